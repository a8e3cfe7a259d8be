"""The Ray Tune layer of sweeps: one Tune experiment per target language.

Ray Train V2 pattern: a Tune trial is a function that runs the trial's training job with the
pipeline's executor (a ``TorchTrainer`` of DeepSpeed workers launched from inside the trial, or
the trial's own process with ``cluster.backend: local``), scores the composed model, registers it,
and reports to Tune. On 2 CPUs the trial holds 0.01 CPU and the workers the rest (a trial that
held a whole CPU would leave its own workers unschedulable).

- Searcher: Optuna (TPE) or random sampling; scheduler: ASHA or the median rule on the objective,
  reported after every ``eval_every`` phase-2 steps (``deftx.training.probe``) and at the end.
- Resume: experiments live under ``<storage>/<sweep name>-<lang>``; the same command restores an
  interrupted experiment (finished trials are not rerun) and reuses all shared work.
- Tracking: a parent MLflow run per sweep, one per language under it, one per trial under that.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from deftx.config import ClusterConfig, PipelineConfig, SelectionConfig
from deftx.core.roles import parameter_roles
from deftx.core.sft import SparseFineTuning, read_metadata
from deftx.data import NUSAX_LABELS
from deftx.errors import DeftxError
from deftx.jobs.executors import LocalExecutor, make_executor
from deftx.jobs.ray import connect
from deftx.jobs.spec import Log, Probe
from deftx.models import load_classifier, load_masked_lm, resolve_model_path
from deftx.tasks import spec_of
from deftx.tracking.plots import close, language_bars, trial_scatter
from deftx.tracking.registry import PendingRegistration, Registry, composed_model_name
from deftx.tracking.runs import log_sft, spectra_figure
from deftx.tracking.tracker import RunHandle, Tracker
from deftx.training.probe import read_reports
from deftx.workflows.pipeline import check_run_outputs, start_run
from deftx.workflows.sweeps.shared import (
    SharedWork,
    check_sweep,
    composed_parts,
    prepare_shared_work,
    score_composition,
    trial_job,
)
from deftx.workflows.sweeps.space import Dimension, SearchSpace, selection_from_sample

TRIAL_CPU = 0.01


def tune_distribution(dim: Dimension) -> Any:
    from ray import tune

    if dim.kind == "constant":
        return dim.values[0]
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    low, high = dim.values
    if dim.kind == "uniform":
        return tune.uniform(low, high)
    if dim.kind == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(low, high + 1)   # Tune's upper bound is exclusive; the space file's is not


def sweep_cluster(cluster: ClusterConfig, total_cpus: float) -> ClusterConfig:
    """The workers' CPUs, leaving ``TRIAL_CPU`` for the trial that launches them."""
    if cluster.backend != "ray":
        return cluster
    need = cluster.num_workers * cluster.cpus_per_worker + TRIAL_CPU
    if need <= total_cpus + 1e-9:
        return cluster
    share = (total_cpus - TRIAL_CPU) / cluster.num_workers
    if share <= 0:
        raise DeftxError(f"the Ray cluster has {total_cpus:g} CPUs: too few for {cluster.num_workers} workers and a "
                         f"trial")
    return ClusterConfig(**{**asdict(cluster), "cpus_per_worker": math.floor(share * 100) / 100})


def start_sweep_ray(cluster: ClusterConfig, log: Log) -> tuple[ClusterConfig, dict[str, float]]:
    """Connect to (or start) Ray, which Tune needs whatever the backend; the cluster settings fitted
    to leave room for the trials, and each trial's resources (``ray``: the trial only launches
    workers; ``local``: it trains itself, with every CPU of the node, since Ray sets a task's torch
    threads from its CPUs and one CPU would halve training speed)."""
    import ray


    connect(cluster if cluster.backend == "ray" else
            ClusterConfig(**{**asdict(cluster), "backend": "ray", "check_resources": False}), log)
    total = ray.cluster_resources().get("CPU", 1.0)
    resources = {"cpu": TRIAL_CPU} if cluster.backend == "ray" else {"cpu": max(1.0, float(int(total)))}
    return sweep_cluster(cluster, total), resources


