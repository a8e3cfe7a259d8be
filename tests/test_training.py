"""The two-phase trainer on a tiny model with real NusaX rows: exactness of the sparse phase,
reproducibility, the masked-LM loss, and resumable batch streams."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_sft

from deftx.config import PhaseConfig, SelectionConfig, SFTConfig
from deftx.core.roles import embedding_parameter_names, parameter_roles
from deftx.core.sft import SFTMetadata, current_base_fingerprint
from deftx.data import NUSAX_LABELS, load_nusax_mt_text, load_nusax_senti
from deftx.models import load_classifier, load_masked_lm, load_tokenizer
from deftx.training.batches import classification_stream, masked_lm_stream
from deftx.training.lt_sft import train_sparse_fine_tuning
from deftx.training.objectives import classification_loss, masked_lm_loss


def _cfg(method: str, *, weight_decay: float = 0.0, l1: float = 0.0, steps: int = 6, warmup: int = 0,
         sparse_update: str = "values") -> SFTConfig:
    sel = SelectionConfig(method=method, density=0.05, rank=2 if method == "deft_x" else None,
                          energy=None if method == "deft_x" else 0.9, residual_keep=0.01)
    phase = PhaseConfig(max_steps=steps, batch_size=8, learning_rate=5e-3, weight_decay=weight_decay, l1_reg=l1)
    return SFTConfig(selection=sel, full=phase, sparse=phase, head_warmup_steps=warmup, sparse_update=sparse_update)


def _train_task(path, method, seed=0, **kw):
    tok = load_tokenizer(str(path))
    model = load_classifier(str(path), NUSAX_LABELS, seed=seed)
    start = {n: p.detach().clone() for n, p in model.state_dict().items()}
    fp = current_base_fingerprint(model)
    rows = load_nusax_senti("ind", "train")[:64]
    result = train_sparse_fine_tuning(
        model, kind="task", loss_fn=classification_loss, cfg=_cfg(method, **kw),
        metadata=SFTMetadata(kind="task", base_fingerprint=fp, label_names=list(NUSAX_LABELS)),
        embedding_names=frozenset(embedding_parameter_names(model)), label="test",
        stream_for=lambda bs: classification_stream(tok, rows, batch_size=bs, seed=seed, max_length=64), log=lambda s: None)
    return model, start, result


@pytest.mark.parametrize("sparse_update", ["values", "dense"])
@pytest.mark.parametrize("method", ["lt_sft", "deft_x"])
def test_entries_outside_mask_stay_bit_identical(tiny_model_dir, method, sparse_update):
    """Weight decay and L1 are on: neither may move an entry outside the mask, and LayerNorm is frozen."""
    model, start, result = _train_task(tiny_model_dir, method, weight_decay=0.1, l1=1.0, sparse_update=sparse_update)
    roles = parameter_roles(model, "task")
    prefix = "bert."
    changed_total = 0
    for name, param in roles.maskable.items():
        before = start[prefix + name]
        delta = result.sft.diffs[name]
        mask = result.masks[name].reshape(-1)
        stored = torch.zeros(param.numel(), dtype=torch.bool)
        stored[delta.indices] = True
        moved = param.detach().reshape(-1) != before.reshape(-1)
        assert not bool((moved & ~mask).any()), f"{name}: an entry outside the mask changed"
        assert not bool((stored & ~mask).any()), f"{name}: the SFT stores an entry outside the mask"
        # a masked entry missing from the SFT moved by at most the drop threshold (1e-7)
        change = (param.detach().reshape(-1) - before.reshape(-1)).abs()
        assert bool((change[moved & ~stored] <= 1e-7).all()), name
        changed_total += int(moved.sum())
        # the SFT's values are the change (theta_start + phi equals theta up to float32 rounding)
        assert torch.allclose(before.reshape(-1)[delta.indices] + delta.values,
                              param.detach().reshape(-1)[delta.indices], rtol=1e-6, atol=1e-9)
    for name, param in model.named_parameters():
        if "LayerNorm" in name:
            assert torch.equal(param.detach(), start[name]), name
    assert 0 < changed_total <= result.selection.k
    assert result.selection.selected == result.selection.k
    # the head is dense and stored as absolute values
    assert set(result.sft.head) == set(roles.head)
    for name, value in result.sft.head.items():
        assert torch.equal(value, dict(model.named_parameters())[name].detach())


@pytest.mark.parametrize("method", ["lt_sft", "deft_x"])
def test_training_is_reproducible(tiny_model_dir, method):
    _, _, a = _train_task(tiny_model_dir, method)
    _, _, b = _train_task(tiny_model_dir, method)
    assert a.sft.nnz == b.sft.nnz > 0
    for name in a.sft.diffs:
        assert torch.equal(a.sft.diffs[name].indices, b.sft.diffs[name].indices)
        assert torch.equal(a.sft.diffs[name].values, b.sft.diffs[name].values)


def test_language_sft_trains_head_first_and_freezes_decoder(tiny_xlmr_dir):
    tok = load_tokenizer(str(tiny_xlmr_dir))
    model, has_head = load_masked_lm(str(tiny_xlmr_dir))
    assert not has_head
    decoder_before = model.get_output_embeddings().weight.detach().clone()
    texts = load_nusax_mt_text("jav")[:64]
    result = train_sparse_fine_tuning(
        model, kind="language", loss_fn=masked_lm_loss, cfg=_cfg("deft_x", warmup=3),
        metadata=SFTMetadata(kind="language", base_fingerprint=current_base_fingerprint(model)),
        embedding_names=frozenset(embedding_parameter_names(model)), head_warmup=True, label="lang",
        stream_for=lambda bs: masked_lm_stream(tok, texts, batch_size=bs, seed=0, max_length=64, mlm_probability=0.15),
        log=lambda s: None)
    assert [p.name for p in result.phases] == ["lang head warm-up", "lang phase 1/2 (full)", "lang phase 2/2 (sparse)"]
    assert torch.equal(model.get_output_embeddings().weight.detach(), decoder_before)
    assert result.sft.head and not any("decoder.weight" in n for n in result.sft.head)
    assert "embeddings.word_embeddings.weight" in result.sft.diffs


def test_masked_lm_loss_equals_full_logit_loss(tiny_model_dir):
    """Computing logits only at masked positions is exact."""
    tok = load_tokenizer(str(tiny_model_dir))
    model, _ = load_masked_lm(str(tiny_model_dir))
    model.eval()
    stream = masked_lm_stream(tok, load_nusax_mt_text("sun")[:40], batch_size=8, seed=3, max_length=64,
                              mlm_probability=0.15)
    batch = stream.batch_at(2)
    ours = masked_lm_loss(model, batch)
    reference = model(**batch).loss
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_batch_streams_are_deterministic_and_cover_each_epoch(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    rows = load_nusax_senti("jav", "train")[:50]
    a = classification_stream(tok, rows, batch_size=8, seed=5, max_length=64)
    b = classification_stream(tok, rows, batch_size=8, seed=5, max_length=64)
    assert a.steps_per_epoch == 7
    for step in (0, 6, 7, 13, 20):
        x, y = a.batch_at(step), b.batch_at(step)
        assert all(torch.equal(x[k], y[k]) for k in x)
    for epoch in range(2):
        seen = sorted(i for s in range(7) for i in a.indices_at(epoch * 7 + s))
        assert seen == list(range(50))
    assert a.indices_at(0) != a.indices_at(7) or a.indices_at(1) != a.indices_at(8)
    mlm = masked_lm_stream(tok, [r.text for r in rows], batch_size=8, seed=5, max_length=64, mlm_probability=0.15)
    m1, m2 = mlm.batch_at(3), mlm.batch_at(3)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    predicted = m1["labels"] != -100
    assert predicted.any() and not bool((m1["labels"][predicted] == tok.pad_token_id).any())


def test_phase_lengths_follow_epochs_min_and_max():
    assert PhaseConfig(epochs=2, batch_size=16).num_steps(500) == 63
    assert PhaseConfig(epochs=0.1, batch_size=16, min_steps=10).num_steps(500) == 10
    assert PhaseConfig(epochs=5, batch_size=16, max_steps=20).num_steps(500) == 20


def _train_language(path, cfg, store=None, stop_after_phase1=False):
    from deftx.training.phase1_store import Phase1Store

    tok = load_tokenizer(str(path))
    model, _ = load_masked_lm(str(path))
    texts = load_nusax_mt_text("jav")[:64]
    return train_sparse_fine_tuning(
        model, kind="language", loss_fn=masked_lm_loss, cfg=cfg,
        metadata=SFTMetadata(kind="language", base_fingerprint=current_base_fingerprint(model)),
        head_warmup=True, label="lang", phase1=Phase1Store(*store) if store else None,
        stop_after_phase1=stop_after_phase1,
        stream_for=lambda bs: masked_lm_stream(tok, texts, batch_size=bs, seed=0, max_length=64, mlm_probability=0.15),
        log=lambda s: None)


def test_phase1_store_reuse_gives_the_sft_of_a_full_run(tiny_xlmr_dir, tmp_path):
    """A sweep trains warm-up + phase 1 once; a trial with another selection read from the store
    ends with exactly the SFT that training everything for that selection gives."""
    store = (tmp_path / "phase1", "digest-a")
    first = _train_language(tiny_xlmr_dir, _cfg("lt_sft", warmup=3), store, stop_after_phase1=True)
    assert first.sft is None and first.selection is None
    assert [p.name for p in first.phases] == ["lang head warm-up", "lang phase 1/2 (full)"]
    assert (tmp_path / "phase1" / "head_start.safetensors").is_file()

    other = _cfg("deft_x", warmup=3)
    reused = _train_language(tiny_xlmr_dir, other, store)
    scratch = _train_language(tiny_xlmr_dir, other)
    assert_same_sft(reused.sft, scratch.sft)
    assert [p.name for p in reused.phases] == ["lang phase 2/2 (sparse)"]   # only phase 2 was trained
    recorded = [p["name"] for p in reused.sft.metadata.training["phases"]]
    assert recorded == [p["name"] for p in scratch.sft.metadata.training["phases"]]
    assert reused.sft.metadata.training["phase1_reused_from"] == str(tmp_path / "phase1")

    # another digest (settings that change phase 1) never reads the stored result
    fresh = _train_language(tiny_xlmr_dir, other, (tmp_path / "phase1", "digest-b"))
    assert "phase1_reused_from" not in fresh.sft.metadata.training
    assert_same_sft(fresh.sft, scratch.sft)


@pytest.mark.parametrize("numel", [7, 2**18, 2**18 * 3 + 5])
def test_chunked_l1_gradients_equal_the_whole_tensor_expression_bit_for_bit(numel):
    """The L1 pull's gradient, scale * sign(theta - start), computed a cache-sized chunk at a time
    (added to a gradient, and through autograd) has the bits of the whole-tensor expression."""
    from deftx.training.sparse import L1Penalty, add_sign_distance_

    gen = torch.Generator().manual_seed(numel)
    start = torch.randn(numel, generator=gen)
    theta = start.clone()
    theta[::3] += torch.randn(theta[::3].shape, generator=gen) * 1e-3   # every third entry moved, the rest tied
    scale = 0.1 / 117_486_720
    grad = torch.randn(numel, generator=gen)
    expected = grad + torch.sign(theta - start).mul_(scale)
    added = grad.clone()
    add_sign_distance_(added, theta, start, scale)
    assert torch.equal(added, expected)

    # a 2-D parameter through the autograd term, and through the gradient added after a reduction
    param = torch.nn.Parameter(theta.reshape(1, -1).clone())
    L1Penalty({"w": param}, {"w": start.reshape(1, -1)}, 0.1, 117_486_720)().backward()
    assert torch.equal(param.grad, torch.sign(param.detach() - start.reshape(1, -1)).mul_(torch.tensor(scale)))
    param.grad = grad.reshape(1, -1).clone()
    L1Penalty({"w": param}, {"w": start.reshape(1, -1)}, 0.1, 117_486_720, apart=[param]).add_apart_gradients()
    assert torch.equal(param.grad, expected.reshape(1, -1))
