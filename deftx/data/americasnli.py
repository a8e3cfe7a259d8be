"""AmericasNLI (NLI evaluation in 10 indigenous languages of the Americas), AmericasNLP-2021 unlabelled
target-language text, and MultiNLI (the English source-task training data).

AmericasNLI's final (ACL 2022) dev and test sets are bundled with deftx (``source="bundled"``;
provenance and licence in ``deftx/data/americasnli/ATTRIBUTION.md``); the AmericasNLP 2021 text and the
first (2021) dev release are not. ``source`` is ``"bundled"``, or a directory laid out as below::

    dev/<code>.tsv                 final (ACL 2022) dev release; columns id, language, premise,
                                   hypothesis, label
    test/<code>.tsv                test (identical in both releases)
    nala-cub_v1/dev/<code>.tsv     first (2021) dev release; columns language, premise, hypothesis, label
    unlabeled/americasnlp2021/train.<code>   one sentence per line (dict.quy for Quechua)

or ``"hub"`` for the Hugging Face dataset ``nala-cub/americas_nli`` (untested offline), whose validation
split is the *v1* dev release (e.g. 376 Nahuatl rows, not 585).
"""

from __future__ import annotations

import csv
import os
from importlib import resources
from pathlib import Path

from deftx.data.examples import (
    AMERICASNLI_LABELS,
    Example,
    check_width,
    column_index,
    hub_field,
    label_index,
    load_hub_split,
    read_table,
)
from deftx.data.languages import check_language
from deftx.errors import DataError

AMERICASNLI_HUB_ID = "nala-cub/americas_nli"
MULTINLI_HUB_ID = "nyu-mll/multi_nli"

_SPLITS = {"dev": "dev", "valid": "dev", "validation": "dev", "test": "test"}
_DEV_RELEASES = ("final", "v1")
_MULTINLI_SPLITS = ("train", "validation_matched", "validation_mismatched")


def _directory(source: str | Path, what: str) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"{what} source must be 'bundled', 'hub' or a directory, not {source!r}")
    path = Path(source)
    if not path.is_dir():
        raise DataError(f"{what} directory not found: {path} (expected a directory laid out like the "
                        "AmericasNLI data directory: dev/, test/, nala-cub_v1/dev/, unlabeled/)")
    return path


def load_americasnli(
    lang: str, split: str, source: str | Path, dev_release: str = "final"
) -> list[Example]:
    """Load AmericasNLI ``split`` (``"dev"``/``"validation"`` or ``"test"``) of language ``lang``.

    ``Example.text`` is the premise, ``Example.text_pair`` the hypothesis; labels index
    :data:`AMERICASNLI_LABELS` (0 entailment, 1 neutral, 2 contradiction).  ``dev_release`` selects the dev
    set: ``"final"`` (``dev/``, ACL 2022) or ``"v1"`` (``nala-cub_v1/dev/``, the one the hub and earlier
    papers use); the test set is the same in both.  With ``source="hub"`` only ``dev_release="v1"`` exists
    for the dev split, so asking the hub for the final dev release raises :class:`DataError`.
    """
    code = check_language(lang, "americasnli")
    if split not in _SPLITS:
        raise DataError(f"unknown AmericasNLI split {split!r}; valid: dev (or validation), test")
    split = _SPLITS[split]
    if dev_release not in _DEV_RELEASES:
        raise DataError(f"unknown AmericasNLI dev release {dev_release!r}; valid: {', '.join(_DEV_RELEASES)}")
    if isinstance(source, str) and source == "hub":
        if split == "dev" and dev_release != "v1":
            raise DataError(
                f"the hub dataset {AMERICASNLI_HUB_ID!r} only has the v1 dev release; pass dev_release='v1' "
                "or a local AmericasNLI directory for the final release"
            )
        return _americasnli_from_hub(code, split)
    if isinstance(source, str) and source == "bundled":
        if split == "dev" and dev_release != "final":
            raise DataError("only the final AmericasNLI dev release is bundled; give a directory with "
                            "nala-cub_v1/dev/ or 'hub' for the v1 release")
        file = resources.files("deftx.data") / "americasnli" / split / f"{code}.tsv.gz"
        return _read_americasnli(file, code)
    root = _directory(source, "AmericasNLI")
    if split == "test":
        file = root / "test" / f"{code}.tsv"
    elif dev_release == "final":
        file = root / "dev" / f"{code}.tsv"
    else:
        file = root / "nala-cub_v1" / "dev" / f"{code}.tsv"
    return _read_americasnli(file, code)


