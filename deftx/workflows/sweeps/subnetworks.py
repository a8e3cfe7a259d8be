"""Sweeps of a subnetwork system's settings (density, re-selection interval, inner steps...), run by
the same Tune runner as the selection sweeps (:func:`deftx.workflows.sweeps.tune.fit_trials`), over
dimensions parsed by the same space parser (:mod:`deftx.workflows.sweeps.space`).

A space file names one system of a results experiment (``subnetworks.systems``) and the settings a
trial samples, as dotted keys of its ``SubnetworkConfig`` (``selection.density``,
``reselect_every``, ``inner_steps``, ``train.learning_rate`` ...). The driver first runs the
experiment without subnetwork systems (language SFTs and the main table: the shared work, reused by
digest); every trial then runs the experiment with only its sampled system, one seed, validation
scoring only, adopting the shared work (``reuse_from``). The objective is the average validation
metric of the held-out targets (leave-fold-out), never a test score.

Trials train in their own process (``cluster.backend: local``, every CPU of the node) or launch
Ray Train workers (``ray``; the trial then holds 0.01 CPU, as in ``deftx.workflows.sweeps.tune``). Each trial
is a nested MLflow run under the sweep's run.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deftx.config import from_dict, read_yaml
from deftx.errors import ConfigError
from deftx.jobs.spec import Log
from deftx.tracking.tracker import RunHandle, Tracker
from deftx.workflows.experiments.config import ExperimentConfig
from deftx.workflows.experiments.report import metric_of, per_seed_average, select
from deftx.workflows.experiments.runner import Experiment
from deftx.workflows.sweeps.space import Dimension, parse_setting_dimension
from deftx.workflows.sweeps.tune import fit_trials, report, start_sweep_ray, trial_identity, trial_logger

SEARCHERS = ("optuna", "random")


@dataclass
class SubnetworkSpace:
    system: str
    dimensions: dict[str, Dimension]
    searcher: str = "random"
    seed: int | None = None
    source: str | None = None

    def describe(self) -> dict[str, str]:
        return {k: f"{d.kind} {list(d.values)}" for k, d in self.dimensions.items()}


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``a.b.c`` set to ``value``."""
    out = copy.deepcopy(data)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value
    return out


def trial_overrides(cfg: ExperimentConfig, space: SubnetworkSpace, sample: dict[str, Any]) -> dict[str, Any]:
    """The system's settings with ``sample`` applied (dotted keys), before validation."""
    overrides = copy.deepcopy(cfg.subnetworks.systems[space.system] or {})
    for key, value in sample.items():
        overrides = set_dotted(overrides, key, value)
    return overrides


