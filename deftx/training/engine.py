"""Step engines: what the phase runner calls to turn a loss into a parameter update.

The runner only needs ``module``, ``backward(loss)``, ``step()`` and ``learning_rate``. The plain
torch engine below is used by the single-process path; a DeepSpeed engine (``engine.backward``,
``engine.step``) satisfies the same protocol, so the training loop exists once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn


class StepEngine(Protocol):
    module: nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    @property
    def learning_rate(self) -> float: ...


def linear_schedule(total_steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to zero."""
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        remaining = max(total_steps - warmup, 1)
        return max(0.0, (total_steps - step) / remaining)

    return factor


def adamw(params: Sequence[nn.Parameter], *, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """torch AdamW, fused when every parameter is an fp32 CPU tensor (4x faster steps than the
    default multi-tensor version on e5-small: 0.12 against 0.52 s), else the default."""
    fused = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    try:
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


class TorchEngine:
    """AdamW (fused on CPU when possible) + linear schedule + optional gradient clipping."""

    def __init__(self, module: nn.Module, params: Sequence[nn.Parameter], *, learning_rate: float,
                 weight_decay: float, total_steps: int, warmup_ratio: float = 0.0,
                 max_grad_norm: float | None = 1.0) -> None:
        self.module = module
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters")
        self.optimizer = adamw(self.params, learning_rate=learning_rate, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(total_steps, warmup_ratio))
        self.max_grad_norm = max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
