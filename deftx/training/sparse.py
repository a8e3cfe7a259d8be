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
        if not _contiguous(param, ref):
            return torch.sign(param.detach() - ref).mul_(grad), None
        out = torch.empty_like(param, memory_format=torch.contiguous_format)
        for a, b, o in _chunks(param.detach(), ref, out):
            torch.sub(a, b, out=o).sign_().mul_(grad)
        return out, None


CHUNK = 1 << 18   # 1 MB of float32: each chunk's passes stay in the core's cache


def _contiguous(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


def _chunks(*tensors: torch.Tensor):
    """Matching flat slices (views) of equally sized contiguous tensors, ``CHUNK`` entries at a time."""
    flat = [t.view(-1) for t in tensors]
    total = flat[0].numel()
    for start in range(0, total, CHUNK):
        yield tuple(f[start:start + CHUNK] for f in flat)


@torch.no_grad()
def add_sign_distance_(grad: torch.Tensor, param: torch.Tensor, ref: torch.Tensor, scale: float) -> None:
    """``grad += scale * sign(param - ref)`` in cache-sized chunks with one reused buffer: the same
    float32 operations as the whole-tensor expression, so the same bits, without its two
    tensor-sized temporaries (0.41 s -> 0.10 s for the 96M-entry word embedding on one thread)."""
    if not _contiguous(grad, param, ref):
        grad.add_(torch.sign(param - ref).mul_(scale))
        return
    buffer = torch.empty(min(CHUNK, param.numel()), dtype=param.dtype, device=param.device)
    for g, p, r in _chunks(grad, param, ref):
        work = buffer[:p.numel()]
        torch.sub(p, r, out=work).sign_().mul_(scale)
        g.add_(work)


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
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                add_sign_distance_(param.grad, param.detach(), ref, scale)
