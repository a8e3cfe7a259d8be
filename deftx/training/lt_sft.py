"""The two-phase LT-SFT loop (with the DeFT-X scoring step plugged in when configured).

    [head warm-up]  language SFTs on a model without a pretrained MLM head: head only, body frozen
    phase 1         all maskable + head parameters, fresh optimizer (L1 towards the start optional);
                    with a ``Phase1Store``, read from it when it holds this phase 1, else saved to it
    selection       per-tensor scores -> exact global top-K (deftx.core.scoring)
    rewind          every trained parameter back to its value at the start of phase 1
    phase 2         masked entries + head, fresh optimizer; entries outside the mask stay
                    bit-identical to the start (deftx.training.sparse)
    extract         phi = theta - theta_start on the mask, |phi| <= 1e-7 dropped; head stored dense

LayerNorm parameters and the untied MLM decoder are frozen throughout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from deftx.config import PhaseConfig, SFTConfig
from deftx.core.roles import SFTKind, embedding_parameter_names, parameter_roles
from deftx.core.scoring import SelectionReport, make_scorer
from deftx.core.sft import SFTMetadata, SparseFineTuning
from deftx.core.topk import resolve_budget
from deftx.training.batches import BatchStream
from deftx.training.head_init import initialise_mlm_head
from deftx.training.phase import LossFn, PhaseResult, run_phase
from deftx.training.phase1_store import Phase1State, Phase1Store
from deftx.training.runtime import (
    PHASE_FULL,
    PHASE_SPARSE,
    PHASE_WARMUP,
    LocalRuntime,
    ModelBuilder,
    ResumeState,
    TrainingRuntime,
)
from deftx.training.sparse import L1Penalty, SparseUpdate
from deftx.training.sparse_values import SparsePhase, can_parametrise


@dataclass
class SFTTrainingResult:
    sft: SparseFineTuning | None
    selection: SelectionReport | None   # None when the run stopped after phase 1
    phases: list[PhaseResult] = field(default_factory=list)
    masks: dict[str, torch.Tensor] | None = None   # the selected entries (phi may drop |phi| <= 1e-7 of them)


def _snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def seed_phase(seed: int, phase: str, rank: int) -> None:
    """Set torch's RNG (dropout) to a state fixed by the run's seed, the phase and the rank, so that
    a phase draws the same random numbers however the run got there: after training the earlier
    phases, after reading them from a ``Phase1Store``, or on another attempt."""
    digest = hashlib.sha256(f"{seed}/{phase}/{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def train_head_only(model: nn.Module, body: dict[str, nn.Parameter], head: dict[str, nn.Parameter],
                    stream: BatchStream, loss_fn: LossFn, *, steps: int, learning_rate: float, label: str,
                    log: Callable[[str], None] | None = None, runtime: TrainingRuntime | None = None,
                    step_hook: Callable[..., Callable[[int, float], None] | None] | None = None,
                    ) -> tuple[PhaseResult, dict[str, torch.Tensor]]:
    """Train a freshly initialised head alone (body frozen), e.g. the MLM head of an encoder
    released without one, so that phase 1 does not spend its steps fitting a random head. Returns
    the phase's result and the trained head's values (read on every rank before the runtime
    releases the phase's model)."""
    runtime = runtime or LocalRuntime()
    for p in body.values():
        p.requires_grad_(False)
    for p in head.values():
        p.requires_grad_(True)
    seed_phase(stream.seed, PHASE_WARMUP, runtime.rank)
    engine = runtime.engine(model, list(head.values()), _warmup_phase(learning_rate), steps)
    start_step = runtime.resume_engine(engine, PHASE_WARMUP)
    hook = step_hook(engine) if step_hook is not None else None
    result = run_phase(engine, runtime.batches(stream.batch_at), runtime.loss(loss_fn), num_steps=steps,
                       start_step=start_step, name=f"{label} head warm-up", on_step=hook, log=log)
    values = runtime.read(head) or {}
    trained = {n: v.detach().clone().contiguous() for n, v in values.items()}
    runtime.end_phase(engine)
    return result, trained


def _warmup_phase(learning_rate: float) -> PhaseConfig:
    return PhaseConfig(learning_rate=learning_rate, weight_decay=0.0, max_grad_norm=1.0)


def _as_builder(model: nn.Module | ModelBuilder) -> tuple[nn.Module, ModelBuilder | None]:
    if isinstance(model, nn.Module):
        return model, None
    return model(), model


def train_sparse_fine_tuning(model: nn.Module | ModelBuilder, *, kind: SFTKind,
                             stream_for: Callable[[int], BatchStream], loss_fn: LossFn,
                             cfg: SFTConfig, metadata: SFTMetadata, embedding_names: frozenset[str] | None = None,
                             head_warmup: bool = False, label: str = "sft",
                             log: Callable[[str], None] | None = None,
                             runtime: TrainingRuntime | None = None, phase1: Phase1Store | None = None,
                             stop_after_phase1: bool = False) -> SFTTrainingResult:
    """Train one SFT and return it (on rank 0; other ranks of a distributed runtime get ``sft=None``).

    ``model`` is the model at the start weights (theta0, or theta0 + the source-language SFT for a
    task SFT), or a function that builds it (needed by runtimes that start each phase from a fresh
    model, e.g. DeepSpeed). With a model object and the local runtime the model is trained in place
    and ends at theta_start + phi. ``metadata.base_fingerprint`` must already name the base model.
    ``stream_for(batch_size)`` returns the (deterministic) batch stream for a phase.
    ``embedding_names`` (skipped by the SVD unless configured) default to the model's embeddings.
    ``phase1``: where phase 1's result is read from (skipping the warm-up and phase 1) or, when it
    holds none for its digest, saved to; ``stop_after_phase1`` returns once it is saved (``sft`` None).
    """
    runtime = runtime or LocalRuntime()
    model, build = _as_builder(model)
    if embedding_names is None:
        embedding_names = frozenset(embedding_parameter_names(model))
    roles = parameter_roles(model, kind)
    _freeze(roles.frozen)
    resume = runtime.resume_state()
    state = resume or ResumeState(phase=PHASE_WARMUP, step=0)
    phases: list[PhaseResult] = []
    stream = stream_for(cfg.full.batch_size)
    n_examples = len(stream.sequences)
    if resume is not None:
        runtime.log(f"[{label}] resuming in phase {resume.phase} at step {resume.step}", log)
        metadata.training = {**metadata.training, "resumed_from": {"phase": resume.phase, "step": resume.step}}
    cached = phase1.load() if phase1 is not None and not state.reached(PHASE_SPARSE) else None
    if cached is not None:
        runtime.log(f"[{label}] warm-up and phase 1 reused from {phase1.directory}", log)
        state.phases, state.head = list(cached.phases), dict(cached.head_start)
        metadata.training = {**metadata.training, "phase1_reused_from": str(phase1.directory)}

    if cached is None and head_warmup and cfg.head_warmup_steps > 0 and not state.reached(PHASE_FULL):
        if resume is None or resume.phase == PHASE_WARMUP and resume.step == 0:
            initialise_mlm_head(model, stream, cfg.head_bias_init)
        warmup, state.head = train_head_only(model, roles.maskable, roles.head, stream, loss_fn,
                                             steps=cfg.head_warmup_steps,
                                             learning_rate=cfg.head_warmup_learning_rate, label=label, log=log,
                                             runtime=runtime,
                                             step_hook=lambda e: runtime.step_hook(e, PHASE_WARMUP, state))
        phases.append(warmup)
        state.phases.append(warmup.as_dict())
        if not runtime.in_place:   # a fresh model is built: let the trained one go first
            model = roles = None
        model = runtime.restart(model, build, state.head, kind)
        roles = parameter_roles(model, kind)
        _freeze(roles.frozen)
    elif state.head:
        model = runtime.restart(model, build, state.head, kind)
        roles = parameter_roles(model, kind)
        _freeze(roles.frozen)

    sel = cfg.selection
    scorer = make_scorer(sel.method, rank=sel.rank, energy=sel.energy, residual_keep=sel.residual_keep,
                         svd_target=sel.svd_target, denoise_embeddings=sel.denoise_embeddings,
                         embedding_names=embedding_names, solver=sel.svd_solver)
    # theta_start is kept whole only where it is needed whole: by phase 1's L1 pull, by the
    # dense-masked phase 2 and by a runtime that rewinds in place. Otherwise a runtime may keep only
    # the part its rank scores in the selection (``start_parts``: 1/W of it under the DeepSpeed
    # runtime), and phase 2 takes theta_start's masked entries from the rebuilt model. Phase 2
    # trains K values (``sparse_update: values``) when configured and every maskable tensor lives in
    # a module the parametrisation supports, else the dense-masked reference.
    values_phase = cfg.sparse_update == "values" and can_parametrise(model, list(roles.maskable))
    parts = None
    if state.reached(PHASE_SPARSE):
        start = {} if values_phase else _snapshot(roles.maskable)
    else:
        parts = runtime.start_parts(roles.maskable, scorer) if values_phase else None
        whole = parts is None or (cfg.full.l1_reg > 0 and cached is None)
        start = _snapshot(roles.maskable) if whole else parts
    head_start = _snapshot(roles.head)
    n_params = sum(p.numel() for p in model.parameters())
    k = resolve_budget(roles.num_maskable, k=sel.k, density=sel.density)

    if not state.reached(PHASE_SPARSE):
        engine = l1 = None
        if cached is None:
            for p in list(roles.maskable.values()) + list(roles.head.values()):
                p.requires_grad_(True)
            steps = cfg.full.num_steps(n_examples)
            seed_phase(stream.seed, PHASE_FULL, runtime.rank)
            engine = runtime.engine(model, list(roles.maskable.values()) + list(roles.head.values()), cfg.full, steps)
            start_step = runtime.resume_engine(engine, PHASE_FULL)
            l1 = None
            if cfg.full.l1_reg > 0:
                apart = getattr(engine, "reduced_apart", ())  # gradients a distributed engine reduces sparsely
                l1 = L1Penalty(roles.maskable, start, cfg.full.l1_reg, n_params, apart=apart)
                if apart:
                    engine.after_reduction(l1.add_apart_gradients)
            phases.append(run_phase(engine, runtime.batches(stream.batch_at), runtime.loss(loss_fn), num_steps=steps,
                                    start_step=start_step, regularizer=l1, name=f"{label} phase 1/2 (full)",
                                    on_step=runtime.step_hook(engine, PHASE_FULL, state), log=log))
            state.phases.append(phases[-1].as_dict())
            theta1: Mapping[str, torch.Tensor] = roles.maskable
            if phase1 is not None:
                values = runtime.read(roles.maskable, everywhere=False)  # collective under ZeRO-3
                head_end = runtime.read(roles.head, everywhere=False)
                if values is not None:
                    phase1.save(Phase1State(values, dict(state.head), list(state.phases), dict(head_end or {})))
                    runtime.log(f"[{label}] phase 1 saved to {phase1.directory}", log)
                del values
        else:
            theta1 = cached.theta1
        if stop_after_phase1:
            if engine is not None:
                runtime.end_phase(engine)
            return SFTTrainingResult(sft=None, selection=None, phases=phases)
        masks, report = runtime.select(start, theta1, k, scorer)
        if engine is not None:
            runtime.end_phase(engine)
        del engine, theta1, cached, l1
        state.masks, state.selection = masks, report.as_dict()
        state.phase, state.step, state.engine_state = PHASE_SPARSE, 0, None
        runtime.save_selection(state)
        runtime.log(f"[{label}] selected {report.selected:,} of {report.maskable:,} maskable entries "
                    f"({100.0 * report.selected / max(report.maskable, 1):.3f}%) by {sel.method}", log)
        if not runtime.in_place:   # a fresh model is built: let phase 1's go first (0.47 GB for e5-small)
            model = roles = None
        if parts is not None:   # the rebuilt model is theta_start: only the head is loaded
            start = {}
            model = runtime.restart(model, build, head_start, kind)
            runtime.check_rebuilt(parts, parameter_roles(model, kind).maskable)
            parts = None
        else:
            model = runtime.restart(model, build, {**start, **head_start}, kind)
            if values_phase:   # phase 2 reads theta_start's masked entries from the rewound model
                start = {}
        roles = parameter_roles(model, kind)
        _freeze(roles.frozen)
    else:
        assert state.masks is not None
        masks = state.masks
        report = SelectionReport.from_masks(k, masks, state.selection.get("ranks", {}))

    update = (_ValuesUpdate(model, roles.maskable, masks, cfg.sparse.l1_reg, n_params) if values_phase
              else _DenseUpdate(roles.maskable, masks, start, cfg.sparse.l1_reg, n_params))
    update.install()
    try:
        steps = cfg.sparse.num_steps(n_examples)
        seed_phase(stream.seed, PHASE_SPARSE, runtime.rank)
        engine = runtime.engine(model, update.trainable() + list(roles.head.values()), cfg.sparse, steps)
        start_step = runtime.resume_engine(engine, PHASE_SPARSE)
        sparse_stream = stream if cfg.sparse.batch_size == cfg.full.batch_size else stream_for(cfg.sparse.batch_size)
        phases.append(run_phase(engine, runtime.batches(sparse_stream.batch_at), runtime.loss(loss_fn),
                                num_steps=steps, start_step=start_step, regularizer=update.regularizer,
                                after_step=update.after_step(runtime), name=f"{label} phase 2/2 (sparse)",
                                on_step=runtime.step_hook(engine, PHASE_SPARSE, state), log=log))
        state.phases.append(phases[-1].as_dict())
        final = update.final(runtime)
        final_head = runtime.read(roles.head, everywhere=False)
        runtime.end_phase(engine)
        del engine
    finally:
        update.remove()

    if final is None or final_head is None:  # not the rank that extracts
        return SFTTrainingResult(sft=None, selection=report, phases=phases)
    metadata.selection = {**metadata.selection, **report.as_dict()}
    metadata.training = {**metadata.training, "phases": list(state.phases),
                         "train_examples": n_examples, "world_size": runtime.world_size}
    sft = update.extract(final, final_head, metadata)
    return SFTTrainingResult(sft=sft, selection=report, phases=phases, masks=masks)


class _DenseUpdate:
    """Phase 2 over the whole tensors: gradients masked by a hook, theta_start written back outside
    the mask after every step (``sparse_update: dense``, the reference)."""

    def __init__(self, params: dict[str, nn.Parameter], masks: Mapping[str, torch.Tensor],
                 start: dict[str, torch.Tensor], l1_reg: float, n_params: int) -> None:
        self.params = params
        self.sparse = SparseUpdate(params, masks, start)
        self.regularizer = L1Penalty(params, start, l1_reg, n_params) if l1_reg > 0 else None

    def install(self) -> None:
        self.sparse.install()

    def remove(self) -> None:
        self.sparse.remove()

    def trainable(self) -> list[nn.Parameter]:
        return self.sparse.trainable()

    def after_step(self, runtime: TrainingRuntime) -> list[Callable[[], None]]:
        return [runtime.projector(self.sparse)]

    def final(self, runtime: TrainingRuntime) -> dict[str, torch.Tensor] | None:
        return runtime.read(self.params, everywhere=False)

    def extract(self, final: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                metadata: SFTMetadata) -> SparseFineTuning:
        return SparseFineTuning.extract(self.sparse.reference, final, self.sparse.masks, head, metadata)


class _ValuesUpdate:
    """Phase 2 over K trainable values on a frozen base (``sparse_update: values``; see
    :mod:`deftx.training.sparse_values`)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], masks: Mapping[str, torch.Tensor],
                 l1_reg: float, n_params: int) -> None:
        self.phase = SparsePhase(model, params, masks)   # theta_start: the parameters' values
        self.scale = l1_reg / max(n_params, 1)
        self.regularizer = self._l1 if l1_reg > 0 else None

    def _l1(self) -> torch.Tensor:
        return self.phase.l1_distance() * self.scale

    def install(self) -> None:
        self.phase.install()

    def remove(self) -> None:
        self.phase.remove()

    def trainable(self) -> list[nn.Parameter]:
        return self.phase.trainable()

    def after_step(self, runtime: TrainingRuntime) -> list[Callable[[], None]]:
        return []    # nothing outside the mask is trainable, so nothing needs writing back

    def final(self, runtime: TrainingRuntime) -> dict | None:
        if runtime.in_place:
            self.phase.write_back()   # one process: the model itself ends at theta_start + phi
        values = runtime.read(self.phase.value_params(), everywhere=False)   # collective under ZeRO-3
        return self.phase.entries(values) if values is not None else None

    def extract(self, final: dict, head: dict[str, torch.Tensor], metadata: SFTMetadata) -> SparseFineTuning:
        return SparseFineTuning.extract_entries(final, head, metadata)


def _freeze(params: dict[str, nn.Parameter]) -> None:
    for p in params.values():
        p.requires_grad_(False)
