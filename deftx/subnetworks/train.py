"""Multi-source training with language-specific subnetworks, on the shared phase runner.

    masks      static/dynamic: per source language l, a ``probe_steps`` full fine-tune from theta0 on
               l's batches alone, then the SFT selection (``select_subnetwork``) gives m_l; the model
               is rewound to theta0 after each probe
    training   one phase over the interleaved batches of all sources (``MultiSourceStream``), each
               step confined to the mask of its batch's language (``LanguageMaskedUpdate``); dynamic:
               every ``reselect_every`` steps each language that had batches gets a new mask from its
               accumulated gradient; meta-learning: a step is one outer step (``deftx.subnetworks.meta``)

The same code runs in one process (``LocalRuntime``) and on every rank of a DeepSpeed group
(``DeepSpeedRuntime``): engines, rewinds and reads go through the runtime, mask selection runs on
every rank on identical inputs (gradient sums are all-reduced first), so every rank holds the
same masks without a broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deftx.config import PhaseConfig
from deftx.core.roles import embedding_parameter_names, parameter_roles
from deftx.core.scoring import MaskScorer, make_scorer
from deftx.core.topk import count_selected, resolve_budget
from deftx.errors import ConfigError
from deftx.subnetworks.config import SubnetworkConfig
from deftx.subnetworks.masks import select_subnetwork
from deftx.subnetworks.meta import MetaStream, meta_loss
from deftx.subnetworks.structure import EncoderStructure, encoder_structure
from deftx.subnetworks.update import LanguageMaskedUpdate, Masks
from deftx.training.batches import ClassificationStream
from deftx.training.lt_sft import seed_phase
from deftx.training.multi_source import LANGUAGE_KEY, MultiSourceStream
from deftx.training.phase import LossFn, PhaseResult, run_phase
from deftx.training.runtime import LocalRuntime, ModelBuilder, TrainingRuntime

Log = Callable[[str], None]


@dataclass
class SubnetworkResult:
    """What training produced. Tensors are on every rank, except ``final`` and ``head`` (rank 0)."""

    languages: list[str]
    start: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor] | None
    head: dict[str, torch.Tensor] | None
    masks: dict[str, Masks]                 # per language, at the end of training (covered tensors only)
    initial_masks: dict[str, Masks]
    touched: Masks                          # every entry some step was allowed to change
    reselections: list[dict[str, Any]] = field(default_factory=list)
    phases: list[PhaseResult] = field(default_factory=list)
    k: int = 0


def phase_steps(cfg: PhaseConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of a phase over a stream with ``steps_per_epoch`` steps per epoch."""
    steps = max(math.ceil(cfg.epochs * steps_per_epoch), cfg.min_steps)
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def training_schedule(cfg: SubnetworkConfig, stream: MultiSourceStream) -> tuple[MultiSourceStream | MetaStream, int]:
    """What one optimizer step of the training phase consumes (a batch, or with meta-learning a
    whole inner loop: ``MetaStream``) and how many such steps the phase takes."""
    batches = stream if cfg.meta_learning == "none" else MetaStream(stream, cfg.batches_per_step)
    return batches, phase_steps(cfg.train, batches.steps_per_epoch)


def steps_for_sizes(cfg: SubnetworkConfig, examples_per_language: list[int]) -> int:
    """The optimizer steps ``training_schedule`` gives for languages with these many training
    examples, without tokenizing them (a stream's step count depends only on its size)."""
    streams = [ClassificationStream([[0]] * n, cfg.train.batch_size, i, labels=[0] * n)
               for i, n in enumerate(examples_per_language)]
    return training_schedule(cfg, MultiSourceStream(streams, seed=0))[1]


def check_reselection(cfg: SubnetworkConfig, steps: int, where: str = "dynamic subnetworks") -> None:
    """A dynamic system must re-select at least once in ``steps`` optimizer steps; otherwise it
    would silently train as static. R equal to ``steps`` re-selects once, after the last step."""
    if cfg.mode == "dynamic" and cfg.reselect_every > steps:
        raise ConfigError(f"{where}: reselect_every={cfg.reselect_every}, but training has only {steps} "
                          f"optimizer steps" + (" (outer steps: meta-learning takes several batches per step)"
                                                if cfg.meta_learning != "none" else "")
                          + ", so the masks would never be re-selected (it would be static); set reselect_every "
                            f"to at most {steps}")


def _language_batches(stream: MultiSourceStream, lang: int) -> Callable[[int], dict[str, torch.Tensor]]:
    def batch_at(step: int) -> dict[str, torch.Tensor]:
        batch = dict(stream.streams[lang].batch_at(step))
        batch[LANGUAGE_KEY] = torch.full((batch["input_ids"].shape[0],), lang, dtype=torch.long)
        return batch

    return batch_at


