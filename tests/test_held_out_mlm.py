"""Held-out MLM loss (deftx.held_out_mlm): fixed masks, the loss against an independent computation,
the matrix over SFTs, and the per-language signal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deftx.data import load_nusax_mt_text
from deftx.held_out_mlm import THETA0, held_out_loss, held_out_set, language_signal, loss_matrix, sample_lines
from deftx.models import load_masked_lm, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def mlm(tiny_model_dir):
    model, _ = load_masked_lm(str(tiny_model_dir), seed=3)
    return model


@pytest.fixture(scope="module")
def lines():
    return load_nusax_mt_text("jav")[:70]


def test_sets_are_fixed_and_predict_mask_tokens_at_non_special_positions(tokenizer, lines):
    one = held_out_set(tokenizer, "jav", lines, max_length=64, batch_size=16, seed=5)
    two = held_out_set(tokenizer, "jav", list(reversed(lines)), max_length=64, batch_size=16, seed=5)
    other_seed = held_out_set(tokenizer, "jav", lines, max_length=64, batch_size=16, seed=6)
    assert one.lines == 70 and len(one.batches) == 5
    for a, b in zip(one.batches, two.batches, strict=True):      # the input order does not matter
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a["labels"], b["labels"]) for a, b in zip(one.batches, other_seed.batches))
    special = set(tokenizer.all_special_ids)
    predicted = 0
    for batch in one.batches:
        where = batch["labels"] != -100
        assert bool((batch["input_ids"][where] == tokenizer.mask_token_id).all())
        assert not (set(batch["labels"][where].tolist()) & special)
        assert bool((batch["attention_mask"][where] == 1).all())
        unmasked = ~where & batch["attention_mask"].bool()
        assert not bool((batch["input_ids"][unmasked] == tokenizer.mask_token_id).any())
        predicted += int(where.sum())
    tokens = sum(int(b["attention_mask"].sum()) - 2 * len(b["input_ids"]) for b in one.batches)
    assert one.predicted == predicted and 0.08 < predicted / tokens < 0.22


def test_sampled_lines_do_not_depend_on_the_order_and_mix_the_sources():
    first, second = [f"a line {i}" for i in range(100)], [f"another {i}" for i in range(100)]
    sample = sample_lines(first + second, 50)
    assert sample == sample_lines(second + first + first, 50)
    assert 10 < sum(line.startswith("a line") for line in sample) < 40
    assert sorted(sample_lines(first + first, None)) == sorted(first)       # each line once, none lost


def test_an_empty_held_out_slice_is_refused_with_the_setting_to_change(tokenizer):
    from deftx.errors import DataError

    with pytest.raises(DataError, match="language_sft.held_out"):
        held_out_set(tokenizer, "jav", [], max_length=64)


def test_loss_equals_the_cross_entropy_of_the_full_hugging_face_forward(mlm, tokenizer, lines):
    data = held_out_set(tokenizer, "jav", lines, max_length=64, batch_size=16)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.batches:      # logits at every position, then the masked ones picked
            logits = mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    assert count == data.predicted
    assert held_out_loss(mlm, data) == pytest.approx(total / count, rel=1e-5)


def _random_language_sft(model, language: str, seed: int):
    from deftx.core.roles import parameter_roles
    from deftx.core.sft import SFTMetadata, SparseFineTuning, current_base_fingerprint

    roles = parameter_roles(model, "language")
    g = torch.Generator().manual_seed(seed)
    start = {n: p.detach().clone() for n, p in roles.maskable.items()}
    trained = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in start.items()}
    masks = {n: torch.rand(t.shape, generator=g) < 0.2 for n, t in start.items()}
    head = {n: p.detach() + 0.1 for n, p in roles.head.items()}
    meta = SFTMetadata(kind="language", language=language, method="lt_sft", selection={}, base_model="tiny",
                       base_fingerprint=current_base_fingerprint(model), tokenizer="tiny", training={})
    return SparseFineTuning.extract(start, trained, masks, head, meta)


def test_matrix_rows_are_the_model_with_each_sft_applied_and_the_model_is_restored(mlm, tokenizer):
    sets = {lang: held_out_set(tokenizer, lang, load_nusax_mt_text(lang)[:40], max_length=64)
            for lang in ("jav", "sun")}
    sfts = {"jav": _random_language_sft(mlm, "jav", 1), "sun": _random_language_sft(mlm, "sun", 2)}
    before = {n: p.detach().clone() for n, p in mlm.named_parameters()}
    with_head = loss_matrix(mlm, sets, sfts, with_head=True, log=lambda line: None)
    body = loss_matrix(mlm, sets, sfts, with_head=False, log=lambda line: None)
    assert all(torch.equal(before[n], p) for n, p in mlm.named_parameters())
    assert list(with_head) == [THETA0, "jav", "sun"] and with_head[THETA0] == body[THETA0]
    assert with_head[THETA0]["jav"] == held_out_loss(mlm, sets["jav"])
    with sfts["sun"].applied(mlm):
        assert with_head["sun"]["jav"] == held_out_loss(mlm, sets["jav"])
    with sfts["sun"].applied(mlm, with_head=False):
        assert body["sun"]["jav"] == held_out_loss(mlm, sets["jav"])
    assert body["sun"]["jav"] != with_head["sun"]["jav"]          # the SFT's head changes the loss


def test_signal_compares_the_own_drop_with_the_other_sfts_drops():
    matrix = {THETA0: {"a": 5.0, "b": 4.0, "c": 3.0},
              "a": {"a": 4.0, "b": 3.9, "c": 2.5},      # on a: own drop 1.0
              "b": {"a": 4.8, "b": 3.95, "c": 2.9},     # on b: own drop 0.05, a's SFT drops 0.1
              "c": {"a": 4.6, "b": 4.1, "c": 2.0}}
    signal = {s.language: s for s in language_signal(matrix)}
    a, b, c = signal["a"], signal["b"], signal["c"]
    assert a.own_drop == pytest.approx(1.0) and a.others_mean_drop == pytest.approx((0.2 + 0.4) / 2)
    assert a.best_other == "c" and a.best_other_drop == pytest.approx(0.4) and a.beats_every_other
    assert b.margin == pytest.approx(0.05 - (0.1 - 0.1) / 2) and b.best_other == "a" and not b.beats_every_other
    assert c.margin == pytest.approx(1.0 - (0.5 + 0.1) / 2) and c.beats_every_other
    assert [s.language for s in language_signal({THETA0: {"a": 1.0, "x": 2.0}, "a": {"a": 0.5, "x": 2.0}})] == ["a"]


@pytest.mark.parametrize("disjoint_from", [None, "NusaX valid/test"])
def test_the_report_section_claims_disjoint_evaluation_data_only_when_told(disjoint_from):
    """The section's text names evaluation data the held-out lines never equal only where the caller
    knows it (the bundled NusaX text is checked against NusaX valid/test; an AmericasNLI run's text
    is the user's), and its table holds each language's margin."""
    from deftx.workflows.experiments.report import mlm_loss_markdown

    matrix = {THETA0: {"a": 5.0, "b": 4.0}, "a": {"a": 4.0, "b": 4.5}, "b": {"a": 5.2, "b": 3.0}}
    text = mlm_loss_markdown({"lt_sft": {"lines": {"a": 7, "b": 9}, "sft": matrix, "body": matrix}},
                             disjoint_from=disjoint_from)
    assert ("never NusaX valid/test" in text) == (disjoint_from is not None)
    assert "never" not in text.replace("never NusaX valid/test", "")
    assert "| a | 7 | 5.000 | 4.000 | +1.000 | -0.200 | b (-0.200) | **+1.200** | +1.000 | +1.200 |" in text
    assert "Margin positive for 2/2 languages (body alone: 2/2)" in text
