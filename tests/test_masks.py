"""Exact properties of maskable-parameter roles and global top-K selection."""

from __future__ import annotations

import threading

import pytest
import torch

from deftx.core import topk
from deftx.core.roles import body_parameters, embedding_parameter_names, maskable_parameters, parameter_roles
from deftx.core.topk import (
    allocate_ties,
    find_threshold,
    global_top_k,
    mask_from_keys,
    resolve_budget,
    score_keys,
    select_mask,
    threshold_and_candidates,
    tie_counts,
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


def sorted_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The tie rule by a stable sort of all keys in canonical order (for sizes too large for
    :func:`brute_force_top_k`)."""
    names = sorted(scores)
    keys = torch.cat([score_keys(scores[n]) for n in names])
    order = torch.sort(keys, descending=True, stable=True).indices[:k]
    flat = torch.zeros(keys.numel(), dtype=torch.bool)
    flat[order] = True
    out, offset = {}, 0
    for n in names:
        out[n] = flat[offset: offset + scores[n].numel()].view(scores[n].shape)
        offset += scores[n].numel()
    return out


def _medium_scores(seed: int, levels: int | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"b.w": (300, 200), "a.w": (50_000,), "c.w": (7,), "d.w": (0,), "e.w": (4, 999)}
    if levels is None:
        return {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    return {n: torch.randint(0, levels, s, generator=g).float() / levels for n, s in shapes.items()}


@pytest.mark.parametrize("stride", [1, 3, 64])
@pytest.mark.parametrize("levels", [None, 7, 1000])
def test_candidate_search_equals_sorting(monkeypatch, stride, levels):
    """The sampled pivot only narrows where the exact search looks: the masks equal a full stable
    sort for every K, whether the search ran on candidates or fell back to all entries, and with
    heavy ties at the threshold (few levels)."""
    monkeypatch.setattr(topk, "SAMPLE_STRIDE", stride)
    scores = _medium_scores(stride + (levels or 0), levels)
    names = sorted(scores)
    keys = [score_keys(scores[n]) for n in names]
    total = sum(t.numel() for t in keys)
    used_candidates = 0
    for k in sorted({1, 2, 50, 777, 1000, 4000, total // 5, total // 2, total}):
        got = global_top_k(scores, k)
        want = sorted_top_k(scores, k)
        assert sum(int(m.sum()) for m in got.values()) == k
        assert all(torch.equal(got[n], want[n]) for n in names), k
        _, cands = threshold_and_candidates(keys, k)
        if cands is not None:
            used_candidates += 1
            assert sum(c.numel() for c in cands.keys) >= k
            for t, ck, cp in zip(keys, cands.keys, cands.positions):
                assert torch.equal(t[cp], ck)
    assert used_candidates >= 3  # the fast path is what was tested, not only the fallback


def test_misleading_sample_falls_back_to_all_entries(monkeypatch):
    """Every sampled entry is large, so the pivot says "few entries are needed above it"; fewer
    than K reach it, and the search must fall back to all entries and stay exact."""
    monkeypatch.setattr(topk, "SAMPLE_STRIDE", 4)
    t = torch.full((200_000,), 0.25)
    t[:40_000:4] = 1.0 + torch.arange(10_000).float() / 10_000  # exactly sampled positions
    t[1:40_000:4] = torch.linspace(0.5, 0.9, 10_000)
    scores = {"x": t}
    keys = [score_keys(t)]
    k = 15_000
    pivot = topk._sample_pivot([topk.TensorKeys(keys[0])], k, t.numel(), topk._identity)
    assert pivot > 0 and int((keys[0] >= pivot).sum()) < k  # the sample did mislead
    threshold, cands = threshold_and_candidates(keys, k)
    assert cands is None
    assert threshold == topk._radix_threshold(keys, k, topk._identity)
    assert torch.equal(global_top_k(scores, k)["x"], sorted_top_k(scores, k)["x"])


@pytest.mark.parametrize("world", [2, 3])
def test_candidate_search_split_over_processes(monkeypatch, world):
    """Split over ``world`` simulated processes (histograms and counts summed), the candidate
    search gives the single-process threshold, and the masks from each process's candidates and
    canonical tie allocation equal the single-process masks."""
    monkeypatch.setattr(topk, "SAMPLE_STRIDE", 5)
    scores = _medium_scores(11, levels=50)
    names = sorted(scores)
    keys = {n: score_keys(scores[n]) for n in names}
    owner = {n: i % world for i, n in enumerate(names)}
    for k in (1, 300, 2500, 10_000):
        single = global_top_k(scores, k)
        comm = _ThreadAllReduce(world)
        results: dict[int, object] = {}

        def work(rank: int) -> None:
            mine = [n for n in names if owner[n] == rank]
            results[rank] = (mine, *threshold_and_candidates([keys[n] for n in mine], k, comm.reducer(rank)))

        threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        thresholds = {results[r][1] for r in range(world)}
        assert len(thresholds) == 1
        threshold = thresholds.pop()
        counts = dict.fromkeys(names, 0)
        for r in range(world):
            mine, _, cands = results[r]
            counts.update(zip(mine, tie_counts([keys[n] for n in mine], threshold, cands)))
        takes = dict(zip(names, allocate_ties([counts[n] for n in names], threshold.take_ties)))
        for r in range(world):
            mine, _, cands = results[r]
            for i, n in enumerate(mine):
                mask = select_mask(keys[n], threshold, takes[n], cands.keys[i] if cands else None,
                                   cands.positions[i] if cands else None)
                assert torch.equal(mask.view(scores[n].shape), single[n]), (k, n)


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


def test_lazy_change_keys_select_the_same_masks(monkeypatch):
    """``select_masks`` reads LT-SFT scores a chunk at a time (``ChangeKeys``): the masks equal a
    global top-K over the materialised |theta1 - theta0|, on the candidate path and the fallback."""
    from deftx.core.scoring import ChangeKeys, change_magnitude, select_masks

    g = torch.Generator().manual_seed(5)
    theta0 = {"w": torch.randn(600, 300, generator=g), "b": torch.randn(300, generator=g),
              "e": torch.randn(20_000, generator=g)}
    theta1 = {n: t + 1e-3 * torch.randn(t.shape, generator=g) for n, t in theta0.items()}
    theta1["e"][::3] = theta0["e"][::3]  # exact zeros: ties at zero
    monkeypatch.setattr(topk, "_CHUNK", 1000)  # many chunks, one ending mid-tensor
    scores = {n: change_magnitude(n, theta0[n], theta1[n]) for n in theta0}
    for stride in (64, 7):
        monkeypatch.setattr(topk, "SAMPLE_STRIDE", stride)
        for k in (1, 1_000, 50_000, 190_000):
            masks, report = select_masks(theta0, theta1, k)
            want = global_top_k(scores, k)
            assert all(torch.equal(masks[n], want[n]) for n in theta0), (stride, k)
            assert report.selected == k
    keys = ChangeKeys(theta0["w"], theta1["w"])
    assert torch.equal(keys.keys(), score_keys(scores["w"]))
    assert torch.equal(keys.chunk(1000, 5000), score_keys(scores["w"])[1000:5000])
    assert torch.equal(keys.sample(13), score_keys(scores["w"])[::13])
    bad = theta1["b"].clone()
    bad[7] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        select_masks({"b": theta0["b"]}, {"b": bad}, 10)
