"""The distributed runtime: the two-phase SFT on every rank of a ``torch.distributed`` group, each
phase under DeepSpeed ZeRO (stage 0-3), with distributed mask selection and checkpoints.

What differs from the single-process reference (``deftx.training.runtime.LocalRuntime``):

- every phase starts from a freshly built model (a DeepSpeed engine leaves hooks and, under ZeRO-3,
  partitions on the module it wraps, so a module is never wrapped twice);
- each rank trains on its share of every batch (rows split evenly; DeepSpeed averages gradients);
- masks come from ``deftx.training.distributed.selection.distributed_select_masks``: each rank gathers and scores only
  the tensors it owns, and the masks equal the single-process masks bit for bit;
- phase 2 writes theta_start back outside the mask in the fp32 master and the forward weights;
- every ``checkpoint_every`` steps, at the first report step once ``checkpoint_minutes`` have
  passed since the last checkpoint (rank 0's clock decides, in the all-reduce the report does
  anyway), and right after the selection, a checkpoint (phase, step, masks, warm-up head,
  DeepSpeed model/optimizer/scheduler state, RNG per rank) goes to a ``CheckpointSink`` (Ray
  Train's ``report`` in ``deftx.jobs.ray``, a directory otherwise). A phase-1 checkpoint of
  e5-small writes ~1.4 GB (weights and AdamW moments) in 2-5 s, so a time interval bounds both
  the work lost on a failure and the share of the run spent saving. The batch stream is a pure
  function of the step, so the step is the data position.

No Ray here: Ray Train (or any launcher) creates the process group and provides the sink.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from deftx.config import PhaseConfig
from deftx.core.scoring import MaskScorer, SelectionReport, denoised_tensors, is_elementwise
from deftx.errors import DeftxError
from deftx.training.batches import IGNORE_INDEX
from deftx.training.distributed.engine import (
    DeepSpeedEngine,
    DeepSpeedValueAccess,
    gather_owned,
    load_deepspeed,
    project_outside_mask,
    return_freed_memory,
    use_weights_only_loading,
)
from deftx.training.distributed.selection import ShardPlan, distributed_select_masks, local_part, plan_shards
from deftx.training.phase import LossFn
from deftx.training.runtime import PHASE_ORDER, BatchAt, ModelBuilder, ResumeState, load_values
from deftx.training.sparse import SparseUpdate

STATE_FILE = "deftx_state.json"
MASKS_FILE = "deftx_masks.safetensors"
HEAD_FILE = "deftx_head.safetensors"
ENGINE_DIR = "engine"
ENGINE_TAG = "ckpt"
WEIGHT_KEY = "_shard_weight"


class CheckpointError(DeftxError):
    """A checkpoint cannot be resumed from (e.g. it holds more than data)."""


class StartParts(dict):
    """A rank's pieces of theta_start for the selection (name -> flat span or whole tensor), with
    every tensor's shape and the spans they cover."""

    def __init__(self, parts: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                 spans: Mapping[str, tuple[int, int] | None]) -> None:
        super().__init__(parts)
        self.shapes = dict(shapes)
        self.spans = dict(spans)


class CheckpointSink(Protocol):
    def __call__(self, metrics: dict[str, Any], directory: Path | None) -> None:
        """Called on every rank with the same metrics; ``directory`` holds this rank's checkpoint
        files (or is None for a metrics-only report). The files of all ranks together form one
        checkpoint. The directory is deleted after the call returns."""


