"""What a results experiment produces: its scores (``Record``) and its state for the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deftx.workflows.experiments.config import ExperimentConfig


class MissingUnit(Exception):
    """A unit the experiment has not trained or scored yet (raised only in report-only mode)."""


@dataclass
class Record:
    """One score: ``part`` main | multi_source | ablation; ``system`` the method (or variant)."""

    part: str
    system: str
    seed: int
    language: str
    split: str
    macro_f1: float
    accuracy: float
    n: int
    with_language_sft: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentState:
    """Everything the experiment produced, for the report."""

    config: ExperimentConfig
    records: list[Record] = field(default_factory=list)
    overlaps: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    language_sft_dirs: dict[str, dict[str, str]] = field(default_factory=dict)    # method -> lang -> dir
    task_sft_dirs: dict[str, dict[int, str]] = field(default_factory=dict)        # method -> seed -> dir
    phase1_dirs: dict[str, str] = field(default_factory=dict)                     # "language-ind", "task" ...
    trained: int = 0
    reused: int = 0
    ledger: dict[str, float] = field(default_factory=dict)   # seconds per stage over all invocations
    missing: list[str] = field(default_factory=list)           # report-only: units not computed yet
    sft_dirs: dict[str, str] = field(default_factory=dict)     # every SFT of the experiment, by relative path
    mlm_loss: dict[str, dict[str, Any]] = field(default_factory=dict)     # method -> held-out MLM-loss result
    subnetwork_stats: list[dict[str, Any]] = field(default_factory=list)   # mask sizes and sharing per model
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)   # system -> trials, champions, valid scores
    head_input_shift: list[dict[str, Any]] = field(default_factory=list)   # what language SFTs do to the head's input
