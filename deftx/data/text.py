"""Unlabelled text of a language, for language SFTs (masked LM): from any text files, and from the
text bundled with deftx for the NusaX languages.

A source is named by a string:

* ``nusax_mt_train``: the language's column of NusaX-MT train (500 sentences; ``deftx/data/nusax``);
* the name of a bundled file, ``deftx/data/nusax_text/<lang>/<name>.txt.gz`` (e.g. ``nllb_seed``,
  ``nusawrites_paragraph``, ``nusawrites_translation``, ``minangnlp_wiki_mt``; provenance, licences
  and the leakage check in ``deftx/data/nusax_text/ATTRIBUTION.md``);
* ``all``: every source of the language, in the order of :func:`text_sources`;
* a path to a text file (``.txt`` or ``.txt.gz``, UTF-8, one sentence or paragraph per line);
  ``{lang}`` in it stands for the language's code, so one setting names each language's own file
  (``/data/wiki/{lang}.txt.gz``);
* ``hf:DATASET[:CONFIG][:SPLIT][:COLUMN]``: a column of a dataset loaded with ``datasets`` (a Hub
  id or a local dataset directory; split ``train`` and column ``text`` unless given), ``{lang}``
  replaced as in paths (``hf:wikimedia/wikipedia:20231101.{lang}``).

:func:`split_held_out` keeps a slice of the lines apart (for held-out MLM loss), chosen by a hash
of each line, so a line stays on its side whatever other sources are added.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from deftx.data.examples import HF_PREFIX, hf_source_parts
from deftx.data.languages import NUSAX_LANGUAGES
from deftx.errors import DataError

NUSAX_MT_TRAIN = "nusax_mt_train"
ALL_SOURCES = "all"
TEXT_SUFFIXES = (".txt.gz", ".txt")


def bundled_text_root() -> Traversable:
    return resources.files("deftx.data") / "nusax_text"


def _bundled_files(lang: str) -> dict[str, Traversable]:
    directory = bundled_text_root() / lang
    if not directory.is_dir():
        return {}
    files = {}
    for entry in directory.iterdir():
        for suffix in TEXT_SUFFIXES:
            if entry.name.endswith(suffix):
                files[entry.name[: -len(suffix)]] = entry
                break
    return dict(sorted(files.items()))


def text_sources(lang: str) -> list[str]:
    """The named sources of ``lang``'s text: ``nusax_mt_train`` for a NusaX language, then the
    bundled files' names (sorted). Empty for a language deftx bundles no text for."""
    names = [NUSAX_MT_TRAIN] if lang in NUSAX_LANGUAGES else []
    return names + list(_bundled_files(lang))


def _normalise(line: str) -> str:
    return " ".join(line.split())


def read_text_file(path: str | os.PathLike | Traversable) -> list[str]:
    """The non-empty lines of a UTF-8 text file (gzip-compressed when its name ends in ``.gz``),
    whitespace collapsed. A missing or undecodable file raises :class:`DataError` naming it."""
    name = str(path)
    try:
        with open(path, "rb") if isinstance(path, (str, os.PathLike)) else path.open("rb") as raw:
            data = raw.read()
    except FileNotFoundError:
        raise DataError(f"{name}: no such text file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, not a text file") from None
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{name}: not a readable gzip file ({exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    return [line for line in (_normalise(raw) for raw in text.splitlines()) if line]


LANG_PLACEHOLDER = "{lang}"


def language_path(source: str, lang: str) -> Path:
    """The file a path source names for ``lang`` (``{lang}`` replaced by its code, ``~`` expanded)."""
    return Path(source.replace(LANG_PLACEHOLDER, lang)).expanduser()


def _is_path(source: str) -> bool:
    return source.startswith(HF_PREFIX) or os.sep in source or "/" in source or source.endswith(TEXT_SUFFIXES)


def read_hf_text(source: str) -> list[str]:
    """The non-empty values of one text column of a dataset (``hf:DATASET[:CONFIG][:SPLIT][:COLUMN]``)."""
    from deftx.data.examples import load_hub_split

    name, config, split, column = hf_source_parts(source, ("CONFIG", "SPLIT", "COLUMN"))
    data = load_hub_split(name, config or None, split or "train", "or give .txt / .txt.gz files")
    column = column or "text"
    columns = list(getattr(data, "column_names", []) or [])
    if columns and column not in columns:
        raise DataError(f"{source}: no column {column!r} (columns: {', '.join(columns)}); name it as the 4th part")
    lines = []
    for value in data[column] if columns else (row[column] for row in data):
        if isinstance(value, str):
            lines += [line for line in (_normalise(raw) for raw in value.splitlines()) if line]
    return lines


def resolve_sources(lang: str, sources: str | Sequence[str]) -> list[str]:
    """``sources`` with ``all`` expanded, checked: every name must be a source of ``lang`` (or a
    path). Raises :class:`DataError` listing the valid names."""
    wanted = [sources] if isinstance(sources, str) else list(sources)
    if not wanted:
        raise DataError(f"no text source given for {lang}")
    available = text_sources(lang)
    out: list[str] = []
    for source in wanted:
        names = available if source == ALL_SOURCES else [source]
        if source == ALL_SOURCES and not available:
            raise DataError(f"deftx bundles no text for {lang!r}: give text files instead of 'all'")
        for name in names:
            if name not in available and not _is_path(name):
                valid = ", ".join([*available, ALL_SOURCES]) if available else "none bundled; give file paths"
                raise DataError(f"unknown text source {name!r} for {lang}; valid: {valid}, a .txt/.txt.gz path "
                                f"or hf:DATASET[:CONFIG][:SPLIT][:COLUMN]")
            if name not in out:
                out.append(name)
    return out


def load_language_text(lang: str, sources: str | Sequence[str] = (NUSAX_MT_TRAIN,),
                       nusax_source: str | Path = "bundled") -> list[str]:
    """The lines of ``lang``'s text from ``sources`` (see the module's docstring), in source order,
    each distinct line once. ``nusax_source`` is where NusaX-MT train is read from (as in
    :func:`deftx.data.load_nusax_mt_text`)."""
    from deftx.data.nusax import load_nusax_mt_text

    bundled = _bundled_files(lang)
    seen: set[str] = set()
    lines: list[str] = []
    for source in resolve_sources(lang, sources):
        if source == NUSAX_MT_TRAIN:
            part = load_nusax_mt_text(lang, nusax_source)
        elif source in bundled:
            part = read_text_file(bundled[source])
        elif source.startswith(HF_PREFIX):
            part = read_hf_text(source.replace(LANG_PLACEHOLDER, lang))
            if not part:
                raise DataError(f"{source}: no text in it")
        else:
            part = read_text_file(language_path(source, lang))
            if not part:
                raise DataError(f"{source}: no text in it")
        for line in part:
            if line not in seen:
                seen.add(line)
                lines.append(line)
    return lines


def is_held_out(line: str, fraction: float) -> bool:
    """Whether ``line`` belongs to the held-out slice of about ``fraction`` of all lines (decided
    by a hash of the line alone)."""
    bucket = int.from_bytes(hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest(), "little")
    return bucket % 1_000_000 < round(fraction * 1_000_000)


def split_held_out(lines: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training lines, held-out lines): about ``fraction`` of the lines are held out, each by a
    hash of its text, so the split of a line never depends on the other lines."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    train, held = [], []
    for line in lines:
        (held if is_held_out(line, fraction) else train).append(line)
    return train, held
