"""Import of composable-sft's SFT files (``pytorch_diff.bin``) as deftx SFTs, without unpickling code.

composable-sft (the LT-SFT authors' library) stores an SFT as one ``torch.save`` pickle:

* ``{'diffs': {name: encoding}, 'abs': {name: tensor}}``: ``diffs`` holds the sparse differences
  of the sparsely fine-tuned parameters, ``abs`` the absolute values of the densely trained ones
  (the head). An encoding is ``{'size': torch.Size, 'index_steps': [...], 'values': tensor}``: the
  changed entries' flat indices in *column-major* order (index = sum_i coord_i * prod(size[:i])),
  sorted and delta-encoded (the first element is a numpy int64, the rest Python ints), with the
  values in the same order.
* Older files: ``{'body': {name: sparse COO tensor}, 'head': {name: tensor}}``.

Names are full model names (``roberta.encoder.layer.0...``, ``classifier.dense.weight``).

**Reading.** ``torch.load`` runs ``pickle``, and a pickle can run any code. So the file's globals
are listed first, without unpickling. Anything beyond the few numpy objects these files need is
refused with a one-line error. Those objects are the ``numpy.dtype`` constructor, the int64/int32
dtype classes and ``numpy``'s scalar reconstructor (under its numpy 1 and numpy 2 module names).
The file is then read with ``torch.load(weights_only=True)`` with only those globals allowed.

**Conversion.** Indices become deftx's row-major flat indices; values keep their float32 bits.
Body parameters are named relative to the base model, as deftx names them. A diff on a head
parameter becomes that head's absolute value (base + diff, the sum composable-sft's ``apply``
computes). ``abs`` tensors must be head parameters. Applying the imported SFT therefore gives
the same weights, bit for bit, as composable-sft's ``SFT.apply`` on the same model.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deftx.core.fingerprint import base_fingerprint
from deftx.core.roles import base_prefix, body_parameters, head_parameter_names
from deftx.core.sft import SFTMetadata, SparseDelta, SparseFineTuning
from deftx.errors import SFTFormatError, first_line

FILE_NAME = "pytorch_diff.bin"
SOURCE_FORMAT = "composable-sft"


def _scalar_reconstructor() -> Any:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


def _allowed_globals() -> list[tuple[Any, str]]:
    """The globals a composable-sft file may reference, each under the name pickles use for it."""
    scalar = _scalar_reconstructor()
    allowed: list[tuple[Any, str]] = [
        (np.dtype, "numpy.dtype"),
        (scalar, "numpy.core.multiarray.scalar"),    # files written with numpy 1.x
        (scalar, "numpy._core.multiarray.scalar"),   # files written with numpy 2.x
    ]
    for kind in (np.int64, np.int32):
        cls = type(np.dtype(kind))   # the object a pickled dtype is rebuilt as
        allowed.append((cls, f"{cls.__module__}.{cls.__qualname__}"))
    return allowed


ALLOWED_GLOBALS = tuple(name for _, name in _allowed_globals())


class ComposableImportError(SFTFormatError):
    """A composable-sft file cannot be read safely, or does not fit the model."""


@dataclass(frozen=True)
class ComposableFile:
    """The decoded content of a ``pytorch_diff.bin``: row-major sparse diffs and absolute tensors,
    both under the file's full model names."""

    path: Path
    diffs: dict[str, SparseDelta]
    absolute: dict[str, torch.Tensor]

    @property
    def nnz(self) -> int:
        return sum(d.nnz for d in self.diffs.values())


