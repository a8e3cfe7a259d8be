"""Distributed mask selection over ``torch.distributed``.

Each rank owns some of the maskable tensors (assigned by estimated scoring cost, not round-robin),
and a part of each large tensor scored element-wise (the word embedding), scores only those, and the ranks agree on the exact global K-th score by summing radix histograms
(``deftx.core.topk.threshold_and_candidates`` with an all-reduce). Ties at the threshold are allocated in the
canonical order of the single-process selection, and the bit-packed boolean masks are all-gathered
so every rank ends with the full mask set. The result equals ``deftx.core.scoring.select_masks`` bit
for bit for any world size.

Only torch.distributed collectives are used here (no Ray, no DeepSpeed): the caller provides the
owned tensors, e.g. gathered from ZeRO partitions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from deftx.core.scoring import MaskScorer, SelectionReport, key_source
from deftx.core.topk import allocate_ties, select_mask, threshold_and_candidates, tie_counts


def scoring_cost(shape: tuple[int, ...], denoised: bool) -> float:
    """Relative cost of scoring one tensor: a thin SVD of an m x n matrix (m >= n) is O(m n^2);
    an element-wise score is O(m n)."""
    numel = math.prod(shape)
    if denoised and len(shape) == 2:
        return float(numel) * min(shape)
    return float(numel)


def assign_owners(costs: Mapping[str, float], world_size: int,
                  initial_load: list[float] | None = None) -> dict[str, int]:
    """Longest-processing-time-first assignment: tensors in decreasing cost (ties by name) go to
    the least-loaded rank (ties to the lower rank), starting from ``initial_load`` (the split
    tensors' rows). Deterministic, so every rank computes the same."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    load = list(initial_load) if initial_load is not None else [0.0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


SPLIT_MIN_NUMEL = 4_000_000  # element-wise-scored tensors at least this large are split


@dataclass(frozen=True)
class Piece:
    """The flat row-major entries ``span`` = [start, stop) of tensor ``name``, scored by rank
    ``owner``; ``span`` is None when the rank owns the whole tensor."""

    name: str
    span: tuple[int, int] | None
    owner: int


def partition_span(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The flat entries DeepSpeed ZeRO-3 stores on ``rank``: partitions of ceil(numel / W)
    entries, the last one short (its padding holds no entry)."""
    size = -(-numel // world_size)
    return min(rank * size, numel), min((rank + 1) * size, numel)


@dataclass(frozen=True)
class ShardPlan:
    """Who scores what (identical on every rank). Tensors scored by an SVD are owned whole.
    Large element-wise-scored tensors (the word embedding) are split: rank r scores the entries
    ZeRO-3 stores on it (:func:`partition_span`), so under ZeRO-3 it reads them from its own
    partition without communication, and their scores need nothing from other entries.
    ``pieces`` are in canonical order (by tensor name, then by entry), the order in which the
    single-process selection breaks ties."""

    shapes: dict[str, tuple[int, ...]]
    pieces: tuple[Piece, ...]

    @property
    def owners(self) -> dict[str, int]:
        """The owner of every tensor that is not split (a split tensor has one owner per piece)."""
        return {p.name: p.owner for p in self.pieces if p.span is None}

    def pieces_of(self, rank: int) -> list[Piece]:
        return [p for p in self.pieces if p.owner == rank]

    def owned(self, rank: int) -> list[str]:
        """Names of the tensors rank ``rank`` scores, whole or in part."""
        return [p.name for p in self.pieces_of(rank)]

    def needed(self, rank: int) -> dict[str, tuple[int, int] | None]:
        """What rank ``rank`` must read of each tensor it scores: a flat span, or None for all."""
        return {p.name: p.span for p in self.pieces_of(rank)}

    def numel(self, piece: Piece) -> int:
        return math.prod(self.shapes[piece.name]) if piece.span is None else piece.span[1] - piece.span[0]


def local_part(tensor: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    """The part of ``tensor`` a piece covers: all of it, or its flat entries ``span``."""
    return tensor if span is None else tensor.reshape(-1)[span[0]: span[1]]


def plan_shards(shapes: Mapping[str, tuple[int, ...]], world_size: int,
                denoised: Mapping[str, bool] | None = None, elementwise: Mapping[str, bool] | None = None,
                split_min_numel: int = SPLIT_MIN_NUMEL) -> ShardPlan:
    """Assign the tensors to ranks. ``denoised`` marks tensors scored by an SVD (costly, never
    split); ``elementwise`` marks tensors whose score of an entry depends on that entry alone: those
    of ``split_min_numel`` or more entries are split over the ranks (nothing is split when it is
    not given)."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    shapes = {n: tuple(s) for n, s in shapes.items()}
    is_denoised = {n: bool(denoised and denoised.get(n)) for n in shapes}
    split = {n for n, s in shapes.items() if world_size > 1 and elementwise and elementwise.get(n)
             and not is_denoised[n] and math.prod(s) >= max(split_min_numel, world_size)}
    pieces: list[Piece] = []
    load = [0.0] * world_size
    for name in sorted(split):
        for rank in range(world_size):
            span = partition_span(math.prod(shapes[name]), rank, world_size)
            pieces.append(Piece(name, span, rank))
            load[rank] += float(span[1] - span[0])
    costs = {n: scoring_cost(s, is_denoised[n]) for n, s in shapes.items() if n not in split}
    whole = assign_owners(costs, world_size, initial_load=load)
    pieces.extend(Piece(n, None, r) for n, r in whole.items())
    pieces.sort(key=lambda p: (p.name, p.span[0] if p.span else 0))
    return ShardPlan(shapes=shapes, pieces=tuple(pieces))


def _pack(masks: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([m.reshape(-1) for m in masks]) if masks else torch.zeros(0, dtype=torch.bool)
    return torch.from_numpy(np.packbits(flat.numpy().astype(np.uint8)))


def distributed_select_masks(plan: ShardPlan, theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor],
                             k: int, scorer: MaskScorer) -> tuple[dict[str, torch.Tensor], SelectionReport]:
    """Collective: every rank calls it with what it scores (``plan.needed(rank)``: whole tensors,
    or its flat span of a split one, as from :func:`local_part`) and receives the full mask set,
    equal to the single-process ``select_masks`` bit for bit."""
    rank, world = dist.get_rank(), dist.get_world_size()
    names = sorted(plan.shapes)
    mine = plan.pieces_of(rank)
    for piece in mine:
        if piece.name not in theta0 or piece.name not in theta1:
            raise ValueError(f"rank {rank} owns {piece.name} but was not given its values")
        want = plan.numel(piece)
        if theta0[piece.name].numel() != want or theta1[piece.name].numel() != want:
            raise ValueError(f"rank {rank} was given {theta1[piece.name].numel()} entries of {piece.name}, "
                             f"its piece has {want}")
    keys = [key_source(scorer, p.name, theta0[p.name], theta1[p.name]) for p in mine]
    threshold, candidates = threshold_and_candidates(keys, k, reduce=_all_reduce_sum)
    index = {p: i for i, p in enumerate(plan.pieces)}
    takes = [0] * len(plan.pieces)
    if not threshold.all_ties:  # split the ties in canonical order over all ranks' pieces
        ties = torch.zeros(len(plan.pieces), dtype=torch.int64)
        for piece, count in zip(mine, tie_counts(keys, threshold, candidates)):
            ties[index[piece]] = count
        takes = allocate_ties(_all_reduce_sum(ties).tolist(), threshold.take_ties)
    local = [select_mask(key, threshold, takes[index[p]], candidates.keys[i] if candidates else None,
                         candidates.positions[i] if candidates else None) for i, (p, key) in enumerate(zip(mine, keys))]

    # all-gather the owned masks, bit-packed; sizes follow from the plan, so no size exchange
    sizes = [sum(plan.numel(p) for p in plan.pieces_of(r)) for r in range(world)]
    width = max((s + 7) // 8 for s in sizes) if sizes else 0
    packed = torch.zeros(width, dtype=torch.uint8)
    mine_packed = _pack(local)
    packed[: mine_packed.numel()] = mine_packed
    gathered = [torch.zeros(width, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(gathered, packed)
    parts: dict[Piece, torch.Tensor] = {}
    for r in range(world):
        bits = torch.from_numpy(np.unpackbits(gathered[r].numpy())[: sizes[r]].astype(bool))
        offset = 0
        for piece in plan.pieces_of(r):
            numel = plan.numel(piece)
            parts[piece] = bits[offset: offset + numel]
            offset += numel
    masks: dict[str, torch.Tensor] = {}
    for name in names:
        flat = torch.cat([parts[p] for p in plan.pieces if p.name == name])
        masks[name] = flat.view(plan.shapes[name]).clone()

    infos = getattr(scorer, "infos", {})
    scored = {p.name for p in mine if p.span is None}
    ranks_all: list[dict[str, int]] = [dict() for _ in range(world)]
    dist.all_gather_object(ranks_all, {n: i.rank for n, i in infos.items() if n in scored})
    return masks, SelectionReport.from_masks(k, masks, {n: r for part in ranks_all for n, r in part.items()})
