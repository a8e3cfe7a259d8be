"""The Ray Tune layer of sweeps: one Tune experiment per target language.

Ray Train V2 pattern: a Tune trial is a function that runs the trial's training job with the
pipeline's executor (a ``TorchTrainer`` of DeepSpeed workers launched from inside the trial, or
the trial's own process with ``cluster.backend: local``), scores the composed model, registers it,
and reports to Tune. On 2 CPUs the trial holds 0.01 CPU and the workers the rest
(``notes/stack.md`` §5).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deftx.config import ClusterConfig, PipelineConfig
from deftx.errors import DeftxError
from deftx.jobs.executors import LocalExecutor, make_executor
from deftx.jobs.spec import Log
from deftx.tracking.registry import PendingRegistration, Registry, composed_model_name
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
from deftx.workflows.sweeps.space import Dimension, SearchSpace

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
    from ray import tune

    work = SharedWork(**shared)
    cfg = work.pipeline_config()
    ctx = tune.get_context()
    trial_dir = Path(settings["trial_root"]) / ctx.get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    key, split = settings["objective"], settings["split"]
    job, selection = trial_job(work, lang, sample)
    report_path = trial_dir / "phase2-evaluations.jsonl"
    report_path.unlink(missing_ok=True)
    if settings["eval_every"] and work.sft == "language":
        job.probe = {"every": settings["eval_every"], "task_sft": work.task_sft, "language": lang, "split": split,
                     "report_path": str(report_path)}
    log_path = trial_dir / "trial.log"

    def log(line: str) -> None:
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    if cfg.cluster.backend == "local":
        import torch

        torch.set_num_threads(cfg.threads or max(1, int(ctx.get_trial_resources().required_resources.get("CPU", 1))))
        executor = LocalExecutor()
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
            tune.report({**{k: v for k, v in record.items() if k != "step"}, "phase2_step": record["step"],
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
        from deftx.tracking.runs import log_sft

        trial_id = ctx.get_trial_id()
        tags = {"deftx.workflows.sweeps.shared": settings["name"], "deftx.trial": trial_id}
        run = log_sft(tracker, settings["experiment"], RunHandle(settings["parent_runs"].get(lang)),
                      trial_dir / "sft", f"trial-{lang}-{trial_id}", extra_params={"sample": sample})
        tracker.log_metrics(run, metrics)
        tracker.set_tags(run, tags)
        if settings["register"]:
            pending = PendingRegistration(experiment=settings["experiment"], run_name=f"register-{lang}-{trial_id}",
                                          task=cfg.task, language=lang, task_sft=task_dir, language_sft=lang_dir,
                                          score=metrics[key], objective=key, params=params, metrics=metrics, tags=tags)
            Registry(tracker).submit(pending, output_dir=settings["output_dir"], parent=run)
    tune.report({**metrics, "phase2_step": -1, "final": 1})


# -- the driver -----------------------------------------------------------------------------------


def _language_seed(seed: int, lang: str) -> int:
    """A searcher seed per language, so that languages do not all sample the same points."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(lang.encode())) % (2**31)


def _searcher(space: SearchSpace, seed: int):
    if space.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)   # metric and mode come from the TuneConfig
    return None   # Tune's default: random sampling of the distributions


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
    from deftx.data import load_nusax_mt_text

    if not space.eval_every or space.sft != "language":
        return 1
    n = min(len(load_nusax_mt_text(cfg.source_language, cfg.data.source)),
            cfg.language_sft.max_train_examples or 10**9)
    return cfg.language_sft.sparse.num_steps(n) // space.eval_every + 1