def fit_trials(trial: Any, arguments: dict[str, Any], *, resources: dict[str, float], path: Path,
               dimensions: dict[str, Dimension], metric: str, num_samples: int, searcher: str, seed: int,
               scheduler: Any = None, max_concurrent: int = 1, log: Log = print):
    """Run (or resume, when ``path`` holds an interrupted experiment) a Tune experiment of
    ``num_samples`` trials of ``trial(sample, **arguments)`` over ``dimensions``, maximising
    ``metric``; the result grid. Every sweep of deftx runs its trials here."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(trial, **arguments), resources)
    if tune.Tuner.can_restore(str(path)):
        log(f"[sweep] resuming the experiment in {path} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        search = None
        if searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search = OptunaSearch(seed=seed)   # metric and mode come from the TuneConfig
        tuner = tune.Tuner(
            trainable, param_space={name: tune_distribution(d) for name, d in dimensions.items()},
            tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=num_samples, search_alg=search,
                                        scheduler=scheduler, max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
    return tuner.fit()


def trial_identity() -> tuple[str, int]:
    """Inside a trial: its id and the CPUs Tune gave it."""
    from ray import tune

    ctx = tune.get_context()
    return ctx.get_trial_id(), max(1, int(ctx.get_trial_resources().required_resources.get("CPU", 1)))


def report(metrics: dict[str, Any]) -> None:
    """Inside a trial: report ``metrics`` to Tune."""
    from ray import tune

    tune.report(metrics)


def trial_logger(trial_dir: Path) -> Log:
    """A trial's log: lines appended to ``trial_dir/trial.log`` (trials run in Ray's processes,
    whose output is not the user's terminal)."""
    log_path = trial_dir / "trial.log"

    def log(line: str) -> None:
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    return log


@dataclass
class LanguageResult:
    language: str
    best_config: dict[str, Any]
    best_score: float
    objective: str
    trials: int
    finished: int
    stopped_early: int
    champion_version: str | None
    seconds: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_trial_dir: str | None = None


@dataclass
class SweepResult:
    name: str
    output_dir: str
    shared_seconds: dict[str, float]
    languages: list[LanguageResult] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"sweep {self.name}: best trial per language", "",
                 "| language | objective | best | trials (early-stopped) | best config | champion |", "|---|---|---|---|---|---|"]
        for r in self.languages:
            config = ", ".join(f"{k}={_short(v)}" for k, v in r.best_config.items())
            lines.append(f"| {r.language} | {r.objective} | {100 * r.best_score:.1f} | {r.trials} ({r.stopped_early}) "
                         f"| {config} | {r.champion_version or '-'} |")
        return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- the trial ----------------------------------------------------------------------------------


def _trial(sample: dict[str, Any], *, shared: dict[str, Any], lang: str, settings: dict[str, Any]) -> None:
    """One Tune trial: train the swept SFT with ``sample``, follow its phase-2 evaluations, score,
    register, report."""
    work = SharedWork(**shared)
    cfg = work.pipeline_config()
    trial_id, cpus = trial_identity()
    trial_dir = Path(settings["trial_root"]) / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    key, split = settings["objective"], settings["split"]
    job, selection = trial_job(work, lang, sample)
    report_path = trial_dir / "phase2-evaluations.jsonl"
    report_path.unlink(missing_ok=True)
    if settings["eval_every"] and work.sft == "language":
        assert work.task_sft is not None
        job = replace(job, probe=Probe(every=settings["eval_every"], task_sft=work.task_sft, language=lang,
                                       split=split, report_path=str(report_path)))
    log = trial_logger(trial_dir)
    if cfg.cluster.backend == "local":
        import torch

        torch.set_num_threads(cfg.threads or cpus)
        executor: Any = LocalExecutor()
    else:
        executor = make_executor(cfg, log)
    errors: list[BaseException] = []

    def train() -> None:
        try:
            executor.run(job, trial_dir / "sft", log)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial thread
            errors.append(exc)

    worker = threading.Thread(target=train, name="deftx-trial-training", daemon=True)
    worker.start()
    seen = 0
    iteration = 0
    while worker.is_alive() or seen < len(read_reports(report_path)):
        new = read_reports(report_path, seen)
        for record in new:
            iteration += 1
            report({**{k: v for k, v in record.items() if k != "step"}, "phase2_step": record["step"],
                    "final": 0})
        seen += len(new)
        worker.join(timeout=1.0)
    if errors:
        raise errors[0]

    task_dir, lang_dir = composed_parts(work, lang, str(trial_dir / "sft"))
    metrics = score_composition(cfg, task_dir, lang_dir, lang, split)
    params = {"language": lang, **selection.hyperparameters()}
    tracker = Tracker(settings["tracking_uri"], enabled=settings["tracking"], log=log)
    if settings["tracking"]:
        tags = {"deftx.sweep": settings["name"], "deftx.trial": trial_id}
        run = log_sft(tracker, settings["experiment"], RunHandle(settings["parent_runs"].get(lang)),
                      trial_dir / "sft", f"trial-{lang}-{trial_id}", extra_params={"sample": sample})
        tracker.log_metrics(run, metrics)
        tracker.set_tags(run, tags)
        if settings["register"]:
            pending = PendingRegistration(experiment=settings["experiment"], run_name=f"register-{lang}-{trial_id}",
                                          task=spec_of(cfg).name, language=lang, task_sft=task_dir, language_sft=lang_dir,
                                          score=metrics[key], objective=key, params=params, metrics=metrics, tags=tags)
            Registry(tracker).submit(pending, output_dir=settings["output_dir"], parent=run)
    report({**metrics, "phase2_step": -1, "final": 1})


