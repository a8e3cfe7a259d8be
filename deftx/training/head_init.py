"""Starting values for a freshly initialised masked-LM head (a base model released without one).

A fresh head predicts every word about equally (its output bias is zero). The body is frozen
during the head warm-up and AdamW moves the bias by about one learning rate per step, so a
300-step warm-up at 1e-3 cannot move a bias entry more than about 0.3 nats, while the words'
log-frequencies span more than 10: on the offline e5-small such a warm-up ended at 8.1-8.2 nats
per masked token on held-out jav, sun and bbc text, worse than the unigram distribution of the
training text by itself (7.5-7.6; ``benchmarks/head_warmup.py``). Starting the output bias at the
log-frequencies of the warm-up text's tokens (add-``smoothing`` estimate) gives the head that prior
at step 0, so the warm-up's steps go to the context-dependent part.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from deftx.core.options import HEAD_BIAS_INITS
from deftx.core.roles import mlm_decoder


def unigram_log_prior(sequences: Iterable[Sequence[int]], size: int, *, special_ids: Iterable[int] = (),
                      smoothing: float = 1.0) -> torch.Tensor:
    """Log-probabilities (shape ``(size,)``) of token ids under add-``smoothing`` counts over
    ``sequences``; special ids are never predicted by masked LM and get the smoothing count only."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    ids = torch.tensor([i for seq in sequences for i in seq], dtype=torch.long)   # one count over all tokens
    if ids.numel() and (int(ids.max()) >= size or int(ids.min()) < 0):
        raise ValueError(f"token id outside [0, {size}) in the text")
    counts = torch.bincount(ids, minlength=size).to(torch.float64)
    special = [i for i in special_ids if 0 <= i < size]
    if special:
        counts[special] = 0.0
    counts += smoothing
    return (counts / counts.sum()).log().to(torch.float32)


def output_bias(model: nn.Module) -> nn.Parameter:
    """The vocabulary bias of ``model``'s masked-LM decoder."""
    decoder = mlm_decoder(model)
    bias = getattr(decoder, "bias", None) if decoder is not None else None
    if not isinstance(bias, nn.Parameter):
        raise TypeError(f"{type(model).__name__} has no masked-LM output bias")
    return bias


def set_unigram_output_bias(model: nn.Module, sequences: Iterable[Sequence[int]], *,
                            special_ids: Iterable[int] = ()) -> None:
    """Set the masked-LM output bias of ``model`` to the unigram log-prior of ``sequences``
    (centred: a constant shift changes no prediction)."""
    bias = output_bias(model)
    prior = unigram_log_prior(sequences, bias.numel(), special_ids=special_ids)
    with torch.no_grad():
        bias.copy_((prior - prior.mean()).to(bias.dtype).view_as(bias))


def initialise_mlm_head(model: nn.Module, stream, how: str) -> None:
    """Apply the ``language_sft.head_bias_init`` choice ``how`` to a fresh masked-LM head before
    its warm-up: ``unigram`` sets the output bias from ``stream``'s token sequences (a
    :class:`~deftx.training.batches.MaskedLMStream`), ``zero`` keeps the model's own initialisation."""
    if how not in HEAD_BIAS_INITS:
        raise ValueError(f"unknown head bias initialisation {how!r}; valid: {', '.join(HEAD_BIAS_INITS)}")
    if how == "unigram":
        set_unigram_output_bias(model, stream.sequences, special_ids=getattr(stream, "special_ids", ()))
