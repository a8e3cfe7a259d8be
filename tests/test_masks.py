"""Exact properties of maskable-parameter roles and global top-K selection."""

from __future__ import annotations

import threading

import pytest
import torch

from deftx.core.roles import body_parameters, embedding_parameter_names, maskable_parameters, parameter_roles
from deftx.core.topk import (
    allocate_ties,
    find_threshold,
    global_top_k,
    mask_from_keys,
    resolve_budget,
    score_keys,
)


def brute_force_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Sort all entries by (-score, tensor name, flat index): the documented tie rule."""
    entries = []
    for name in sorted(scores):
        for j, v in enumerate(scores[name].reshape(-1).tolist()):
            entries.append((-v, name, j))
    entries.sort()
    out = {n: torch.zeros(t.numel(), dtype=torch.bool) for n, t in scores.items()}
    for _, name, j in entries[:k]:
        out[name][j] = True
    return {n: m.view(scores[n].shape) for n, m in out.items()}


def _random_scores(seed: int, levels: int | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (7,), (0,), (2, 2, 3), (1,)]
    out = {}
    for i, shape in enumerate(shapes):
        if levels is None:
            t = torch.rand(shape, generator=g)
        else:  # few distinct values: many ties
            t = torch.randint(0, levels, shape, generator=g).float() / 4
        out[f"t{(i * 7) % 5}.w"] = t
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 1, 2, 5])
def test_global_top_k_matches_brute_force(seed, levels):
    scores = _random_scores(seed, levels)
    total = sum(t.numel() for t in scores.values())
    for k in sorted({0, 1, 2, total // 3, total // 2, total - 1, total}):
        got = global_top_k(scores, k)
        want = brute_force_top_k(scores, k)
        assert sum(int(m.sum()) for m in got.values()) == k
        for name in scores:
            assert got[name].dtype == torch.bool and got[name].shape == scores[name].shape
            assert torch.equal(got[name], want[name]), (name, k)


def test_tie_rule_prefers_earlier_tensor_name_then_index():
    scores = {"b": torch.tensor([1.0, 1.0]), "a": torch.tensor([0.5, 1.0, 1.0])}
    masks = global_top_k(scores, 3)
    assert masks["a"].tolist() == [False, True, True]
    assert masks["b"].tolist() == [True, False]


def test_scores_spanning_radix_bins_and_extreme_values():
    scores = {"x": torch.tensor([0.0, 1e-38, 1.0000001, 1.0, 3.4e38, 2.0**-149, 65536.0, 65537.0])}
    for k in range(9):
        assert torch.equal(global_top_k(scores, k)["x"], brute_force_top_k(scores, k)["x"])


def test_negative_zero_counts_as_zero():
    masks = global_top_k({"x": torch.tensor([-0.0, 0.0, 0.5])}, 2)
    assert masks["x"].tolist() == [True, False, True]


@pytest.mark.parametrize("bad,message", [
    (torch.tensor([1.0, -0.5]), "non-negative"),
    (torch.tensor([1.0, float("nan")]), "finite"),
    (torch.tensor([float("inf")]), "finite"),
])
def test_invalid_scores_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        global_top_k({"x": bad}, 1)


def test_k_out_of_range_rejected():
    with pytest.raises(ValueError, match="outside"):
        global_top_k({"x": torch.ones(3)}, 4)


class _ThreadAllReduce:
    """Sums a tensor over ``world`` threads, like torch.distributed.all_reduce over processes."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.parts: dict[int, torch.Tensor] = {}

    def reducer(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.parts[r] for r in sorted(self.parts))
            self.barrier.wait()
            return total
        return reduce


