"""An SFT's MLflow run, filled while its phases train (not after the SFT is saved).

The driver opens the run before it hands the job to an executor (:class:`LiveRuns`) and passes
its address (:class:`LiveRun`: tracking URI and run id, plain data that crosses to Ray workers).
Rank 0 of the job sends every step's loss, learning rate and steps per second there
(:class:`MlflowSink`, through ``deftx.training.live``), in batches every few seconds, so another
process reading the store sees a phase's metrics while it is still running. After the job the
driver completes the same run with the SFT's parameters, final metrics and artifacts
(``deftx.tracking.runs.log_sft``). Tracking never costs training: a failing store is dropped with
one warning.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deftx.errors import first_line
from deftx.tracking.tracker import RunHandle, Tracker

FLUSH_SECONDS = 5.0   # default; DEFTX_LIVE_FLUSH_SECONDS overrides it (how fresh a live view is)


def flush_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("DEFTX_LIVE_FLUSH_SECONDS", FLUSH_SECONDS)))
    except ValueError:
        return FLUSH_SECONDS


@dataclass(frozen=True)
class LiveRun:
    """Where a job's rank 0 logs its live metrics."""

    uri: str
    run_id: str


def phase_metric(phase: str) -> str:
    """``lang jav phase 1/2 (full)`` -> ``loss.phase1_full``; head warm-up -> ``loss.head_warmup``
    (the key of a phase's per-step losses in an SFT's run)."""
    if "warm-up" in phase:
        return "loss.head_warmup"
    match = re.search(r"phase (\d)/\d \((\w+)\)", phase)
    return f"loss.phase{match.group(1)}_{match.group(2)}" if match else "loss." + re.sub(r"\W+", "_", phase)


def metric_key(phase: str, value: str) -> str:
    """``lang jav phase 1/2 (full)``, ``loss`` -> ``loss.phase1_full`` (the key the SFT's per-step
    losses always had); ``lr`` -> ``lr.phase1_full``; ``steps_per_s`` -> ``steps_per_s.phase1_full``.
    (Kept here, free of the plotting imports of ``deftx.tracking.runs``: Ray workers call it.)"""
    return value + phase_metric(phase)[len("loss"):]


class MlflowSink:
    """A ``deftx.training.live`` sink logging to one MLflow run, flushed every ``flush_seconds``."""

    def __init__(self, live: LiveRun, log: Callable[[str], None] = print, every: float | None = None):
        from mlflow import MlflowClient

        from deftx.tracking.tracker import quiet_mlflow

        quiet_mlflow()
        self.live, self.log = live, log
        self.flush_seconds = flush_seconds() if every is None else every
        self.client = MlflowClient(live.uri)
        self.buffer: list[Any] = []
        self.last = time.monotonic()
        self.failed = False

    def __call__(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.buffer += [Metric(metric_key(phase, k), float(v), now_ms, step) for k, v in values.items()]
        if time.monotonic() - self.last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if self.failed or not self.buffer:
            self.buffer.clear()
            return
        try:
            for start in range(0, len(self.buffer), 1000):   # MLflow's limit per batch
                self.client.log_batch(self.live.run_id, metrics=self.buffer[start:start + 1000])
        except Exception as exc:  # noqa: BLE001 - tracking must never cost a training run
            self.failed = True
            self.log(f"WARNING: live metrics to MLflow stopped ({first_line(exc)}); training goes on")
        self.buffer.clear()


class LiveRuns:
    """The driver's side: one run per SFT trained, opened before its job runs."""

    def __init__(self, tracker: Tracker, experiment: str, parent: RunHandle | None = None) -> None:
        self.tracker, self.experiment, self.parent = tracker, experiment, parent
        self.handles: dict[str, RunHandle] = {}

    def start(self, name: str, directory: str | Path, tags: Mapping[str, str] | None = None) -> LiveRun | None:
        """Open the run of the SFT that will be written to ``directory``; None when offline."""
        handle = self.tracker.start_run(self.experiment, name, parent=self.parent,
                                        tags={"deftx.sft_dir": str(directory), **(tags or {})})
        if handle.run_id is None:
            return None
        self.handles[str(directory)] = handle
        return LiveRun(self.tracker.uri, handle.run_id)

    def failed(self, directory: str | Path, interrupted: bool) -> None:
        handle = self.handles.pop(str(directory), None)
        if handle is not None:
            self.tracker.end_run(handle, "KILLED" if interrupted else "FAILED")

    def take(self, directory: str | Path) -> RunHandle | None:
        """The open run of ``directory`` (to complete with ``log_sft``), if it was trained live."""
        return self.handles.pop(str(directory), None)
