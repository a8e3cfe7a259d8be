"""deftx.analysis: layer types, support overlap, densities, change spectra and their figures."""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.figure import Figure

from deftx.analysis import (
    change_spectra,
    density_by_layer,
    density_by_layer_type,
    energy_rank,
    layer_type,
    mask_overlap,
    mean_normalised_spectrum,
)
from deftx.core.sft import SFTMetadata, SparseDelta, SparseFineTuning
from deftx.tracking.plots import close, density_by_layer_figure, spectra_by_type_figure

Q = "encoder.layer.0.attention.self.query.weight"
FFN_OUT = "encoder.layer.0.output.dense.weight"


def make_sft(tensors: dict[str, tuple[tuple[int, ...], list[int]]], kind: str = "language") -> SparseFineTuning:
    """An SFT with the given (shape, flat indices) per tensor; values are all 1."""
    diffs = {
        name: SparseDelta(shape, torch.tensor(indices, dtype=torch.int64), torch.ones(len(indices)))
        for name, (shape, indices) in tensors.items()
    }
    return SparseFineTuning(diffs, {}, SFTMetadata(kind=kind, language="ind" if kind == "language" else None))


# -- layer_type --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["bert.", "roberta.", ""])
def test_layer_type_bert_and_xlmr_names(prefix):
    expected = {
        "encoder.layer.0.attention.self.query.weight": "query",
        "encoder.layer.0.attention.self.query.bias": "query",
        "encoder.layer.3.attention.self.key.weight": "key",
        "encoder.layer.3.attention.self.key.bias": "key",
        "encoder.layer.11.attention.self.value.weight": "value",
        "encoder.layer.11.attention.self.value.bias": "value",
        "encoder.layer.5.attention.output.dense.weight": "attention output",
        "encoder.layer.5.attention.output.dense.bias": "attention output",
        "encoder.layer.7.intermediate.dense.weight": "ffn in",
        "encoder.layer.7.intermediate.dense.bias": "ffn in",
        "encoder.layer.7.output.dense.weight": "ffn out",
        "encoder.layer.7.output.dense.bias": "ffn out",
        "embeddings.word_embeddings.weight": "embeddings",
        "embeddings.position_embeddings.weight": "embeddings",
        "embeddings.LayerNorm.weight": "embeddings",
        "encoder.layer.5.attention.output.LayerNorm.weight": "other",
        "encoder.layer.7.output.LayerNorm.bias": "other",
        "pooler.dense.weight": "other",
    }
    got = {name: layer_type(prefix + name) for name in expected}
    assert got == expected


def test_layer_type_heads_are_other():
    assert layer_type("classifier.weight") == "other"
    assert layer_type("classifier.dense.weight") == "other"
    assert layer_type("classifier.out_proj.bias") == "other"


# -- mask_overlap ------------------------------------------------------------------------------


def test_mask_overlap_identical_supports():
    a = make_sft({Q: ((4, 5), [0, 3, 7]), FFN_OUT: ((2, 5), [1, 9])})
    b = make_sft({Q: ((4, 5), [0, 3, 7]), FFN_OUT: ((2, 5), [1, 9])}, kind="task")
    got = mask_overlap(a, b)
    assert got["shared"] == 5 and got["nnz_a"] == 5 and got["nnz_b"] == 5
    assert got["jaccard"] == 1.0 and got["frac_of_a"] == 1.0 and got["frac_of_b"] == 1.0
    assert got["expected_shared"] == pytest.approx(3 * 3 / 20 + 2 * 2 / 10)
    assert got["ratio_to_random"] == pytest.approx(5 / (9 / 20 + 4 / 10))


def test_mask_overlap_disjoint_supports():
    # the same flat index in different tensors is not a shared entry
    a = make_sft({Q: ((4, 5), [0, 1, 2]), FFN_OUT: ((2, 5), [4])})
    b = make_sft({Q: ((4, 5), [3, 4]), "encoder.layer.1.output.dense.weight": ((2, 5), [0, 1, 2])})
    got = mask_overlap(a, b)
    assert got["shared"] == 0
    assert got["jaccard"] == 0.0 and got["frac_of_a"] == 0.0 and got["frac_of_b"] == 0.0
    assert got["nnz_a"] == 4 and got["nnz_b"] == 5
    assert got["expected_shared"] == pytest.approx(3 * 2 / 20)  # only Q is in both
    assert got["ratio_to_random"] == 0.0