def _read_americasnli(file, code: str) -> list[Example]:
    header, records = read_table(file, delimiter="\t", quoting=csv.QUOTE_NONE)
    premise_col = column_index(header, "premise", file)
    hypothesis_col = column_index(header, "hypothesis", file)
    label_col = column_index(header, "label", file)
    examples = []
    for line, fields in records:
        check_width(fields, header, file, line)
        # Kept even if empty: the official nah test set has 3 rows whose premise is a single space.
        premise, hypothesis = fields[premise_col].strip(), fields[hypothesis_col].strip()
        label = label_index(fields[label_col], AMERICASNLI_LABELS, f"{file}: line {line}")
        examples.append(Example(text=premise, label=label, text_pair=hypothesis, language=code))
    if not examples:
        raise DataError(f"{file}: no data rows")
    return examples


def _americasnli_from_hub(code: str, split: str) -> list[Example]:
    """``load_dataset("nala-cub/americas_nli", code)``: splits validation/test, columns premise/hypothesis/
    label (ClassLabel 0 entailment, 1 neutral, 2 contradiction).  Untested offline."""
    hub_split = "validation" if split == "dev" else "test"
    data = load_hub_split(AMERICASNLI_HUB_ID, code, hub_split, "use a local AmericasNLI directory as source")
    return _nli_examples(data, f"{AMERICASNLI_HUB_ID} ({code}) {hub_split}", code)


def _nli_examples(data: object, where: str, language: str) -> list[Example]:
    """Hub NLI records -> examples; records with label -1 (no gold label) are dropped."""
    examples = []
    for i, row in enumerate(data):  # type: ignore[attr-defined]
        label = hub_field(row, "label", where)
        if label == -1:
            continue
        examples.append(
            Example(
                text=str(hub_field(row, "premise", where)).strip(),
                label=label_index(label, AMERICASNLI_LABELS, f"{where} record {i}"),
                text_pair=str(hub_field(row, "hypothesis", where)).strip(),
                language=language,
            )
        )
    return examples


def load_americasnlp_text(lang: str, source: str | Path, max_lines: int | None = None) -> list[str]:
    """Unlabelled target-language text (AmericasNLP 2021 shared-task training side), for language SFTs.

    Reads ``unlabeled/americasnlp2021/train.<code>`` (``dict.quy`` for Quechua, whose JW300 train file is not
    available) under ``source``; ``source`` may also be the ``americasnlp2021`` directory itself.  Returns
    stripped, non-empty lines, at most ``max_lines`` of them (the first ones) if given.
    """
    code = check_language(lang, "americasnli")
    if max_lines is not None and max_lines < 0:
        raise DataError(f"max_lines must be >= 0, got {max_lines}")
    root = _directory(source, "AmericasNLP text")
    name = "dict.quy" if code == "quy" else f"train.{code}"
    candidates = [root / "unlabeled" / "americasnlp2021" / name, root / name]
    file = next((c for c in candidates if c.is_file()), candidates[0])
    if not file.is_file():
        raise DataError(f"missing data file: {file}")
    lines: list[str] = []
    try:
        with file.open(encoding="utf-8-sig") as handle:
            for raw in handle:
                if max_lines is not None and len(lines) >= max_lines:
                    break
                text = raw.strip()
                if text:
                    lines.append(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {file}: {exc}") from exc
    if not lines and max_lines != 0:
        raise DataError(f"{file}: no text")
    return lines


def load_multinli(split: str = "train") -> list[Example]:
    """MultiNLI from the hub (``nyu-mll/multi_nli``; needs network, untested offline).

    ``split`` is ``"train"``, ``"validation_matched"`` or ``"validation_mismatched"``.  Labels are already
    0 entailment, 1 neutral, 2 contradiction; records with label -1 are dropped.  ``Example.language`` is
    ``"eng"``.
    """
    if split not in _MULTINLI_SPLITS:
        raise DataError(f"unknown MultiNLI split {split!r}; valid: {', '.join(_MULTINLI_SPLITS)}")
    data = load_hub_split(MULTINLI_HUB_ID, None, split, "MultiNLI is only available from the hub")
    return _nli_examples(data, f"{MULTINLI_HUB_ID} {split}", "eng")
