"""Labelled classification data from your own files or a Hugging Face dataset.

A *table* is one split of one language's labelled examples, named by a string:

* a local file: ``.csv``, ``.tsv`` (a header row names the columns) or ``.jsonl`` (one JSON object
  per line), optionally gzip-compressed (``.csv.gz``, ...), UTF-8;
* ``hf:DATASET[:CONFIG][:SPLIT]``: a dataset through ``datasets.load_dataset`` (a Hub id, or a local
  dataset directory), split ``train`` unless given. A ``ClassLabel`` column gives its label names.

Columns are configurable: the text, an optional second text (``pair``, e.g. an NLI hypothesis) and
the label. Labels are strings (a JSON number or a ``ClassLabel`` index becomes its name). The label
set is given explicitly, or inferred from the training tables: their distinct labels, sorted (as
numbers when they all are), so that training and every later evaluation agree on the class ids.
Every problem (missing file or column, empty text, unknown label) is a one-line
:class:`~deftx.errors.DataError` naming the table and, for a file, the line.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deftx.data.examples import (
    HF_PREFIX,
    Example,
    check_width,
    column_index,
    hf_source_parts,
    load_hub_split,
    read_table,
)
from deftx.errors import DataError

DELIMITERS = {".csv": ",", ".tsv": "\t"}
FORMATS = (".csv", ".tsv", ".jsonl")


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text, the optional second text, and the label."""

    text: str = "text"
    pair: str | None = None
    label: str = "label"


@dataclass(frozen=True)
class Row:
    text: str
    pair: str | None
    label: str
    where: str   # "<file>: line N" or "<dataset>: row N", for messages


def table_format(source: str) -> str:
    """``csv``, ``tsv``, ``jsonl`` or ``hf`` for a table name; DataError for anything else."""
    if source.startswith(HF_PREFIX):
        return "hf"
    name = source[:-3] if source.endswith(".gz") else source
    for suffix in FORMATS:
        if name.endswith(suffix):
            return suffix[1:]
    raise DataError(f"{source}: unknown table format; use a .csv, .tsv or .jsonl file (optionally .gz) or "
                    f"hf:DATASET[:CONFIG][:SPLIT]")


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """``hf:DATASET[:CONFIG][:SPLIT]`` -> (dataset, config or None, split)."""
    name, config, split = hf_source_parts(source, ("CONFIG", "SPLIT"))
    return name, config or None, split or "train"


def _label_text(value: object, where: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise DataError(f"{where}: label {value!r} is not a string or a number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: empty label")
    return text


def _text(value: object, column: str, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: column {column!r} is empty or not text")
    return value.strip()


def _read_delimited(path: Path, columns: Columns, delimiter: str) -> list[Row]:
    header, records = read_table(path, delimiter=delimiter)
    text_i = column_index(header, columns.text, path)
    label_i = column_index(header, columns.label, path)
    pair_i = column_index(header, columns.pair, path) if columns.pair else None
    rows = []
    for line, fields in records:
        check_width(fields, header, path, line)
        where = f"{path}: line {line}"
        rows.append(Row(_text(fields[text_i], columns.text, where),   # type: ignore[arg-type]
                        _text(fields[pair_i], columns.pair, where) if pair_i is not None else None,
                        _label_text(fields[label_i], where), where))
    return rows


def _read_jsonl(path: Path, columns: Columns) -> list[Row]:
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"missing data file: {path}") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        for name in (columns.text, columns.label, *([columns.pair] if columns.pair else [])):
            if name not in record:
                raise DataError(f"{where}: no {name!r} field (fields: {', '.join(record)})")
        rows.append(Row(_text(record[columns.text], columns.text, where),   # type: ignore[arg-type]
                        _text(record[columns.pair], columns.pair, where) if columns.pair else None,
                        _label_text(record[columns.label], where), where))
    return rows


def _read_hf(source: str, columns: Columns) -> list[Row]:
    dataset, config, split = parse_hf(source)
    data = load_hub_split(dataset, config, split, "or give local .csv/.tsv/.jsonl files")
    names = list(getattr(data, "column_names", []) or [])
    for name in (columns.text, columns.label, *([columns.pair] if columns.pair else [])):
        if names and name not in names:
            raise DataError(f"{source}: no column {name!r} (columns: {', '.join(names)})")
    feature = getattr(data, "features", {}).get(columns.label) if hasattr(data, "features") else None
    class_names = list(getattr(feature, "names", None) or [])
    rows = []
    for number, record in enumerate(data):
        where = f"{source}: row {number}"
        label = record[columns.label]
        if class_names and isinstance(label, int) and not isinstance(label, bool):
            if label < 0:
                continue   # ClassLabel -1: unlabelled (e.g. a hidden test split)
            label = class_names[label]
        rows.append(Row(_text(record[columns.text], columns.text, where),   # type: ignore[arg-type]
                        _text(record[columns.pair], columns.pair, where) if columns.pair else None,
                        _label_text(label, where), where))
    return rows


def read_rows(source: str, columns: Columns = Columns()) -> list[Row]:
    """The rows of one table (see the module docstring); a table without rows is an error."""
    kind = table_format(source)
    if kind == "hf":
        rows = _read_hf(source, columns)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"missing data file: {path}")
        rows = _read_jsonl(path, columns) if kind == "jsonl" else _read_delimited(path, columns, DELIMITERS["." + kind])
    if not rows:
        raise DataError(f"{source}: no examples in it")
    return rows


def infer_labels(label_values: Iterable[str]) -> tuple[str, ...]:
    """The distinct labels, sorted: numerically when every label is an integer, else as text."""
    distinct = sorted(set(label_values))
    if distinct and all(v.lstrip("-").isdigit() for v in distinct):
        distinct.sort(key=int)
    return tuple(distinct)


def to_examples(rows: Sequence[Row], labels: Sequence[str], language: str) -> list[Example]:
    """``rows`` as :class:`Example` records with class ids into ``labels``."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for row in rows:
        if row.label not in index:
            raise DataError(f"{row.where}: unknown label {row.label!r}; expected one of {', '.join(labels)}")
        out.append(Example(row.text, index[row.label], row.pair, language))
    return out


def load_table(source: str, labels: Sequence[str], language: str, columns: Columns = Columns()) -> list[Example]:
    """One table's examples with class ids into ``labels``."""
    return to_examples(read_rows(source, columns), labels, language)
