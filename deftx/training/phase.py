"""The one training loop: run a phase of ``num_steps`` optimizer steps with a step engine.

Used for the head warm-up, phase 1 (full) and phase 2 (sparse) of every SFT, by the
single-process trainer and (through a DeepSpeed engine) by distributed workers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deftx.errors import DeftxError
from deftx.training import live
from deftx.training.engine import StepEngine
from deftx.training.progress import Progress

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class TrainingDiverged(DeftxError):
    """The loss became NaN or infinite."""


@dataclass
class PhaseResult:
    name: str
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "seconds": round(self.seconds, 2), "final_loss": self.final_loss,
                "losses": [round(x, 5) for x in self.losses]}


def run_phase(engine: StepEngine, batch_at: Callable[[int], dict[str, torch.Tensor]], loss_fn: LossFn, *,
              num_steps: int, name: str, start_step: int = 0,
              regularizer: Callable[[], torch.Tensor] | None = None,
              after_step: Sequence[Callable[[], None]] = (),
              on_step: Callable[[int, float], None] | None = None,
              log: Callable[[str], None] | None = None) -> PhaseResult:
    """Train steps ``start_step .. num_steps-1``; ``batch_at(step)`` must be deterministic so that
    a phase resumed at ``start_step`` continues exactly where it stopped."""
    module = engine.module
    module.train()
    progress = Progress(name, num_steps, sink=log)
    result = PhaseResult(name=name, steps=num_steps, seconds=0.0)
    start = time.perf_counter()
    for step in range(start_step, num_steps):
        batch = batch_at(step)
        loss = loss_fn(module, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"{name}: loss is {value} at step {step + 1}; lower the learning rate")
        if regularizer is not None:
            loss = loss + regularizer()
        engine.backward(loss)
        engine.step()
        for hook in after_step:
            hook()
        result.losses.append(value)
        if on_step is not None:
            on_step(step + 1, value)
        progress.update(step + 1, loss=value, lr=engine.learning_rate)
        live.emit(name, step + 1, {"loss": value, "lr": engine.learning_rate, "steps_per_s": progress.rate})
    result.seconds = time.perf_counter() - start
    module.eval()
    return result
