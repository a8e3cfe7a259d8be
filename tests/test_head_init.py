"""A fresh MLM head's starting output bias (deftx.training.head_init): the unigram prior's values,
where it lands in a real Hugging Face head, and that the warm-up starts from it."""

from __future__ import annotations

import math

import pytest
import torch

from deftx.config import ConfigError, SFTConfig
from deftx.data import load_nusax_mt_text
from deftx.held_out_mlm import held_out_loss, held_out_set
from deftx.jobs.recipes import warm_up_mlm_head
from deftx.models import load_masked_lm, load_tokenizer
from deftx.training.batches import masked_lm_stream
from deftx.training.head_init import initialise_mlm_head, output_bias, unigram_log_prior
from deftx.training.objectives import mlm_head


def test_the_prior_is_the_add_one_estimate_and_ignores_special_ids():
    prior = unigram_log_prior([[0, 2, 2, 3], [2, 3, 0]], 5, special_ids=[0])
    counts = torch.tensor([0, 0, 3, 2, 0], dtype=torch.float64) + 1.0
    assert torch.allclose(prior.double(), (counts / counts.sum()).log(), atol=1e-6)
    assert math.isclose(float(prior.exp().sum()), 1.0, rel_tol=1e-5)
    half = unigram_log_prior([[2, 2, 3]], 5, smoothing=0.5)
    assert math.isclose(float(half[2].exp()), 2.5 / 5.5, rel_tol=1e-5)


@pytest.mark.parametrize("bad, message", [(dict(size=0), "size"), (dict(smoothing=0.0), "smoothing"),
                                          (dict(sequences=[[7]]), "outside")])
def test_bad_prior_arguments_are_refused(bad, message):
    args = dict(sequences=[[1, 2]], size=5, smoothing=1.0) | bad
    with pytest.raises(ValueError, match=message):
        unigram_log_prior(args["sequences"], args["size"], smoothing=args["smoothing"])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def texts():
    return load_nusax_mt_text("jav")[:200]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_xlmr_dir"])
def test_the_bias_the_head_adds_to_its_logits_is_set(fixture, request, texts):
    """BERT's ``cls.predictions`` and XLM-R's ``lm_head``: the parameter set is the one the head's
    logits actually add (checked through the head's forward, not by name)."""
    directory = str(request.getfixturevalue(fixture))
    tokenizer = load_tokenizer(directory)
    model, has_head = load_masked_lm(directory, seed=1)
    assert not has_head
    stream = masked_lm_stream(tokenizer, texts, batch_size=8, seed=0, max_length=32, mlm_probability=0.15)
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        before = mlm_head(model)(hidden)
        initialise_mlm_head(model, stream, "unigram")
        after = mlm_head(model)(hidden)
    prior = unigram_log_prior(stream.sequences, output_bias(model).numel(), special_ids=stream.special_ids)
    assert torch.allclose(after - before, (prior - prior.mean()).expand_as(after), atol=1e-5)
    kept = output_bias(model).detach().clone()
    initialise_mlm_head(model, stream, "zero")
    assert torch.equal(output_bias(model), kept)
    with pytest.raises(ValueError, match="valid: unigram, zero"):
        initialise_mlm_head(model, stream, "uniform")


def test_the_warm_up_starts_from_the_prior_and_beats_the_zero_bias_start(tiny_model_dir, tokenizer, texts):
    """Same steps, data and seed: the warm-up from the unigram bias ends with a clearly lower
    held-out loss than the one from the model's zero bias."""
    held = held_out_set(tokenizer, "jav", load_nusax_mt_text("jav")[200:260], max_length=32, batch_size=16)
    losses = {}
    for how in ("zero", "unigram"):
        model, _ = load_masked_lm(str(tiny_model_dir), seed=4)
        cfg = SFTConfig(head_warmup_steps=30, head_warmup_learning_rate=1e-3, head_bias_init=how)
        values, phase = warm_up_mlm_head(model, tokenizer, texts, cfg, max_length=32, seed=0, log=lambda m: None)
        assert phase.steps == 30
        losses[how] = held_out_loss(model, held)
    assert losses["unigram"] < losses["zero"] - 0.25, losses


def test_the_setting_is_validated():
    with pytest.raises(ConfigError, match="head_bias_init"):
        SFTConfig(head_bias_init="frequency").validate("language_sft")
    assert SFTConfig().head_bias_init == "unigram"
