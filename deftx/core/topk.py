"""Exact global top-K selection of mask entries, and budgets.

Pure functions over tensors; no Ray, no DeepSpeed.

Selection tie rule (used everywhere, also by the distributed selection): entries are ranked by
score, larger first; among equal scores the entry that comes first in *canonical order* wins.
Canonical order = tensors sorted by name (Python string order), then row-major flat index.
Scores are compared as float32 and must be finite and non-negative (``-0.0`` counts as ``0.0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

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
    if not keys.numel():
        return keys
    low, high = (int(v) for v in torch.aminmax(keys))  # one pass validates both bounds
    if low < 0:
        neg = keys < 0
        if bool((keys[neg] != torch.iinfo(torch.int32).min).any()):
            raise ValueError("scores must be non-negative")
        keys = torch.where(neg, torch.zeros((), dtype=torch.int32), keys)
    if high >= 0x7F800000:
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

    @property
    def all_ties(self) -> bool:
        """True when every entry equal to the threshold is selected (no tie has to be split)."""
        return self.take_ties == self.n_equal


def _pick_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Largest bin b with (#entries in bins > b) < k <= (#entries in bins >= b).
    Returns (b, #entries in bins strictly above b)."""
    from_top = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # entries in bins >= b
    b = int(torch.nonzero(from_top >= k).max())
    above = int(from_top[b + 1]) if b + 1 < counts.numel() else 0
    return b, above


def _radix_threshold(tensors: Sequence[torch.Tensor], k: int, reduce: Reducer) -> Threshold:
    """Exact K-th largest key of ``tensors`` (over all processes) by a two-pass radix histogram."""
    hi = torch.zeros(_HI_BINS, dtype=torch.int64)
    for t in tensors:
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
    for t in tensors:
        if t.numel():
            sel = t[torch.bitwise_right_shift(t, 16) == b_hi]
            if sel.numel():
                lo += torch.bincount(torch.bitwise_and(sel, 0xFFFF), minlength=_LO_BINS)
    lo = reduce(lo)
    b_lo, above_lo = _pick_bin(lo, k - above_hi)
    n_above = above_hi + above_lo
    n_equal = int(lo[b_lo])
    return Threshold(key=(b_hi << 16) | b_lo, n_above=n_above, n_equal=n_equal, take_ties=k - n_above)


# Candidate filtering: a strided sample (every SAMPLE_STRIDE-th key) estimates a pivot key that at
# least K entries reach; the exact search then runs on the entries at or above the pivot only
# (about K of them, kept with their positions) instead of on all entries. If fewer than K entries
# reach the pivot (the sample misled), the search falls back to all entries: exact either way.
SAMPLE_STRIDE = 64
_MAX_CANDIDATE_FRACTION = 0.25  # above this the filtering pass costs more than it saves
_CHUNK = 1 << 18  # entries filtered at a time (1 MiB of keys: the compare stays in cache)


@dataclass(frozen=True)
class Candidates:
    """For each key source, its keys at or above a pivot <= the threshold, in row-major order,
    and their flat positions. Every selected entry is a candidate."""

    keys: list[torch.Tensor]
    positions: list[torch.Tensor]


class KeySource(Protocol):
    """The keys of one tensor, read in three ways. A source may compute its keys on the fly (see
    ``deftx.core.scoring.ChangeKeys``), so that a selection never holds all scores at once."""

    numel: int

    def sample(self, stride: int) -> torch.Tensor:
        """Keys at flat positions 0, stride, 2 * stride, ..."""
        ...

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Keys at flat positions [start, stop), validated as :func:`score_keys` does."""
        ...

    def keys(self) -> torch.Tensor:
        """All keys, flat."""
        ...


class TensorKeys:
    """A :class:`KeySource` over keys already computed (by :func:`score_keys`)."""

    def __init__(self, keys: torch.Tensor) -> None:
        self._keys = keys.reshape(-1)
        self.numel = self._keys.numel()

    def sample(self, stride: int) -> torch.Tensor:
        return self._keys[::stride]

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        return self._keys[start:stop]

    def keys(self) -> torch.Tensor:
        return self._keys


def _as_source(keys: torch.Tensor | KeySource) -> KeySource:
    return TensorKeys(keys) if isinstance(keys, torch.Tensor) else keys


def _sample_pivot(sources: Sequence[KeySource], k: int, total: int, reduce: Reducer) -> int:
    """A key that, judging by a strided sample, somewhat more than ``k`` entries reach; 0 when
    filtering would keep too large a part of the entries to pay."""
    stride = SAMPLE_STRIDE
    hist = torch.zeros(_HI_BINS, dtype=torch.int64)
    for source in sources:
        if source.numel:
            hist += torch.bincount(torch.bitwise_right_shift(source.sample(stride), 16), minlength=_HI_BINS)
    hist = reduce(hist)
    expected = k / stride
    want = int(math.ceil(1.25 * expected + 4.0 * math.sqrt(expected) + 8))  # margin: ~4 sigma
    from_top = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])
    reach = torch.nonzero(from_top >= want)
    if not reach.numel():
        return 0
    b = int(reach.max())
    if int(from_top[b]) * stride > _MAX_CANDIDATE_FRACTION * total:
        return 0
    return b << 16


def _filter(source: KeySource, pivot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of ``source`` that are >= pivot and their flat positions, one cache-sized chunk at a time."""
    keys, positions = [], []
    for start in range(0, source.numel, _CHUNK):
        chunk = source.chunk(start, min(start + _CHUNK, source.numel))
        idx = torch.nonzero(chunk >= pivot).flatten()
        if idx.numel():
            keys.append(chunk[idx])
            positions.append(idx + start)
    if not keys:
        return torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int64)
    return torch.cat(keys), torch.cat(positions)


