"""Restricting every optimizer step to the subnetwork of the language of its batch.

Two mechanisms, as for an SFT's sparse phase (``deftx.training.sparse``), but with a mask that
changes from step to step:

- a gradient hook on every maskable parameter zeroes the gradient outside the current language's
  mask (so clipping and the optimizer's moments only see the subnetwork's gradient); in dynamic
  mode the same hook first adds the full gradient to that language's accumulator;
- the values outside the mask are read before the step and written back after it. Without the
  write-back, AdamW's moments from earlier batches of *other* languages (and weight decay) would
  still move entries outside m_l, so it is needed with any stateful optimizer.

Reading and writing go through a ``ValueAccess`` (``deftx.training.masked_values``) so that the same object works in one process
and under DeepSpeed ZeRO (where the fp32 master weights are partitioned; see
``deftx.training.distributed.runtime``). Languages are the integer indices that multi-source batches
carry in their ``language`` rows (``deftx.training.multi_source``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from deftx.training.masked_values import LocalValueAccess, ValueAccess
from deftx.training.multi_source import LANGUAGE_KEY
from deftx.training.phase import LossFn

Masks = dict[str, torch.Tensor]


def batch_language(batch: Mapping[str, torch.Tensor]) -> int:
    """The one language of a multi-source batch (its ``language`` rows must all agree)."""
    langs = batch.get(LANGUAGE_KEY)
    if langs is None or langs.numel() == 0:
        raise ValueError("a subnetwork batch needs a non-empty 'language' row index")
    if bool((langs != langs.reshape(-1)[0]).any()):
        raise ValueError("a subnetwork batch mixes languages")
    return int(langs.reshape(-1)[0])


@dataclass
class LanguageMaskedUpdate:
    """Confine each step to ``masks[language]`` (language index -> name -> bool mask) over
    ``params`` (name -> parameter; the head is not among them and is shared by all languages)."""

    params: Mapping[str, nn.Parameter]
    masks: dict[int, Masks]
    access: ValueAccess = field(default_factory=LocalValueAccess)
    accumulate: bool = False          # dynamic mode: keep each language's full gradient sum
    accumulating: bool = True         # off while a meta-learning outer step back-propagates g
    current: list[int] = field(default_factory=list)     # languages of the step being taken
    accumulators: dict[int, Masks] = field(default_factory=dict)
    touched: Masks = field(default_factory=dict)          # union of every mask a step used
    _before: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _active: Masks = field(default_factory=dict, repr=False)
    _handles: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for lang, masks in self.masks.items():
            self._check(lang, masks)
        self.touched = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in self.params.items()}

    def _check(self, lang: int, masks: Mapping[str, torch.Tensor]) -> None:
        if set(masks) != set(self.params):
            missing = sorted(set(self.params) ^ set(masks))
            raise ValueError(f"the mask of language {lang} does not cover the parameters (first: {missing[0]})")
        for name, m in masks.items():
            if tuple(m.shape) != tuple(self.params[name].shape):
                raise ValueError(f"the mask of language {lang} for {name} has shape {tuple(m.shape)}, "
                                 f"the parameter {tuple(self.params[name].shape)}")

    def set_masks(self, lang: int, masks: Masks) -> None:
        self._check(lang, masks)
        self.masks[lang] = {n: m.bool() for n, m in masks.items()}

    # -- hooks --------------------------------------------------------------------------------

    def install(self) -> None:
        """Register the gradient hooks (before any engine wraps the parameters)."""
        for name, p in self.params.items():
            self._handles.append(p.register_hook(lambda g, n=name: self._on_grad(n, g)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if not self.current:
            return grad
        if self.accumulate and self.accumulating and len(self.current) == 1:
            acc = self.accumulators.setdefault(self.current[0], {})
            if name in acc:
                acc[name] += grad.detach()
            else:
                acc[name] = grad.detach().clone()
        if name not in self._before:   # the active mask holds every entry of this tensor
            return grad
        return grad.masked_fill(~self._active[name].view_as(grad), 0.0)

    # -- one step -----------------------------------------------------------------------------

    def begin(self, languages: Sequence[int]) -> None:
        """Before the forward pass of a step whose batches are in ``languages``: activate the
        union of their masks and read the values that must survive the step."""
        unknown = [lang for lang in languages if lang not in self.masks]
        if unknown:
            raise KeyError(f"no subnetwork mask for language index {unknown[0]}")
        self.current = list(languages)
        self.accumulating = True
        first = self.masks[self.current[0]]
        self._active = {n: m.clone() for n, m in first.items()} if len(self.current) > 1 else dict(first)
        for lang in self.current[1:]:
            for n, m in self.masks[lang].items():
                self._active[n] |= m
        partial = {n: p for n, p in self.params.items() if not bool(self._active[n].all())}
        self._before = self.access.master_values(partial)

    def finish(self) -> None:
        """After the optimizer step: everything outside the active mask back to its value before."""
        if not self.current:
            return
        partial = {n: self.params[n] for n in self._before}
        self.access.write_outside(partial, {n: self._active[n] for n in partial}, self._before)
        for n, m in self._active.items():
            self.touched[n] |= m
        self._before, self.current = {}, []

    def loss(self, loss_fn: LossFn) -> LossFn:
        """``loss_fn`` that first calls :meth:`begin` with its batch's language."""

        def wrapped(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            self.begin([batch_language(batch)])
            return loss_fn(model, batch)

        return wrapped