# -- the driver -----------------------------------------------------------------------------------


def _language_seed(seed: int, lang: str) -> int:
    """A searcher seed per language, so that languages do not all sample the same points."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(lang.encode())) % (2**31)


def _scheduler(space: SearchSpace, max_reports: int):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    if space.scheduler.kind == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max(max_reports, 1),
                             grace_period=min(space.scheduler.grace_period, max(max_reports, 1)),
                             reduction_factor=space.scheduler.reduction_factor)
    if space.scheduler.kind == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=space.scheduler.grace_period,
                                  min_samples_required=2)
    return None


def _reports_per_trial(cfg: PipelineConfig, space: SearchSpace) -> int:
    """Phase-2 evaluations plus the final report (ASHA's max_t)."""

    if not space.eval_every or space.sft != "language":
        return 1
    n = len(spec_of(cfg).adaptation_text(cfg.source_language, cfg.data.source, cfg.language_sft))
    return cfg.language_sft.sparse.num_steps(n) // space.eval_every + 1


def run_sweep(cfg: PipelineConfig, space: SearchSpace, languages: list[str], num_samples: int, *,
              name: str | None = None, log: Log = print, max_concurrent: int = 1) -> SweepResult:
    """Tune experiments (one per target language) over ``space``; see the module docstring."""
    started = time.perf_counter()
    languages = check_sweep(cfg, space, languages, num_samples)
    check_run_outputs(cfg)
    name = name or f"{Path(cfg.output_dir).name}-sweep"
    cfg.cluster, resources = start_sweep_ray(cfg.cluster, log)
    cfg, executor = start_run(cfg, log, None)
    out = Path(cfg.output_dir)
    shared = prepare_shared_work(cfg, space, languages, executor, log)

    key = space.objective.key
    tracker = Tracker(cfg.tracking.uri, enabled=cfg.tracking.enabled, log=log)
    registry = Registry(tracker)
    experiment = cfg.experiment_name(f"sweep-{name}")
    sweep_run = tracker.start_run(experiment, f"sweep-{name}", params={
        "space": {lang: space.describe(lang) for lang in languages}, "num_samples": num_samples,
        "objective": key, "searcher": space.searcher, "scheduler": space.scheduler.kind,
        "eval_every": space.eval_every, "sft": space.sft}, tags={"deftx.sweep": name})
    tracker.log_metrics(sweep_run, {f"shared_seconds.{k}": v for k, v in shared.seconds.items()})
    storage = Path(cfg.cluster.storage_path or out / "tune").resolve()
    result = SweepResult(name=name, output_dir=str(out), shared_seconds=shared.seconds)
    max_reports = _reports_per_trial(cfg, space)
    try:
        for lang in languages:
            lang_started = time.perf_counter()
            lang_run = tracker.start_run(experiment, f"sweep-{name}-{lang}", parent=sweep_run,
                                         params={"language": lang, "space": space.describe(lang)})
            settings = {"trial_root": str(out / "sweeps" / name / lang), "objective": key,
                        "split": space.objective.split, "eval_every": space.eval_every, "name": name,
                        "tracking": cfg.tracking.enabled and not tracker.offline, "register": cfg.tracking.register,
                        "tracking_uri": tracker.uri, "experiment": experiment, "output_dir": str(out),
                        "parent_runs": {lang: lang_run.run_id}}
            log(f"== sweep {lang}: {num_samples} trials, objective {key} ==")
            grid = fit_trials(_trial, {"shared": asdict(shared), "lang": lang, "settings": settings},
                              resources=resources, path=storage / f"{name}-{lang}",
                              dimensions=space.for_language(lang), metric=key, num_samples=num_samples,
                              searcher=space.searcher, seed=_language_seed(cfg.seed, lang),
                              scheduler=_scheduler(space, max_reports), max_concurrent=max_concurrent, log=log)
            summary = _summarise(grid, lang, key, time.perf_counter() - lang_started, Path(settings["trial_root"]))
            if cfg.tracking.enabled and cfg.tracking.register and not tracker.offline:
                model_name = composed_model_name(cfg.task, lang)
                summary.champion_version = tracker.call(
                    "checking the champion", lambda name=model_name: registry.reconcile_champion(name, key))
            tracker.log_metrics(lang_run, {f"best_{key}": summary.best_score, "trials": summary.trials})
            tracker.log_params(lang_run, {"best": summary.best_config})
            _log_sweep_plots(tracker, lang_run, summary, key)
            if not tracker.offline:
                _log_spectra(tracker, lang_run, cfg, shared, lang, summary)
            tracker.end_run(lang_run)
            result.languages.append(summary)
            log(f"[sweep {lang}] best {key} {100 * summary.best_score:.1f}: {summary.best_config}")
    except BaseException:
        tracker.end_run(sweep_run, "FAILED")
        raise
    result.seconds = time.perf_counter() - started
    _log_language_bars(tracker, sweep_run, result, key)
    tracker.log_metrics(sweep_run, {"seconds": result.seconds})
    tracker.end_run(sweep_run)
    (out / "sweeps" / name).mkdir(parents=True, exist_ok=True)
    import json

    (out / "sweeps" / name / "result.json").write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    (out / "sweeps" / name / "result.md").write_text(result.table() + f"\n\nwall time {result.seconds:.0f} s\n")
    return result


def _summarise(grid, lang: str, key: str, seconds: float, trial_root: Path) -> LanguageResult:
    rows = []
    for res in grid:
        metrics = res.metrics or {}
        final = bool(metrics.get("final"))
        rows.append({"config": dict(res.config or {}), "score": metrics.get(key), "final": final,
                     "trial_id": metrics.get("trial_id"),
                     "iterations": metrics.get("training_iteration"), "error": str(res.error) if res.error else None})
    finished = [r for r in rows if r["final"] and r["score"] is not None]
    if not finished:
        errors = [r["error"] for r in rows if r["error"]]
        raise DeftxError(f"sweep {lang}: no trial finished" + (f" (first error: {errors[0].splitlines()[0]})"
                                                               if errors else ""))
    best = max(finished, key=lambda r: r["score"])
    return LanguageResult(language=lang, best_config=_active(best["config"]), best_score=float(best["score"]),
                          objective=key, trials=len(rows), finished=len(finished),
                          stopped_early=sum(1 for r in rows if not r["final"] and not r["error"]),
                          champion_version=None, seconds=seconds, rows=rows,
                          best_trial_dir=str(trial_root / best["trial_id"]) if best["trial_id"] else None)


def _active(sample: dict[str, Any]) -> dict[str, Any]:
    """The sampled values the trial's selection used (the DeFT-X ones only for deft_x, and only
    the active rank rule's value), in the order of ``SelectionConfig.hyperparameters()``."""

    chosen = selection_from_sample(SelectionConfig(), sample).hyperparameters()
    return {k: v for k, v in chosen.items() if v is not None and (k in sample or k in ("rank", "energy"))}


def _log_sweep_plots(tracker: Tracker, run: RunHandle, summary: LanguageResult, key: str) -> None:
    fig = trial_scatter(summary.rows, key, title=f"{summary.language}: trials")
    if fig is not None:
        tracker.log_figure(run, fig, f"plots/trials-{summary.language}.png")


def _log_spectra(tracker: Tracker, run: RunHandle, cfg: PipelineConfig, shared: SharedWork, lang: str,
                 summary: LanguageResult) -> None:
    """Singular values of the stored phase-1 change, with the best trial's DeFT-X ranks marked."""

    best_dir = summary.best_trial_dir
    ranks = {}
    if best_dir and (Path(best_dir) / "sft" / "sft.json").is_file():
        ranks = read_metadata(Path(best_dir) / "sft").get("selection", {}).get("ranks", {})
    path = resolve_model_path(cfg.model.name_or_path, log=lambda line: None)
    if shared.sft == "language":
        store, kind = shared.phase1[lang], "language"
        model = load_masked_lm(path, seed=cfg.seed)[0]
    else:   # the task SFT starts at theta0 + the source-language SFT

        store, kind = shared.phase1["task"], "task"
        model = load_classifier(path, NUSAX_LABELS, seed=cfg.seed)
        SparseFineTuning.load(shared.source_sft).apply(model, with_head=False)
    base = {n: p.detach() for n, p in parameter_roles(model, kind).maskable.items()}
    fig = spectra_figure(store, base, ranks, title=f"{lang}: phase-1 change spectra (dashed: best trial's rank)")
    if fig is not None:
        tracker.log_figure(run, fig, f"plots/spectra-{lang}.png")
        close(fig)


def _log_language_bars(tracker: Tracker, run: RunHandle, result: SweepResult, key: str) -> None:
    fig = language_bars({r.language: r.best_score for r in result.languages}, key, title=f"sweep {result.name}")
    tracker.log_figure(run, fig, "plots/best-per-language.png")
