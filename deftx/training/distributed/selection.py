"""Distributed mask selection over ``torch.distributed``.

Each rank owns some of the maskable tensors (assigned by estimated scoring cost, not round-robin),
scores only those, and the ranks agree on the exact global K-th score by summing radix histograms
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


def assign_owners(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Longest-processing-time-first assignment: tensors in decreasing cost (ties by name) go to
    the least-loaded rank (ties to the lower rank). Deterministic, so every rank computes the same."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    load = [0.0] * world_size
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


@dataclass(frozen=True)
class ShardPlan:
    """Which rank owns which tensor, and the shapes of all tensors (identical on every rank)."""

    shapes: dict[str, tuple[int, ...]]
    owners: dict[str, int]

    def owned(self, rank: int) -> list[str]:
        return [n for n in sorted(self.shapes) if self.owners[n] == rank]


def plan_shards(shapes: Mapping[str, tuple[int, ...]], world_size: int,
                denoised: Mapping[str, bool] | None = None) -> ShardPlan:
    costs = {n: scoring_cost(tuple(s), bool(denoised and denoised.get(n))) for n, s in shapes.items()}
    return ShardPlan(shapes={n: tuple(s) for n, s in shapes.items()}, owners=assign_owners(costs, world_size))


def _pack(masks: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([m.reshape(-1) for m in masks]) if masks else torch.zeros(0, dtype=torch.bool)
    return torch.from_numpy(np.packbits(flat.numpy().astype(np.uint8)))


def distributed_select_masks(plan: ShardPlan, theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor],
                             k: int, scorer: MaskScorer) -> tuple[dict[str, torch.Tensor], SelectionReport]:
    """Collective: every rank calls it with the tensors it owns (``plan.owned(rank)``) and receives
    the full mask set, equal to the single-process ``select_masks`` bit for bit."""
    rank, world = dist.get_rank(), dist.get_world_size()
    names = sorted(plan.shapes)
    mine = plan.owned(rank)
    missing = [n for n in mine if n not in theta0 or n not in theta1]
    if missing:
        raise ValueError(f"rank {rank} owns {missing[0]} but was not given its values")
    keys = {n: key_source(scorer, n, theta0[n], theta1[n]) for n in mine}
    threshold, candidates = threshold_and_candidates([keys[n] for n in mine], k, reduce=_all_reduce_sum)
    takes = dict.fromkeys(names, 0)
    if not threshold.all_ties:  # split the ties in canonical order over all ranks' tensors
        ties = torch.zeros(len(names), dtype=torch.int64)
        local_ties = dict(zip(mine, tie_counts([keys[n] for n in mine], threshold, candidates)))
        for i, n in enumerate(names):
            ties[i] = local_ties.get(n, 0)
        takes = dict(zip(names, allocate_ties(_all_reduce_sum(ties).tolist(), threshold.take_ties)))
    local = {n: select_mask(keys[n], threshold, takes[n], candidates.keys[i] if candidates else None,
                            candidates.positions[i] if candidates else None) for i, n in enumerate(mine)}

    # all-gather the owned masks, bit-packed; sizes follow from the plan, so no size exchange
    sizes = [sum(math.prod(plan.shapes[n]) for n in plan.owned(r)) for r in range(world)]
    width = max((s + 7) // 8 for s in sizes) if sizes else 0
    packed = torch.zeros(width, dtype=torch.uint8)
    mine_packed = _pack([local[n] for n in mine])
    packed[: mine_packed.numel()] = mine_packed
    gathered = [torch.zeros(width, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(gathered, packed)
    masks: dict[str, torch.Tensor] = {}
    for r in range(world):
        bits = torch.from_numpy(np.unpackbits(gathered[r].numpy())[: sizes[r]].astype(bool))
        offset = 0
        for n in plan.owned(r):
            numel = math.prod(plan.shapes[n])
            masks[n] = bits[offset: offset + numel].view(plan.shapes[n]).clone()
            offset += numel

    infos = getattr(scorer, "infos", {})
    ranks_all: list[dict[str, int]] = [dict() for _ in range(world)]
    dist.all_gather_object(ranks_all, {n: i.rank for n, i in infos.items() if n in keys})
    masks = {n: masks[n] for n in names}
    return masks, SelectionReport.from_masks(k, masks, {n: r for part in ranks_all for n, r in part.items()})
