"""The tasks the pipeline trains and evaluates: where each one's labelled data, evaluation data and
unlabelled language-SFT text come from, its labels and its metric.

* ``nusax_senti`` (dataset ``nusax``): sentiment, 3 labels, macro-F1. Labelled training data: the
  NusaX-senti train split of a language; evaluation: its ``valid`` / ``test`` splits; language-SFT
  text: the NusaX-MT train sentences (bundled, a NusaX directory, or the hub).
* ``americasnli`` (dataset ``americasnli``): NLI, 3 labels, accuracy. No training set exists in the
  target languages: offline, the labelled training data of a language is its AmericasNLI *dev* set
  (so a model trained on a language's dev set must never be evaluated on that language: the
  experiments train leave-fold-out); ``eng`` is English MultiNLI from the hub (``multi_nli``, the
  published setting; needs network). Evaluation: ``valid`` is the dev set, ``test`` the test set.
  Language-SFT text: the AmericasNLP 2021 training side of each language (``source`` must be a
  directory laid out as :mod:`deftx.data.americasnli` describes); for ``eng`` (hub) MultiNLI's premises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
from deftx.errors import DataError

Source = str | Path


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str
    labels: tuple[str, ...]
    metric: str                                             # the headline metric: macro_f1 or accuracy
    language_names: dict[str, str]
    _train: Callable[[str, Source], list[Example]]
    _evaluation: Callable[[str, str, Source], list[Example]]
    _text: Callable[[str, Source], list[str]]

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

    def text(self, lang: str, source: Source) -> list[str]:
        """Unlabelled text of ``lang`` for its language SFT."""
        return self._text(lang, source)

    def language_name(self, lang: str) -> str:
        return self.language_names.get(lang, lang)


def _americasnli_train(lang: str, source: Source) -> list[Example]:
    if lang == "eng":
        return load_multinli("train")
    _needs_directory(source)
    return load_americasnli(lang, "dev", source)


def _americasnli_evaluation(lang: str, split: str, source: Source) -> list[Example]:
    if lang == "eng":
        return load_multinli("validation_matched")
    return load_americasnli(lang, "dev" if split == "valid" else "test", source)


def _americasnlp_text(lang: str, source: Source) -> list[str]:
    if lang == "eng":   # the hub setting: English text for the source-language SFT, MultiNLI's premises
        return list(dict.fromkeys(e.text for e in load_multinli("train") if e.text))
    _needs_directory(source)
    return load_americasnlp_text(lang, source)


def _needs_directory(source: Source) -> None:
    if isinstance(source, str) and source in ("bundled", "hub"):
        raise DataError(f"AmericasNLI data source {source!r}: give the AmericasNLI directory (data.source); the "
                        "AmericasNLP text and the final dev release are not on the hub, and nothing is bundled")


TASKS: dict[str, TaskSpec] = {
    "nusax_senti": TaskSpec("nusax_senti", "nusax", NUSAX_LABELS, "macro_f1", dict(NUSAX_LANGUAGE_NAMES),
                            lambda lang, src: load_nusax_senti(lang, "train", src),
                            lambda lang, split, src: load_nusax_senti(lang, split, src),
                            load_nusax_mt_text),
    "americasnli": TaskSpec("americasnli", "americasnli", AMERICASNLI_LABELS, "accuracy",
                            {**AMERICASNLI_LANGUAGES, "eng": "English"},
                            _americasnli_train, _americasnli_evaluation, _americasnlp_text),
}
DATASET_TASK = {spec.dataset: name for name, spec in TASKS.items()}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]
