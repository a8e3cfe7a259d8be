"""The two-phase SFT on 2 real ranks under DeepSpeed (``DeepSpeedRuntime``, no Ray): it trains,
keeps LayerNorm frozen and the SFT within its masks, and a run interrupted after a checkpoint and
resumed from it ends with the same SFT as an uninterrupted run, bit for bit."""

from __future__ import annotations

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_same_sft, loopback_group


class Interrupted(RuntimeError):
    pass


def _train(rank: int, path: str, kind: str, stage: int, checkpoints: str, crash_at: tuple[str, int] | None,
           resume: bool, phase1: tuple[str, str] | None = None, stop_after_phase1: bool = False,
           density: float = 0.05, checkpointing: dict | None = None, alive_at_build: list | None = None,
           held_at_build: list | None = None):
    from deftx.config import PhaseConfig, SelectionConfig, SFTConfig
    from deftx.core.roles import embedding_parameter_names
    from deftx.core.sft import SFTMetadata
    from deftx.data import NUSAX_LABELS, load_nusax_mt_text, load_nusax_senti
    from deftx.models import load_classifier, load_masked_lm, load_tokenizer
    from deftx.training.batches import classification_stream, masked_lm_stream
    from deftx.training.distributed.runtime import DeepSpeedRuntime, DirectoryCheckpointSink
    from deftx.training.lt_sft import train_sparse_fine_tuning
    from deftx.training.objectives import classification_loss, masked_lm_loss

    tok = load_tokenizer(path)
    from deftx.training.phase1_store import Phase1Store

    sel = SelectionConfig(method="deft_x", density=density, rank=2, energy=None, residual_keep=0.01)
    phase = PhaseConfig(max_steps=6, batch_size=8, learning_rate=5e-3, weight_decay=0.1)
    cfg = SFTConfig(selection=sel, full=phase, sparse=phase, head_warmup_steps=4)
    if kind == "task":
        rows = load_nusax_senti("ind", "train")[:64]

        def build():
            return load_classifier(path, NUSAX_LABELS, seed=0)

        loss_fn = classification_loss
        stream_for = lambda bs: classification_stream(tok, rows, batch_size=bs, seed=0, max_length=64)
    else:
        texts = load_nusax_mt_text("jav")[:64]

        def build():
            return load_masked_lm(path, seed=0)[0]

        loss_fn = masked_lm_loss
        stream_for = lambda bs: masked_lm_stream(tok, texts, batch_size=bs, seed=0, max_length=64,
                                                 mlm_probability=0.15)
    if alive_at_build is not None:   # count the models built earlier that are still alive at each build
        import gc
        import weakref

        built: list = []
        untracked = build

        def build():
            gc.collect()
            alive_at_build.append(sum(ref() is not None for ref in built))
            model = untracked()
            built.append(weakref.ref(model))
            return model
    sink = DirectoryCheckpointSink(checkpoints)
    runtime = DeepSpeedRuntime(zero_stage=stage, sink=sink, resume_from=sink.latest() if resume else None,
                               **(checkpointing or {"checkpoint_every": 2}))
    if held_at_build is not None:   # bytes that the engines of earlier phases still hold at each build
        engines: list = []
        make_engine, unmeasured = runtime.engine, build

        def engine(*args, **kwargs):
            engines.append(make_engine(*args, **kwargs))   # kept alive on purpose: only release frees them
            return engines[-1]

        def build():
            held_at_build.append(sum(_bytes_held(e) for e in engines))
            return unmeasured()

        runtime.engine = engine
    if crash_at is not None:  # stop both ranks right after the given step (a checkpoint precedes it)
        hook = runtime.step_hook

        def crashing(engine, phase, state):
            inner = hook(engine, phase, state)

            def on_step(step, loss):
                inner(step, loss)
                if (phase, step) == crash_at:
                    raise Interrupted(f"stopped at {phase} step {step}")
            return on_step

        runtime.step_hook = crashing
    return train_sparse_fine_tuning(
        build, kind=kind, loss_fn=loss_fn, cfg=cfg, stream_for=stream_for, runtime=runtime,
        metadata=SFTMetadata(kind=kind, base_fingerprint="test", label_names=list(NUSAX_LABELS) if kind == "task"
                             else None),
        embedding_names=frozenset(embedding_parameter_names(build())), head_warmup=kind == "language",
        label="test", log=lambda s: None, phase1=Phase1Store(*phase1) if phase1 else None,
        stop_after_phase1=stop_after_phase1)


