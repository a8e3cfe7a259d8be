"""Distributed mask selection equals the single-process selection bit for bit (world sizes 1 and 2,
LT-SFT and DeFT-X, with ties). Ranks are real processes (torch.multiprocessing) talking over gloo;
rendezvous goes through a file store and gloo is bound to the loopback interface."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from helpers import loopback_group

from deftx.core.scoring import denoised_tensors, is_elementwise, make_scorer, select_masks
from deftx.core.topk import find_threshold, score_keys
from deftx.training.distributed.selection import (
    assign_owners,
    distributed_select_masks,
    local_part,
    partition_span,
    plan_shards,
    scoring_cost,
)

SHAPES = {"emb.weight": (40, 6), "l0.q.weight": (12, 12), "l0.q.bias": (12,), "l0.ffn.weight": (24, 12),
          "l1.q.weight": (12, 12), "l1.ffn.weight": (12, 24), "l1.ffn.bias": (24,)}
KS = (0, 1, 37, 200, 1000)


def _tensors(seed: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    theta0 = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    # changes quantised to few values, so many scores tie at the threshold
    theta1 = {n: v + torch.randint(-3, 4, v.shape, generator=g).float() / 8 for n, v in theta0.items()}
    return theta0, theta1


def _scorer(method: str):
    return make_scorer(method, rank=2 if method == "deft_x" else None, residual_keep=0.05,
                       embedding_names=frozenset({"emb.weight"}))


def _worker(rank: int, world: int, store: str, method: str, out: str, split: int, stride: int) -> None:
    from deftx.core import topk

    topk.SAMPLE_STRIDE = stride  # a small stride takes the candidate path even on these small tensors
    with loopback_group(rank, world, store):
        theta0, theta1 = _tensors(0)
        scorer = _scorer(method)
        plan = plan_shards(SHAPES, world, denoised=denoised_tensors(scorer, SHAPES),
                           elementwise={n: is_elementwise(scorer, n, s) for n, s in SHAPES.items()},
                           split_min_numel=split)
        needed = plan.needed(rank)
        results = {}
        for k in KS:
            masks, report = distributed_select_masks(plan, {n: local_part(theta0[n], r) for n, r in needed.items()},
                                                     {n: local_part(theta1[n], r) for n, r in needed.items()}, k,
                                                     scorer)
            results[k] = (masks, report.selected, report.ranks)
        torch.save(results, f"{out}.rank{rank}")


@pytest.mark.parametrize("world,split,stride", [(1, 10**9, 64), (2, 10**9, 64), (2, 20, 2), (3, 20, 3)])
@pytest.mark.parametrize("method", ["lt_sft", "deft_x"])
def test_distributed_masks_equal_single_process(tmp_path, world, method, split, stride):
    """Whole tensors per rank, or (split=20) every element-wise-scored tensor of 20+ entries cut
    into one block of rows per rank; the exact search on all entries or (small stride) on sampled
    candidates: the masks equal the single-process selection bit for bit."""
    if split < 10**9:
        scorer = _scorer(method)
        plan = plan_shards(SHAPES, world, denoised=denoised_tensors(scorer, SHAPES),
                           elementwise={n: is_elementwise(scorer, n, s) for n, s in SHAPES.items()},
                           split_min_numel=split)
        assert sum(p.span is not None for p in plan.pieces) >= world  # some tensors are split
    out = str(tmp_path / "masks")
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), method, out, split, stride), nprocs=world, join=True)
    theta0, theta1 = _tensors(0)
    total = sum(v.numel() for v in theta0.values())
    split_ties = 0
    for k in KS:
        k_eff = min(k, total)
        scorer = _scorer(method)
        keys = [score_keys(scorer(n, theta0[n], theta1[n])) for n in sorted(theta0)]
        threshold = find_threshold(keys, k_eff)
        split_ties += 0 < threshold.take_ties < threshold.n_equal  # the tie rule decides membership
        want, report = select_masks(theta0, theta1, k_eff, _scorer(method))
        for rank in range(world):
            masks, selected, ranks = torch.load(f"{out}.rank{rank}")[k]
            assert selected == k_eff
            assert set(masks) == set(want)
            for name in want:
                assert torch.equal(masks[name], want[name]), (rank, k, name)
            if method == "deft_x":
                assert ranks == report.ranks
    assert split_ties >= (2 if method == "lt_sft" else 1)  # ties at the threshold were present and split


def test_owners_balance_svd_cost_not_tensor_count():
    costs = {n: scoring_cost(s, len(s) == 2) for n, s in SHAPES.items()}
    owners = assign_owners(costs, 2)
    load = [sum(c for n, c in costs.items() if owners[n] == r) for r in (0, 1)]
    assert max(load) / sum(load) < 0.6  # balanced by cost
    assert assign_owners(costs, 2) == owners  # deterministic
    assert set(assign_owners(costs, 1).values()) == {0}
    with pytest.raises(ValueError):
        assign_owners(costs, 0)


def test_split_plan_follows_zero3_partitions_in_canonical_order():
    """A large element-wise tensor is cut into the flat spans ZeRO-3 stores on each rank; SVD-scored
    matrices and tensors not known to be element-wise stay whole; the pieces cover every entry
    exactly once and are sorted by (name, first entry)."""
    shapes = {"emb.weight": (1000, 8), "l0.q.weight": (64, 64), "l0.q.bias": (64,), "pos.weight": (30, 8),
              "other.weight": (900, 9)}
    kwargs = dict(denoised={"l0.q.weight": True}, split_min_numel=4000,
                  elementwise={"emb.weight": True, "l0.q.bias": True, "pos.weight": True})
    plan = plan_shards(shapes, 3, **kwargs)
    split = [p for p in plan.pieces if p.span is not None]
    assert [p.name for p in split] == ["emb.weight"] * 3 and [p.owner for p in split] == [0, 1, 2]
    assert [p.span for p in split] == [(0, 2667), (2667, 5334), (5334, 8000)]  # ceil(8000 / 3) = 2667
    assert [p.span for p in split] == [partition_span(8000, r, 3) for r in range(3)]
    keys = [(p.name, p.span[0] if p.span else 0) for p in plan.pieces]
    assert keys == sorted(keys)
    assert sum(plan.numel(p) for p in plan.pieces) == sum(math.prod(s) for s in shapes.values())
    assert all(p.span is None for p in plan_shards(shapes, 1, **kwargs).pieces)
    assert plan.owners == {p.name: p.owner for p in plan.pieces if p.span is None}
    assert "emb.weight" not in plan.owners and plan.needed(1)["emb.weight"] == (2667, 5334)
    t = torch.arange(8000.0).view(1000, 8)
    assert torch.equal(local_part(t, (2667, 5334)), torch.arange(2667.0, 5334.0))