def run_sweep(cfg: PipelineConfig, space: SearchSpace, languages: list[str], num_samples: int, *,
              name: str | None = None, log: Log = print, max_concurrent: int = 1) -> SweepResult:
    """Tune experiments (one per target language) over ``space``; see the module docstring."""
    import ray
    from ray import tune

    started = time.perf_counter()
    languages = check_sweep(cfg, space, languages, num_samples)
    check_run_outputs(cfg)
    name = name or f"{Path(cfg.output_dir).name}-sweep"
    from deftx.jobs.ray import connect

    # Tune needs Ray whatever the backend; with `local` the trials train in their own processes
    connect(cfg.cluster if cfg.cluster.backend == "ray" else
            ClusterConfig(**{**asdict(cfg.cluster), "backend": "ray", "check_resources": False}), log)
    cfg.cluster = sweep_cluster(cfg.cluster, ray.cluster_resources().get("CPU", 1.0))
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
        "eval_every": space.eval_every, "sft": space.sft}, tags={"deftx.workflows.sweeps.shared": name})
    tracker.log_metrics(sweep_run, {f"shared_seconds.{k}": v for k, v in shared.seconds.items()})
    storage = Path(cfg.cluster.storage_path or out / "tune").resolve()
    result = SweepResult(name=name, output_dir=str(out), shared_seconds=shared.seconds)
    max_reports = _reports_per_trial(cfg, space)
    # ray: the trial only launches workers; local: the trial trains, with every CPU of the node
    # (Ray sets a task's OMP/torch threads from its CPUs: 1 CPU would halve training speed here)
    total = ray.cluster_resources().get("CPU", 1.0)
    resources = {"cpu": TRIAL_CPU} if cfg.cluster.backend == "ray" else {"cpu": max(1.0, float(int(total)))}
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
            trainable = tune.with_resources(
                tune.with_parameters(_trial, shared=asdict(shared), lang=lang, settings=settings), resources)
            path = storage / f"{name}-{lang}"
            if tune.Tuner.can_restore(str(path)):
                log(f"[sweep {lang}] resuming the experiment in {path} (finished trials are kept)")
                tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
            else:
                params = {n: tune_distribution(d) for n, d in space.for_language(lang).items()}
                tuner = tune.Tuner(
                    trainable, param_space=params,
                    tune_config=tune.TuneConfig(metric=key, mode="max", num_samples=num_samples,
                                                search_alg=_searcher(space, _language_seed(cfg.seed, lang)),
                                                scheduler=_scheduler(space, max_reports),
                                                max_concurrent_trials=max_concurrent),
                    run_config=tune.RunConfig(name=path.name, storage_path=str(storage), verbose=0,
                                              failure_config=tune.FailureConfig(max_failures=0)))
            log(f"== sweep {lang}: {num_samples} trials, objective {key} ==")
            grid = tuner.fit()
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
    from deftx.config import SelectionConfig
    from deftx.workflows.sweeps.space import selection_from_sample

    chosen = selection_from_sample(SelectionConfig(), sample).hyperparameters()
    return {k: v for k, v in chosen.items() if v is not None and (k in sample or k in ("rank", "energy"))}


def _log_sweep_plots(tracker: Tracker, run: RunHandle, summary: LanguageResult, key: str) -> None:
    from deftx.tracking.plots import trial_scatter

    fig = trial_scatter(summary.rows, key, title=f"{summary.language}: trials")
    if fig is not None:
        tracker.log_figure(run, fig, f"plots/trials-{summary.language}.png")


def _log_spectra(tracker: Tracker, run: RunHandle, cfg: PipelineConfig, shared: SharedWork, lang: str,
                 summary: LanguageResult) -> None:
    """Singular values of the stored phase-1 change, with the best trial's DeFT-X ranks marked."""
    from deftx.core.roles import parameter_roles
    from deftx.core.sft import read_metadata
    from deftx.models import load_classifier, load_masked_lm, resolve_model_path
    from deftx.tracking.plots import close
    from deftx.tracking.runs import spectra_figure

    best_dir = summary.best_trial_dir
    ranks = {}
    if best_dir and (Path(best_dir) / "sft" / "sft.json").is_file():
        ranks = read_metadata(Path(best_dir) / "sft").get("selection", {}).get("ranks", {})
    path = resolve_model_path(cfg.model.name_or_path, log=lambda line: None)
    if shared.sft == "language":
        store, kind = shared.phase1[lang][0], "language"
        model = load_masked_lm(path, seed=cfg.seed)[0]
    else:   # the task SFT starts at theta0 + the source-language SFT
        from deftx.core.sft import SparseFineTuning
        from deftx.data import NUSAX_LABELS

        store, kind = shared.phase1["task"][0], "task"
        model = load_classifier(path, NUSAX_LABELS, seed=cfg.seed)
        SparseFineTuning.load(shared.source_sft).apply(model, with_head=False)
    base = {n: p.detach() for n, p in parameter_roles(model, kind).maskable.items()}
    fig = spectra_figure(store, base, ranks, title=f"{lang}: phase-1 change spectra (dashed: best trial's rank)")
    if fig is not None:
        tracker.log_figure(run, fig, f"plots/spectra-{lang}.png")
        close(fig)


def _log_language_bars(tracker: Tracker, run: RunHandle, result: SweepResult, key: str) -> None:
    from deftx.tracking.plots import language_bars

    fig = language_bars({r.language: r.best_score for r in result.languages}, key, title=f"sweep {result.name}")
    tracker.log_figure(run, fig, "plots/best-per-language.png")