def resolve_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/pytorch_diff.bin`` for a directory."""
    path = Path(path)
    file = path / FILE_NAME if path.is_dir() else path
    if not file.is_file():
        raise ComposableImportError(f"{file}: file not found (expected composable-sft's {FILE_NAME})")
    return file


def check_globals(file: Path) -> None:
    """Refuse ``file`` before unpickling if it references any global outside the allow-list."""
    if not zipfile.is_zipfile(file):
        raise ComposableImportError(f"{file}: not a torch.save checkpoint in the zip format (composable-sft "
                                    f"files are); refusing to unpickle it")
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError) as exc:
        raise ComposableImportError(f"{file}: not a readable torch.save checkpoint ({exc})") from None
    foreign = sorted(set(found) - set(ALLOWED_GLOBALS))
    if foreign:
        raise ComposableImportError(
            f"{file}: refusing to load: it references {', '.join(foreign)}, which composable-sft SFT files never "
            f"contain (allowed: tensors and {', '.join(ALLOWED_GLOBALS)}); unpickling it could run code")


def _load_weights_only(file: Path) -> Any:
    check_globals(file)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(str(file), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise ComposableImportError(f"{file}: cannot be read with weights_only=True ({first_line(exc)})") from None


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (torch.Size, tuple, list)) or not all(
            isinstance(s, (int, np.integer)) and int(s) >= 0 for s in value):
        raise ComposableImportError(f"{where}: 'size' must be a list of non-negative integers, got {value!r}")
    return tuple(int(s) for s in value)


def _to_row_major(column_major: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    coords = np.unravel_index(column_major, shape, order="F")
    return np.ravel_multi_index(coords, shape, order="C").astype(np.int64)


def _delta(shape: tuple[int, ...], row_major: np.ndarray, values: torch.Tensor) -> SparseDelta:
    order = np.argsort(row_major, kind="stable")
    indices = torch.from_numpy(np.ascontiguousarray(row_major[order]))
    return SparseDelta(shape, indices, values.detach().reshape(-1).to(torch.float32)[torch.from_numpy(order)].clone())


def decode_encoding(encoding: Any, where: str) -> SparseDelta:
    """One ``{'size', 'index_steps', 'values'}`` entry as a row-major :class:`SparseDelta`."""
    if not isinstance(encoding, Mapping) or set(encoding) != {"size", "index_steps", "values"}:
        keys = sorted(encoding) if isinstance(encoding, Mapping) else type(encoding).__name__
        raise ComposableImportError(f"{where}: expected keys size, index_steps, values; got {keys}")
    shape = _shape(encoding["size"], where)
    steps = encoding["index_steps"]
    if not isinstance(steps, (list, tuple)) or not all(isinstance(s, (int, np.integer)) for s in steps):
        raise ComposableImportError(f"{where}: 'index_steps' must be a list of integers")
    values = encoding["values"]
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or not values.is_floating_point():
        raise ComposableImportError(f"{where}: 'values' must be a 1-D floating-point tensor")
    if values.numel() != len(steps):
        raise ComposableImportError(f"{where}: {len(steps)} indices but {values.numel()} values")
    flat = np.cumsum(np.asarray(steps, dtype=np.int64), dtype=np.int64)
    numel = int(np.prod(shape, dtype=np.int64))
    if len(steps) and (int(steps[0]) < 0 or (len(steps) > 1 and int(np.min(np.asarray(steps[1:], np.int64))) <= 0)):
        raise ComposableImportError(f"{where}: indices are not strictly increasing")
    if len(steps) and int(flat[-1]) >= numel:
        raise ComposableImportError(f"{where}: index {int(flat[-1])} out of bounds for size {list(shape)}")
    return _delta(shape, _to_row_major(flat, shape), values)


def decode_sparse(tensor: Any, where: str) -> SparseDelta:
    """An older file's sparse COO tensor as a row-major :class:`SparseDelta`."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.sparse_coo:
        raise ComposableImportError(f"{where}: expected a sparse COO tensor")
    tensor = tensor.coalesce()
    shape = tuple(tensor.shape)
    coords = tuple(tensor.indices().numpy())
    row_major = np.ravel_multi_index(coords, shape, order="C").astype(np.int64) if shape else np.zeros(0, np.int64)
    return _delta(shape, row_major, tensor.values())


def _dense_dict(value: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping):
        raise ComposableImportError(f"{where}: expected a dict of tensors")
    out = {}
    for name, tensor in value.items():
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or not tensor.is_floating_point():
            raise ComposableImportError(f"{where}['{name}']: expected a dense floating-point tensor")
        out[str(name)] = tensor.detach().to(torch.float32)
    return out


def read_composable(path: str | Path) -> ComposableFile:
    """Read and decode a composable-sft SFT (a ``pytorch_diff.bin`` file or its directory) safely."""
    file = resolve_file(path)
    content = _load_weights_only(file)
    if not isinstance(content, Mapping):
        raise ComposableImportError(f"{file}: expected a dict, got {type(content).__name__}")
    keys = set(content)
    if keys and keys <= {"diffs", "abs"}:
        raw = content.get("diffs", {})
        if not isinstance(raw, Mapping):
            raise ComposableImportError(f"{file}: 'diffs' must be a dict")
        diffs = {str(n): decode_encoding(e, f"{file}: diffs['{n}']") for n, e in raw.items()}
        absolute = _dense_dict(content.get("abs", {}), f"{file}: abs")
    elif "body" in keys and keys <= {"body", "head"}:
        raw = content["body"]
        if not isinstance(raw, Mapping):
            raise ComposableImportError(f"{file}: 'body' must be a dict")
        diffs = {str(n): decode_sparse(t, f"{file}: body['{n}']") for n, t in raw.items()}
        absolute = _dense_dict(content.get("head") or {}, f"{file}: head")
    else:
        raise ComposableImportError(f"{file}: not a composable-sft SFT (keys {sorted(map(str, keys))}; expected "
                                    f"'diffs' and 'abs', or 'body' and 'head')")
    if not diffs and not absolute:
        raise ComposableImportError(f"{file}: the SFT is empty (no diffs and no absolute tensors)")
    return ComposableFile(file, diffs, absolute)


def infer_kind(content: ComposableFile) -> str:
    """'task' when the file sets a sequence-classification head (``classifier.*``), else 'language'."""
    names = list(content.diffs) + list(content.absolute)
    return "task" if any(n.split(".")[0] == "classifier" for n in names) else "language"


def infer_num_labels(content: ComposableFile) -> int:
    """The number of classes of a task SFT's classifier: the rows of its last ``classifier`` weight
    (``classifier.out_proj.weight`` for XLM-R, ``classifier.weight`` for BERT)."""
    for name in ("classifier.out_proj.weight", "classifier.weight"):
        if name in content.absolute:
            return int(content.absolute[name].shape[0])
    raise ComposableImportError(f"{content.path}: no classifier.out_proj.weight or classifier.weight in 'abs'; pass "
                                f"the label names explicitly")


