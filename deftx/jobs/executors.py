"""Where jobs run: this process (the single-process reference) or Ray Train workers under
DeepSpeed (:mod:`deftx.jobs.ray`, imported only when that backend is chosen)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from deftx.config import PipelineConfig
from deftx.jobs.run import run_job
from deftx.jobs.spec import Job, Log
from deftx.tracking.live import LiveRun
from deftx.training.runtime import LocalRuntime


class Executor(Protocol):
    def prepare(self) -> None:
        """Check that jobs can run (e.g. reach the cluster) before any work is done."""

    def run(self, job: Job, directory: Path, log: Log, live: LiveRun | None = None) -> None:
        """Run ``job`` and leave its output in ``directory`` (live metrics to ``live``'s run)."""


class LocalExecutor:
    """Every job in this process (the single-process reference; no Ray, no DeepSpeed)."""

    def prepare(self) -> None:
        pass

    def run(self, job: Job, directory: Path, log: Log, live: LiveRun | None = None) -> None:
        output = run_job(job, LocalRuntime(), log, live)
        assert output is not None
        output.save(directory)


def make_executor(cfg: PipelineConfig, log: Log = print) -> Executor:
    """The executor of ``cfg.cluster.backend``: Ray Train workers under DeepSpeed, or this process."""
    if cfg.cluster.backend == "local":
        return LocalExecutor()
    from deftx.jobs.ray import RayExecutor

    out = Path(cfg.output_dir).resolve()
    return RayExecutor(cfg.cluster, default_storage=out / "ray", log=log, log_dir=out / "logs")

