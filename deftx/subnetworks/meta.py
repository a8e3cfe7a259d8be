"""First-order meta-learning across source languages, with the subnetwork restriction in the inner
loop (Reptile: Nichol et al. 2018; first-order MAML: Finn et al. 2017).

One optimizer step of the phase runner is one outer step on one language l:

    theta_0 = theta
    for i in 1..n:  theta_i = theta_{i-1} - alpha * (grad L(theta_{i-1}; support_i) * m_l)    (head: unmasked)
    Reptile: g = theta - theta_n
    FOMAML:  g = grad L(theta_n; query) * m_l
    theta <- optimizer step with gradient g        (then everything outside m_l is written back)

The inner loop updates the parameters in place (and puts them back exactly before the outer step),
so that whatever the loss function does with the model (e.g. the per-batch language-SFT shift of
multi-source training) sees the adapted weights. The outer step goes through the usual
``engine.backward`` / ``engine.step`` by returning a surrogate loss whose gradient is g, so it runs
unchanged under DeepSpeed ZeRO 0-2. The gradient hooks of ``LanguageMaskedUpdate`` do the masking
(they fire for ``torch.autograd.grad`` too). ZeRO-3 partitions the weights the inner loop must
update in place, so it is refused.

Batches: the batches of an outer step are stacked along dim 1 (rows stay dim 0, so a distributed
runtime can still split rows across ranks); :class:`MetaStream` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from deftx.subnetworks.update import LanguageMaskedUpdate
from deftx.training.batches import _generator
from deftx.training.multi_source import LANGUAGE_KEY, MultiSourceStream
from deftx.training.phase import LossFn

ALGORITHMS = ("reptile", "fomaml")


@dataclass
class MetaStream:
    """Outer steps over a multi-source stream: each takes ``per_step`` consecutive batches of one
    language (its own stream's order), stacked along dim 1 (padded to the longest, cut to the
    fewest rows). An epoch visits every language's batches once, in whole outer steps; the order of
    languages is shuffled by ``seed`` and the epoch. Deterministic, like every stream."""

    source: MultiSourceStream
    per_step: int
    _plans: dict[int, list[tuple[int, int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.per_step < 1:
            raise ValueError(f"an outer step needs >= 1 batch, got {self.per_step}")

    def _chunks(self, lang: int) -> int:
        return max(self.source.streams[lang].steps_per_epoch // self.per_step, 1)

    @property
    def sequences(self) -> list[list[int]]:
        return self.source.sequences

    @property
    def batch_size(self) -> int:
        return self.source.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return sum(self._chunks(i) for i in range(len(self.source.streams)))

    def plan(self, epoch: int) -> list[tuple[int, int]]:
        """(language index, that language's outer-step number) of every outer step of ``epoch``."""
        if epoch not in self._plans:
            order = [(lang, epoch * self._chunks(lang) + c) for lang in range(len(self.source.streams))
                     for c in range(self._chunks(lang))]
            perm = torch.randperm(len(order), generator=_generator(self.source.seed, epoch, 4242)).tolist()
            self._plans = {epoch: [order[i] for i in perm]}
        return self._plans[epoch]

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        lang, chunk = self.plan(epoch)[offset]
        stream = self.source.streams[lang]
        batches = [stream.batch_at(chunk * self.per_step + j) for j in range(self.per_step)]
        return stack_batches(batches, lang, pad_id=int(getattr(stream, "pad_id", 0)))


def stack_batches(batches: Sequence[Mapping[str, torch.Tensor]], lang: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Batches of one language stacked along dim 1: 2-D tensors (rows x tokens) padded to the
    longest (``pad_id`` for input ids, 0 otherwise; -100 for token labels), rows cut to the fewest."""
    rows = min(b["input_ids"].shape[0] for b in batches)
    width = max(b["input_ids"].shape[1] for b in batches)
    out: dict[str, torch.Tensor] = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            t = b[key][:rows]
            if t.dim() == 2 and t.shape[1] < width:
                fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
                t = torch.cat([t, torch.full((rows, width - t.shape[1]), fill, dtype=t.dtype)], dim=1)
            parts.append(t)
        out[key] = torch.stack(parts, dim=1)
    out[LANGUAGE_KEY] = torch.full((rows,), lang, dtype=torch.long)
    return out


def unstack_batch(batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The per-step batches of a stacked batch, each with its ``language`` rows."""
    langs = batch[LANGUAGE_KEY]
    keys = [k for k in batch if k != LANGUAGE_KEY]
    count = batch[keys[0]].shape[1]
    return [{**{k: batch[k][:, i] for k in keys}, LANGUAGE_KEY: langs} for i in range(count)]


def meta_loss(loss_fn: LossFn, params: Mapping[str, nn.Parameter], *, algorithm: str, inner_steps: int,
              inner_learning_rate: float, update: LanguageMaskedUpdate | None = None) -> LossFn:
    """A loss whose gradient is the meta-gradient g of one outer step (see the module docstring)
    and whose value is the mean loss of the inner loop (and, for FOMAML, the query batch).

    ``params``: every trained parameter (maskable body and head); the inner loop updates those with
    ``requires_grad``. ``loss_fn`` gets the unstacked batches (with their ``language`` rows).
    ``update``: its gradient accumulation (dynamic masks) counts the inner-loop (and query)
    gradients, and is paused for the backward pass of g, which would count them twice."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown meta-learning algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    names = [n for n in sorted(params) if params[n].requires_grad]
    plist = [params[n] for n in names]

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        steps = unstack_batch(batch)
        expected = inner_steps + (1 if algorithm == "fomaml" else 0)
        if len(steps) != expected:
            raise ValueError(f"{algorithm} with {inner_steps} inner steps needs {expected} stacked batches, "
                             f"got {len(steps)}")
        saved = [p.detach().clone() for p in plist]
        values: list[torch.Tensor] = []
        try:
            for support in steps[:inner_steps]:
                value = loss_fn(model, support)
                values.append(value.detach())
                grads = torch.autograd.grad(value, plist, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(plist, grads):
                        if g is not None:
                            p.sub_(g, alpha=inner_learning_rate)
            if algorithm == "reptile":
                meta = [(s - p.detach()) for s, p in zip(saved, plist)]
            else:
                value = loss_fn(model, steps[inner_steps])
                values.append(value.detach())
                grads = torch.autograd.grad(value, plist, allow_unused=True)
                meta = [g.detach() if g is not None else torch.zeros_like(p) for p, g in zip(plist, grads)]
        finally:
            with torch.no_grad():
                for p, s in zip(plist, saved):
                    p.copy_(s)
        if update is not None:
            update.accumulating = False
        surrogate = sum((p * g).sum() for p, g in zip(plist, meta))
        mean = torch.stack(values).mean()
        return surrogate - surrogate.detach() + mean  # type: ignore[operator]

    return loss
