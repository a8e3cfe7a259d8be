"""The task-agnostic :class:`Example` record, label names, and small I/O helpers shared by the loaders.

The helpers turn every way a data file can be wrong (missing, undecodable, a missing column, a row with the
wrong number of fields, an unknown label) into a one-line :class:`~deftx.errors.DataError` naming the file
and, for a bad row, the line on which that row starts.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any

from deftx.errors import DataError

NUSAX_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
"""NusaX-Senti label names; index = class id (composable-sft's mapping 0/1/2)."""

AMERICASNLI_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
"""AmericasNLI / MultiNLI / XNLI label names; index = class id."""


@dataclass(frozen=True)
class Example:
    """One labelled example: a text (or a text pair, for NLI) and a class index."""

    text: str
    label: int
    """Index into the dataset's label names (:data:`NUSAX_LABELS` or :data:`AMERICASNLI_LABELS`)."""
    text_pair: str | None = None
    """Second segment (NLI hypothesis), ``None`` for single-text tasks."""
    language: str = ""
    """Language code of the text (``"jav"``, ``"aym"``, ...)."""


def label_index(value: object, labels: tuple[str, ...], where: str) -> int:
    """Map a label name (case-insensitive) or a class index to an index into ``labels``.

    ``where`` prefixes the error message (e.g. ``"<file>: line 7"``).
    """
    if isinstance(value, str):
        name = value.strip().lower()
        if name in labels:
            return labels.index(name)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    raise DataError(f"{where}: unknown label {value!r}; expected one of {', '.join(labels)}")


def _open_text(file: Traversable):
    """``file`` as UTF-8 text (an optional BOM dropped), gunzipped when its name ends in ``.gz``."""
    if file.name.endswith(".gz"):
        return io.StringIO(gzip.decompress(file.read_bytes()).decode("utf-8-sig"), newline="")
    return file.open("r", encoding="utf-8-sig", newline="")


def read_table(
    file: Traversable, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Read a delimited text file with a header row (UTF-8, an optional BOM is dropped; gzip-compressed
    when the name ends in ``.gz``).

    Returns the header and ``(line number, fields)`` for every non-blank record; the line number is the
    physical line on which the record starts (records may span lines inside quotes).
    """
    if not file.is_file():
        raise DataError(f"missing data file: {file}")
    line = 0
    records: list[tuple[int, list[str]]] = []
    try:
        with _open_text(file) as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
            header = next(reader, None)
            line = reader.line_num
            for fields in reader:
                if fields:
                    records.append((line + 1, fields))
                line = reader.line_num
    except (csv.Error, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{file}: line {line + 1}: cannot parse: {exc}") from exc
    except OSError as exc:
        raise DataError(f"cannot read data file {file}: {exc}") from exc
    if header is None:
        raise DataError(f"{file}: empty file (expected a header row)")
    return [name.strip() for name in header], records


def column_index(header: list[str], name: str, file: object) -> int:
    """Position of column ``name`` in ``header``; :class:`DataError` naming ``file`` if absent."""
    try:
        return header.index(name)
    except ValueError:
        raise DataError(f"{file}: missing column {name!r} (header: {', '.join(header)})") from None


def check_width(fields: list[str], header: list[str], file: object, line: int) -> None:
    """Raise :class:`DataError` if a record does not have one field per header column."""
    if len(fields) != len(header):
        raise DataError(f"{file}: line {line}: expected {len(header)} fields, got {len(fields)}")


HF_PREFIX = "hf:"


def hf_source_parts(source: str, names: tuple[str, ...]) -> list[str]:
    """``hf:DATASET[:A][:B]...`` split into DATASET and one part per name of ``names`` (empty when
    not given); a :class:`DataError` showing the expected form otherwise."""
    parts = source[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 1 + len(names):
        raise DataError(f"{source}: expected hf:DATASET" + "".join(f"[:{n}]" for n in names))
    return parts + [""] * (1 + len(names) - len(parts))


def load_hub_split(path: str, name: str | None, split: str, fallback: str) -> Any:
    """``datasets.load_dataset(path, name, split=split)``, with failures as one-line :class:`DataError`.

    ``datasets`` is imported here, not at module import, so ``import deftx.data`` stays fast.  ``fallback``
    tells the user what to use instead (e.g. ``"use source='bundled' or a local directory"``).
    """
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(f"the 'datasets' package is needed to load {path!r} from the hub: {exc}") from exc
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub/network/format failure becomes a DataError
        text = str(exc).strip().splitlines()
        reason = text[0][:300] if text else type(exc).__name__
        raise DataError(
            f"could not load {path!r}{f' ({name})' if name else ''} split {split!r} from the Hugging Face hub"
            f" (no network?): {reason}; {fallback}"
        ) from exc


def hub_field(row: Any, column: str, where: str) -> Any:
    """``row[column]`` for a hub record, with a :class:`DataError` if the column is missing."""
    try:
        return row[column]
    except (KeyError, TypeError, IndexError):
        raise DataError(f"{where}: record has no {column!r} column") from None