def _bytes_held(engine) -> int:
    """Bytes of the storages that a ``DeepSpeedEngine``'s model parameters (and their ZeRO-3
    partitions), optimizer state and optimizer attributes point at."""
    from deftx.training.distributed.engine import tensors_within

    storages: dict[int, int] = {}

    def add(value) -> None:
        for tensor in tensors_within(value):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for param in engine.module.parameters():
        add(param)
        add(getattr(param, "ds_tensor", None))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in list(inner.state.values()) + list(getattr(engine.optimizer, "state", {}).values()):
        add(state)
    for value in vars(engine.optimizer).values():
        add(value)
    storages.pop(0, None)   # empty storages
    return sum(storages.values())


def _worker(rank: int, world: int, store: str, path: str, kind: str, stage: int, out: str,
            crash_at: tuple[str, int] | None, checkpointing: dict | None) -> None:
    with loopback_group(rank, world, store):
        try:
            result = _train(rank, path, kind, stage, f"{out}/checkpoints", crash_at, resume=False,
                            checkpointing=checkpointing)
        except Interrupted:
            dist.barrier()
            result = _train(rank, path, kind, stage, f"{out}/checkpoints", None, resume=True,
                            checkpointing=checkpointing)
        if rank == 0:
            result.sft.save(f"{out}/sft", overwrite=True)
        else:
            assert result.sft is None


def _run(tmp_path, name: str, model_dir, kind: str, stage: int, crash_at=None, checkpointing=None):
    out = tmp_path / name
    out.mkdir()
    mp.spawn(_worker, args=(2, str(out / "store"), str(model_dir), kind, stage, str(out), crash_at, checkpointing),
             nprocs=2, join=True)
    from deftx.core.sft import SparseFineTuning

    return SparseFineTuning.load(out / "sft")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_resumed_task_sft_equals_uninterrupted_run(tmp_path, tiny_model_dir, stage):
    """Stopped in the middle of phase 2 (after the checkpoint at step 2), resumed from it."""
    whole = _run(tmp_path, "whole", tiny_model_dir, "task", stage)
    resumed = _run(tmp_path, "resumed", tiny_model_dir, "task", stage, crash_at=("sparse", 3))
    assert whole.nnz > 0
    assert whole.metadata.training["world_size"] == 2
    assert [p["name"] for p in whole.metadata.training["phases"]] == [
        "test phase 1/2 (full)", "test phase 2/2 (sparse)"]
    assert_same_sft(whole, resumed)


def _release_worker(rank: int, world: int, store: str, path: str, out: str) -> None:
    import json

    with loopback_group(rank, world, store):
        alive: list[int] = []
        _train(rank, path, "task", 0, f"{out}/checkpoints", None, False, alive_at_build=alive)
        if rank == 0:
            with open(f"{out}/alive.json", "w") as fh:
                json.dump(alive, fh)


@pytest.mark.slow
def test_a_phase_starts_after_the_previous_phase_model_is_released(tmp_path, tiny_model_dir):
    """Phase 2 builds a fresh model (ZeRO-0): by then phase 1's model, its optimizer state and the
    L1 term that referenced its parameters are gone, so two models never coexist."""
    import json

    mp.spawn(_release_worker, args=(2, str(tmp_path / "store"), str(tiny_model_dir), str(tmp_path)), nprocs=2,
             join=True)
    alive = json.loads((tmp_path / "alive.json").read_text())
    assert len(alive) == 3 and alive == [0, 0, 0]   # embedding names, phase 1, phase 2