class DirectoryCheckpointSink:
    """Checkpoints merged into ``root/<phase>-<step>/`` on a filesystem every rank can reach (for
    launchers other than Ray Train); ``latest()`` is the newest complete one."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __call__(self, metrics: dict[str, Any], directory: Path | None) -> None:
        if directory is None:
            return
        name = f"{PHASE_ORDER.index(metrics['phase'])}-{metrics['phase']}-{int(metrics['step']):08d}"
        target = self.root / name
        shutil.copytree(directory, target, dirs_exist_ok=True)
        dist.barrier()
        if dist.get_rank() == 0:
            (self.root / "latest").write_text(name, encoding="utf-8")
        dist.barrier()

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        return self.root / marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


class DeepSpeedRuntime:
    """``TrainingRuntime`` for a ``torch.distributed`` group (already initialised) under ZeRO."""

    in_place = False   # every phase starts from a freshly built model

    def __init__(self, *, zero_stage: int = 0, checkpoint_every: int = 0, checkpoint_minutes: float = 0.0,
                 sink: CheckpointSink | None = None, resume_from: str | Path | None = None, report_every: int = 10,
                 status_dir: str | Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedRuntime needs an initialised torch.distributed process group")
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0-3, got {zero_stage}")
        load_deepspeed()   # first, so that nothing imports DeepSpeed the slow way (see the function)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.zero_stage = zero_stage
        if checkpoint_every < 0 or checkpoint_minutes < 0:
            raise ValueError("checkpoint_every and checkpoint_minutes must be >= 0 (0: off)")
        self.checkpoint_every = checkpoint_every
        self.checkpoint_minutes = checkpoint_minutes
        self.clock = clock
        self._last_checkpoint = clock()
        self.sink = sink
        self.resume_from = Path(resume_from) if resume_from else None
        self.report_every = max(report_every, 1)
        self.status_dir = Path(status_dir) if status_dir else None
        self._resume: ResumeState | None = None
        self._resume_read = False
        # weight decay of the phase whose engine was built last (None: no engine yet, so the
        # sparse write-back is never skipped by mistake)
        self._weight_decay: float | None = None

    # -- engines and models -------------------------------------------------------------------

    def engine(self, model: nn.Module, params: list[nn.Parameter], cfg: PhaseConfig, steps: int) -> DeepSpeedEngine:
        self._weight_decay = cfg.weight_decay
        return DeepSpeedEngine(model, params, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               total_steps=steps, warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
                               zero_stage=self.zero_stage,
                               micro_batch_size=max(cfg.batch_size // self.world_size, 1))

    def restart(self, model: nn.Module | None, build: ModelBuilder | None, values: Mapping[str, torch.Tensor],
                kind: str) -> nn.Module:
        if build is None:
            raise ValueError("the DeepSpeed runtime starts every phase from a fresh model: pass a model builder")
        del model
        gc.collect()
        fresh = build()
        load_values(fresh, kind, values)
        return fresh

    def end_phase(self, engine: DeepSpeedEngine) -> None:
        """Tear the phase's engine down and free its model's and optimizer's memory: read what the
        run needs from the model (``read``, ``select``) before."""
        engine.close()
        destroy = getattr(engine.engine, "destroy", None)
        if callable(destroy):
            destroy()
        engine.release()
        gc.collect()
        return_freed_memory()

    # -- data ---------------------------------------------------------------------------------

    def batches(self, batch_at: BatchAt) -> BatchAt:
        """Each rank's contiguous share of the rows of every batch. A rank whose share would be
        empty, or hold no predicted token, computes the loss of the whole batch with weight 0
        (it must still run backward: ZeRO's gradient reduction is collective)."""
        rank, world = self.rank, self.world_size

        def shard(step: int) -> dict[str, torch.Tensor]:
            batch = batch_at(step)
            rows = torch.tensor_split(torch.arange(batch["input_ids"].shape[0]), world)[rank]
            part = {k: v[rows] for k, v in batch.items()}
            labels = part.get("labels")
            empty = rows.numel() == 0 or (labels is not None and labels.dim() == 2
                                          and not bool((labels != IGNORE_INDEX).any()))
            if empty:
                return {**batch, WEIGHT_KEY: torch.zeros(())}
            return part

        return shard

    def loss(self, loss_fn: LossFn) -> LossFn:
        def weighted(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            if WEIGHT_KEY in batch:
                batch = dict(batch)
                weight = batch.pop(WEIGHT_KEY)
                return loss_fn(module, batch) * weight
            return loss_fn(module, batch)

        return weighted

    # -- selection, projection, reading -------------------------------------------------------

    def _plan(self, shapes: Mapping[str, tuple[int, ...]], scorer: MaskScorer) -> ShardPlan:
        return plan_shards(shapes, self.world_size, denoised=denoised_tensors(scorer, shapes),
                           elementwise={n: is_elementwise(scorer, n, s) for n, s in shapes.items()})

    @torch.no_grad()
    def start_parts(self, params: Mapping[str, nn.Parameter], scorer: MaskScorer) -> StartParts:
        """This rank's pieces of theta_start in the selection plan (about 1/W of it): copies of the
        whole (not yet partitioned) parameters' spans."""
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        needed = self._plan(shapes, scorer).needed(self.rank)
        return StartParts({n: local_part(params[n].detach(), span).clone() for n, span in needed.items()},
                          shapes, needed)

    @torch.no_grad()
    def check_rebuilt(self, parts: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> None:
        """Phase 2 starts from a rebuilt model instead of writing theta_start back: check, on this
        rank's pieces, that the builder gave theta_start again (a builder that draws random weights
        for the body, or reads files that changed, would otherwise train phase 2 from elsewhere)."""
        assert isinstance(parts, StartParts)
        for name in sorted(parts):
            if not torch.equal(local_part(params[name].detach(), parts.spans[name]), parts[name]):
                raise DeftxError(f"the model builder did not rebuild theta_start: {name} differs from its value "
                                 f"before phase 1 (a builder must give the same weights every time)")

    def select(self, start: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], k: int,
               scorer: MaskScorer) -> tuple[dict[str, torch.Tensor], SelectionReport]:
        if isinstance(start, StartParts):
            shapes = start.shapes
        else:
            shapes = {n: tuple(start[n].shape) for n in params}
        plan = self._plan(shapes, scorer)
        needed = plan.needed(self.rank)
        mine = gather_owned(params, needed, self.zero_stage)
        ours = start if isinstance(start, StartParts) else {n: local_part(start[n], span) for n, span in needed.items()}
        return distributed_select_masks(plan, ours, mine, k, scorer)

    def projector(self, sparse: SparseUpdate) -> Callable[[], None]:
        """The post-step write-back of theta_start outside the mask. Without weight decay it is not
        needed, and skipped: the gradient hook zeroes gradients there, so AdamW's moments stay 0
        and its update is exactly 0 (clipping scales zeros to zeros). Under ZeRO 1-3 the write-back
        gathers every partially masked tensor each step, which costs more than the step itself."""
        if self._weight_decay == 0.0:
            return lambda: None
        partial = {n: sparse.params[n] for n in sparse.partial}
        masks = {n: sparse.masks[n] for n in sparse.partial}
        reference = {n: sparse.reference[n] for n in sparse.partial}
        return lambda: project_outside_mask(partial, masks, reference, self.zero_stage)

    def value_access(self) -> DeepSpeedValueAccess:
        return DeepSpeedValueAccess(self.zero_stage)

    @torch.no_grad()
    def read(self, params: Mapping[str, nn.Parameter], everywhere: bool = True) -> dict[str, torch.Tensor] | None:
        """Full values of ``params`` (collective under ZeRO-3: gathered one tensor at a time); on
        every rank, or on rank 0 only (None elsewhere) with ``everywhere=False``."""
        keep = everywhere or self.rank == 0
        out: dict[str, torch.Tensor] = {}
        for name in sorted(params):
            p = params[name]
            if self.zero_stage == 3:
                deepspeed = load_deepspeed()
                with deepspeed.zero.GatheredParameters([p]):
                    if keep:
                        out[name] = p.data.detach().clone()
            elif keep:
                out[name] = p.data.detach().clone()
        return out if keep else None

    # -- checkpoints --------------------------------------------------------------------------

    def resume_state(self) -> ResumeState | None:
        if self._resume_read:
            return self._resume
        self._resume_read = True
        if self.resume_from is None or not (self.resume_from / STATE_FILE).is_file():
            return None
        from safetensors.torch import load_file

        root = self.resume_from
        info = json.loads((root / STATE_FILE).read_text(encoding="utf-8"))
        if info.get("world_size") != self.world_size or info.get("zero_stage") != self.zero_stage:
            raise ValueError(f"checkpoint {root} was written by {info.get('world_size')} workers at ZeRO stage "
                             f"{info.get('zero_stage')}; this run has {self.world_size} at stage {self.zero_stage}")
        masks = load_file(str(root / MASKS_FILE)) if (root / MASKS_FILE).is_file() else None
        head = load_file(str(root / HEAD_FILE)) if (root / HEAD_FILE).is_file() else {}
        self._resume = ResumeState(phase=info["phase"], step=int(info["step"]), head=head, masks=masks,
                                   selection=info.get("selection", {}), phases=info.get("phases", []),
                                   engine_state=str(root / ENGINE_DIR) if info.get("engine") else None)
        return self._resume

    def resume_engine(self, engine: DeepSpeedEngine, phase: str) -> int:
        state = self.resume_state()
        if state is None or state.phase != phase:
            return 0
        if state.engine_state is not None:
            use_weights_only_loading(engine.engine)   # a checkpoint is data: never unpickle code from it
            try:
                path, _ = engine.engine.load_checkpoint(state.engine_state, tag=ENGINE_TAG,
                                                        load_optimizer_states=True, load_lr_scheduler_states=True)
            except pickle.UnpicklingError as exc:
                lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line]
                raise CheckpointError(f"refusing to load the checkpoint in {state.engine_state}: it holds objects "
                                      f"other than tensors and DeepSpeed state "
                                      f"({lines[0] if lines else str(exc).splitlines()[0]})") from None
            if path is None:
                raise RuntimeError(f"could not load the engine checkpoint in {state.engine_state}")
            rng = Path(state.engine_state) / f"rng-rank{self.rank}.pt"
            torch.set_rng_state(torch.load(rng, weights_only=True))
        return state.step

    def step_hook(self, engine: DeepSpeedEngine | None, phase: str,
                  state: ResumeState) -> Callable[[int, float], None] | None:
        window: list[float] = []
        started = time.perf_counter()   # start of the current report window

        def on_step(step: int, loss: float) -> None:
            nonlocal started
            window.append(loss)
            self._write_status(phase, step)
            by_steps = self.checkpoint_every > 0 and step % self.checkpoint_every == 0
            if not by_steps and step % self.report_every != 0:
                return
            # one collective: the ranks' mean losses, and rank 0's time since the last checkpoint
            since = self.clock() - self._last_checkpoint if self.rank == 0 else 0.0
            reduced = torch.tensor([sum(window) / len(window), since], dtype=torch.float64)
            dist.all_reduce(reduced)
            by_time = self.checkpoint_minutes > 0 and float(reduced[1]) >= self.checkpoint_minutes * 60
            metrics = {"phase": phase, "step": step, "loss": float(reduced[0]) / self.world_size,
                       "steps_per_second": len(window) / max(time.perf_counter() - started, 1e-9)}
            window.clear()
            started = time.perf_counter()
            if by_steps or by_time:
                state.phase, state.step = phase, step
                self._save(state, engine, metrics)
            elif self.sink is not None:
                self.sink(metrics, None)

        return on_step

    def save_selection(self, state: ResumeState) -> None:
        if self.sink is not None and (self.checkpoint_every > 0 or self.checkpoint_minutes > 0):
            self._save(state, None, {"phase": state.phase, "step": state.step, "selected": int(
                state.selection.get("selected", 0))})

    def _save(self, state: ResumeState, engine: DeepSpeedEngine | None, metrics: dict[str, Any]) -> None:
        if self.sink is None:
            return
        from safetensors.torch import save_file

        tmp = Path(tempfile.mkdtemp(prefix=f"deftx-ckpt-r{self.rank}-"))
        try:
            if engine is not None:
                engine.engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG)
                torch.save(torch.get_rng_state(), tmp / ENGINE_DIR / f"rng-rank{self.rank}.pt")
            if self.rank == 0:
                if state.masks is not None:
                    save_file({n: m.contiguous() for n, m in state.masks.items()}, str(tmp / MASKS_FILE))
                if state.head:
                    save_file({n: v.contiguous() for n, v in state.head.items()}, str(tmp / HEAD_FILE))
                info = {"phase": state.phase, "step": state.step, "selection": state.selection,
                        "phases": state.phases, "engine": engine is not None, "world_size": self.world_size,
                        "zero_stage": self.zero_stage}
                (tmp / STATE_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
            self.sink({**metrics, "checkpoint": 1}, tmp)
            self._last_checkpoint = self.clock()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_status(self, phase: str, step: int) -> None:
        if self.status_dir is None:
            return
        self.status_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.status_dir / f".rank{self.rank}.json"
        tmp.write_text(json.dumps({"pid": os.getpid(), "rank": self.rank, "phase": phase, "step": step}))
        os.replace(tmp, self.status_dir / f"rank{self.rank}.json")

    def log(self, message: str, sink: Callable[[str], None] | None) -> None:
        if self.rank == 0:
            (sink or print)(message)
