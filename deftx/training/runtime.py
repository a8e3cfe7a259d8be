"""Where a two-phase SFT runs: the parts of ``train_sparse_fine_tuning`` that differ between one
process and a group of distributed workers, behind one small interface.

The orchestration (warm-up, phase 1, selection, rewind, phase 2, extraction) exists once, in
``deftx.training.lt_sft``; a runtime only says how to build an engine, how to select masks, how
to rewind, how to read weights back, and whether to checkpoint. ``LocalRuntime`` is the
single-process reference; ``deftx.training.distributed.runtime.DeepSpeedRuntime`` runs the same
steps on every rank of a ``torch.distributed`` group under DeepSpeed ZeRO.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from deftx.config import PhaseConfig
from deftx.core.roles import parameter_roles
from deftx.core.scoring import MaskScorer, SelectionReport, select_masks
from deftx.training.engine import StepEngine, TorchEngine
from deftx.training.masked_values import LocalValueAccess, ValueAccess
from deftx.training.phase import LossFn
from deftx.training.sparse import SparseUpdate

ModelBuilder = Callable[[], nn.Module]
BatchAt = Callable[[int], dict[str, torch.Tensor]]

PHASE_WARMUP, PHASE_FULL, PHASE_SPARSE = "warmup", "full", "sparse"
PHASE_ORDER = (PHASE_WARMUP, PHASE_FULL, PHASE_SPARSE)


@dataclass
class ResumeState:
    """What a checkpoint says about a two-phase run: the phase and step it reached, and the
    results of the earlier stages that a resumed run must not recompute."""

    phase: str
    step: int
    head: dict[str, torch.Tensor] = field(default_factory=dict)   # the head at the start of phase 1
    masks: dict[str, torch.Tensor] | None = None                  # the selection (phase 2 only)
    selection: dict[str, Any] = field(default_factory=dict)       # its report
    phases: list[dict[str, Any]] = field(default_factory=list)    # results of finished phases
    engine_state: str | None = None                               # engine checkpoint directory

    def reached(self, phase: str) -> bool:
        """True if the run had already started ``phase`` (so earlier phases are done)."""
        return PHASE_ORDER.index(self.phase) >= PHASE_ORDER.index(phase)


@torch.no_grad()
def load_values(model: nn.Module, kind: str, values: Mapping[str, torch.Tensor]) -> None:
    """Copy ``values`` (named as in ``parameter_roles``: maskable body names and head names) into
    ``model``'s parameters."""
    roles = parameter_roles(model, kind)  # type: ignore[arg-type]
    params = {**roles.maskable, **roles.head}
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise KeyError(f"no trainable parameter named {unknown[0]}")
    for name, value in values.items():
        params[name].data.copy_(value)


class TrainingRuntime(Protocol):
    rank: int
    world_size: int
    in_place: bool    # the model object passed in is the one trained (whole parameters, one process)

    def engine(self, model: nn.Module, params: list[nn.Parameter], cfg: PhaseConfig, steps: int) -> StepEngine: ...

    def restart(self, model: nn.Module | None, build: ModelBuilder | None, values: Mapping[str, torch.Tensor],
                kind: str) -> nn.Module:
        """The model at the start of the next phase, with ``values`` loaded. An in-place runtime
        returns ``model`` itself; the others build a fresh one, and callers pass None once they have
        dropped every reference to the trained model, so that two models never coexist."""

    def start_parts(self, params: Mapping[str, nn.Parameter], scorer: MaskScorer) -> Mapping[str, torch.Tensor] | None:
        """What of theta_start (``params`` before phase 1) this rank needs for the selection by
        ``scorer``, when that is less than all of it (None: keep it whole). Only for runtimes that
        rebuild the model for phase 2, which then holds theta_start again."""

    def check_rebuilt(self, parts: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> None:
        """Raise unless the rebuilt ``params`` equal the ``parts`` kept of theta_start."""

    def select(self, start: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], k: int,
               scorer: MaskScorer) -> tuple[dict[str, torch.Tensor], SelectionReport]:
        """Masks of the ``k`` entries scoring highest between ``start`` (theta_start whole, or this
        rank's ``start_parts``) and ``params`` (the model's parameters after phase 1, or plain tensors
        read from a ``Phase1Store``)."""

    def projector(self, sparse: SparseUpdate) -> Callable[[], None]: ...

    def value_access(self) -> ValueAccess:
        """How updates confined to a changing mask read and write back values (subnetworks)."""

    def read(self, params: Mapping[str, nn.Parameter], everywhere: bool = True) -> dict[str, torch.Tensor] | None: ...

    def batches(self, batch_at: BatchAt) -> BatchAt: ...

    def loss(self, loss_fn: LossFn) -> LossFn: ...

    def resume_state(self) -> ResumeState | None: ...

    def resume_engine(self, engine: StepEngine, phase: str) -> int: ...

    def step_hook(self, engine: StepEngine, phase: str, state: ResumeState) -> Callable[[int, float], None] | None: ...

    def save_selection(self, state: ResumeState) -> None: ...

    def end_phase(self, engine: StepEngine) -> None: ...

    def log(self, message: str, sink: Callable[[str], None] | None) -> None: ...


class LocalRuntime:
    """One process, a fused torch AdamW, the model trained and rewound in place, no checkpoints."""

    rank = 0
    world_size = 1
    in_place = True

    def engine(self, model: nn.Module, params: list[nn.Parameter], cfg: PhaseConfig, steps: int) -> StepEngine:
        return TorchEngine(model, params, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                           total_steps=steps, warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm)

    def restart(self, model: nn.Module | None, build: ModelBuilder | None, values: Mapping[str, torch.Tensor],
                kind: str) -> nn.Module:
        """The model at the start of a phase: the same object, with ``values`` written back."""
        if model is None:
            raise ValueError("the local runtime trains in place: restart needs the model")
        load_values(model, kind, values)
        return model

    def start_parts(self, params, scorer) -> None:
        return None   # the model is rewound in place from the whole theta_start

    def check_rebuilt(self, parts, params) -> None:
        raise RuntimeError("the local runtime keeps theta_start whole and never rebuilds the model")

    def select(self, start, params, k, scorer):
        return select_masks(start, {n: p.detach() for n, p in params.items()}, k, scorer)

    def projector(self, sparse: SparseUpdate) -> Callable[[], None]:
        return sparse.project

    def value_access(self) -> ValueAccess:
        return LocalValueAccess()

    def read(self, params: Mapping[str, nn.Parameter], everywhere: bool = True) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in params.items()}

    def batches(self, batch_at: BatchAt) -> BatchAt:
        return batch_at

    def loss(self, loss_fn: LossFn) -> LossFn:
        return loss_fn

    def resume_state(self) -> ResumeState | None:
        return None

    def resume_engine(self, engine: StepEngine, phase: str) -> int:
        return 0

    def step_hook(self, engine, phase, state):
        return None

    def save_selection(self, state: ResumeState) -> None:
        pass

    def end_phase(self, engine: StepEngine) -> None:
        pass

    def log(self, message: str, sink: Callable[[str], None] | None) -> None:
        (sink or print)(message)
