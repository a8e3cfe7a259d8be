"""The SFT artifact: a sparse difference over a base model's encoder plus a dense head.

On disk an SFT is a directory with two files (and a model card, ``README.md``, generated from the
metadata for people and the Hugging Face Hub; see ``deftx.core.card``):

* ``sft.safetensors``: per maskable tensor its changed entries' flat row-major indices (strictly
  increasing) and ``diff/<name>/values`` (float32); per head tensor ``head/<name>`` (absolute
  values, dense). Body names are relative to the base model
  (``encoder.layer.0.attention.self.query.weight``), head names are full model names.
  Format version 2 (written by default) stores an index as its block of 65,536 entries and its
  offset in that block: ``diff/<name>/blocks`` (int32, the number of entries in each block of the
  tensor) and ``diff/<name>/offsets`` (int16, offset - 32768). That is 2 bytes per entry instead of
  8, so an SFT takes about 6 bytes per changed entry. Version 1 stored ``diff/<name>/indices``
  (int64); deftx reads both and can still write version 1 (``save(..., format_version=1)``).
* ``sft.json``: metadata (format version, kind, language, task, method and hyperparameters, base
  model id and weight fingerprint, tokenizer, label names, training data, metrics, deftx version),
  the expected shape and entry count of every tensor, and the SHA-256 of ``sft.safetensors``.

``load`` validates everything it can without a model (checksum, keys, dtypes, shapes, index
bounds, duplicates); ``apply`` also checks the base fingerprint and shapes against the model.
Every problem raises :class:`deftx.errors.SFTFormatError` with a one-line message naming the file.
Writes are atomic (``deftx.core.io.atomic_directory``). ``apply`` records the entries it overwrites, so
``revert`` restores the weights bit for bit (subtracting the diff would not, in floating point).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import re
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deftx import __version__
from deftx.core.card import CARD_FILE, sft_card
from deftx.core.fingerprint import base_fingerprint
from deftx.core.io import OutputKind, atomic_directory, sha256_file, write_json
from deftx.core.roles import body_parameters, head_parameter_names
from deftx.errors import SFTFormatError

FORMAT_NAME = "deftx-sft"
FORMAT_VERSION = 2  # written by default
READABLE_VERSIONS = (1, 2)
INDEX_BLOCK = 1 << 16  # format 2: indices = block * INDEX_BLOCK + offset
_OFFSET_BIAS = 1 << 15  # offsets are stored as int16 (offset - 32768)
WEIGHTS_FILE = "sft.safetensors"
METADATA_FILE = "sft.json"
DROP_EPS = 1e-7  # |phi| <= DROP_EPS is dropped when extracting (composable-sft's rule)
HUB_FILES = (METADATA_FILE, WEIGHTS_FILE, CARD_FILE)  # what a Hub repository of an SFT holds
SFT_OUTPUT = OutputKind("an SFT directory", METADATA_FILE, lambda doc: doc.get("format") == FORMAT_NAME)
# First components of body-relative names (``embeddings.*``, ``encoder.*`` for BERT and XLM-R);
# a head tensor may never live under them (see :func:`_check_head_names`).
BODY_ROOTS = frozenset({"embeddings", "encoder"})


@dataclass(frozen=True)
class SparseDelta:
    """Sparse change of one tensor: ``values`` added at flat row-major ``indices``."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, 1-D, strictly increasing
    values: torch.Tensor  # float32, 1-D

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SFTMetadata:
    """Provenance stored with an SFT (``sft.json``)."""

    kind: str  # "language" | "task"
    language: str | None = None
    task: str | None = None
    method: str = "lt_sft"
    selection: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""
    base_fingerprint: str = ""
    tokenizer: str = ""
    label_names: list[str] | None = None
    trained_on: dict[str, Any] = field(default_factory=dict)  # e.g. the source-language SFT under a task SFT
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    deftx_version: str = __version__
    created: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SFTMetadata:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def encode_indices(indices: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Format-2 encoding of strictly increasing flat indices into a tensor of ``numel`` entries:
    (entries per block of INDEX_BLOCK as int32, offsets in their block minus 32768 as int16)."""
    blocks = -(-numel // INDEX_BLOCK)
    idx = indices.to(torch.int64)
    counts = torch.bincount(torch.bitwise_right_shift(idx, 16), minlength=blocks).to(torch.int32)
    offsets = (torch.bitwise_and(idx, INDEX_BLOCK - 1) - _OFFSET_BIAS).to(torch.int16)
    return counts, offsets


def decode_indices(counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_indices` (int64 flat indices); the caller validates the result."""
    return decode_many([counts], [offsets])


def decode_many(counts: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
    """The indices of several diffs decoded together and concatenated (a few vector operations for
    a whole file instead of several per tensor). Each diff's block counts must be non-negative and
    sum to its number of offsets; the caller checks that first."""
    blocks = [c.numel() for c in counts]
    nnz = [o.numel() for o in offsets]
    total = sum(nnz)
    block_of_entry = torch.repeat_interleave(torch.arange(sum(blocks)), torch.cat(counts).to(torch.int64),
                                             output_size=total)
    first_block = torch.tensor([0, *blocks[:-1]], dtype=torch.int64).cumsum(0)  # each diff's first block
    base = torch.repeat_interleave(first_block, torch.tensor(nnz, dtype=torch.int64), output_size=total)
    joined = torch.cat(offsets).to(torch.int64)
    return torch.bitwise_left_shift(block_of_entry - base, 16) + joined + _OFFSET_BIAS


class _AppliedState:
    """Per-model record of applied SFTs (a stack of overwritten entries) and the base fingerprint."""

    def __init__(self) -> None:
        self.stack: list[tuple[SparseFineTuning, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.fingerprint: str | None = None


_APPLIED: weakref.WeakKeyDictionary[nn.Module, _AppliedState] = weakref.WeakKeyDictionary()


def _applied_state(model: nn.Module) -> _AppliedState:
    state = _APPLIED.get(model)
    if state is None:
        state = _APPLIED[model] = _AppliedState()
    return state


def current_base_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the model's base weights: recorded when the first SFT is applied and kept
    while SFTs are applied; computed afresh (about 0.3 s for 117M parameters) when none is, since
    writes through ``.data`` leave no trace that would show the weights changed."""
    state = _applied_state(model)
    if state.stack and state.fingerprint is not None:
        return state.fingerprint
    state.fingerprint = base_fingerprint(model)
    return state.fingerprint


class SparseFineTuning:
    """A sparse fine-tuning phi over a base model: ``diffs`` (body) + ``head`` (dense, absolute)."""

    def __init__(self, diffs: Mapping[str, SparseDelta], head: Mapping[str, torch.Tensor],
                 metadata: SFTMetadata, source: str | None = None) -> None:
        self.diffs: dict[str, SparseDelta] = dict(sorted(diffs.items()))
        self.head: dict[str, torch.Tensor] = dict(sorted(head.items()))
        self.metadata = metadata
        self.source = source  # directory it was loaded from, for messages

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def extract(cls, start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                masks: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor],
                metadata: SFTMetadata, eps: float = DROP_EPS) -> SparseFineTuning:
        """phi = trained - start on the masked entries, with |phi| <= eps dropped."""
        entries = {}
        for name in masks:
            index = torch.nonzero(masks[name].reshape(-1)).flatten()
            entries[name] = (tuple(trained[name].shape), index, start[name].detach().reshape(-1)[index],
                             trained[name].detach().reshape(-1)[index])
        return cls.extract_entries(entries, head, metadata, eps)

    @classmethod
    def extract_entries(cls, entries: Mapping[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]],
                        head: Mapping[str, torch.Tensor], metadata: SFTMetadata,
                        eps: float = DROP_EPS) -> SparseFineTuning:
        """:meth:`extract` from the masked entries alone: ``entries[name] = (shape, index, start,
        trained)`` with ``index`` the mask's flat positions in increasing order and ``start`` /
        ``trained`` the values there. The same SFT, bit for bit, as :meth:`extract` of the whole
        tensors, without ever holding them."""
        diffs: dict[str, SparseDelta] = {}
        for name in sorted(entries):
            shape, index, start, trained = entries[name]
            delta = trained.detach().reshape(-1).float() - start.detach().reshape(-1).float()
            keep = delta.abs() > eps
            diffs[name] = SparseDelta(tuple(shape), index.reshape(-1)[keep].to(torch.int64), delta[keep].clone())
        heads = {n: t.detach().clone().float() for n, t in head.items()}
        return cls(diffs, heads, metadata)

    # -- properties --------------------------------------------------------------------------

    @property
    def nnz(self) -> int:
        return sum(d.nnz for d in self.diffs.values())

    @property
    def name(self) -> str:
        m = self.metadata
        return f"{m.kind} SFT ({m.language or m.task or '?'})" + (f" from {self.source}" if self.source else "")

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.metadata.kind, "language": self.metadata.language, "task": self.metadata.task,
            "method": self.metadata.method, "nnz": self.nnz,
            "maskable_entries": sum(d.numel for d in self.diffs.values()),
            "head_entries": sum(t.numel() for t in self.head.values()),
        }

    # -- apply / revert ----------------------------------------------------------------------

    def _error(self, problem: str) -> SFTFormatError:
        return SFTFormatError(f"{self.source or self.name}: {problem}")

    def check_compatible(self, model: nn.Module, with_head: bool = True, check_base: bool = True,
                         fingerprint: str | None = None) -> None:
        """Raise SFTFormatError unless the SFT fits ``model`` (names, shapes, index bounds, head and,
        with ``check_base``, the base fingerprint; ``fingerprint`` if already known)."""
        body = body_parameters(model)
        for name, delta in self.diffs.items():
            param = body.get(name)
            if param is None:
                raise self._error(f"tensor '{name}' does not exist in the model")
            if tuple(param.shape) != delta.shape:
                raise self._error(f"tensor '{name}' has shape {list(delta.shape)} in the SFT but "
                                  f"{list(param.shape)} in the model")
            if delta.nnz and (int(delta.indices.min()) < 0 or int(delta.indices.max()) >= param.numel()):
                raise self._error(f"index out of bounds in '{name}' (shape {list(delta.shape)})")
        if with_head:
            params = dict(model.named_parameters())
            allowed = head_parameter_names(model)
            for name, value in self.head.items():
                if name not in params:
                    raise self._error(f"head tensor '{name}' does not exist in the model "
                                      f"(apply a language SFT with with_head=False)")
                if name not in allowed:
                    raise self._error(f"head tensor '{name}' names a body or frozen weight of the model, not a "
                                      f"head parameter; an SFT's head may only set the {self.metadata.kind} head")
                if tuple(params[name].shape) != tuple(value.shape):
                    raise self._error(f"head tensor '{name}' has shape {list(value.shape)} in the SFT but "
                                      f"{list(params[name].shape)} in the model")
        if check_base and self.metadata.base_fingerprint:
            found = fingerprint or current_base_fingerprint(model)
            if found != self.metadata.base_fingerprint:
                raise self._error(
                    f"base model fingerprint mismatch: the SFT was trained on {self.metadata.base_model!r} "
                    f"({self.metadata.base_fingerprint[:19]}...), the model's base weights are {found[:19]}...")

    @torch.no_grad()
    def apply(self, model: nn.Module, with_head: bool = True, check_base: bool = True) -> None:
        """Add the diffs to the model's body in place and (``with_head``) copy the head values."""
        state = _applied_state(model)
        fingerprint = current_base_fingerprint(model)  # recorded before the weights change
        self.check_compatible(model, with_head, check_base, fingerprint)
        body = body_parameters(model)
        saved_body: dict[str, torch.Tensor] = {}
        for name, delta in self.diffs.items():
            flat = body[name].data.view(-1)
            original = flat[delta.indices]  # a copy: kept for revert, and the base of the sum
            # indices are unique, so writing original + value equals index_add_ bit for bit (faster)
            flat.index_put_((delta.indices,), original + delta.values.to(flat.dtype))
            saved_body[name] = original
        saved_head: dict[str, torch.Tensor] = {}
        if with_head:
            params = dict(model.named_parameters())
            for name, value in self.head.items():
                saved_head[name] = params[name].data.clone()
                params[name].data.copy_(value)
        state.stack.append((self, saved_body, saved_head))

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        """Undo the last ``apply`` of this SFT on ``model`` exactly (bit for bit)."""
        state = _APPLIED.get(model)
        if not state or not state.stack:
            raise self._error("revert called but the SFT is not applied to this model")
        top, saved_body, saved_head = state.stack[-1]
        if top is not self:
            raise self._error(f"revert out of order: revert {top.name} first")
        body = body_parameters(model)
        for name, original in saved_body.items():
            body[name].data.view(-1)[self.diffs[name].indices] = original
        if saved_head:
            params = dict(model.named_parameters())
            for name, original in saved_head.items():
                params[name].data.copy_(original)
        state.stack.pop()

    @contextlib.contextmanager
    def applied(self, model: nn.Module, with_head: bool = True, check_base: bool = True) -> Iterator[nn.Module]:
        self.apply(model, with_head=with_head, check_base=check_base)
        try:
            yield model
        finally:
            self.revert(model)

    # -- save / load -------------------------------------------------------------------------

    def save(self, directory: str | Path, overwrite: bool = False, format_version: int = FORMAT_VERSION) -> Path:
        """Write the SFT atomically to ``directory`` (``format_version`` 1 for readers older than
        format 2; see the module docstring)."""
        from safetensors.torch import save_file

        if format_version not in READABLE_VERSIONS:
            raise ValueError(f"format_version must be one of {READABLE_VERSIONS}, got {format_version!r}")
        directory = Path(directory)
        tensors: dict[str, torch.Tensor] = {}
        for name, delta in self.diffs.items():
            if format_version == 1:
                tensors[f"diff/{name}/indices"] = delta.indices.to(torch.int64).contiguous()
            else:
                counts, offsets = encode_indices(delta.indices, delta.numel)
                tensors[f"diff/{name}/blocks"] = counts
                tensors[f"diff/{name}/offsets"] = offsets
            tensors[f"diff/{name}/values"] = delta.values.to(torch.float32).contiguous()
        for name, value in self.head.items():
            tensors[f"head/{name}"] = value.to(torch.float32).contiguous()
        meta = asdict(self.metadata)
        meta["created"] = meta["created"] or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with atomic_directory(directory, overwrite=overwrite, kind=SFT_OUTPUT) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
            doc = {
                "format": FORMAT_NAME, "format_version": format_version, **meta,
                "tensors": {n: {"shape": list(d.shape), "nnz": d.nnz} for n, d in self.diffs.items()},
                "head": {n: {"shape": list(v.shape)} for n, v in self.head.items()},
                "nnz": self.nnz,
                "weights_file": WEIGHTS_FILE, "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            }
            write_json(tmp / METADATA_FILE, doc)
            (tmp / CARD_FILE).write_text(sft_card(doc), encoding="utf-8")
        self.metadata.created = meta["created"]
        self.source = str(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SparseFineTuning:
        """Read and validate an SFT directory (see the module docstring for what is checked)."""
        directory = Path(directory)
        doc = read_metadata(directory)
        weights = directory / WEIGHTS_FILE
        where = str(weights)
        if not weights.is_file():
            raise SFTFormatError(f"{where}: file is missing")
        if sha256_file(weights) != doc["weights_sha256"]:
            raise SFTFormatError(f"{where}: checksum mismatch (file truncated or modified after saving)")
        try:
            from safetensors.torch import load_file

            tensors = load_file(str(weights))
        except Exception as exc:  # safetensors raises several types for a bad header
            raise SFTFormatError(f"{where}: not a readable safetensors file ({exc})") from None
        diffs = _validated_diffs(tensors, doc, where, doc["format_version"])
        head = _validated_head(tensors, doc, where)
        _check_head_names(head, diffs, where)
        total = sum(d.nnz for d in diffs.values())
        if doc.get("nnz", total) != total:
            raise SFTFormatError(f"{where}: the tensors hold {total} entries, {METADATA_FILE} says {doc['nnz']}")
        parts = ("indices", "values") if doc["format_version"] == 1 else ("blocks", "offsets", "values")
        expected = {f"diff/{n}/{p}" for n in diffs for p in parts} | {f"head/{n}" for n in head}
        extra = sorted(set(tensors) - expected)
        if extra:
            raise SFTFormatError(f"{where}: unexpected tensor '{extra[0]}' not listed in {METADATA_FILE}")
        meta = SFTMetadata.from_dict(doc)
        return cls(diffs, head, meta, source=str(directory))

    # -- the Hugging Face Hub ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, token: str | bool | None = None,
                        local_files_only: bool = False) -> SparseFineTuning:
        """Load an SFT from a local directory, or from a Hub repository ``org/name`` (at ``revision``:
        a branch, tag or commit) through the Hub cache (see ``deftx.core.hub``)."""
        from deftx.core.hub import download, looks_like_repo_id

        if Path(name_or_path).is_dir() or not looks_like_repo_id(str(name_or_path)):
            return cls.load(name_or_path)
        path = download(str(name_or_path), HUB_FILES, revision=revision, cache_dir=cache_dir, token=token,
                        local_files_only=local_files_only)
        sft = cls.load(path)
        sft.source = f"{name_or_path}" + (f"@{revision}" if revision else "")
        return sft

    def push_to_hub(self, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, commit_message: str | None = None) -> str:
        """Upload this SFT (``sft.json``, ``sft.safetensors`` and its model card) to the Hub
        repository ``repo_id`` (created if missing); returns the commit URL."""
        import tempfile

        from deftx.core.hub import upload

        with tempfile.TemporaryDirectory(prefix="deftx-push-") as tmp:
            directory = Path(tmp) / "sft"
            source = self.source
            self.save(directory)
            self.source = source
            return upload(directory, repo_id, HUB_FILES, revision=revision, private=private, token=token,
                          commit_message=commit_message)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The validated ``sft.json`` of an SFT directory, as a dict."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not directory.is_dir():
        raise SFTFormatError(f"{directory}: not a directory (expected an SFT directory)")
    if not path.is_file():
        raise SFTFormatError(f"{path}: file is missing (not a deftx SFT directory?)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SFTFormatError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise SFTFormatError(f"{path}: not a deftx SFT (format field is {doc.get('format') if isinstance(doc, dict) else None!r})")
    version = doc.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise SFTFormatError(f"{path}: unsupported format_version {version!r} "
                             f"(this deftx reads {', '.join(map(str, READABLE_VERSIONS))})")
    if doc.get("kind") not in ("language", "task"):
        raise SFTFormatError(f"{path}: kind must be 'language' or 'task', got {doc.get('kind')!r}")
    for key in ("tensors", "head"):
        if not isinstance(doc.get(key), dict):
            raise SFTFormatError(f"{path}: missing or invalid '{key}' table")
    _check_schema(doc, path)
    return doc


_HEX64 = re.compile(r"[0-9a-f]{64}")
_OPTIONAL_STR = (str, type(None))
# sft.json fields and the JSON types they must have (missing optional fields take their defaults)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "language": _OPTIONAL_STR, "task": _OPTIONAL_STR, "method": (str,), "selection": (dict,),
    "base_model": (str,), "base_fingerprint": (str,), "tokenizer": (str,), "label_names": (list, type(None)),
    "trained_on": (dict,), "training": (dict,), "metrics": (dict,), "deftx_version": (str,), "created": (str,),
}
_JSON_TYPE = {str: "a string", dict: "an object", list: "a list", type(None): "null"}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_schema(doc: dict[str, Any], path: Path) -> None:
    """Every field of ``sft.json`` has its documented type (a wrong type would otherwise surface
    later as a traceback or, for a string of labels, as wrong labels)."""
    for key, types in _FIELD_TYPES.items():
        if key in doc and not isinstance(doc[key], types):
            wanted = " or ".join(_JSON_TYPE[t] for t in types)
            raise SFTFormatError(f"{path}: '{key}' must be {wanted}, got {type(doc[key]).__name__} {doc[key]!r:.40}")
    labels = doc.get("label_names")
    if labels is not None:
        if not labels or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
            raise SFTFormatError(f"{path}: 'label_names' must be a list of distinct non-empty strings, got {labels!r:.60}")
        if doc["kind"] != "task":
            raise SFTFormatError(f"{path}: a {doc['kind']} SFT has no label names")
    if doc.get("weights_file", WEIGHTS_FILE) != WEIGHTS_FILE:
        raise SFTFormatError(f"{path}: 'weights_file' must be {WEIGHTS_FILE!r}, got {doc.get('weights_file')!r:.40}")
    checksum = doc.get("weights_sha256")
    if checksum is None:
        raise SFTFormatError(f"{path}: no 'weights_sha256' (the checksum of {WEIGHTS_FILE}); the file cannot be "
                             f"verified")
    if not isinstance(checksum, str) or not _HEX64.fullmatch(checksum):
        raise SFTFormatError(f"{path}: 'weights_sha256' must be 64 lowercase hex digits, got {checksum!r:.40}")
    for name, entry in doc["tensors"].items():
        if not isinstance(entry, dict) or not _is_count(entry.get("nnz")):
            raise SFTFormatError(f"{path}: tensor '{name}' needs an integer 'nnz' >= 0")
    if "nnz" in doc and not _is_count(doc["nnz"]):
        raise SFTFormatError(f"{path}: 'nnz' must be an integer >= 0, got {doc['nnz']!r:.40}")


def _check_head_names(head: Mapping[str, torch.Tensor], diffs: Mapping[str, SparseDelta], where: str) -> None:
    """A head tensor is a full model name outside the encoder body: ``classifier.*``,
    ``bert.pooler.*``, ``cls.predictions.*``, ``lm_head.*``. A name whose first or second component
    is a root of the body (``embeddings``, ``encoder``, or a root of this SFT's own tensors) would
    let the head overwrite body weights when applied, so it is refused."""
    roots = set(BODY_ROOTS) | {name.split(".", 1)[0] for name in diffs}
    for name in head:
        parts = name.split(".")
        if parts[0] in roots or (len(parts) > 1 and parts[1] in roots) or name in diffs:
            raise SFTFormatError(f"{where}: head tensor '{name}' names a body weight of the encoder; an SFT's head "
                                 f"may only hold head parameters (classifier, pooler, MLM head)")


def _shape_of(entry: Any, name: str, where: str) -> tuple[int, ...]:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise SFTFormatError(f"{where}: invalid shape for tensor '{name}' in {METADATA_FILE}")
    return tuple(shape)


def _index_parts(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], version: int,
                 where: str) -> tuple[torch.Tensor, ...] | None:
    """The stored index tensors of one diff: (indices,) in format 1, (blocks, offsets) in format 2;
    None when one is missing. Checks their types and layout only (values are checked together)."""
    if version == 1:
        idx = tensors.get(f"diff/{name}/indices")
        if idx is not None and (idx.dtype != torch.int64 or idx.dim() != 1):
            raise SFTFormatError(f"{where}: indices of '{name}' must be 1-D int64, got {idx.dtype} {list(idx.shape)}")
        return None if idx is None else (idx,)
    counts, offsets = tensors.get(f"diff/{name}/blocks"), tensors.get(f"diff/{name}/offsets")
    if counts is None or offsets is None:
        return None
    if offsets.dtype != torch.int16 or offsets.dim() != 1:
        raise SFTFormatError(f"{where}: offsets of '{name}' must be 1-D int16, got {offsets.dtype} {list(offsets.shape)}")
    blocks = -(-math.prod(shape) // INDEX_BLOCK)
    if counts.dtype != torch.int32 or tuple(counts.shape) != (blocks,):
        raise SFTFormatError(f"{where}: blocks of '{name}' must be {blocks} int32 counts (shape {list(shape)}), "
                             f"got {counts.dtype} {list(counts.shape)}")
    return counts, offsets


def _decode_all(names: list[str], parts: list[tuple[torch.Tensor, ...]], nnz: list[int], where: str) -> torch.Tensor:
    """Format 2: the block counts checked (non-negative, summing to each diff's entries), then the
    indices of all diffs decoded together into one int64 tensor (:func:`decode_many`)."""
    counts = torch.cat([p[0] for p in parts]).to(torch.int64)
    if counts.numel() and int(counts.min()) < 0:
        bad = next(n for n, p in zip(names, parts) if p[0].numel() and int(p[0].min()) < 0)
        raise SFTFormatError(f"{where}: negative block count in '{bad}'")
    blocks = [p[0].numel() for p in parts]
    ends = torch.cumsum(counts, 0)  # entries in all blocks up to each block
    block_ends = torch.tensor(blocks, dtype=torch.int64).cumsum(0)  # blocks up to each tensor's end
    totals = torch.zeros(len(parts), dtype=torch.int64)  # entries up to each tensor's end
    if counts.numel():
        reached = block_ends > 0  # an empty tensor (no blocks) ends where the one before it does
        totals[reached] = ends[block_ends[reached] - 1]
    per_tensor = torch.diff(totals, prepend=torch.zeros(1, dtype=torch.int64))
    wrong = torch.nonzero(per_tensor != torch.tensor(nnz, dtype=torch.int64)).flatten()
    if wrong.numel():
        i = int(wrong[0])
        raise SFTFormatError(f"{where}: the blocks of '{names[i]}' count {int(per_tensor[i])} entries but it has "
                             f"{nnz[i]} offsets")
    return decode_many([p[0] for p in parts], [p[1] for p in parts])


def _validated_diffs(tensors: dict[str, torch.Tensor], doc: dict[str, Any], where: str,
                     version: int = FORMAT_VERSION) -> dict[str, SparseDelta]:
    """The diffs of a weights file, each checked (shapes, dtypes, counts against ``sft.json``,
    strictly increasing indices within bounds, finite values). Type and count checks run per
    tensor; the value checks run on all diffs at once."""
    names, shapes, parts, values = [], [], [], []
    for name, entry in doc["tensors"].items():
        shape = _shape_of(entry, name, where)
        stored = _index_parts(tensors, name, shape, version, where)
        val = tensors.get(f"diff/{name}/values")
        if stored is None or val is None:
            raise SFTFormatError(f"{where}: tensor '{name}' is missing its indices or values")
        if val.dtype != torch.float32 or val.dim() != 1:
            raise SFTFormatError(f"{where}: values of '{name}' must be 1-D float32, got {val.dtype} {list(val.shape)}")
        n = stored[-1].numel()
        if n != val.numel():
            raise SFTFormatError(f"{where}: '{name}' has {n} indices but {val.numel()} values")
        if n != entry.get("nnz"):
            raise SFTFormatError(f"{where}: '{name}' has {n} entries, {METADATA_FILE} says {entry.get('nnz')}")
        names.append(name)
        shapes.append(shape)
        parts.append(stored)
        values.append(val)
    if not names:
        return {}
    nnz = [v.numel() for v in values]
    every = torch.cat([p[0] for p in parts]) if version == 1 else _decode_all(names, parts, nnz, where)
    starts = [0]
    for n in nnz:
        starts.append(starts[-1] + n)

    def owner(position: int) -> int:  # the diff holding entry ``position`` of ``every``
        return max(i for i in range(len(names)) if starts[i] <= position and nnz[i])

    steps = every[1:] - every[:-1]
    if steps.numel():
        boundaries = torch.tensor([s - 1 for s in starts[1:-1] if 0 < s], dtype=torch.int64)
        steps[boundaries] = 1  # between two diffs the indices start again
        if int(steps.min()) <= 0:
            i = owner(int(torch.nonzero(steps <= 0)[0]) + 1)
            own = every[starts[i]: starts[i + 1]]
            kind = "duplicate" if int((own[1:] - own[:-1]).min()) == 0 else "unsorted"
            raise SFTFormatError(f"{where}: {kind} indices in '{names[i]}'")
    nonempty = [i for i, n in enumerate(nnz) if n]
    if nonempty:  # the indices increase, so each diff's first and last are its extremes
        first = every[torch.tensor([starts[i] for i in nonempty])]
        last = every[torch.tensor([starts[i + 1] - 1 for i in nonempty])]
        limit = torch.tensor([math.prod(shapes[i]) for i in nonempty], dtype=torch.int64)
        bad = torch.nonzero((first < 0) | (last >= limit)).flatten()
        if bad.numel():
            j = int(bad[0])
            i = nonempty[j]
            raise SFTFormatError(f"{where}: index out of bounds in '{names[i]}' (shape {list(shapes[i])}, "
                                 f"indices span {int(first[j])}..{int(last[j])})")
    joined = torch.cat(values)
    if joined.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(joined))).all()):  # nan propagates
        i = owner(int(torch.nonzero(~torch.isfinite(joined))[0]))
        raise SFTFormatError(f"{where}: non-finite values in '{names[i]}'")
    indices = every.split(nnz)
    return {name: SparseDelta(shape, idx, val) for name, shape, idx, val in zip(names, shapes, indices, values)}


def _validated_head(tensors: dict[str, torch.Tensor], doc: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    head: dict[str, torch.Tensor] = {}
    for name, entry in doc["head"].items():
        shape = _shape_of(entry, name, where)
        value = tensors.get(f"head/{name}")
        if value is None:
            raise SFTFormatError(f"{where}: head tensor '{name}' is missing")
        if value.dtype != torch.float32:
            raise SFTFormatError(f"{where}: head tensor '{name}' must be float32, got {value.dtype}")
        if tuple(value.shape) != shape:
            raise SFTFormatError(f"{where}: head tensor '{name}' has shape {list(value.shape)}, "
                                 f"{METADATA_FILE} says {list(shape)}")
        if not bool(torch.isfinite(value).all()):
            raise SFTFormatError(f"{where}: non-finite values in head tensor '{name}'")
        head[name] = value
    return head
