"""Exact properties of SVD denoising and the DeFT-X scorer."""

from __future__ import annotations

import pytest
import torch

from deftx.core.denoise import denoise, denoise_with_info, prune_by_magnitude, select_rank
from deftx.core.scoring import DenoisedChangeScorer, change_magnitude, make_scorer, select_masks


def _matrix_with_spectrum(singular_values: list[float], rows: int = 12, cols: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=g, dtype=torch.float64))
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("energy,expected", [
    (0.5, 1),            # 16 / 30 >= 0.5
    (16 / 30, 1),        # exactly the first value's share
    (0.6, 2),            # (16+9)/30 = 0.833
    (25 / 30, 2),
    (0.9, 3),            # (16+9+4)/30 = 0.967
    (1.0, 4),
])
def test_energy_rule_picks_smallest_rank(energy, expected):
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # squares 16, 9, 4, 1 -> total 30
    assert select_rank(s, 30.0, energy) == expected
    m = _matrix_with_spectrum([4.0, 3.0, 2.0, 1.0]).float()
    _, info = denoise_with_info(m, energy=energy, solver="full")
    assert info.rank == expected


def test_energy_rule_reports_when_more_spectrum_is_needed():
    assert select_rank(torch.tensor([4.0]), 30.0, 0.9) is None


@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (5, 5)])
def test_full_rank_without_pruning_returns_input_exactly(shape):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(denoise(delta, rank=min(shape)), delta)
    assert torch.equal(denoise(delta, rank=100), delta)
    assert torch.equal(denoise(delta, energy=0.5, residual_keep=1.0), delta)


def test_low_rank_matrix_is_reproduced_and_residual_is_dropped():
    m = _matrix_with_spectrum([5.0, 2.0]).float()
    noisy = m + 1e-3 * torch.randn(m.shape, generator=torch.Generator().manual_seed(2))
    out = denoise(noisy, rank=2)
    assert torch.allclose(out, m, atol=5e-3)
    assert (out - m).norm() < (noisy - m).norm()  # denoising moved towards the signal


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.25, 0.5])
def test_residual_pruning_keeps_exact_fraction_by_magnitude(keep):
    delta = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    out, info = denoise_with_info(delta, rank=2, residual_keep=keep, solver="full")
    low, _ = denoise_with_info(delta, rank=2, residual_keep=0.0, solver="full")
    residual = delta - low
    kept = out - low
    n_keep = round(keep * delta.numel())
    assert info.residual_kept == n_keep
    assert int((kept != 0).sum()) == n_keep
    if n_keep:  # the kept residual entries are the largest ones
        smallest_kept = kept[kept != 0].abs().min()
        largest_dropped = residual[kept == 0].abs().max()
        assert smallest_kept >= largest_dropped - 1e-6


def test_prune_by_magnitude_ties_follow_row_major_order():
    x = torch.tensor([[1.0, -2.0], [2.0, 1.0]])
    out, kept = prune_by_magnitude(x, 0.25)
    assert kept == 1 and out.tolist() == [[0.0, -2.0], [0.0, 0.0]]


def test_randomized_solver_matches_full_on_separated_spectrum():
    m = _matrix_with_spectrum([9.0, 7.0, 5.0, 0.01, 0.005], rows=300, cols=60).float()
    full = denoise(m, rank=3, solver="full")
    rand = denoise(m, rank=3, solver="randomized")
    assert torch.allclose(full, rand, atol=1e-4)
    assert torch.equal(rand, denoise(m, rank=3, solver="randomized"))  # seeded: reproducible


def test_svd_target_projects_change_onto_basis_subspace():
    base = _matrix_with_spectrum([3.0, 1.0], rows=8, cols=6, seed=4).float()
    delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    out = denoise(delta, rank=2, basis=base, solver="full")
    u, _, vh = torch.linalg.svd(base, full_matrices=False)
    p_left, p_right = u[:, :2] @ u[:, :2].T, vh[:2].T @ vh[:2]
    assert torch.allclose(out, p_left @ delta @ p_right, atol=1e-5)
    # with basis = delta the projection is the truncated SVD of delta
    assert torch.allclose(denoise(delta, rank=2, basis=delta, solver="full"), denoise(delta, rank=2, solver="full"),
                          atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 25), (25, 40), (30, 30)])