@pytest.mark.parametrize("split_seed", range(4))
def test_threshold_from_split_histograms_equals_single_process(split_seed):
    """The distributed selection sums per-process histograms: any split of the tensors over
    processes gives the same threshold, and canonical tie allocation gives the same masks."""
    scores = _random_scores(3, levels=3)
    names = sorted(scores)
    keys = {n: score_keys(scores[n]) for n in names}
    owner = {n: int(torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(split_seed * 31 + i)))
             for i, n in enumerate(names)}
    total = sum(t.numel() for t in keys.values())
    for k in range(total + 1):
        single = find_threshold([keys[n] for n in names], k)
        comm = _ThreadAllReduce(2)
        results: dict[int, object] = {}

        def work(rank: int) -> None:
            mine = [keys[n] for n in names if owner[n] == rank]
            results[rank] = find_threshold(mine, k, reduce=comm.reducer(rank))

        threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results[0] == single and results[1] == single
        ties = [int((keys[n] == single.key).sum()) if single.take_ties else 0 for n in names]
        takes = allocate_ties(ties, single.take_ties)
        masks = {n: mask_from_keys(keys[n], single, t).view(scores[n].shape) for n, t in zip(names, takes)}
        want = brute_force_top_k(scores, k)
        assert all(torch.equal(masks[n], want[n]) for n in names)


@pytest.mark.parametrize("total,kwargs,expected", [
    (1000, {"density": 0.01}, 10),
    (1000, {"density": 1.0}, 1000),
    (1000, {"density": 0.0015}, 2),
    (1000, {"k": 0}, 0),
    (1000, {"k": 1000}, 1000),
    (117_486_720, {"density": 0.01}, 1_174_867),
])
def test_resolve_budget(total, kwargs, expected):
    assert resolve_budget(total, **kwargs) == expected


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one"),
    ({"k": 1, "density": 0.1}, "exactly one"),
    ({"density": 0.0}, r"\(0, 1\]"),
    ({"density": 1.5}, r"\(0, 1\]"),
    ({"density": -0.1}, r"\(0, 1\]"),
    ({"k": -1}, "non-negative"),
    ({"k": 1001}, "exceeds"),
    ({"k": 2.5}, "non-negative integer"),
])
def test_resolve_budget_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_budget(1000, **kwargs)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_xlmr_dir"])
def test_parameter_roles_language_and_task(request, fixture):
    from deftx.models import load_classifier, load_masked_lm

    path = str(request.getfixturevalue(fixture))
    mlm, has_head = load_masked_lm(path)
    assert not has_head  # the tiny model, like the offline e5 model, ships no MLM head
    roles = parameter_roles(mlm, "language")
    body = body_parameters(mlm)
    # the word embedding is maskable even though XLM-R lists the tied decoder first (transformers 5)
    assert "embeddings.word_embeddings.weight" in roles.maskable
    assert not any("LayerNorm" in n for n in roles.maskable)
    assert set(roles.maskable) == {n for n in body if "LayerNorm" not in n}
    decoder = mlm.get_output_embeddings().weight
    assert decoder is not body["embeddings.word_embeddings.weight"]
    assert not decoder.requires_grad and any(p is decoder for p in roles.frozen.values())
    assert roles.head and all(not any(p is q for q in body.values()) for p in roles.head.values())
    assert embedding_parameter_names(mlm) >= {"embeddings.word_embeddings.weight",
                                              "embeddings.position_embeddings.weight"}

    clf = load_classifier(path, ["a", "b", "c"])
    croles = parameter_roles(clf, "task")
    assert set(croles.maskable) == set(roles.maskable)
    assert any(n.endswith("classifier.weight") or "classifier" in n for n in croles.head)
    assert set(maskable_parameters(clf)) == set(croles.maskable)
    n_all = sum(p.numel() for p in clf.parameters())
    n_parts = sum(p.numel() for d in (croles.maskable, croles.head, croles.frozen) for p in d.values())
    assert n_all == n_parts


def test_tied_decoder_is_rejected(tiny_model_dir):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(tiny_model_dir))
    with pytest.raises(ValueError, match="untie"):
        parameter_roles(model, "language")
