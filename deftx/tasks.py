"""The tasks the pipeline trains and evaluates: where each one's labelled data, evaluation data and
unlabelled language-SFT text come from, its labels and its metric.

* ``nusax_senti`` (dataset ``nusax``): sentiment, 3 labels, macro-F1. Labelled training data: the
  NusaX-senti train split of a language; evaluation: its ``valid`` / ``test`` splits; language-SFT
  text: the NusaX-MT train sentences (bundled, a NusaX directory, or the hub), or the sources named
  by ``language_sft.text`` (the bundled NusaX text, text files; :mod:`deftx.data.text`).
* ``americasnli`` (dataset ``americasnli``): NLI, 3 labels, accuracy. No training set exists in the
  target languages: offline, the labelled training data of a language is its AmericasNLI *dev* set
  (so a model trained on a language's dev set must never be evaluated on that language: the
  experiments train leave-fold-out); ``eng`` is the bundled English NLI pairs (MultiNLI dev_matched
  and SNLI dev, 95% train / 5% valid; :mod:`deftx.data.nli_en`), or with ``source: hub`` MultiNLI
  train (``multi_nli``, the published setting; needs network). Evaluation: ``valid`` is the dev set,
  ``test`` the test set. Language-SFT text: the AmericasNLP 2021 training side of each language
  (``source`` must be a directory laid out as :mod:`deftx.data.americasnli` describes); for ``eng``
  the training pairs' premises and hypotheses (hub: MultiNLI's premises).
* ``table`` (dataset ``table``): your own labelled files or Hugging Face datasets, per language and
  split (``data.table``, :mod:`deftx.data.tables`), with the labels given or inferred from the
  training tables and the metric you choose; language-SFT text: ``language_sft.text`` (required).
  Its :class:`TaskSpec` is built from the configuration (:func:`spec_of`), its name is
  ``data.table.name``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from deftx.data import (
    AMERICASNLI_LABELS,
    AMERICASNLI_LANGUAGES,
    NUSAX_LABELS,
    NUSAX_LANGUAGE_NAMES,
    Example,
    load_americasnli,
    load_americasnlp_text,
    load_multinli,
    load_nusax_mt_text,
    load_nusax_senti,
)
from deftx.data.nli_en import english_nli_split
from deftx.data.tables import Columns, Row, infer_labels, read_rows, to_examples
from deftx.data.text import load_language_text, split_held_out
from deftx.errors import DataError

Source = str | Path


class TextSettings(Protocol):
    """What :meth:`TaskSpec.adaptation_text` reads of a language-SFT config (``SFTConfig``)."""

    text: list[str] | None
    held_out: float
    max_train_examples: int | None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str
    labels: tuple[str, ...]
    metric: str                                             # the headline metric: macro_f1 or accuracy
    language_names: dict[str, str]
    _train: Callable[[str, Source], list[Example]]
    _evaluation: Callable[[str, str, Source], list[Example]]
    _text: Callable[[str, Source, Sequence[str] | None], list[str]]
    _has: Callable[[str, str], bool] | None = None   # (language, split) -> is there data? (default: yes)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def train(self, lang: str, source: Source) -> list[Example]:
        """Labelled training examples of ``lang``."""
        return self._train(lang, source)

    def evaluation(self, lang: str, split: str, source: Source) -> list[Example]:
        """Evaluation examples of ``lang``: ``split`` is ``valid`` or ``test``."""
        if split not in ("valid", "test"):
            raise DataError(f"unknown evaluation split {split!r}; valid: valid, test")
        return self._evaluation(lang, split, source)

    def text(self, lang: str, source: Source, sources: Sequence[str] | None = None) -> list[str]:
        """Unlabelled text of ``lang`` for its language SFT: the task's default text, or ``sources``
        (``language_sft.text``: names of bundled sources or file paths, see :mod:`deftx.data.text`)."""
        return self._text(lang, source, sources)

    def adaptation_text(self, lang: str, source: Source, sft_cfg: TextSettings, part: str = "train") -> list[str]:
        """``lang``'s text under a language-SFT config: ``part`` ``train`` is what its MLM head
        warm-up and phases train on (held-out lines removed, then ``max_train_examples`` kept),
        ``held_out`` the lines kept apart for the held-out MLM loss (``sft_cfg.held_out``)."""
        if part not in ("train", "held_out"):
            raise ValueError(f"unknown part {part!r}; valid: train, held_out")
        train, held = split_held_out(self.text(lang, source, sft_cfg.text), sft_cfg.held_out)
        if part == "held_out":
            return held
        limit = sft_cfg.max_train_examples
        return train if limit is None else train[:limit]

    def has(self, lang: str, split: str) -> bool:
        """Whether ``lang`` has a ``split`` (``train``, ``valid`` or ``test``) in this task's data."""
        return True if self._has is None else self._has(lang, split)

    def language_name(self, lang: str) -> str:
        return self.language_names.get(lang, lang)


