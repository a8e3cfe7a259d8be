"""Restricting updates to a mask (phase 2), and the L1 pull towards the phase's start weights.

Two mechanisms together make entries outside the mask bit-identical to their reference values:
a gradient hook zeroes their gradient (so optimizer moments stay zero and gradient clipping only
sees masked gradients), and a projection after every optimizer step writes the reference values
back (decoupled weight decay and any optimizer quirk cannot leak). Tensors without any masked
entry are frozen (no gradient at all), fully masked tensors need neither hook nor projection.
The hook is registered on the parameter before any engine wraps it, which is also what DeepSpeed
requires (its engine copies hooks only from the parameters it is given).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class SparseUpdate:
    """Confine training of ``params`` to ``masks``; entries outside stay equal to ``reference``."""

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor],
                 reference: Mapping[str, torch.Tensor]) -> None:
        missing = set(params) - set(masks)
        if missing:
            raise ValueError(f"no mask for {sorted(missing)[0]}")
        self.params = dict(params)
        self.masks = {n: masks[n].reshape(params[n].shape).bool() for n in params}
        self.reference = dict(reference)
        self.partial: list[str] = []
        self.frozen: list[str] = []
        self._frozen_state: dict[str, bool] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        for name, param in self.params.items():
            mask = self.masks[name]
            selected = int(torch.count_nonzero(mask))
            if selected == 0:
                self._frozen_state[name] = param.requires_grad
                param.requires_grad_(False)
                self.frozen.append(name)
            elif selected < mask.numel():
                outside = ~mask
                self._handles.append(param.register_hook(lambda g, o=outside: g.masked_fill(o, 0.0)))
                self.partial.append(name)

    @torch.no_grad()
    def project(self) -> None:
        """Write the reference values back outside the mask (after every optimizer step)."""
        for name in self.partial:
            data = self.params[name].data
            torch.where(self.masks[name], data, self.reference[name], out=data)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, state in self._frozen_state.items():
            self.params[name].requires_grad_(state)
        self._frozen_state.clear()

    def trainable(self) -> list[nn.Parameter]:
        return [p for n, p in self.params.items() if n not in self.frozen]


class _AbsDistance(torch.autograd.Function):
    """sum |p - ref| without keeping a |p - ref| temporary for backward (grad = sign(p - ref))."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(param, ref)
        return torch.dist(param.detach(), ref, p=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        param, ref = ctx.saved_tensors
        return torch.sign(param.detach() - ref).mul_(grad), None


class L1Penalty:
    """coefficient * sum |theta - reference| / normaliser (composable-sft normalises by the model's
    total parameter count and adds the term once per optimizer step).

    Parameters in ``apart`` are left out of the loss term; :meth:`add_apart_gradients` adds their
    part of its gradient, coefficient / normaliser * sign(theta - reference), to their ``.grad``
    directly. A distributed engine uses it for a gradient it reduces on its own (the word
    embedding's sparse one): the term is the same on every rank, so adding it after the reduction
    gives the same averaged gradient without making the reduced one dense."""

    def __init__(self, params: Mapping[str, nn.Parameter], reference: Mapping[str, torch.Tensor],
                 coefficient: float, normaliser: int, apart: Sequence[nn.Parameter] = ()) -> None:
        apart_ids = {id(p) for p in apart}
        self.pairs = [(params[n], reference[n]) for n in sorted(params) if id(params[n]) not in apart_ids]
        self.apart = [(params[n], reference[n]) for n in sorted(params) if id(params[n]) in apart_ids]
        self.coefficient = coefficient
        self.normaliser = max(normaliser, 1)

    def __call__(self) -> torch.Tensor:
        total = torch.zeros(())
        for param, ref in self.pairs:
            if param.requires_grad:
                total = total + _AbsDistance.apply(param, ref)
        return total * (self.coefficient / self.normaliser)

    @torch.no_grad()
    def add_apart_gradients(self) -> None:
        scale = self.coefficient / self.normaliser
        for param, ref in self.apart:
            if param.requires_grad:
                term = torch.sign(param.detach() - ref).mul_(scale)
                if param.grad is None:
                    param.grad = term
                else:
                    param.grad.add_(term)