@pytest.mark.parametrize("setting", [{"rank": 3}, {"energy": 0.9}, {"energy": 0.5, "residual_keep": 0.1}])
def test_gram_solver_equals_float64_truncated_svd(shape, setting):
    """The Gram solver (the default for the delta target) gives the float64 truncated SVD's result
    to float32 rounding, chooses the same rank, and reports the same spectrum; its tall and wide
    orientations agree (the transpose of the result is the result of the transpose)."""
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 1e-3
    got, info = denoise_with_info(delta, **setting)
    assert info.solver == "gram"
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    ref_rank = setting.get("rank") or select_rank(s, float((s ** 2).sum()), setting["energy"])
    assert info.rank == ref_rank
    low = (u[:, :ref_rank] * s[:ref_rank]) @ vh[:ref_rank]
    ref, _ = prune_by_magnitude((delta.double() - low).float(), setting.get("residual_keep", 0.0))
    assert torch.allclose(got.double(), low + ref.double(), atol=1e-9, rtol=0)
    assert torch.allclose(torch.tensor(info.singular_values[:5], dtype=torch.float64), s[:5], rtol=1e-10)
    transposed, _ = denoise_with_info(delta.T.contiguous(), **setting)
    assert torch.allclose(transposed.T, got, atol=1e-9, rtol=0)
    full = denoise(delta, solver="full", **setting)
    assert torch.allclose(full, got, atol=2e-7, rtol=0)  # the float32 SVD agrees, to its coarser rounding


def test_gram_solver_needs_the_delta_target():
    delta = torch.randn(6, 4, generator=torch.Generator().manual_seed(9))
    with pytest.raises(ValueError, match="gram solver"):
        denoise(delta, rank=2, basis=delta + 1, solver="gram")
    assert denoise_with_info(delta, rank=2, basis=delta + 1)[1].solver == "full"  # auto picks full


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "positive integer"),
    ({"rank": 2, "energy": 0.9}, "exactly one"),
    ({}, "exactly one"),
    ({"energy": 0.0}, r"\(0, 1\]"),
    ({"energy": 1.2}, r"\(0, 1\]"),
    ({"rank": 2, "residual_keep": 1.5}, r"\[0, 1\]"),
    ({"rank": 2, "solver": "magic"}, "unknown SVD solver"),
])
def test_denoise_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        denoise(torch.ones(3, 3), **kwargs)


def test_denoise_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        denoise(torch.ones(3), rank=1)


def test_deftx_scorer_skips_vectors_and_embeddings():
    g = torch.Generator().manual_seed(6)
    t0 = {"emb": torch.randn(20, 4, generator=g), "w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    t1 = {n: v + torch.randn(v.shape, generator=g) for n, v in t0.items()}
    scorer = DenoisedChangeScorer(rank=1, energy=None, embedding_names=frozenset({"emb"}))
    assert torch.equal(scorer("emb", t0["emb"], t1["emb"]), change_magnitude("emb", t0["emb"], t1["emb"]))
    assert torch.equal(scorer("b", t0["b"], t1["b"]), change_magnitude("b", t0["b"], t1["b"]))
    denoised = scorer("w", t0["w"], t1["w"])
    assert torch.allclose(denoised, denoise(t1["w"] - t0["w"], rank=1).abs())
    assert scorer.infos["w"].rank == 1 and "emb" not in scorer.infos
    with_emb = DenoisedChangeScorer(rank=1, energy=None, embedding_names=frozenset({"emb"}), denoise_embeddings=True)
    with_emb("emb", t0["emb"], t1["emb"])
    assert "emb" in with_emb.infos


@pytest.mark.parametrize("method", ["lt_sft", "deft_x"])
def test_select_masks_selects_exactly_k(method):
    g = torch.Generator().manual_seed(7)
    t0 = {"a": torch.randn(10, 6, generator=g), "b": torch.randn(6, generator=g)}
    t1 = {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in t0.items()}
    scorer = make_scorer(method, rank=2 if method == "deft_x" else None)
    for k in (0, 1, 7, 66):
        masks, report = select_masks(t0, t1, k, scorer)
        assert report.selected == k == sum(int(m.sum()) for m in masks.values())
    if method == "lt_sft":  # LT-SFT: the k largest |delta|
        masks, _ = select_masks(t0, t1, 5, scorer)
        flat = torch.cat([(t1[n] - t0[n]).abs().reshape(-1) for n in sorted(t0)])
        sel = torch.cat([masks[n].reshape(-1) for n in sorted(t0)])
        assert flat[sel].min() >= flat[~sel].max()
