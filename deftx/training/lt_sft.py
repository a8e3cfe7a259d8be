"""The two-phase LT-SFT loop (with the DeFT-X scoring step plugged in when configured).

    [head warm-up]  language SFTs on a model without a pretrained MLM head: head only, body frozen
    phase 1         all maskable + head parameters, fresh optimizer (L1 towards the start optional)
    selection       per-tensor scores -> exact global top-K (deftx.selection)
    rewind          every trained parameter back to its value at the start of phase 1
    phase 2         masked entries + head, fresh optimizer; entries outside the mask stay
                    bit-identical to the start (deftx.training.sparse)
    extract         phi = theta - theta_start on the mask, |phi| <= 1e-7 dropped; head stored dense

LayerNorm parameters and the untied MLM decoder are frozen throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from deftx.config import PhaseConfig, SFTConfig
from deftx.masks import SFTKind, parameter_roles, resolve_budget
from deftx.selection import SelectionReport, make_scorer, select_masks
from deftx.sft import SFTMetadata, SparseFineTuning
from deftx.training.batches import BatchStream
from deftx.training.engine import TorchEngine
from deftx.training.phase import LossFn, PhaseResult, run_phase
from deftx.training.sparse import L1Penalty, SparseUpdate


@dataclass
class SFTTrainingResult:
    sft: SparseFineTuning
    selection: SelectionReport
    phases: list[PhaseResult] = field(default_factory=list)


def _engine(model: nn.Module, params: list[nn.Parameter], cfg: PhaseConfig, steps: int) -> TorchEngine:
    return TorchEngine(model, params, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                       total_steps=steps, warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm)


def _snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def _restore(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for n, p in params.items():
        p.data.copy_(values[n])


def train_head_only(model: nn.Module, body: dict[str, nn.Parameter], head: dict[str, nn.Parameter],
                    stream: BatchStream, loss_fn: LossFn, *, steps: int, learning_rate: float, label: str,
                    log: Callable[[str], None] | None = None) -> PhaseResult:
    """Train a freshly initialised head alone (body frozen), e.g. the MLM head of an encoder
    released without one, so that phase 1 does not spend its steps fitting a random head."""
    for p in body.values():
        p.requires_grad_(False)
    for p in head.values():
        p.requires_grad_(True)
    engine = TorchEngine(model, list(head.values()), learning_rate=learning_rate, weight_decay=0.0,
                         total_steps=steps, max_grad_norm=1.0)
    return run_phase(engine, stream.batch_at, loss_fn, num_steps=steps, name=f"{label} head warm-up", log=log)


def train_sparse_fine_tuning(model: nn.Module, *, kind: SFTKind, stream_for: Callable[[int], BatchStream],
                             loss_fn: LossFn,
                             cfg: SFTConfig, metadata: SFTMetadata, embedding_names: frozenset[str] = frozenset(),
                             head_warmup: bool = False, label: str = "sft",
                             log: Callable[[str], None] | None = None) -> SFTTrainingResult:
    """Train one SFT on ``model`` in place and return it (the model ends at theta_start + phi).

    The model's current weights are the start (theta0, or theta0 + the source-language SFT for a
    task SFT); ``metadata.base_fingerprint`` must already name the underlying base model.
    ``stream_for(batch_size)`` returns the (deterministic) batch stream for a phase.
    """
    say = log or print
    roles = parameter_roles(model, kind)
    for p in roles.frozen.values():
        p.requires_grad_(False)
    phases: list[PhaseResult] = []
    stream = stream_for(cfg.full.batch_size)
    n_examples = len(stream.sequences)

    if head_warmup and cfg.head_warmup_steps > 0:
        phases.append(train_head_only(model, roles.maskable, roles.head, stream, loss_fn, steps=cfg.head_warmup_steps,
                                      learning_rate=cfg.head_warmup_learning_rate, label=label, log=log))

    start = _snapshot(roles.maskable)
    head_start = _snapshot(roles.head)
    for p in list(roles.maskable.values()) + list(roles.head.values()):
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters())

    steps = cfg.full.num_steps(n_examples)
    engine = _engine(model, list(roles.maskable.values()) + list(roles.head.values()), cfg.full, steps)
    l1 = L1Penalty(roles.maskable, start, cfg.full.l1_reg, n_params) if cfg.full.l1_reg > 0 else None
    phases.append(run_phase(engine, stream.batch_at, loss_fn, num_steps=steps, regularizer=l1,
                            name=f"{label} phase 1/2 (full)", log=log))
    del engine

    sel = cfg.selection
    k = resolve_budget(roles.num_maskable, k=sel.k, density=sel.density)
    scorer = make_scorer(sel.method, rank=sel.rank, energy=sel.energy, residual_keep=sel.residual_keep,
                         svd_target=sel.svd_target, denoise_embeddings=sel.denoise_embeddings,
                         embedding_names=embedding_names, solver=sel.svd_solver)
    masks, report = select_masks(start, {n: p.detach() for n, p in roles.maskable.items()}, k, scorer)
    say(f"[{label}] selected {report.selected:,} of {report.maskable:,} maskable entries "
        f"({100.0 * report.selected / max(report.maskable, 1):.3f}%) by {sel.method}")

    _restore(roles.maskable, start)
    _restore(roles.head, head_start)

    sparse = SparseUpdate(roles.maskable, masks, start)
    sparse.install()
    try:
        steps = cfg.sparse.num_steps(n_examples)
        engine = _engine(model, sparse.trainable() + list(roles.head.values()), cfg.sparse, steps)
        l1 = L1Penalty(roles.maskable, start, cfg.sparse.l1_reg, n_params) if cfg.sparse.l1_reg > 0 else None
        sparse_stream = stream if cfg.sparse.batch_size == cfg.full.batch_size else stream_for(cfg.sparse.batch_size)
        phases.append(run_phase(engine, sparse_stream.batch_at, loss_fn, num_steps=steps, regularizer=l1,
                                after_step=[sparse.project], name=f"{label} phase 2/2 (sparse)", log=log))
        del engine
    finally:
        sparse.remove()

    metadata.selection = {**metadata.selection, **report.as_dict()}
    metadata.training = {**metadata.training, "phases": [p.as_dict() for p in phases],
                         "train_examples": n_examples}
    sft = SparseFineTuning.extract(start, {n: p.detach() for n, p in roles.maskable.items()}, masks,
                                   {n: p.detach() for n, p in roles.head.items()}, metadata)
    return SFTTrainingResult(sft=sft, selection=report, phases=phases)