def load_subnetwork_space(path: str | Path, cfg: ExperimentConfig) -> SubnetworkSpace:
    """A space file, checked against ``cfg`` (the system exists, every sampled key is a setting
    and every bound and option gives a valid configuration) before any work."""
    path = Path(path)
    data = read_yaml(path)
    unknown = set(data) - {"system", "dimensions", "searcher", "seed"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {min(unknown)!r}; valid: system, dimensions, searcher, seed")
    system = data.get("system")
    if system not in cfg.subnetworks.systems:
        raise ConfigError(f"{path}: system: {system!r} is not a subnetwork system of the experiment "
                          f"({', '.join(cfg.subnetworks.systems) or 'none'})")
    searcher = data.get("searcher", "random")
    if searcher not in SEARCHERS:
        raise ConfigError(f"{path}: searcher: unknown {searcher!r}; valid: {', '.join(SEARCHERS)}")
    seed = data.get("seed")
    if seed is not None and seed not in cfg.seeds:
        raise ConfigError(f"{path}: seed: {seed} is not one of the experiment's seeds ({cfg.seeds})")
    dims = data.get("dimensions") or {}
    if not isinstance(dims, dict) or not dims:
        raise ConfigError(f"{path}: dimensions: give at least one setting to sample")
    space = SubnetworkSpace(system=system, searcher=searcher, seed=seed, source=str(path),
                            dimensions={k: parse_setting_dimension(k, v, f"{path}: dimensions.{k}") for k, v in dims.items()})
    for key, dim in space.dimensions.items():   # every bound and option must give a valid system
        for value in dim.candidates():
            trial = copy.deepcopy(cfg)
            trial.subnetworks.systems = {"trial": trial_overrides(cfg, space, {key: value})}
            try:
                trial.subnetworks.system("trial")
            except ConfigError as exc:
                raise ConfigError(f"{path}: dimensions.{key} = {value!r} gives an invalid system: "
                                  f"{str(exc).replace('subnetworks.systems.trial.', '')}") from None
    return space


def shared_config(cfg: ExperimentConfig, space: SubnetworkSpace) -> ExperimentConfig:
    """The work every trial shares, run once before the trials: the experiment without its
    subnetwork systems, ablations and analysis, at the trials' seed (language SFTs, and the main
    table if the experiment has one)."""
    shared = copy.deepcopy(cfg)
    shared.subnetworks.systems = {}
    shared.seeds = [space.seed if space.seed is not None else cfg.seeds[0]]
    shared.ablations.variants = {}
    shared.analysis = False
    shared.pipeline.tracking.enabled = False
    return shared.validate()


def trial_config(cfg: ExperimentConfig, space: SubnetworkSpace, sample: dict[str, Any], shared_dir: str,
                 trial_dir: str) -> ExperimentConfig:
    """The experiment a trial runs: its sampled system only, one seed, validation scores only, the
    shared work adopted from ``shared_dir``."""
    trial = copy.deepcopy(cfg)
    trial.subnetworks.systems = {"trial": trial_overrides(cfg, space, sample)}
    trial.seeds = [space.seed if space.seed is not None else cfg.seeds[0]]
    trial.eval_splits = ["valid"]
    trial.analysis = False
    trial.ablations.variants = {}
    trial.reuse_from = shared_dir
    trial.pipeline.output_dir = trial_dir
    return trial.validate()


def objective_of(state, metric: str) -> float:
    rows = select(state.records, part="subnetworks", split="valid")
    values = per_seed_average(rows, list(state.config.pipeline.target_languages), metric)
    return sum(values) / len(values) if values else float("nan")


def _trial(sample: dict[str, Any], *, base: dict[str, Any], space: dict[str, Any], settings: dict[str, Any]) -> None:
    """One Tune trial: the experiment with the sampled system only; reports the objective."""
    cfg = from_dict(ExperimentConfig, base)
    sp = SubnetworkSpace(**{**space, "dimensions": {k: Dimension(**d) for k, d in space["dimensions"].items()}})
    trial_id, cpus = trial_identity()
    trial_dir = Path(settings["trial_root"]) / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    trial = trial_config(cfg, sp, sample, settings["shared_dir"], str(trial_dir))
    trial.pipeline.tracking.enabled = False   # the trial's run is logged below, nested under the sweep
    log = trial_logger(trial_dir)
    if trial.pipeline.cluster.backend == "local":
        import torch

        torch.set_num_threads(trial.pipeline.threads or cpus)
    state = Experiment(trial, log=log).run()
    metric, _ = metric_of(trial)
    value = objective_of(state, metric)
    per_language = {f"valid.{r.language}.{metric}": getattr(r, metric) for r in state.records
                    if r.part == "subnetworks"}
    key = settings["objective"]
    tracker = Tracker(settings["tracking_uri"], enabled=settings["tracking"], log=log)
    if settings["tracking"]:
        run = tracker.start_run(settings["experiment"], f"trial-{trial_id}", parent=RunHandle(settings["parent"]),
                                params={"sample": sample, "system": sp.system},
                                tags={"deftx.sweep": settings["name"], "deftx.trial": trial_id})
        tracker.log_metrics(run, {key: value, **per_language})
        tracker.end_run(run)
    report({key: value, **per_language})


@dataclass
class SubnetworkSweepResult:
    name: str
    system: str
    objective: str
    output_dir: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    seconds: float = 0.0

    def table(self) -> str:
        keys = sorted({k for t in self.trials for k in t["config"]})
        lines = ["| trial | " + " | ".join(keys) + f" | {self.objective} |", "|---" * (len(keys) + 2) + "|"]
        for t in sorted(self.trials, key=lambda t: -(t["score"] if t["score"] == t["score"] else -1)):
            cells = [_short(t["config"].get(k)) for k in keys]
            score = "failed" if t["error"] else f"{100 * t['score']:.1f}"
            lines.append(f"| {t['trial_id']} | " + " | ".join(cells) + f" | {score} |")
        return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_subnetwork_sweep(cfg: ExperimentConfig, space: SubnetworkSpace, num_samples: int, *,
                         name: str | None = None, log: Log = print) -> SubnetworkSweepResult:
    """The shared work, then ``num_samples`` Tune trials of ``space`` (see the module docstring)."""
    if num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {num_samples}")
    started = time.perf_counter()
    name = name or f"{cfg.dataset}-{cfg.preset}-{space.system}"
    pipe = cfg.pipeline
    pipe.cluster, resources = start_sweep_ray(pipe.cluster, log)

    log("== shared work: language SFTs and the main table, if the experiment has one (reused when finished) ==")
    shared_state = Experiment(shared_config(cfg, space), log=log).run()
    shared_dir = str(Path(shared_state.config.pipeline.output_dir).resolve())
    cfg.pipeline = shared_state.config.pipeline   # absolute paths

    metric, _ = metric_of(cfg)
    key = f"valid_{metric}"
    tracker = Tracker(pipe.tracking.uri, enabled=pipe.tracking.enabled, log=log)
    experiment = pipe.tracking.experiment or f"deftx-subnetworks-sweep-{cfg.dataset}"
    sweep_run = tracker.start_run(experiment, f"sweep-{name}", params={
        "system": space.system, "space": space.describe(), "num_samples": num_samples, "objective": key,
        "searcher": space.searcher, "seed": shared_state.config.seeds[0]}, tags={"deftx.sweep": name})
    out = Path(shared_dir) / "sweeps" / name
    settings = {"trial_root": str(out / "trials"), "shared_dir": shared_dir, "objective": key, "name": name,
                "tracking": pipe.tracking.enabled and not tracker.offline, "tracking_uri": tracker.uri,
                "experiment": experiment, "parent": sweep_run.run_id}
    space_data = {**asdict(space), "dimensions": {k: asdict(d) for k, d in space.dimensions.items()}}
    storage = Path(pipe.cluster.storage_path or Path(shared_dir) / "tune").resolve()
    try:
        log(f"== sweep {name}: {num_samples} trials of {space.system}, objective {key} ==")
        grid = fit_trials(_trial, {"base": asdict(cfg), "space": space_data, "settings": settings},
                          resources=resources, path=storage / name, dimensions=space.dimensions, metric=key,
                          num_samples=num_samples, searcher=space.searcher, seed=cfg.seeds[0], log=log)
    except BaseException:
        tracker.end_run(sweep_run, "FAILED")
        raise
    result = SubnetworkSweepResult(name=name, system=space.system, objective=key, output_dir=str(out))
    for res in grid:
        metrics = res.metrics or {}
        score = metrics.get(key)
        result.trials.append({"trial_id": metrics.get("trial_id") or Path(res.path).name,
                              "config": dict(res.config or {}),
                              "score": float(score) if isinstance(score, (int, float)) else float("nan"),
                              "error": str(res.error) if res.error else None})
    finished = [t for t in result.trials if not t["error"] and not math.isnan(t["score"])]
    if finished:
        result.best = max(finished, key=lambda t: t["score"])
        tracker.log_metrics(sweep_run, {f"best_{key}": result.best["score"]})
        tracker.log_params(sweep_run, {"best": result.best["config"]})
        log(f"[sweep] best {key} {100 * result.best['score']:.1f}: {result.best['config']}")
    result.seconds = time.perf_counter() - started
    tracker.log_metrics(sweep_run, {"seconds": result.seconds, "trials": len(result.trials),
                                    "finished": len(finished)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(asdict(result), indent=2, default=str) + "\n", encoding="utf-8")
    (out / "result.md").write_text(f"# Sweep {name}: {space.system}, objective {key} (held-out targets' validation)"
                                   f"\n\n{result.table()}\n\nwall time {result.seconds:.0f} s\n", encoding="utf-8")
    tracker.log_file(sweep_run, out / "result.md")
    tracker.end_run(sweep_run, "FINISHED" if finished else "FAILED")
    return result
