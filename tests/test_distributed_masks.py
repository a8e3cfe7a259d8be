"""Distributed mask selection equals the single-process selection bit for bit (world sizes 1 and 2,
LT-SFT and DeFT-X, with ties). Ranks are real processes (torch.multiprocessing) talking over gloo;
rendezvous goes through a file store and gloo is bound to the loopback interface."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import loopback_group

from deftx.core.scoring import make_scorer, select_masks
from deftx.core.topk import find_threshold, score_keys
from deftx.training.distributed.selection import (
    assign_owners,
    distributed_select_masks,
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


def _worker(rank: int, world: int, store: str, method: str, out: str) -> None:
    with loopback_group(rank, world, store):
        theta0, theta1 = _tensors(0)
        scorer = _scorer(method)
        plan = plan_shards(SHAPES, world, denoised={n: scorer.denoises(n, s) if hasattr(scorer, "denoises") else False
                                                    for n, s in SHAPES.items()})
        mine = plan.owned(rank)
        results = {}
        for k in KS:
            masks, report = distributed_select_masks(plan, {n: theta0[n] for n in mine},
                                                     {n: theta1[n] for n in mine}, k, scorer)
            results[k] = (masks, report.selected, report.ranks)
        torch.save(results, f"{out}.rank{rank}")


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("method", ["lt_sft", "deft_x"])
def test_distributed_masks_equal_single_process(tmp_path, world, method):
    out = str(tmp_path / "masks")
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), method, out), nprocs=world, join=True)
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