def test_mask_overlap_worked_example():
    only_a = "encoder.layer.1.intermediate.dense.bias"
    only_b = "encoder.layer.1.attention.self.key.weight"
    a = make_sft({Q: ((4, 5), [0, 3, 7, 12]), FFN_OUT: ((2, 5), [1, 2]), only_a: ((8,), [0, 1, 2])})
    b = make_sft({Q: ((4, 5), [3, 7, 9, 15, 19]), FFN_OUT: ((2, 5), [2, 5, 8, 9]), only_b: ((3, 3), [4])})
    got = mask_overlap(a, b)
    # shared: {3, 7} in Q and {2} in FFN_OUT
    assert got["shared"] == 3
    assert got["nnz_a"] == 4 + 2 + 3 and got["nnz_b"] == 5 + 4 + 1
    assert got["frac_of_a"] == pytest.approx(3 / 9)
    assert got["frac_of_b"] == pytest.approx(3 / 10)
    assert got["jaccard"] == pytest.approx(3 / (9 + 10 - 3))
    # Q: 4 * 5 / 20 = 1.0; FFN_OUT: 2 * 4 / 10 = 0.8; tensors in only one SFT contribute nothing
    assert got["expected_shared"] == pytest.approx(1.8)
    assert got["ratio_to_random"] == pytest.approx(3 / 1.8)
    assert mask_overlap(b, a)["frac_of_a"] == pytest.approx(3 / 10)  # symmetric up to the a/b swap


def test_mask_overlap_empty_sfts():
    a = make_sft({Q: ((4, 5), [])})
    b = make_sft({Q: ((4, 5), [1, 2])})
    got = mask_overlap(a, b)
    assert got["shared"] == 0 and got["nnz_a"] == 0 and got["nnz_b"] == 2
    assert got["frac_of_a"] == 0.0 and got["jaccard"] == 0.0 and got["expected_shared"] == 0.0
    assert math.isnan(got["ratio_to_random"])


def test_mask_overlap_shape_mismatch_raises():
    a = make_sft({Q: ((4, 5), [0]), FFN_OUT: ((2, 5), [0])})
    b = make_sft({Q: ((4, 5), [0]), FFN_OUT: ((5, 2), [0])})
    with pytest.raises(ValueError, match=FFN_OUT.replace(".", r"\.")):
        mask_overlap(a, b)


# -- densities ---------------------------------------------------------------------------------


def _density_sft() -> SparseFineTuning:
    return make_sft({
        "embeddings.word_embeddings.weight": ((10, 4), list(range(4))),  # 4 / 40
        "encoder.layer.0.attention.self.query.weight": ((4, 4), [0, 5]),  # 2 / 16
        "encoder.layer.0.attention.self.query.bias": ((4,), [1, 3]),  # 2 / 4
        "encoder.layer.0.output.dense.weight": ((4, 8), list(range(0, 32, 2))),  # 16 / 32
        "encoder.layer.10.attention.output.dense.weight": ((4, 4), [0, 1, 2, 3]),  # 4 / 16
        "encoder.layer.2.intermediate.dense.weight": ((8, 4), []),  # 0 / 32
        "pooler.dense.weight": ((4, 4), list(range(16))),  # 16 / 16
    })


def test_density_by_layer():
    got = density_by_layer(_density_sft())
    assert list(got) == ["embeddings", "layer 0", "layer 2", "layer 10", "other"]
    assert got["embeddings"] == pytest.approx(0.1)
    assert got["layer 0"] == pytest.approx((2 + 2 + 16) / (16 + 4 + 32))
    assert got["layer 2"] == 0.0
    assert got["layer 10"] == pytest.approx(0.25)
    assert got["other"] == 1.0


def test_density_by_layer_type():
    got = density_by_layer_type(_density_sft())
    assert list(got) == ["query", "attention output", "ffn in", "ffn out", "embeddings", "other"]
    assert got["query"] == pytest.approx(4 / 20)
    assert got["attention output"] == pytest.approx(0.25)
    assert got["ffn in"] == 0.0
    assert got["ffn out"] == pytest.approx(0.5)
    assert got["embeddings"] == pytest.approx(0.1)
    assert got["other"] == 1.0