@dataclass
class DynamicMasks:
    """After every ``every``-th optimizer step: sum each language's gradient accumulated since the
    last re-selection over the ranks, add it to that language's total, and re-select m_l from the
    total (``select_subnetwork`` of 0 -> -total: the direction plain SGD would have moved). A
    language without batches since the last re-selection keeps its mask."""

    update: LanguageMaskedUpdate
    every: int
    k: int
    scorer: MaskScorer
    structure: EncoderStructure | None
    languages: list[str]
    log: Log | None = None
    step: int = 0
    totals: dict[int, Masks] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self) -> None:
        self.step += 1
        if self.step % self.every:
            return
        access = self.update.access
        for lang in range(len(self.languages)):   # the same order and tensors on every rank
            window = self.update.accumulators.pop(lang, None)
            present = torch.tensor([0.0 if window is None else 1.0])
            access.sum_across_ranks([present])
            if float(present) == 0.0:
                continue
            if window is None:
                window = {n: torch.zeros(p.shape) for n, p in self.update.params.items()}
            names = sorted(window)
            access.sum_across_ranks([window[n] for n in names])
            total = self.totals.setdefault(lang, {n: torch.zeros_like(window[n]) for n in names})
            for n in names:
                total[n] += window[n]
            zero = {n: torch.zeros_like(total[n]) for n in names}
            old = self.update.masks[lang]
            new = select_subnetwork(zero, {n: -total[n] for n in names}, self.k, self.scorer, self.structure)
            self.update.set_masks(lang, new)
            changed = sum(int((old[n] != new[n]).sum()) for n in names)
            self.history.append({"step": self.step, "language": self.languages[lang],
                                 "selected": count_selected(new), "changed": changed})
        if self.log is not None:
            recent = [h for h in self.history if h["step"] == self.step]
            moved = ", ".join(f"{h['language']} {h['changed']:,}" for h in recent)
            self.log(f"[subnetworks] step {self.step}: masks re-selected (entries changed: {moved or 'none'})")


