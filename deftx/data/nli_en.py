"""English NLI pairs bundled with deftx (MultiNLI dev_matched and SNLI dev; provenance, licences
and the leakage note in ``deftx/data/nli_en/ATTRIBUTION.md``): the labelled source-language data
for AmericasNLI's zero-shot transfer."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from importlib import resources

from deftx.data.examples import AMERICASNLI_LABELS, Example, label_index
from deftx.errors import DataError

ENGLISH_NLI_FILES = ("mnli_dev_matched", "snli_dev")
ENGLISH_NLI_VALID_FRACTION = 0.05
_HEADER = ["premise", "hypothesis", "label"]


def load_english_nli(files: Sequence[str] = ENGLISH_NLI_FILES) -> list[Example]:
    """The labelled pairs of the bundled ``files`` (by name, in order): ``Example.text`` the
    premise, ``text_pair`` the hypothesis, labels indexing :data:`AMERICASNLI_LABELS` (0
    entailment, 1 neutral, 2 contradiction), language ``eng``."""
    unknown = [f for f in files if f not in ENGLISH_NLI_FILES]
    if unknown or not files:
        raise DataError(f"unknown English NLI file {repr(unknown[0]) if unknown else '(none given)'}; "
                        f"valid: {', '.join(ENGLISH_NLI_FILES)}")
    examples: list[Example] = []
    for name in files:
        entry = resources.files("deftx.data") / "nli_en" / f"{name}.tsv.gz"
        with entry.open("rb") as raw:
            lines = gzip.decompress(raw.read()).decode("utf-8").splitlines()
        if not lines or lines[0].split("\t") != _HEADER:
            raise DataError(f"{entry}: expected the header {' / '.join(_HEADER)}")
        for number, line in enumerate(lines[1:], start=2):
            fields = line.split("\t")
            if len(fields) != 3 or not fields[0].strip() or not fields[1].strip():
                raise DataError(f"{entry}: line {number}: expected a premise, a hypothesis and a label")
            label = label_index(fields[2], AMERICASNLI_LABELS, f"{entry}: line {number}")
            examples.append(Example(text=fields[0].strip(), text_pair=fields[1].strip(), label=label,
                                    language="eng"))
    return examples


def english_nli_split(split: str) -> list[Example]:
    """The bundled pairs as a training and a validation split: ``valid`` holds about 5% of the
    pairs, chosen by a hash of premise and hypothesis (:func:`deftx.data.text.is_held_out`), ``train``
    the rest. There is no separate English test set: ``test`` is the validation split too."""
    from deftx.data.text import is_held_out

    if split not in ("train", "valid", "test"):
        raise DataError(f"unknown English NLI split {split!r}; valid: train, valid, test")
    held = split != "train"
    return [e for e in load_english_nli()
            if is_held_out(f"{e.text}\t{e.text_pair}", ENGLISH_NLI_VALID_FRACTION) == held]
