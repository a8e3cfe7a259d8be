"""Multi-source task training: batches of several source languages, each language's SFT applied to
the batch that belongs to it (composable-sft's multi-source training).

A batch of language l is computed at theta + phi_lang(l); the gradient flows to theta unchanged
(d(theta + phi)/d theta = I), so the optimizer updates the shared weights with gradients taken
where the language SFT puts the model, and the language SFTs never enter the trained weights.
The shift is done functionally (``torch.func.functional_call`` with ``theta + phi`` for the
tensors phi touches), not by an in-place add, which would invalidate the tensors autograd saved
for the backward pass.

Batches hold one language each and carry a per-row ``language`` index (rows, so that a
distributed runtime can split a batch across ranks like any other tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deftx.core.roles import body_parameters
from deftx.core.sft import SparseDelta
from deftx.training.batches import BatchStream, _generator
from deftx.training.phase import LossFn

LANGUAGE_KEY = "language"


@dataclass
class MultiSourceStream:
    """One batch stream per language, interleaved: an epoch visits every batch of every language
    once, in an order shuffled by ``seed`` and the epoch; ``batch_at`` is deterministic."""

    streams: Sequence[BatchStream]
    seed: int
    _plans: dict[int, list[tuple[int, int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.streams:
            raise ValueError("a multi-source stream needs at least one language")

    @property
    def sequences(self) -> list[list[int]]:
        return [s for stream in self.streams for s in stream.sequences]

    @property
    def batch_size(self) -> int:
        return self.streams[0].batch_size

    @property
    def steps_per_epoch(self) -> int:
        return sum(s.steps_per_epoch for s in self.streams)

    def plan(self, epoch: int) -> list[tuple[int, int]]:
        """(language index, that language's step) of every batch of ``epoch``, in order."""
        if epoch not in self._plans:
            order = [(li, epoch * s.steps_per_epoch + j) for li, s in enumerate(self.streams)
                     for j in range(s.steps_per_epoch)]
            perm = torch.randperm(len(order), generator=_generator(self.seed, epoch, 31337)).tolist()
            self._plans = {epoch: [order[i] for i in perm]}
        return self._plans[epoch]

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        lang, inner = self.plan(epoch)[offset]
        batch = dict(self.streams[lang].batch_at(inner))
        batch[LANGUAGE_KEY] = torch.full((batch["input_ids"].shape[0],), lang, dtype=torch.long)
        return batch


class _Shifted:
    """Calls ``module`` with some of its parameters replaced (``overrides``, full names)."""

    def __init__(self, module: nn.Module, overrides: dict[str, torch.Tensor]) -> None:
        self.module, self.overrides = module, overrides

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, self.overrides, args, kwargs, strict=False)


def shifted_parameters(model: nn.Module, diffs: Mapping[str, SparseDelta]) -> dict[str, torch.Tensor]:
    """``theta + phi`` for each body tensor ``diffs`` touches, keyed by the model's full parameter
    names; differentiable in theta."""
    full_name = {id(p): n for n, p in model.named_parameters()}
    body = body_parameters(model)
    out: dict[str, torch.Tensor] = {}
    for name, delta in diffs.items():
        if delta.nnz == 0:
            continue
        param = body[name]
        shifted = param.reshape(-1).index_add(0, delta.indices, delta.values.to(param.dtype))
        out[full_name[id(param)]] = shifted.view_as(param)
    return out


def multi_source_loss(loss_fn: LossFn, diffs: Sequence[Mapping[str, SparseDelta] | None]) -> LossFn:
    """``loss_fn`` evaluated for each batch at theta + phi_lang of the batch's language
    (``diffs[i]``: the body diffs of language i's SFT, or None for no SFT). ``loss_fn`` must only
    call the model (``model(...)``), as the classification loss does."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = dict(batch)
        langs = batch.pop(LANGUAGE_KEY)
        if langs.numel() and bool((langs != langs[0]).any()):
            raise ValueError("a multi-source batch mixes languages")
        chosen = diffs[int(langs[0])] if langs.numel() else None
        if not chosen:
            return loss_fn(model, batch)
        return loss_fn(_Shifted(model, shifted_parameters(model, chosen)), batch)  # type: ignore[arg-type]

    return loss