def _americasnli_train(lang: str, source: Source) -> list[Example]:
    if lang == "eng":
        return load_multinli("train") if _is_hub(source) else english_nli_split("train")
    if _is_hub(source):
        raise DataError("AmericasNLI's labelled target-language data (the final dev release, for leave-fold-out "
                        "training) is not on the hub: use data.source 'bundled' or a directory")
    return load_americasnli(lang, "dev", source)


def _americasnli_evaluation(lang: str, split: str, source: Source) -> list[Example]:
    if lang == "eng":
        return load_multinli("validation_matched") if _is_hub(source) else english_nli_split(split)
    return load_americasnli(lang, "dev" if split == "valid" else "test", source)


def _is_hub(source: Source) -> bool:
    return isinstance(source, str) and source == "hub"


def _nusax_text(lang: str, source: Source, sources: Sequence[str] | None) -> list[str]:
    if sources is None:
        return load_nusax_mt_text(lang, source)
    return load_language_text(lang, sources, nusax_source=source)


def _americasnlp_text(lang: str, source: Source, sources: Sequence[str] | None) -> list[str]:
    if sources is not None:   # the user's own files
        return load_language_text(lang, sources)
    if lang == "eng":   # English text for the source-language SFT: the training pairs' sentences
        if _is_hub(source):   # the published setting: MultiNLI's premises
            return list(dict.fromkeys(e.text for e in load_multinli("train") if e.text))
        return list(dict.fromkeys(t for e in english_nli_split("train") for t in (e.text, e.text_pair) if t))
    if isinstance(source, str) and source in ("bundled", "hub"):
        raise DataError(f"{lang}: no text for its language SFT: the AmericasNLP 2021 text is neither bundled nor "
                        "on the hub (no licence covers redistributing it); name each language's file with "
                        "language_sft.text (e.g. [/data/americasnlp2021/train.{lang}], {lang} standing for the "
                        "code), or give a directory laid out as in deftx/data/americasnli.py as data.source")
    return load_americasnlp_text(lang, source)


TASKS: dict[str, TaskSpec] = {
    "nusax_senti": TaskSpec("nusax_senti", "nusax", NUSAX_LABELS, "macro_f1", dict(NUSAX_LANGUAGE_NAMES),
                            lambda lang, src: load_nusax_senti(lang, "train", src),
                            lambda lang, split, src: load_nusax_senti(lang, split, src),
                            _nusax_text),
    "americasnli": TaskSpec("americasnli", "americasnli", AMERICASNLI_LABELS, "accuracy",
                            {**AMERICASNLI_LANGUAGES, "eng": "English"},
                            _americasnli_train, _americasnli_evaluation, _americasnlp_text),
}
TABLE_TASK = "table"
DATASET_TASK = {**{spec.dataset: name for name, spec in TASKS.items()}, "table": TABLE_TASK}


def task_spec(name: str | TaskSpec) -> TaskSpec:
    """A built-in task by name (a :class:`TaskSpec` is returned as it is)."""
    if isinstance(name, TaskSpec):
        return name
    if name == TABLE_TASK:
        raise DataError("the table task is defined by its configuration: use spec_of(config)")
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


def spec_of(cfg) -> TaskSpec:
    """The task of a pipeline configuration: a built-in one, or the table task of ``cfg.data.table``."""
    if cfg.data.dataset == "table":
        return table_task(cfg.data.table)
    return task_spec(cfg.task)


@functools.lru_cache(maxsize=64)
def _rows(source: str, columns: Columns) -> tuple[Row, ...]:
    return tuple(read_rows(source, columns))


def table_task(table) -> TaskSpec:
    """The task of your own tables (``TableConfig``; see :mod:`deftx.data.tables`)."""
    columns = Columns(table.text_column, table.pair_column, table.label_column)
    if table.labels:
        labels = tuple(table.labels)
    else:
        labels = infer_labels(row.label for source in table.train.values() for row in _rows(source, columns))
        if len(labels) < 2:
            raise DataError(f"data.table.train: found a single label ({', '.join(labels)}); a classifier needs two")

    def table_of(split: str, lang: str) -> str:
        tables = getattr(table, split)
        if lang not in tables:
            raise DataError(f"data.table.{split}: no table for {lang!r} (have: {', '.join(tables) or 'none'})")
        return tables[lang]

    def train(lang: str, source: Source) -> list[Example]:
        return to_examples(_rows(table_of("train", lang), columns), labels, lang)

    def evaluation(lang: str, split: str, source: Source) -> list[Example]:
        return to_examples(_rows(table_of(split, lang), columns), labels, lang)

    def text(lang: str, source: Source, sources: Sequence[str] | None) -> list[str]:
        if sources is None:
            raise DataError("dataset 'table' has no default text for language SFTs: set language_sft.text")
        return load_language_text(lang, sources)

    return TaskSpec(table.name, "table", labels, table.metric, {}, train, evaluation, text,
                    lambda lang, split: lang in getattr(table, split))
