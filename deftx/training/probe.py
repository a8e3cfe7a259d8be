"""Evaluation of a language SFT while its phase 2 trains, for early stopping in sweeps.

Every ``every`` sparse-phase steps, all ranks read the maskable weights (a collective under
ZeRO-3); rank 0 scores theta_now + phi_task (theta_now = theta0 + the language SFT so far) on the
objective's split and appends ``{"step", <metric keys>}`` as one JSON line to ``report_path``. A
sweep's trial follows that file and reports each line to Tune, so ASHA or the median rule can stop
a weak trial long before its phase 2 ends. Nothing here knows about Ray.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from deftx.core.roles import parameter_roles
from deftx.evaluation import ClassifierScorer
from deftx.training.runtime import PHASE_SPARSE, TrainingRuntime
from deftx.training.sparse_values import SparsePhase

Probe = Callable[[Mapping[str, torch.Tensor], int], dict[str, float]]


def append_report(path: str | Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed and fsynced (a reader in another process sees whole lines)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_reports(path: str | Path, start: int = 0) -> list[dict[str, Any]]:
    """The complete lines of a report file from line ``start`` on."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    except OSError:
        return []
    return [json.loads(line) for line in lines[start:] if line.endswith("\n")]


class ProbedRuntime:
    """A ``TrainingRuntime`` that also runs ``probe`` every ``every`` steps of the sparse phase.
    Everything else is delegated to ``inner``."""

    def __init__(self, inner: TrainingRuntime, *, kind: str, every: int, probe: Probe, report_path: str | Path) -> None:
        if every < 1:
            raise ValueError(f"probe interval must be >= 1, got {every}")
        self.inner, self.kind, self.every, self.probe = inner, kind, every, probe
        self.report_path = Path(report_path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step_hook(self, engine, phase, state):
        hook = self.inner.step_hook(engine, phase, state)
        if phase != PHASE_SPARSE:
            return hook
        params = parameter_roles(engine.module, self.kind).maskable  # type: ignore[arg-type]

        def on_step(step: int, loss: float) -> None:
            if hook is not None:
                hook(step, loss)
            if step % self.every:
                return
            values = self.inner.read(params, everywhere=False)   # collective under ZeRO-3
            bank = getattr(engine.module, SparsePhase.ATTRIBUTE, None)
            if bank is not None:   # phase 2 on K values over a frozen base: the effective weights
                trained = self.inner.read(bank.values, everywhere=False)
                values = bank.apply_to(values, trained) if values is not None and trained is not None else None
            if values is not None:
                append_report(self.report_path, {"step": step, **self.probe(values, step)})

        return on_step


def language_probe(model_path: str, tokenizer, task_sft, examples, num_labels: int, split: str, *,
                   seed: int, batch_size: int, max_length: int) -> Probe:
    """Score theta_now + phi_task on ``examples``: a classifier at theta0 gets the current body
    weights, then the task SFT (with its head) on top; both are undone afterwards."""

    labels = task_sft.metadata.label_names or [str(i) for i in range(num_labels)]
    scorer = ClassifierScorer(model_path, labels, seed=seed, batch_size=batch_size, max_length=max_length,
                              tokenizer=tokenizer)
    body = parameter_roles(scorer.model, "task").maskable

    def probe(values: Mapping[str, torch.Tensor], step: int) -> dict[str, float]:
        with scorer.weights({n: values[n] for n in body}), scorer.composed(task_sft, check_base=False):
            res = scorer.score(examples)
        return {f"{split}_macro_f1": res["macro_f1"], f"{split}_accuracy": res["accuracy"]}

    return probe