def threshold_and_candidates(keys: Sequence[torch.Tensor | KeySource], k: int, reduce: Reducer = _identity
                             ) -> tuple[Threshold, Candidates | None]:
    """Exact K-th largest key over ``keys`` (key tensors or :class:`KeySource` objects; see
    :func:`find_threshold`), and the candidates the search ran on (None when it had to look at
    all entries)."""
    sources = [_as_source(t) for t in keys]
    counts = torch.tensor([sum(s.numel for s in sources)], dtype=torch.int64)
    total = int(reduce(counts)[0])
    if not 0 <= k <= total:
        raise ValueError(f"k={k} is outside [0, {total}]")
    if k == 0:
        return Threshold(key=-1, n_above=0, n_equal=0, take_ties=0), None
    pivot = _sample_pivot(sources, k, total, reduce)
    if pivot > 0:
        filtered = [_filter(s, pivot) for s in sources]
        candidates = Candidates(keys=[f[0] for f in filtered], positions=[f[1] for f in filtered])
        reached = int(reduce(torch.tensor([sum(c.numel() for c in candidates.keys)], dtype=torch.int64))[0])
        if reached >= k:  # the K-th largest key is >= pivot: every entry that matters is a candidate
            return _radix_threshold(candidates.keys, k, reduce), candidates
    return _radix_threshold([s.keys() for s in sources], k, reduce), None


def find_threshold(keys: Iterable[torch.Tensor | KeySource] | Callable[[], Iterable[torch.Tensor]], k: int,
                   reduce: Reducer = _identity) -> Threshold:
    """Exact K-th largest key over several key tensors.

    ``keys`` is a list of key tensors (from :func:`score_keys`) or key sources, or a callable
    returning them. ``reduce`` sums a histogram or a count over processes (``all_reduce``) in the
    distributed selection; everything reduced is an integer count, so the threshold is exact for
    any split of the entries over processes. A strided sample picks a pivot, the exact two-pass
    radix histogram runs on the entries at or above it (about K) and falls back to all entries
    when fewer than K reach the pivot.
    """
    tensors = list(keys() if callable(keys) else keys)
    return threshold_and_candidates(tensors, k, reduce)[0]


def tie_counts(keys: Sequence[torch.Tensor | KeySource], threshold: Threshold,
               candidates: Candidates | None = None) -> list[int]:
    """Entries equal to the threshold in each key tensor (counted on the candidates when given)."""
    if threshold.key < 0:
        return [0] * len(keys)
    tensors = candidates.keys if candidates is not None else [_as_source(t).keys() for t in keys]
    return [int(torch.count_nonzero(t == threshold.key)) for t in tensors]


def select_mask(keys: torch.Tensor | KeySource, threshold: Threshold, take_ties: int,
                candidate_keys: torch.Tensor | None = None, candidate_positions: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Flat boolean mask of one key tensor: keys above the threshold plus its first ``take_ties``
    keys equal to it (all of them when the threshold selects every tie). Built from the
    candidates when given (no pass over all keys), else by :func:`mask_from_keys`."""
    source = _as_source(keys)
    if candidate_keys is None or candidate_positions is None:
        return mask_from_keys(source.keys(), threshold, take_ties)
    mask = torch.zeros(source.numel, dtype=torch.bool)
    if threshold.key < 0:
        return mask
    if threshold.all_ties:
        mask[candidate_positions[candidate_keys >= threshold.key]] = True
        return mask
    mask[candidate_positions[candidate_keys > threshold.key]] = True
    if take_ties:
        mask[candidate_positions[candidate_keys == threshold.key][:take_ties]] = True
    return mask


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
    """Flat boolean mask: keys above the threshold plus the first ``take_ties`` keys equal to it
    (all keys equal to it when the threshold selects every tie; ``take_ties`` is then ignored)."""
    if threshold.key < 0:
        return torch.zeros(keys.shape, dtype=torch.bool)
    if threshold.all_ties:
        return keys >= threshold.key
    mask = keys > threshold.key
    if take_ties:
        tied = torch.nonzero(keys == threshold.key).flatten()[:take_ties]
        mask[tied] = True
    return mask


def top_k_of_sources(sources: Mapping[str, torch.Tensor | KeySource], k: int) -> dict[str, torch.Tensor]:
    """Flat boolean masks selecting exactly ``k`` entries over all key sources together (the tie
    rule of the module docstring). A sampled pivot, one filtering pass, an exact radix search over
    about K candidates, and masks written from the candidates' positions."""
    names = sorted(sources)
    ordered = [_as_source(sources[n]) for n in names]
    threshold, cands = threshold_and_candidates(ordered, k)
    takes = [0] * len(names)
    if not threshold.all_ties:
        takes = allocate_ties(tie_counts(ordered, threshold, cands), threshold.take_ties)
    return {name: select_mask(source, threshold, takes[i], cands.keys[i] if cands else None,
                              cands.positions[i] if cands else None)
            for i, (name, source) in enumerate(zip(names, ordered))}


def global_top_k(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks selecting exactly ``k`` entries over all tensors together (one budget).

    Ranking and tie rule as in the module docstring. Work and memory are linear in the number of
    entries: no sort and no concatenation of all scores (see :func:`top_k_of_sources`).
    """
    flat = top_k_of_sources({n: score_keys(t) for n, t in scores.items()}, k)
    return {n: flat[n].view(scores[n].shape) for n in sorted(scores)}


# -- statistics ------------------------------------------------------------------------------


def count_selected(masks: Mapping[str, torch.Tensor]) -> int:
    return sum(int(torch.count_nonzero(m)) for m in masks.values())


def density_by_tensor(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of selected entries per tensor."""
    return {n: int(torch.count_nonzero(m)) / max(m.numel(), 1) for n, m in sorted(masks.items())}
