"""Exact global top-K selection of mask entries, and budgets.

Pure functions over tensors; no Ray, no DeepSpeed.

Selection tie rule (used everywhere, also by the distributed selection): entries are ranked by
score, larger first; among equal scores the entry that comes first in *canonical order* wins.
Canonical order = tensors sorted by name (Python string order), then row-major flat index.
Scores are compared as float32 and must be finite and non-negative (``-0.0`` counts as ``0.0``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

# -- budgets ---------------------------------------------------------------------------------


def resolve_budget(total: int, *, k: int | None = None, density: float | None = None) -> int:
    """Number of entries to select out of ``total``: an explicit count ``k`` (0 <= k <= total)
    or a ``density`` in (0, 1] (rounded to the nearest integer). Exactly one must be given."""
    if (k is None) == (density is None):
        raise ValueError("give exactly one of k (a count) or density (a fraction in (0, 1])")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        if k > total:
            raise ValueError(f"k={k} exceeds the {total} maskable entries")
        return k
    assert density is not None
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return min(total, int(round(density * total)))


# -- exact global top-K ----------------------------------------------------------------------

_HI_BINS = 1 << 15  # float32 keys of finite non-negative numbers are < 0x7f800000: top 15 bits
_LO_BINS = 1 << 16
Reducer = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def score_keys(score: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of a finite, non-negative score tensor (flattened).

    For IEEE float32 x >= 0 the bit pattern read as int32 is monotone in x, so comparing keys
    compares scores exactly. ``-0.0`` (bit pattern 0x80000000) is mapped to the key of ``+0.0``.
    """
    flat = score.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    keys = flat.view(torch.int32)
    if keys.numel() and bool((keys < 0).any()):
        neg = keys < 0
        if bool((keys[neg] != torch.iinfo(torch.int32).min).any()):
            raise ValueError("scores must be non-negative")
        keys = torch.where(neg, torch.zeros((), dtype=torch.int32), keys)
    if keys.numel() and int(keys.max()) >= 0x7F800000:
        raise ValueError("scores must be finite (found inf or nan)")
    return keys


@dataclass(frozen=True)
class Threshold:
    """Result of the K-th-largest search: every entry with key > ``key`` is selected, and
    ``take_ties`` of the ``n_equal`` entries with key == ``key`` (the first ones in canonical order).
    ``key`` is -1 when nothing is selected (k = 0)."""

    key: int
    n_above: int
    n_equal: int
    take_ties: int

    @property
    def value(self) -> float:
        """The K-th largest score as a float (0.0 when k = 0)."""
        return float(torch.tensor([max(self.key, 0)], dtype=torch.int32).view(torch.float32))


def _pick_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Largest bin b with (#entries in bins > b) < k <= (#entries in bins >= b).
    Returns (b, #entries in bins strictly above b)."""
    from_top = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # entries in bins >= b
    b = int(torch.nonzero(from_top >= k).max())
    above = int(from_top[b + 1]) if b + 1 < counts.numel() else 0
    return b, above


def find_threshold(keys: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]], k: int,
                   reduce: Reducer = _identity) -> Threshold:
    """Exact K-th largest key over several key tensors, by a two-pass radix histogram.

    ``keys`` is a list of key tensors (from :func:`score_keys`) or a callable returning a fresh
    iterable of them (so keys can be recomputed per pass instead of held in memory). ``reduce`` sums
    a histogram over processes (``all_reduce``) in the distributed selection; the histograms are
    integer counts, so the threshold is exact for any split of the entries over processes.
    """
    source = keys if callable(keys) else (lambda ks=list(keys): ks)
    hi = torch.zeros(_HI_BINS, dtype=torch.int64)
    for t in source():
        if t.numel():
            hi += torch.bincount(torch.bitwise_right_shift(t, 16), minlength=_HI_BINS)
    hi = reduce(hi)
    total = int(hi.sum())
    if not 0 <= k <= total:
        raise ValueError(f"k={k} is outside [0, {total}]")
    if k == 0:
        return Threshold(key=-1, n_above=0, n_equal=0, take_ties=0)
    b_hi, above_hi = _pick_bin(hi, k)
    lo = torch.zeros(_LO_BINS, dtype=torch.int64)
    for t in source():
        if t.numel():
            sel = t[torch.bitwise_right_shift(t, 16) == b_hi]
            if sel.numel():
                lo += torch.bincount(torch.bitwise_and(sel, 0xFFFF), minlength=_LO_BINS)
    lo = reduce(lo)
    b_lo, above_lo = _pick_bin(lo, k - above_hi)
    n_above = above_hi + above_lo
    n_equal = int(lo[b_lo])
    return Threshold(key=(b_hi << 16) | b_lo, n_above=n_above, n_equal=n_equal, take_ties=k - n_above)


def allocate_ties(tie_counts: list[int], take: int) -> list[int]:
    """Split ``take`` tied entries over tensors given in canonical order: earlier tensors first."""
    out = []
    for count in tie_counts:
        n = min(count, take)
        out.append(n)
        take -= n
    if take:
        raise ValueError("fewer tied entries than the threshold search counted")
    return out


def mask_from_keys(keys: torch.Tensor, threshold: Threshold, take_ties: int) -> torch.Tensor:
    """Flat boolean mask: keys above the threshold plus the first ``take_ties`` keys equal to it."""
    if threshold.key < 0:
        return torch.zeros(keys.shape, dtype=torch.bool)
    mask = keys > threshold.key
    if take_ties:
        tied = torch.nonzero(keys == threshold.key).flatten()[:take_ties]
        mask[tied] = True
    return mask


def global_top_k(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks selecting exactly ``k`` entries over all tensors together (one budget).

    Ranking and tie rule as in the module docstring. Work and memory are linear in the number of
    entries: two histogram passes over int32 keys (no sort, no concatenation of all scores).
    """
    names = sorted(scores)
    keys = {n: score_keys(scores[n]) for n in names}
    threshold = find_threshold([keys[n] for n in names], k)
    ties = [int((keys[n] == threshold.key).sum()) if threshold.take_ties else 0 for n in names]
    takes = allocate_ties(ties, threshold.take_ties)
    return {n: mask_from_keys(keys[n], threshold, t).view(scores[n].shape) for n, t in zip(names, takes)}


# -- statistics ------------------------------------------------------------------------------


def count_selected(masks: Mapping[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def density_by_tensor(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of selected entries per tensor."""
    return {n: float(m.sum()) / max(m.numel(), 1) for n, m in sorted(masks.items())}
