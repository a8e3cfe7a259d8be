"""The NusaX zero-shot pipeline (its jobs and their recipes are in :mod:`deftx.jobs`).

1. a language SFT per language (source + targets): masked LM on NusaX-MT train text;
2. a task SFT for sentiment on the source language, trained on theta0 + phi_lang(source);
3. per target language: theta0 + phi_task + phi_lang(target), macro-F1 on the NusaX test set
   (beside it the task SFT alone, to show what the language SFT adds).

Finished SFTs are saved under ``output_dir/sfts/`` with a digest of everything that determines
them; a re-run with the same settings reuses them, so an interrupted pipeline loses at most the SFT
it was training.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deftx import __version__
from deftx.config import PipelineConfig, from_dict
from deftx.core.io import check_output_location
from deftx.core.sft import SparseFineTuning
from deftx.evaluation import ClassifierScorer
from deftx.jobs.cache import base_identity, job_key, phase1_key, reuse_head, reuse_sft
from deftx.jobs.executors import Executor, make_executor
from deftx.jobs.spec import HeadJob, Job, LanguageJob, Log, TaskJob, capped, pipeline_languages, with_phase1
from deftx.models import load_tokenizer, resolve_model_path
from deftx.tasks import spec_of
from deftx.tracking.live import LiveRuns
from deftx.tracking.plots import close, language_bars
from deftx.tracking.registry import PendingRegistration, Registry, composed_model_name
from deftx.tracking.runs import log_sft
from deftx.tracking.tracker import Tracker
from deftx.training.phase1_store import Phase1Store


@dataclass
class PipelineResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    method: str = ""
    output_dir: str = ""
    task: str = "nusax_senti"
    sfts: dict[str, str] = field(default_factory=dict)          # name -> directory
    mlflow: dict[str, str] = field(default_factory=dict)        # experiment, run_id, uri
    registered: list[str] = field(default_factory=list)         # "NAME vN (@champion)" or what waits for sync

    def table(self) -> str:
        title = "NusaX-senti" if self.task == "nusax_senti" else self.task
        lines = [f"{title} test macro-F1 (method {self.method}; source language task SFT, zero-shot)",
                 "",
                 "| language | role | task + lang SFT | task SFT only | n |",
                 "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['language']} ({r['name']}) | {r['role']} | {100 * r['macro_f1']:.1f} | "
                         f"{100 * r['task_only_macro_f1']:.1f} | {r['n']} |")
        targets = [r for r in self.rows if r["role"] == "target"]
        if targets:
            avg = sum(r["macro_f1"] for r in targets) / len(targets)
            avg0 = sum(r["task_only_macro_f1"] for r in targets) / len(targets)
            lines.append(f"| average of targets | | {100 * avg:.1f} | {100 * avg0:.1f} | |")
        return "\n".join(lines)

    def where(self) -> str:
        """Where everything the run made is: SFT directories, the MLflow run, registered models."""
        lines = [f"SFTs and results in {self.output_dir}:"]
        lines += [f"  {name:<24} {path}" for name, path in self.sfts.items()]
        if self.mlflow:
            lines.append(f"MLflow: run {self.mlflow['run_id']} in experiment {self.mlflow['experiment']} "
                         f"({self.mlflow['uri']}; `mlflow ui --backend-store-uri {self.mlflow['uri']}`)")
        else:
            lines.append("MLflow: not tracked")
        if self.registered:
            lines.append("registered: " + "; ".join(self.registered))
        return "\n".join(lines)


def absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """A copy of ``cfg`` whose local paths are absolute (jobs run in other working directories)."""
    data = asdict(cfg)
    data["output_dir"] = str(Path(cfg.output_dir).resolve())
    if Path(cfg.model.name_or_path).is_dir():
        data["model"]["name_or_path"] = str(Path(cfg.model.name_or_path).resolve())
    if cfg.data.source not in ("bundled", "hub"):
        data["data"]["source"] = str(Path(cfg.data.source).resolve())
    for key in ("storage_path", "status_dir"):
        if data["cluster"][key]:
            data["cluster"][key] = str(Path(data["cluster"][key]).resolve())
    return from_dict(PipelineConfig, data)


@dataclass
class TrainedSFTs:
    """What :func:`train_pipeline_sfts` produced: directories and loaded SFTs, and the base model's
    fingerprint every later job of the run is keyed with."""

    cfg: PipelineConfig
    fingerprint: str
    head_dir: Path | None
    language: dict[str, SparseFineTuning] = field(default_factory=dict)
    task: SparseFineTuning | None = None
    task_dir: Path | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def language_dir(self, lang: str) -> Path:
        return self.output_dir / "sfts" / f"lang-{lang}"

    @property
    def head(self) -> str | None:
        return str(self.head_dir) if self.head_dir is not None else None

    def language_job(self, lang: str, cfg: PipelineConfig | None = None, **more) -> LanguageJob:
        return LanguageJob(cfg or self.cfg, self.fingerprint, lang, head=self.head, **more)

    def task_job(self, language_sft: str | None, cfg: PipelineConfig | None = None, **more) -> TaskJob:
        cfg = cfg or self.cfg
        return TaskJob(cfg, self.fingerprint, cfg.source_language, language_sft=language_sft, **more)


def run_sft(job: Job, directory: Path, executor: Executor, log: Log,
            banner: str | None = None, live: LiveRuns | None = None) -> tuple[SparseFineTuning, bool]:
    """The SFT of ``job`` in ``directory``: reused if saved with the job's key, else trained there
    (after logging ``banner``), its metrics going to a run of ``live`` while it trains. Returns
    (SFT, whether it was trained)."""
    sft = reuse_sft(directory, job_key(job), log)
    if sft is not None:
        return sft, False
    if banner:
        log(banner)
    run = live.start(directory.name, directory) if live is not None else None
    try:
        executor.run(job, directory, log, live=run)
    except BaseException as exc:
        if live is not None:
            live.failed(directory, isinstance(exc, KeyboardInterrupt))
        raise
    sft = SparseFineTuning.load(directory)
    log(f"saved {directory} ({sft.nnz:,} entries)")
    return sft, True


def run_phase1(job: Job, executor: Executor, log: Log, banner: str | None = None) -> tuple[Phase1Store, bool]:
    """Fill ``job``'s phase-1 store (after logging ``banner``) unless it holds this phase 1 already.
    Returns (store, whether it was trained)."""
    assert job.phase1 is not None   # type: ignore[union-attr]
    store = Phase1Store(job.phase1.directory, phase1_key(job))  # type: ignore[union-attr,arg-type]
    if store.exists():
        log(f"reusing {store.directory} (phase 1 with the same settings)")
        return store, False
    if banner:
        log(banner)
    executor.run(with_phase1(job, job.phase1.directory, only=True),  # type: ignore[union-attr]
                 store.directory.with_name(f".{store.directory.name}.job"), log)
    return store, True


def train_pipeline_sfts(cfg: PipelineConfig, executor: Executor, languages: list[str], log: Log = print,
                        with_task: bool = True, with_head: bool = True,
                        live: LiveRuns | None = None) -> TrainedSFTs:
    """Train (or reuse) the shared MLM head (unless not ``with_head``: nothing will train a language
    SFT), the language SFTs of ``languages`` and the task SFT (on the source language, on top of its
    language SFT) with ``executor``. ``cfg`` must have absolute paths (:func:`absolute_paths`)."""
    out = Path(cfg.output_dir)
    model_path = resolve_model_path(cfg.model.name_or_path, log=log)
    fingerprint, has_head = base_identity(cfg, model_path)
    head_dir: Path | None = None
    if with_head and not has_head and cfg.language_sft.head_warmup_steps > 0:
        head_dir = out / "mlm-head"
        job = HeadJob(cfg, fingerprint)
        if not reuse_head(head_dir, job_key(job), log):
            log(f"== MLM head warm-up ({cfg.language_sft.head_warmup_steps} steps; shared by the language SFTs) ==")
            executor.run(job, head_dir, log)
    trained = TrainedSFTs(cfg, fingerprint, head_dir)
    for i, lang in enumerate(languages, 1):
        directory = trained.language_dir(lang)
        banner = f"== language SFT {i}/{len(languages)}: {lang} ({spec_of(cfg).language_name(lang)}) =="
        trained.language[lang], _ = run_sft(trained.language_job(lang), directory, executor, log, banner, live)
    if not with_task:
        return trained

    directory = out / "sfts" / f"task-{spec_of(cfg).name}"
    job = trained.task_job(str(trained.language_dir(cfg.source_language)))
    trained.task, _ = run_sft(job, directory, executor, log,
                              f"== task SFT: {spec_of(cfg).name} on {cfg.source_language} ==", live)
    trained.task_dir = directory
    return trained


def check_run_outputs(cfg: PipelineConfig, *more: str | Path | None) -> None:
    """Before any work: the output directory, the checkpoint storage and ``more`` are directories
    (or can be created) and writable; a one-line :class:`deftx.core.io.OutputError` otherwise. (The
    MLflow store is not checked: tracking turns itself off with a warning when it cannot write.)"""

    for path in (cfg.output_dir, cfg.cluster.storage_path, cfg.cluster.status_dir, *more):
        if path:
            check_output_location(path)


def start_run(cfg: PipelineConfig, log: Log, executor: Executor | None) -> tuple[PipelineConfig, Executor]:
    """Absolute paths, the output directory with the resolved config, a prepared executor."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_run_outputs(cfg)
    cfg.check_pipeline_data()
    cfg = absolute_paths(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
    executor = executor or make_executor(cfg, log)
    executor.prepare()
    return cfg, executor


def run_pipeline(cfg: PipelineConfig, log: Log = print, executor: Executor | None = None) -> PipelineResult:
    """Train (or reuse) every SFT of the pipeline with ``executor`` (default: the one of
    ``cfg.cluster``), then evaluate the compositions in this process, track the run in MLflow and
    register the SFTs and composed models (``cfg.tracking``)."""

    started = time.perf_counter()
    cfg, executor = start_run(cfg, log, executor)
    out = Path(cfg.output_dir)
    tracker = Tracker(cfg.tracking.uri, enabled=cfg.tracking.enabled, log=log)
    experiment = cfg.experiment_name(f"pipeline-{out.name}")
    run = tracker.start_run(experiment, f"pipeline-{out.name}", params=asdict(cfg),
                            tags={"deftx.output_dir": str(out), "deftx.version": __version__})
    tracked = {"experiment": experiment, "run_id": run.run_id, "uri": tracker.uri} if run.run_id else {}
    tracker.log_file(run, out / "config.json")
    try:
        result = _train_and_evaluate(cfg, executor, log, started, tracker, run, experiment)
        result.mlflow = tracked if not tracker.offline else {}
    except BaseException as exc:
        tracker.end_run(run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end_run(run)
    return result


def _train_and_evaluate(cfg: PipelineConfig, executor: Executor, log: Log, started: float, tracker, run,
                        experiment: str) -> PipelineResult:

    languages = pipeline_languages(cfg)
    live = LiveRuns(tracker, experiment, parent=run)
    trained = train_pipeline_sfts(cfg, executor, languages, log, live=live)
    lang_sfts, task_sft = trained.language, trained.task
    assert task_sft is not None and trained.task_dir is not None
    out = Path(cfg.output_dir)
    for lang in languages:
        directory = trained.language_dir(lang)
        log_sft(tracker, experiment, run, directory, f"lang-{lang}", existing=live.take(directory))
    log_sft(tracker, experiment, run, trained.task_dir, f"task-{spec_of(cfg).name}", existing=live.take(trained.task_dir))
    model_path = resolve_model_path(cfg.model.name_or_path, log=log)
    tokenizer = load_tokenizer(model_path)

    log("== zero-shot evaluation ==")
    spec = spec_of(cfg)
    scorer = ClassifierScorer(model_path, spec.labels, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                              max_length=cfg.model.max_length, tokenizer=tokenizer, log=log)
    result = PipelineResult(method=cfg.task_sft.selection.method, output_dir=str(out), task=spec.name,
                            sfts={**{f"lang-{lang}": str(trained.language_dir(lang)) for lang in languages},
                                  f"task-{spec.name}": str(trained.task_dir)})
    valid_scores: dict[str, float] = {}
    for lang in languages:
        if not spec.has(lang, "test"):
            log(f"[eval {lang}] no test data: not evaluated")
            continue
        test = capped(spec.evaluation(lang, "test", cfg.data.source), cfg.max_eval_examples)
        with scorer.composed(task_sft, lang_sfts[lang]):
            composed = scorer.score(test, f"eval {lang} test, task + language SFT")
            if lang != cfg.source_language and cfg.tracking.enabled and spec.has(lang, "valid"):
                valid_scores[lang] = scorer.score(spec.evaluation(lang, "valid", cfg.data.source),
                                                  f"eval {lang} valid, task + language SFT")["macro_f1"]
        with scorer.composed(task_sft):
            alone = scorer.score(test, f"eval {lang} test, task SFT alone")
        role = "source" if lang == cfg.source_language else "target"
        result.rows.append({"language": lang, "name": spec.language_name(lang), "role": role,
                            "macro_f1": composed["macro_f1"], "accuracy": composed["accuracy"],
                            "task_only_macro_f1": alone["macro_f1"], "n": composed["n"]})
        log(f"[eval {lang}] macro-F1 {100 * composed['macro_f1']:.1f} with language SFT, "
            f"{100 * alone['macro_f1']:.1f} task SFT only")
    result.seconds = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(result.table() + f"\n\nwall time {result.seconds:.0f} s\n", encoding="utf-8")

    for row in result.rows:
        tracker.log_metrics(run, {f"test.{row['language']}.macro_f1": row["macro_f1"],
                                  f"test.{row['language']}.task_only_macro_f1": row["task_only_macro_f1"],
                                  f"test.{row['language']}.accuracy": row["accuracy"]})
    tracker.log_metrics(run, {"seconds": result.seconds})
    fig = language_bars({r["language"]: r["macro_f1"] for r in result.rows}, "test macro-F1",
                        title=f"{spec_of(cfg).name} test macro-F1: task + language SFT (bars) vs task SFT only",
                        baseline={r["language"]: r["task_only_macro_f1"] for r in result.rows})
    tracker.log_figure(run, fig, "plots/f1-per-language.png")
    close(fig)
    tracker.log_file(run, out / "results.md")
    if cfg.tracking.enabled and cfg.tracking.register:
        registry = Registry(tracker)
        for lang, score in valid_scores.items():
            row = next(r for r in result.rows if r["language"] == lang)
            pending = PendingRegistration(
                experiment=experiment, run_name=f"register-{out.name}-{lang}", task=spec_of(cfg).name, language=lang,
                task_sft=str(trained.task_dir), language_sft=str(trained.language_dir(lang)), score=score,
                objective="target_valid_macro_f1",
                params={"pipeline": out.name, "method": cfg.task_sft.selection.method},
                metrics={"target_valid_macro_f1": score, "test_macro_f1": row["macro_f1"],
                         "test_task_only_macro_f1": row["task_only_macro_f1"]},
                tags={"deftx.pipeline": str(out)})
            done = registry.submit(pending, output_dir=out, parent=run)
            name = composed_model_name(pending.task, lang)
            result.registered.append(f"{name} v{done.composed_version}" + (" @champion" if done.champion else "")
                                     if done is not None else f"{name} waits on disk (deftx registry sync {out})")
            if done is not None:
                log(f"registered {pending.task}-{lang}: composed v{done.composed_version}"
                    + (" (champion)" if done.champion else ""))
    return result

