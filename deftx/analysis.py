"""Analysis of trained SFTs: where their entries sit and what their changes look like.

* ``layer_type``: the role of an encoder tensor (query, key, value, attention output, FFN in/out,
  embeddings, other), from its Hugging Face BERT / XLM-R name (with or without the ``bert.`` /
  ``roberta.`` prefix; biases share their weight's type).
* ``mask_overlap``: how much two SFTs' supports coincide, against what independent uniform random
  supports of the same per-tensor sizes would give.
* ``density_by_layer`` / ``density_by_layer_type``: the selected fraction per layer or per type.
* ``change_spectra``, ``mean_normalised_spectrum``, ``energy_rank``: singular values of dense
  changes ``theta1 - theta0`` per layer type.
Their figures are in :mod:`deftx.tracking.plots`. Pure functions: no Ray, no MLflow, no
matplotlib, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch

from deftx.core.denoise import select_rank
from deftx.core.sft import SparseFineTuning

LAYER_TYPES = ("query", "key", "value", "attention output", "ffn in", "ffn out", "embeddings", "other")

# The FFN's output is ``layer.N.output.dense``; the attention's is ``layer.N.attention.output.dense``.
_TYPE_PATTERNS = (
    ("query", re.compile(r"(?:^|\.)attention\.self\.query\.(?:weight|bias)$")),
    ("key", re.compile(r"(?:^|\.)attention\.self\.key\.(?:weight|bias)$")),
    ("value", re.compile(r"(?:^|\.)attention\.self\.value\.(?:weight|bias)$")),
    ("attention output", re.compile(r"(?:^|\.)attention\.output\.dense\.(?:weight|bias)$")),
    ("ffn in", re.compile(r"(?:^|\.)intermediate\.dense\.(?:weight|bias)$")),
    ("ffn out", re.compile(r"(?:^|\.)layer\.\d+\.output\.dense\.(?:weight|bias)$")),
)


_LAYER = re.compile(r"layers?\.(\d+)\.")


def layer_of(name: str) -> str:
    """``encoder.layer.3.attention...`` -> ``layer 3``; embeddings -> ``embeddings``."""
    match = _LAYER.search(name)
    if match:
        return f"layer {int(match.group(1))}"
    return "embeddings" if "embeddings" in name else "other"


def layer_type(name: str) -> str:
    """The role of a parameter: one of ``LAYER_TYPES`` (LayerNorms, pooler, heads: ``other``)."""
    if "embeddings" in name:
        return "embeddings"
    for kind, pattern in _TYPE_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def layer_key(layer: str) -> tuple[int, int]:
    """Sort key for ``layer_of`` groups: embeddings, layer 0..N, other."""
    if layer == "embeddings":
        return (0, 0)
    if layer.startswith("layer "):
        return (1, int(layer.split()[1]))
    return (2, 0)


def type_key(kind: str) -> int:
    return LAYER_TYPES.index(kind) if kind in LAYER_TYPES else len(LAYER_TYPES)


# -- supports ---------------------------------------------------------------------------------


def mask_overlap(a: SparseFineTuning, b: SparseFineTuning) -> dict[str, float]:
    """Compare two SFTs' supports entry by entry over the tensors present in either.

    Returns ``shared`` (entries, i.e. (tensor, flat index) pairs, selected by both), ``nnz_a``,
    ``nnz_b``, ``frac_of_a`` = shared / nnz_a and ``frac_of_b`` (0 when the SFT is empty),
    ``jaccard`` = shared / |union| (0 when both are empty), ``expected_shared`` = the sum over
    tensors in both of nnz_a(t) * nnz_b(t) / numel(t) (the expected overlap of independent uniformly
    random supports of the same sizes) and ``ratio_to_random`` = shared / expected_shared (nan when
    the expectation is 0). Raises ValueError if a tensor in both has different shapes.
    """
    shared = 0
    expected = 0.0
    for name in sorted(set(a.diffs) & set(b.diffs)):
        da, db = a.diffs[name], b.diffs[name]
        if tuple(da.shape) != tuple(db.shape):
            raise ValueError(f"tensor '{name}' has shape {list(da.shape)} in {a.name} "
                             f"but {list(db.shape)} in {b.name}")
        if da.nnz and db.nnz:
            shared += int(torch.isin(da.indices, db.indices.to(da.indices.device)).sum())
        if da.numel:
            expected += da.nnz * db.nnz / da.numel
    nnz_a, nnz_b = a.nnz, b.nnz
    union = nnz_a + nnz_b - shared
    return {
        "shared": shared,
        "nnz_a": nnz_a,
        "nnz_b": nnz_b,
        "frac_of_a": shared / nnz_a if nnz_a else 0.0,
        "frac_of_b": shared / nnz_b if nnz_b else 0.0,
        "jaccard": shared / union if union else 0.0,
        "expected_shared": expected,
        "ratio_to_random": shared / expected if expected > 0 else math.nan,
    }


def _grouped_density(sft: SparseFineTuning, group_of, key) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for name, delta in sft.diffs.items():
        agg = totals.setdefault(group_of(name), [0, 0])
        agg[0] += delta.nnz
        agg[1] += delta.numel
    return {g: (totals[g][0] / totals[g][1] if totals[g][1] else 0.0) for g in sorted(totals, key=key)}


def density_by_layer(sft: SparseFineTuning) -> dict[str, float]:
    """Selected fraction (sum of nnz / sum of numel) per :func:`layer_of` group, ordered
    embeddings, layer 0..N, other (only the groups the SFT has tensors in)."""
    return _grouped_density(sft, layer_of, layer_key)


def density_by_layer_type(sft: SparseFineTuning) -> dict[str, float]:
    """Selected fraction per ``layer_type``, in ``LAYER_TYPES`` order (only the types present)."""
    return _grouped_density(sft, layer_type, type_key)


# -- spectra ----------------------------------------------------------------------------------


@torch.no_grad()
def change_spectra(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor], *,
                   skip_embeddings: bool = True) -> dict[str, list[torch.Tensor]]:
    """Singular values (float32, descending, on the CPU) of ``theta1[n] - theta0[n]`` for every
    2-D floating-point tensor ``n`` in both, grouped by ``layer_type`` (``LAYER_TYPES`` order, one
    tensor per matrix in ``theta1``'s order). Embedding matrices are skipped unless
    ``skip_embeddings`` is False. Raises ValueError if a tensor's shapes differ."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, t1 in theta1.items():
        t0 = theta0.get(name)
        if t0 is None or t1.dim() != 2 or not t1.is_floating_point():
            continue
        kind = layer_type(name)
        if skip_embeddings and kind == "embeddings":
            continue
        if tuple(t0.shape) != tuple(t1.shape):
            raise ValueError(f"tensor '{name}' has shape {list(t0.shape)} in theta0 but {list(t1.shape)} in theta1")
        change = t1.detach().float() - t0.detach().to(t1.device).float()
        groups.setdefault(kind, []).append(torch.linalg.svdvals(change).cpu())
    return {kind: groups[kind] for kind in sorted(groups, key=type_key)}


def mean_normalised_spectrum(spectra: Iterable[torch.Tensor], length: int | None = None) -> torch.Tensor:
    """Average of the spectra each divided by its largest value (all-zero and empty ones skipped),
    truncated to ``length`` or else to the shortest kept spectrum. Empty result if none is kept;
    ValueError if ``length`` exceeds a kept spectrum's length."""
    kept = []
    for values in spectra:
        values = values.detach().reshape(-1).float().cpu()
        top = float(values.abs().max()) if values.numel() else 0.0
        if top > 0.0:
            kept.append(values / top)
    if not kept:
        return torch.empty(0)
    shortest = min(v.numel() for v in kept)
    if length is None:
        length = shortest
    elif length < 0 or length > shortest:
        raise ValueError(f"length {length} is outside 0..{shortest} (the shortest spectrum's length)")
    return torch.stack([v[:length] for v in kept]).mean(dim=0)


def energy_rank(values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2), for ``s`` sorted descending; 0 for an
    all-zero or empty spectrum. ``energy`` must be in (0, 1]. Uses ``deftx.core.denoise.select_rank``
    (with its 1e-6 relative tolerance), so it agrees with DeFT-X's energy rule."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s = torch.sort(values.detach().reshape(-1).double().abs().cpu(), descending=True).values
    total = float((s**2).sum())
    if total <= 0.0:
        return 0
    rank = select_rank(s, total, energy)
    return s.numel() if rank is None else rank