def _held_worker(rank: int, world: int, store: str, path: str, out: str) -> None:
    import json

    with loopback_group(rank, world, store):
        held: list[int] = []
        _train(rank, path, "language", 3, f"{out}/checkpoints", None, False, held_at_build=held)
        with open(f"{out}/held{rank}.json", "w") as fh:
            json.dump(held, fh)


@pytest.mark.slow
def test_zero3_phase_memory_is_freed_before_the_next_phase_builds(tmp_path, tiny_model_dir):
    """DeepSpeed's stage-3 engine stays reachable after ``destroy``; ending a phase must still free
    its memory: when the next phase builds its model, the engines of the earlier phases (kept
    referenced here on purpose) hold no parameter, partition or optimizer-state bytes (language
    SFT: head warm-up, phase 1, phase 2). Without the release the last two builds see 0.4 and 0.9 MB
    of the tiny model still held."""
    import json

    mp.spawn(_held_worker, args=(2, str(tmp_path / "store"), str(tiny_model_dir), str(tmp_path)), nprocs=2,
             join=True)
    for rank in range(2):
        held = json.loads((tmp_path / f"held{rank}.json").read_text())
        assert held == [0, 0, 0, 0], held   # embedding names, initial model, after the warm-up, after phase 1


def _start_parts_worker(rank: int, world: int, store: str, path: str, out: str) -> None:
    import torch

    from deftx.core.roles import embedding_parameter_names, parameter_roles
    from deftx.core.scoring import make_scorer
    from deftx.data import NUSAX_LABELS
    from deftx.errors import DeftxError
    from deftx.models import load_classifier
    from deftx.training.distributed.runtime import DeepSpeedRuntime

    with loopback_group(rank, world, store):
        runtime = DeepSpeedRuntime(zero_stage=0)
        model = load_classifier(path, NUSAX_LABELS, seed=0)
        params = parameter_roles(model, "task").maskable
        found = {}
        for method in ("lt_sft", "deft_x"):
            scorer = make_scorer(method, rank=2 if method == "deft_x" else None, residual_keep=0.01,
                                 embedding_names=frozenset(embedding_parameter_names(model)))
            parts = runtime.start_parts(params, scorer)
            runtime.check_rebuilt(parts, parameter_roles(load_classifier(path, NUSAX_LABELS, seed=0),
                                                         "task").maskable)   # the same weights: passes
            other = parameter_roles(load_classifier(path, NUSAX_LABELS, seed=0), "task").maskable
            with torch.no_grad():
                for p in other.values():
                    p.add_(1e-3)
            try:
                runtime.check_rebuilt(parts, other)
                refused = ""
            except DeftxError as exc:
                refused = str(exc)
            found[method] = (dict(parts), parts.spans, refused)
        torch.save(found, f"{out}.rank{rank}")