def to_sft(content: ComposableFile, model: nn.Module, metadata: SFTMetadata) -> SparseFineTuning:
    """``content`` as a deftx SFT over ``model``'s base weights (see the module docstring for the
    mapping). ``metadata`` supplies kind, language or task and label names; the base fingerprint
    and the import's provenance are filled in here."""
    prefix = base_prefix(model)
    body = body_parameters(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    aliases = {n: by_id.get(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}
    heads = head_parameter_names(model)
    params = dict(model.named_parameters())
    where = str(content.path)

    def relative(name: str) -> str | None:
        rel = name[len(prefix):] if prefix and name.startswith(prefix) else name
        return rel if rel in body else None

    diffs: dict[str, SparseDelta] = {}
    head: dict[str, torch.Tensor] = {}
    for name, delta in content.diffs.items():
        rel, full = relative(name), aliases.get(name, name)
        if rel is not None:
            if tuple(body[rel].shape) != delta.shape:
                raise ComposableImportError(f"{where}: '{name}' has size {list(delta.shape)} in the file but "
                                            f"{list(body[rel].shape)} in the model")
            diffs[rel] = delta
        elif full in heads:
            base = params[full].detach().to(torch.float32).clone()
            if tuple(base.shape) != delta.shape:
                raise ComposableImportError(f"{where}: '{name}' has size {list(delta.shape)} in the file but "
                                            f"{list(base.shape)} in the model")
            flat = base.view(-1)
            flat[delta.indices] = flat[delta.indices] + delta.values
            head[full] = base
        else:
            raise ComposableImportError(_unknown(where, name, model, params))
    for name, value in content.absolute.items():
        full = aliases.get(name, name)
        if full not in heads:
            if relative(name) is not None:
                raise ComposableImportError(f"{where}: '{name}' is stored as an absolute value but is a body weight "
                                            f"of the model; deftx SFTs store body changes as sparse differences")
            raise ComposableImportError(_unknown(where, name, model, params))
        if tuple(params[full].shape) != tuple(value.shape):
            raise ComposableImportError(f"{where}: '{name}' has size {list(value.shape)} in the file but "
                                        f"{list(params[full].shape)} in the model")
        head[full] = value.clone()
    metadata.base_fingerprint = base_fingerprint(model)
    metadata.trained_on = {**metadata.trained_on, "imported_from": SOURCE_FORMAT, "file": content.path.name}
    return SparseFineTuning(diffs, head, metadata)


def _unknown(where: str, name: str, model: nn.Module, params: Mapping[str, Any]) -> str:
    kind = type(model).__name__
    return (f"{where}: '{name}' is not a body or head parameter of the model ({kind}, {len(params)} parameters); "
            f"is --model the base the SFT was trained on, and --kind right?")


def import_composable(source: str | Path, model: str, out: str | Path, *, kind: str | None = None,
                      language: str | None = None, task: str | None = None,
                      label_names: list[str] | None = None, overwrite: bool = False, revision: str | None = None,
                      log=print) -> SparseFineTuning:
    """Read a composable-sft SFT (``source``: a ``pytorch_diff.bin``, its directory, or a Hub repository
    ``org/name`` at ``revision``, fetched through the Hub cache), convert it
    over the base ``model`` (a Hugging Face id or directory) and save it as a deftx SFT in ``out``.
    ``kind`` defaults to :func:`infer_kind`; a task SFT's labels default to ``LABEL_0..`` with as
    many classes as its classifier has."""
    from deftx.core.hub import download, looks_like_repo_id
    from deftx.core.io import check_output_dir
    from deftx.core.sft import SFT_OUTPUT
    from deftx.models import load_classifier, load_masked_lm, resolve_model_path

    check_output_dir(out, overwrite, SFT_OUTPUT)
    if looks_like_repo_id(str(source)):
        source = download(str(source), [FILE_NAME], revision=revision)
    content = read_composable(source)
    kind = kind or infer_kind(content)
    if kind not in ("language", "task"):
        raise ComposableImportError(f"kind must be 'language' or 'task', got {kind!r}")
    log(f"read {content.path}: {len(content.diffs)} sparse tensors ({content.nnz:,} entries), "
        f"{len(content.absolute)} absolute tensors; importing as a {kind} SFT over {model}")
    path = resolve_model_path(model, log=log)
    if kind == "task":
        labels = list(label_names) if label_names else [f"LABEL_{i}" for i in range(infer_num_labels(content))]
        net = load_classifier(path, labels)
    else:
        labels = None
        net, _ = load_masked_lm(path)
    meta = SFTMetadata(kind=kind, language=language, task=task, method="lt_sft", base_model=model,
                       tokenizer=model, label_names=labels,
                       selection={"imported": SOURCE_FORMAT})
    sft = to_sft(content, net, meta)
    sft.check_compatible(net)
    sft.save(out, overwrite=overwrite)
    return sft