# -- spectra -----------------------------------------------------------------------------------


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def test_change_spectra_recovers_a_rank_two_change():
    gen = torch.Generator().manual_seed(0)
    u, v = _orthonormal(6, 2, gen), _orthonormal(5, 2, gen)
    sigma = torch.tensor([3.0, 0.5], dtype=torch.float64)
    low_rank = (u * sigma) @ v.T
    value = "bert.encoder.layer.0.attention.self.value.weight"
    query = "bert.encoder.layer.0.attention.self.query.weight"
    bias = "bert.encoder.layer.0.attention.self.value.bias"
    emb = "bert.embeddings.word_embeddings.weight"
    theta0 = {
        value: torch.randn(6, 5, generator=gen),
        query: torch.randn(4, 4, generator=gen),
        bias: torch.zeros(6),
        emb: torch.zeros(7, 3),
    }
    theta1 = {
        value: theta0[value] + low_rank.float(),
        query: theta0[query].clone(),  # unchanged
        bias: torch.ones(6),  # 1-D: ignored
        emb: torch.ones(7, 3),  # skipped by default
        "bert.encoder.layer.1.attention.self.key.weight": torch.ones(4, 4),  # not in theta0: ignored
    }
    spectra = change_spectra(theta0, theta1)
    assert list(spectra) == ["query", "value"]
    assert len(spectra["value"]) == 1 and len(spectra["query"]) == 1
    s = spectra["value"][0]
    assert s.dtype == torch.float32 and s.shape == (5,)
    torch.testing.assert_close(s[:2], sigma.float(), atol=1e-5, rtol=1e-5)
    assert float(s[2:].abs().max()) < 1e-5
    assert float(spectra["query"][0].abs().max()) == 0.0

    with_emb = change_spectra(theta0, theta1, skip_embeddings=False)
    assert list(with_emb) == ["query", "value", "embeddings"]
    # ones(7, 3) has a single singular value sqrt(21)
    torch.testing.assert_close(with_emb["embeddings"][0][0], torch.tensor(math.sqrt(21.0)))


def test_change_spectra_shape_mismatch_raises():
    name = "encoder.layer.0.intermediate.dense.weight"
    with pytest.raises(ValueError, match="intermediate"):
        change_spectra({name: torch.zeros(3, 4)}, {name: torch.zeros(4, 3)})


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0])  # squares 9, 4, 1; total 14
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 9 / 14) == 1  # exactly on the boundary
    assert energy_rank(s, 0.65) == 2
    assert energy_rank(s, 13 / 14) == 2
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.tensor([1.0, 3.0, 2.0]), 0.65) == 2  # order does not matter
    assert energy_rank(torch.zeros(4), 0.9) == 0
    assert energy_rank(torch.empty(0), 0.9) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            energy_rank(s, bad)


def test_mean_normalised_spectrum():
    a = torch.tensor([4.0, 2.0, 1.0])  # -> 1, 0.5, 0.25
    b = torch.tensor([2.0, 2.0, 0.0, 0.0])  # -> 1, 1, 0, 0
    zero = torch.zeros(2)  # skipped: would otherwise cut the common length to 2
    torch.testing.assert_close(mean_normalised_spectrum([a, b, zero]), torch.tensor([1.0, 0.75, 0.125]))
    torch.testing.assert_close(mean_normalised_spectrum([a, b], length=2), torch.tensor([1.0, 0.75]))
    torch.testing.assert_close(mean_normalised_spectrum([b]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert mean_normalised_spectrum([]).numel() == 0
    assert mean_normalised_spectrum([zero]).numel() == 0
    with pytest.raises(ValueError):
        mean_normalised_spectrum([a, b], length=4)


# -- figures -----------------------------------------------------------------------------------


def test_spectra_by_type_figure():
    curves = {
        "language SFT (ind)": {"query": torch.tensor([1.0, 0.5, 0.1]), "ffn out": torch.tensor([1.0, 0.2])},
        "task SFT": {"query": torch.tensor([1.0, 0.3, 0.0]), "ffn out": torch.empty(0)},
    }
    fig = spectra_by_type_figure(curves, "normalised spectra")
    try:
        assert isinstance(fig, Figure)
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in visible] == ["query", "ffn out"]
        query_ax, ffn_ax = visible
        assert [line.get_label() for line in query_ax.get_lines()] == ["language SFT (ind)", "task SFT"]
        assert len(ffn_ax.get_lines()) == 1
        assert list(query_ax.get_lines()[0].get_xdata()) == [1, 2, 3]
        assert query_ax.get_yscale() == "log"
    finally:
        close(fig)
    assert spectra_by_type_figure({}, "empty") is None
    assert spectra_by_type_figure({"task SFT": {}}, "empty") is None
    assert spectra_by_type_figure({"task SFT": {"query": torch.empty(0)}}, "empty") is None


def test_density_by_layer_figure():
    densities = {
        "LT-SFT": {"layer 0": 0.1, "embeddings": 0.05, "layer 10": 0.02, "layer 2": 0.03},
        "DeFT-X": {"layer 0": 0.2, "layer 2": 0.01},
    }
    fig = density_by_layer_figure(densities, "density per layer")
    try:
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["embeddings", "layer 0", "layer 2", "layer 10"]
        lt_sft, deft_x = ax.containers
        assert [b.get_height() for b in lt_sft] == pytest.approx([5.0, 10.0, 3.0, 2.0])
        heights = [b.get_height() for b in deft_x]
        assert heights[1:3] == pytest.approx([20.0, 1.0])
        assert math.isnan(heights[0]) and math.isnan(heights[3])  # layers DeFT-X lacks: no bar
    finally:
        close(fig)
    assert density_by_layer_figure({}, "empty") is None
    assert density_by_layer_figure({"LT-SFT": {}}, "empty") is None