def train_subnetworks(model: nn.Module | ModelBuilder, *, languages: list[str], stream: MultiSourceStream,
                      loss_fn: LossFn, cfg: SubnetworkConfig, seed: int, label: str = "subnetworks",
                      log: Log | None = None, runtime: TrainingRuntime | None = None,
                      num_heads: int | None = None, initial_masks: dict[str, Masks] | None = None) -> SubnetworkResult:
    """Train a task model on ``stream`` (one sub-stream per language of ``languages``) with
    subnetworks as configured. ``model`` is the classifier at theta0 (or a builder of it, needed by
    runtimes that start each phase from a fresh model). ``loss_fn`` takes multi-source batches (it
    pops their ``language`` rows, e.g. ``multi_source_loss``). ``num_heads`` (structured masks)
    defaults to the model config's ``num_attention_heads``. ``initial_masks`` (language -> masks
    of the covered tensors, e.g. from an earlier run with the same probe settings) skips the probes."""
    runtime = runtime or LocalRuntime()
    if cfg.meta_learning != "none" and getattr(runtime, "zero_stage", 0) == 3:
        raise ValueError("meta-learning updates the weights in place in its inner loop, which ZeRO-3 "
                         "partitions; use zero_stage 0-2")
    if len(languages) != len(stream.streams):
        raise ValueError(f"{len(languages)} languages for {len(stream.streams)} batch streams")
    batches, steps = training_schedule(cfg, stream)
    check_reselection(cfg, steps)
    model, build = (model, None) if isinstance(model, nn.Module) else (model(), model)
    embedding_names = frozenset(embedding_parameter_names(model))
    roles = parameter_roles(model, "task")
    _freeze(roles.frozen)
    start = {n: p.detach().clone() for n, p in roles.maskable.items()}
    head_start = {n: p.detach().clone() for n, p in roles.head.items()}
    covered = sorted(n for n in start if cfg.cover == "all" or n not in embedding_names)
    if not covered:
        raise ValueError("subnetworks cover no tensor (the model has only embeddings?); use cover: all")
    num_covered = sum(start[n].numel() for n in covered)
    k = resolve_budget(num_covered, density=cfg.selection.density)
    sel = cfg.selection
    scorer = make_scorer(sel.method, rank=sel.rank, energy=sel.energy, residual_keep=sel.residual_keep,
                         svd_target=sel.svd_target, denoise_embeddings=sel.denoise_embeddings,
                         embedding_names=embedding_names, solver=sel.svd_solver)
    structure = None
    if cfg.structured:
        heads = num_heads or getattr(getattr(model, "config", None), "num_attention_heads", None)
        if not heads:
            raise ValueError("structured subnetworks need the number of attention heads (num_heads)")
        structure = encoder_structure({n: tuple(start[n].shape) for n in covered}, int(heads))
    phases: list[PhaseResult] = []
    say = (lambda message: runtime.log(message, log))

    masks: dict[int, Masks] = {}
    if cfg.mode != "none" and initial_masks is not None:
        missing = [lang for lang in languages if lang not in initial_masks]
        if missing:
            raise ValueError(f"initial masks lack {', '.join(missing)}")
        masks = {i: {n: initial_masks[lang][n].bool() for n in covered} for i, lang in enumerate(languages)}
        say(f"[{label}] initial subnetworks reused (no probes)")
    elif cfg.mode != "none":
        for i, lang in enumerate(languages):
            for p in list(roles.maskable.values()) + list(roles.head.values()):
                p.requires_grad_(True)
            seed_phase(seed, f"probe-{lang}", runtime.rank)
            probe = PhaseConfig(learning_rate=cfg.probe_learning_rate, batch_size=stream.batch_size)
            engine = runtime.engine(model, list(roles.maskable.values()) + list(roles.head.values()), probe,
                                    cfg.probe_steps)
            phases.append(run_phase(engine, runtime.batches(_language_batches(stream, i)), runtime.loss(loss_fn),
                                    num_steps=cfg.probe_steps, name=f"{label} probe {lang}", log=log))
            moved = runtime.read({n: roles.maskable[n] for n in covered})
            runtime.end_phase(engine)
            del engine
            assert moved is not None
            masks[i] = select_subnetwork({n: start[n] for n in covered}, moved, k, scorer, structure)
            del moved
            if not runtime.in_place:   # a fresh model is built: let the probed one go first
                model = roles = None
            model = runtime.restart(model, build, {**start, **head_start}, "task")
            roles = parameter_roles(model, "task")
            _freeze(roles.frozen)
        say(f"[{label}] subnetworks of {k:,} entries ({100.0 * k / max(num_covered, 1):.2f}% of the "
            f"{num_covered:,} in {'every maskable tensor' if cfg.cover == 'all' else 'the encoder layers'}) for "
            f"{', '.join(languages)}" + (" (whole heads and neurons)" if structure else ""))
    else:
        masks = {i: {n: torch.ones(start[n].shape, dtype=torch.bool) for n in covered} for i in range(len(languages))}
    initial = {languages[i]: {n: m.clone() for n, m in ms.items()} for i, ms in masks.items()}

    for p in list(roles.maskable.values()) + list(roles.head.values()):
        p.requires_grad_(True)
    update = LanguageMaskedUpdate({n: roles.maskable[n] for n in covered}, masks, access=runtime.value_access(),
                                  accumulate=cfg.mode == "dynamic")
    update.install()   # before the engine wraps the parameters
    try:
        trained = {**roles.maskable, **roles.head}
        if cfg.meta_learning == "none":
            loss = update.loss(loss_fn)
        else:
            loss = update.loss(meta_loss(loss_fn, trained, algorithm=cfg.meta_learning, inner_steps=cfg.inner_steps,
                                         inner_learning_rate=cfg.inner_learning_rate, update=update))
        after: list[Callable[[], None]] = [update.finish]
        dynamic = None
        if cfg.mode == "dynamic":
            dynamic = DynamicMasks(update, cfg.reselect_every, k, scorer, structure, languages, log=say)
            after.append(dynamic)
        seed_phase(seed, "subnetworks", runtime.rank)
        engine = runtime.engine(model, list(trained.values()), cfg.train, steps)
        name = f"{label} ({cfg.mode}" + (f", {cfg.meta_learning}" if cfg.meta_learning != "none" else "") + ")"
        phases.append(run_phase(engine, runtime.batches(batches.batch_at), runtime.loss(loss), num_steps=steps,
                                after_step=after, name=name, log=log))
        final = runtime.read(roles.maskable, everywhere=False)
        head = runtime.read(roles.head, everywhere=False)
        runtime.end_phase(engine)
        del engine
    finally:
        update.remove()
    touched = {n: update.touched[n] if n in update.touched else torch.ones(t.shape, dtype=torch.bool)
               for n, t in start.items()}    # tensors outside the subnetworks: trained by every batch
    return SubnetworkResult(languages=list(languages), start=start, final=final, head=head,
                            masks={languages[i]: m for i, m in update.masks.items()}, initial_masks=initial,
                            touched=touched, reselections=dynamic.history if dynamic else [],
                            phases=phases, k=k)


def _freeze(params: Mapping[str, nn.Parameter]) -> None:
    for p in params.values():
        p.requires_grad_(False)