@pytest.mark.slow
def test_each_rank_keeps_only_its_selection_share_of_theta_start(tmp_path, tiny_model_dir):
    """With K-sized phase 2 the DeepSpeed runtime does not keep theta_start whole: each rank keeps
    the pieces it scores in the selection, the ranks' pieces together are exactly theta_start (no
    entry twice, none missing), and a rebuild that does not give theta_start again is refused."""
    import torch

    from deftx.core.roles import parameter_roles
    from deftx.data import NUSAX_LABELS
    from deftx.models import load_classifier

    out = str(tmp_path / "parts")
    mp.spawn(_start_parts_worker, args=(2, str(tmp_path / "store"), str(tiny_model_dir), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    start = parameter_roles(load_classifier(str(tiny_model_dir), NUSAX_LABELS, seed=0), "task").maskable
    total = sum(p.numel() for p in start.values())
    for method in ("lt_sft", "deft_x"):
        covered = {n: torch.zeros(p.numel(), dtype=torch.int64) for n, p in start.items()}
        for rank in ranks:
            parts, spans, refused = rank[method]
            assert "did not rebuild theta_start" in refused
            held = sum(t.numel() for t in parts.values())
            assert 0 < held < 0.75 * total, (method, held, total)
            for name, part in parts.items():
                lo, hi = spans[name] if spans[name] is not None else (0, start[name].numel())
                assert torch.equal(part.reshape(-1), start[name].detach().reshape(-1)[lo:hi]), name
                covered[name][lo:hi] += 1
        assert all(bool((c == 1).all()) for c in covered.values()), method


def _checkpoint_names(tmp_path, name: str) -> list[str]:
    return sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir() if p.is_dir())


@pytest.mark.slow
def test_time_based_checkpoints_come_at_report_steps_and_resume_exactly(tmp_path, tiny_model_dir):
    """``checkpoint_minutes``: none before the interval has passed (only the one after the
    selection), and once it has, one at each progress report; a run stopped after one and resumed
    from it ends with the SFT of an uninterrupted run (ZeRO-0, the default)."""
    patient = {"checkpoint_every": 0, "checkpoint_minutes": 60.0, "report_every": 2}
    eager = {"checkpoint_every": 0, "checkpoint_minutes": 1e-9, "report_every": 4}
    whole = _run(tmp_path, "whole", tiny_model_dir, "task", 0, checkpointing=patient)
    assert _checkpoint_names(tmp_path, "whole") == ["2-sparse-00000000"]  # the selection
    resumed = _run(tmp_path, "resumed", tiny_model_dir, "task", 0, crash_at=("sparse", 5), checkpointing=eager)
    assert _checkpoint_names(tmp_path, "resumed") == ["1-full-00000004", "2-sparse-00000000", "2-sparse-00000004"]
    assert_same_sft(whole, resumed)


@pytest.mark.slow
def test_resumed_language_sft_with_head_warmup_equals_uninterrupted_run(tmp_path, tiny_model_dir):
    """MLM on a model without a pretrained head: head warm-up, then phase 1 stopped at step 3 and
    resumed from the checkpoint at step 2 (which carries the warmed-up head)."""
    whole = _run(tmp_path, "whole", tiny_model_dir, "language", 2)
    resumed = _run(tmp_path, "resumed", tiny_model_dir, "language", 2, crash_at=("full", 3))
    assert len(whole.metadata.training["phases"]) == 3
    assert_same_sft(whole, resumed)


def _phase1_worker(rank: int, world: int, store: str, path: str, stage: int, out: str) -> None:
    """Phase 1 once into a store, then a trial with another density from the store, then the same
    trial trained from scratch."""
    with loopback_group(rank, world, store):
        saved = (f"{out}/phase1", "d1")
        first = _train(rank, path, "language", stage, f"{out}/c1", None, False, phase1=saved, stop_after_phase1=True)
        assert first.sft is None
        dist.barrier()
        reused = _train(rank, path, "language", stage, f"{out}/c2", None, False, phase1=saved, density=0.1)
        scratch = _train(rank, path, "language", stage, f"{out}/c3", None, False, density=0.1)
        if rank == 0:
            reused.sft.save(f"{out}/reused")
            scratch.sft.save(f"{out}/scratch")


@pytest.mark.slow
def test_phase1_store_reuse_under_zero3_gives_the_sft_of_a_full_run(tmp_path, tiny_model_dir):
    """Under ZeRO-3 a trial that reads warm-up + phase 1 from the store (plain tensors, not
    partitions) ends with the SFT of a run that trains everything, bit for bit."""
    from deftx.core.sft import SparseFineTuning

    mp.spawn(_phase1_worker, args=(2, str(tmp_path / "store"), str(tiny_model_dir), 3, str(tmp_path)), nprocs=2,
             join=True)
    reused, scratch = SparseFineTuning.load(tmp_path / "reused"), SparseFineTuning.load(tmp_path / "scratch")
    assert reused.metadata.training["phase1_reused_from"] == str(tmp_path / "phase1")
    assert reused.nnz > 0
    assert_same_sft(reused, scratch)


# -- checkpoints are data ------------------------------------------------------------------------


class _RunsCode:
    """What a tampered checkpoint file could hold: unpickling it runs a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_files_are_read_as_data_only(tmp_path):
    """deftx reads DeepSpeed checkpoint files with torch.load(weights_only=True) and an explicit
    list of DeepSpeed classes: its own state loads, an object that would run code is refused.
    (The control: DeepSpeed's default reader, weights_only=False, runs it.)"""
    import pickle

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from deftx.training.distributed.engine import weights_only_load

    good = tmp_path / "good.pt"
    state = {"module": {"w": torch.arange(4.0)}, "zero_stage": ZeroStageEnum.gradients,
             "loss_scaler": LossScaler(1.0), "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]}
    torch.save(state, good)
    loaded = weights_only_load(str(good))
    assert torch.equal(loaded["module"]["w"], state["module"]["w"]) and loaded["zero_stage"] == ZeroStageEnum.gradients
    marker = tmp_path / "code-ran"
    bad = tmp_path / "bad.pt"
    torch.save({"module": _RunsCode(str(marker))}, bad)
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL posix.system"):
        weights_only_load(str(bad))
    assert not marker.exists()
    torch.load(bad, weights_only=False)
    assert marker.exists()


def _tamper_worker(rank: int, world: int, store: str, path: str, out: str, marker: str) -> None:
    from pathlib import Path

    import torch

    from deftx.training.distributed.runtime import CheckpointError, DirectoryCheckpointSink

    with loopback_group(rank, world, store):
        try:
            _train(rank, path, "task", 2, f"{out}/checkpoints", ("sparse", 3), resume=False)
        except Interrupted:
            pass
        dist.barrier()
        if rank == 0:
            latest = DirectoryCheckpointSink(f"{out}/checkpoints").latest()
            files = list((latest / "engine").rglob("*model_states.pt"))
            assert files
            for f in files:
                torch.save({"module": _RunsCode(marker)}, f)
        dist.barrier()
        try:
            _train(rank, path, "task", 2, f"{out}/checkpoints", None, resume=True)
        except CheckpointError as exc:
            Path(out, f"error-{rank}.txt").write_text(str(exc))


@pytest.mark.slow
def test_resuming_from_a_tampered_checkpoint_runs_no_code(tmp_path, tiny_model_dir):
    """A checkpoint file replaced by one that would run a command when unpickled: the resume is
    refused on every rank with one line, and the command never runs."""
    marker = tmp_path / "code-ran"
    mp.spawn(_tamper_worker, args=(2, str(tmp_path / "store"), str(tiny_model_dir), str(tmp_path), str(marker)),
             nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / f"error-{rank}.txt").read_text()
        assert message.startswith("refusing to load the checkpoint in") and "GLOBAL posix.system" in message
        assert "\n" not in message
    assert not marker.exists()


def test_deepspeed_loads_without_importing_mlflow_and_mlflow_still_imports_after():
    """DeepSpeed's autotuner tries ``import mlflow`` when DeepSpeed loads (most of its import time);
    deftx's workers load DeepSpeed without it, and MLflow stays importable for live tracking."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from deftx.training.distributed.engine import load_deepspeed\n"
            "load_deepspeed()\n"
            "from deepspeed.autotuning import autotuner\n"
            "print('mlflow' in sys.modules, autotuner.has_mlflow, 'deepspeed' in sys.modules)\n"
            "import mlflow\n"
            "print(mlflow.__name__, load_deepspeed() is sys.modules['deepspeed'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split() for line in done.stdout.splitlines()[-2:]] == [["False", "False", "True"],
                                                                        ["mlflow", "True"]]
