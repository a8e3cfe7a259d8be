"""NusaX loaders: NusaX-Senti (sentiment classification) and NusaX-MT text (target-language MLM text).

Sources:

* ``"bundled"`` (default): the copy shipped as package data in ``deftx/data/nusax`` (all Senti splits and the
  MT *train* split; see ``deftx/data/nusax/ATTRIBUTION.md``);
* ``"hub"``: the Hugging Face datasets ``indonlp/NusaX-senti`` / ``indonlp/NusaX-MT`` (needs network;
  untested offline);
* a local directory laid out like the NusaX repository: either its ``datasets/`` directory or the
  directory containing ``datasets/`` (``sentiment/<language>/{train,valid,test}.csv``, ``mt/train.csv``).
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from deftx.data.examples import (
    NUSAX_LABELS,
    Example,
    check_width,
    column_index,
    hub_field,
    label_index,
    load_hub_split,
    read_table,
)
from deftx.data.languages import NUSAX_LANGUAGES, check_language
from deftx.errors import DataError

NUSAX_SENTI_HUB_ID = "indonlp/NusaX-senti"
NUSAX_MT_HUB_ID = "indonlp/NusaX-MT"

_SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
_HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
_HUB_FALLBACK = "use source='bundled' or a local directory"


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise DataError(f"unknown NusaX split {split!r}; valid: train, valid (or validation), test")
    return _SPLITS[split]


def _root(source: str | Path) -> Traversable:
    """The directory holding ``sentiment/`` and ``mt/`` for a non-hub ``source``."""
    if isinstance(source, str) and source == "bundled":
        return resources.files("deftx.data") / "nusax"
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"NusaX source must be 'bundled', 'hub' or a directory, not {source!r}")
    path = Path(source)
    for candidate in (path, path / "datasets"):
        if (candidate / "sentiment").is_dir() or (candidate / "mt").is_dir():
            return candidate
    raise DataError(
        f"NusaX source {str(source)!r} is not 'bundled', 'hub' or a NusaX directory "
        "(expected sentiment/ and mt/ in it or in its datasets/ subdirectory)"
    )


def _is_hub(source: str | Path) -> bool:
    return isinstance(source, str) and source == "hub"


def load_nusax_senti(lang: str, split: str, source: str | Path = "bundled") -> list[Example]:
    """Load one NusaX-Senti split of language ``lang`` (a key of ``NUSAX_LANGUAGES``).

    ``split`` is ``"train"`` (500 rows), ``"valid"``/``"validation"`` (100) or ``"test"`` (400).  Labels are
    indices into :data:`NUSAX_LABELS` (0 negative, 1 neutral, 2 positive).  A bad split, a missing file, a
    malformed row or an unknown label raises :class:`DataError` naming the file (and line).
    """
    code = check_language(lang, "nusax")
    split = _check_split(split)
    if _is_hub(source):
        return _senti_from_hub(code, split)
    file = _root(source) / "sentiment" / NUSAX_LANGUAGES[code] / f"{split}.csv"
    header, records = read_table(file)
    text_col = column_index(header, "text", file)
    label_col = column_index(header, "label", file)
    examples = []
    for line, fields in records:
        check_width(fields, header, file, line)
        text = fields[text_col].strip()
        if not text:
            raise DataError(f"{file}: line {line}: empty text")
        label = label_index(fields[label_col], NUSAX_LABELS, f"{file}: line {line}")
        examples.append(Example(text=text, label=label, language=code))
    if not examples:
        raise DataError(f"{file}: no data rows")
    return examples


def _senti_from_hub(code: str, split: str) -> list[Example]:
    """``load_dataset("indonlp/NusaX-senti", code)``: columns id/text/lang/label, label a ClassLabel
    (0 negative, 1 neutral, 2 positive), splits train/validation/test.  Untested offline."""
    hub_split = _HUB_SPLITS[split]
    data = load_hub_split(NUSAX_SENTI_HUB_ID, code, hub_split, _HUB_FALLBACK)
    where = f"{NUSAX_SENTI_HUB_ID} ({code}) {hub_split}"
    examples = []
    for i, row in enumerate(data):
        text = str(hub_field(row, "text", where)).strip()
        label = label_index(hub_field(row, "label", where), NUSAX_LABELS, f"{where} record {i}")
        examples.append(Example(text=text, label=label, language=code))
    return examples


def load_nusax_mt_text(lang: str, source: str | Path = "bundled") -> list[str]:
    """Target-language text for language (MLM) fine-tuning: the ``lang`` column of NusaX-MT **train**.

    Only the train split is ever read: NusaX-MT valid/test are the *same sentences* as the NusaX-Senti
    valid/test sets (translations of one corpus, split identically), so training a language SFT on them
    would mean training on the evaluation inputs.  Returns the 500 train sentences, whitespace-normalised
    (line breaks inside a cell become spaces), with empty cells dropped.
    """
    code = check_language(lang, "nusax")
    if _is_hub(source):
        return _mt_from_hub(code)
    file = _root(source) / "mt" / "train.csv"
    header, records = read_table(file)
    col = column_index(header, NUSAX_LANGUAGES[code], file)
    texts = []
    for line, fields in records:
        check_width(fields, header, file, line)
        text = " ".join(fields[col].split())
        if text:
            texts.append(text)
    if not texts:
        raise DataError(f"{file}: no {NUSAX_LANGUAGES[code]} text")
    return texts


def _mt_from_hub(code: str) -> list[str]:
    """Best effort, UNTESTED OFFLINE.  ``indonlp/NusaX-MT`` has one config per language pair (``"eng-jav"``,
    ...) with columns id/text_1/text_2/text_1_lang/text_2_lang; we read the ``eng-<lang>`` pair (``eng-ind``
    for English) train split and keep the ``lang`` side.  The hub repo is a loading script without a parquet
    export, which recent ``datasets`` releases may refuse to run: prefer ``source='bundled'``."""
    name = "eng-ind" if code == "eng" else f"eng-{code}"
    data = load_hub_split(NUSAX_MT_HUB_ID, name, "train", _HUB_FALLBACK)
    where = f"{NUSAX_MT_HUB_ID} ({name}) train"
    wanted = {code, NUSAX_LANGUAGES[code]}
    texts = []
    for row in data:
        side = "text_1" if code == "eng" else "text_2"  # position in the config name
        for column in ("text_1", "text_2"):
            lang_value = row.get(f"{column}_lang") if hasattr(row, "get") else None
            if isinstance(lang_value, str) and lang_value.strip().lower() in wanted:
                side = column
                break
        text = " ".join(str(hub_field(row, side, where)).split())
        if text:
            texts.append(text)
    return texts
