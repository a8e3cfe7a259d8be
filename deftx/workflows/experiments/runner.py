"""The zero-shot results experiments (NusaX, AmericasNLI): full fine-tuning, LT-SFT and DeFT-X (and
any other configured selection) on the same model, data, seeds and budget; multi-source
leave-fold-out task SFTs; DeFT-X ablations of the task SFT; mask overlap and analysis figures.

Two layouts of the main table (``main``):
  single_source    the task SFT is trained on the source language (on its language SFT) and
                   composed with each target's language SFT (NusaX from Indonesian; AmericasNLI
                   from English MultiNLI when the hub is reachable)
  leave_fold_out   the targets are split into folds; a fold's targets are scored with task SFTs
                   trained multi-source on the labelled data of the other folds' languages only
                   (AmericasNLI offline: the other languages' dev sets), each batch at theta + its
                   language's SFT; full fine-tuning is the same multi-source data on theta0

What is trained once and what per seed (every unit is saved with a digest of everything it depends
on, so an interrupted experiment resumes where it stopped and a re-run with the same settings
trains nothing):
  once                the MLM head warm-up (base models without one); per language, the language
                      SFT's phase 1 (``Phase1Store``), then one phase 2 per method: the methods'
                      language SFTs share phase 1 exactly
  per seed            full fine-tuning on the source language (theta0, the task SFT's phase-1
                      budget, evaluated directly); per method, the task SFT on theta0 + the
                      method's source-language SFT; per method and fold, a multi-source task SFT
  first seed          the ablation variants, each re-selecting from the base method's task phase 1

Every training unit runs as a job (:mod:`deftx.jobs.spec`) through the pipeline's executor: in this process
(``cluster.backend: local``) or on Ray Train workers under DeepSpeed (``ray``). Evaluation runs in
this process. Hyperparameters come from the configuration only; test scores never feed back.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deftx.analysis import mask_overlap
from deftx.config import PipelineConfig, SelectionConfig
from deftx.core.sft import SparseFineTuning
from deftx.jobs.cache import job_key, key_of, phase1_key, reuse_subnetwork_model, saved_with, scores_key
from deftx.jobs.executors import Executor
from deftx.jobs.spec import Job, LanguageJob, Log, MultiSourceJob, Phase1, SubnetworkJob, TaskJob
from deftx.subnetworks.artifact import SubnetworkModel
from deftx.subnetworks.train import check_reselection, steps_for_sizes
from deftx.tasks import spec_of
from deftx.training.phase1_store import Phase1Store
from deftx.workflows.experiments.config import FULL_FT, SOURCE_SFT_PART, ExperimentConfig
from deftx.workflows.experiments.diagnostics import MLMDiagnostics
from deftx.workflows.experiments.evaluator import Evaluator
from deftx.workflows.experiments.reuse import adopt, adopt_scores
from deftx.workflows.experiments.state import ExperimentState, MissingUnit, Record
from deftx.workflows.experiments.tuning import champions, sample_tag, trial_selection
from deftx.workflows.experiments.tuning import describe as describe_sample
from deftx.workflows.pipeline import TrainedSFTs, run_phase1, run_sft, start_run, train_pipeline_sfts


class _NoTraining:
    """The executor of report-only mode: nothing is trained."""

    def prepare(self) -> None:
        pass

    def run(self, job: Job, directory: Path, log: Log, live=None) -> None:
        raise MissingUnit(f"{job.name} ({directory})")


def subnetwork_statistics(model, targets: list[str]) -> dict[str, Any]:
    """How much the source languages' subnetworks share, and how much of the model a target uses."""
    masks = list(model.masks.values())
    sizes = [sum(int(m.sum()) for m in ms.values()) for ms in masks]
    total = sum(m.numel() for m in masks[0].values()) if masks else 0
    jaccard = []
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            inter = sum(int((masks[i][n] & masks[j][n]).sum()) for n in masks[i])
            union = sum(int((masks[i][n] | masks[j][n]).sum()) for n in masks[i])
            jaccard.append(inter / union if union else 1.0)
    used = [model.sft_for(t).nnz / max(model.sft.nnz, 1) for t in targets]
    overlap = model.info.get("initial_vs_final_overlap", {})
    return {"density": sum(sizes) / max(len(sizes), 1) / max(total, 1),
            "mean_pairwise_jaccard": sum(jaccard) / len(jaccard) if jaccard else float("nan"),
            "changed_entries": model.sft.nnz,
            "target_share_of_change": sum(used) / len(used) if used else float("nan"),
            "initial_vs_final_overlap": sum(overlap.values()) / len(overlap) if overlap else float("nan"),
            "reselections": len(model.info.get("reselections", []))}


def check_subnetwork_schedules(cfg: ExperimentConfig) -> None:
    """Before any work: every dynamic subnetwork system re-selects its masks on every fold's real
    training sizes. Without this, a bad ``reselect_every`` surfaced only when its unit began, hours
    in (and a system that never re-selects would train as static)."""

    dynamic = {name: cfg.subnetworks.system(name) for name in cfg.subnetworks.systems}
    dynamic = {name: sub for name, sub in dynamic.items() if sub.mode == "dynamic"}
    if not dynamic:
        return
    spec, source = spec_of(cfg.pipeline), cfg.pipeline.data.source
    cap = cfg.multi_source.max_examples_per_language
    sizes: dict[str, int] = {}
    for fold in range(cfg.multi_source.folds):
        for lang in cfg.fold_sources(fold):
            if lang not in sizes:
                n = len(spec.train(lang, source))
                sizes[lang] = n if cap is None else min(n, cap)
        fold_sizes = [sizes[lang] for lang in cfg.fold_sources(fold)]
        for name, sub in dynamic.items():
            check_reselection(sub, steps_for_sizes(sub, fold_sizes), f"subnetworks.systems.{name} (fold {fold})")


class Experiment:
    """``report_only``: train and score nothing; collect what earlier runs finished (a partial
    report while a long experiment is still running, or after it was interrupted)."""

    def __init__(self, cfg: ExperimentConfig, executor: Executor | None = None, log: Log = print,
                 report_only: bool = False) -> None:
        self.cfg = cfg
        self.log = log
        self.report_only = report_only
        self._executor = _NoTraining() if report_only else executor
        self.state = ExperimentState(cfg)
        self._ledger_stage: str | None = None     # the stage _flush_ledger charges, and since when
        self._ledger_mark = 0.0

    @contextmanager
    def _unit(self, what: str) -> Iterator[None]:
        """Skip (and list) ``what`` when a part of it is missing in report-only mode."""
        try:
            yield
        except MissingUnit as exc:
            if not self.report_only:
                raise
            self.state.missing.append(f"{what}: {exc}")
        self._flush_ledger()

    # -- helpers -------------------------------------------------------------------------------

    def _count(self, trained: bool) -> None:
        if trained:
            self.state.trained += 1
        else:
            self.state.reused += 1

    def _run_sft(self, job: Job, directory: Path) -> SparseFineTuning:
        sft, trained = run_sft(job, directory, self.executor, self.log)
        self._count(trained)
        self.state.sft_dirs[str(directory.relative_to(self.out))] = str(directory)
        return sft

    def _run_phase1(self, job: LanguageJob | TaskJob | MultiSourceJob) -> Phase1Store:
        store, trained = run_phase1(job, self.executor, self.log)
        self._count(trained)
        return store

    def _phase1(self, name: str) -> Phase1:
        directory = str(self.out / "phase1" / name)
        self.state.phase1_dirs[name] = directory
        return Phase1(directory)

    def _config_with(self, seed: int | None = None, language_selection: SelectionConfig | None = None,
                     task_selection: SelectionConfig | None = None,
                     task_max_examples: int | None = None) -> PipelineConfig:
        """The pipeline config with these settings changed (a copy)."""
        config = copy.deepcopy(self.cfg.pipeline)
        if seed is not None:
            config.seed = seed
        if language_selection is not None:
            config.language_sft.selection = copy.deepcopy(language_selection)
        if task_selection is not None:
            config.task_sft.selection = copy.deepcopy(task_selection)
        if task_max_examples is not None:
            config.task_sft.max_train_examples = task_max_examples
        return config.validate()

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        """Time ``stage``. Its seconds go to the ledger after every finished unit and when the stage
        ends or fails, so a run killed outright (SIGKILL, a closed session) loses at most the unit it
        was in."""
        self.log(f"=== {stage} ===")
        started = time.perf_counter()
        self._ledger_stage, self._ledger_mark = stage, started
        try:
            yield
        finally:
            ended = time.perf_counter()
            self._flush_ledger(ended)
            self._ledger_stage = None
        self.state.stage_seconds[stage] = self.state.stage_seconds.get(stage, 0.0) + ended - started

    def _flush_ledger(self, now: float | None = None) -> None:
        """Add the current stage's seconds since the last flush to ``<output>/time-ledger.json``:
        seconds per stage over every invocation (a resumed experiment adds to it)."""
        stage = self._ledger_stage
        if stage is None or self.report_only:
            return
        now = time.perf_counter() if now is None else now
        data = self._read_ledger()
        data[stage] = round(data.get(stage, 0.0) + now - self._ledger_mark, 1)
        self._ledger_mark = now
        (self.out / "time-ledger.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        self.state.ledger = data

    def _read_ledger(self) -> dict[str, float]:
        path = self.out / "time-ledger.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    # -- the experiment ------------------------------------------------------------------------

    def run(self) -> ExperimentState:
        cfg = self.cfg
        if not self.report_only:
            check_subnetwork_schedules(cfg)
        pipe_cfg, self.executor = start_run(cfg.pipeline, self.log, self._executor)
        self.cfg.pipeline = pipe_cfg
        self.out = Path(pipe_cfg.output_dir)
        (self.out / "experiment.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
        self.targets = list(pipe_cfg.target_languages)
        self.languages = cfg.sft_languages()
        self.state.ledger = self._read_ledger()
        if cfg.reuse_from and not self.report_only:
            adopt_scores(Path(cfg.reuse_from), self.out / "scores", asdict(cfg.pipeline), self.log)
        trained = None
        with self._unit("MLM head"):
            trained = self._language_sfts()
        if trained is None:
            return self.state
        self.trained = trained
        self.evaluator = Evaluator(cfg, self.out / "scores", self.log, self.report_only)
        for seed in cfg.seeds if cfg.main_table else []:
            with self._timed(f"task SFTs and evaluation (seed {seed})"):
                if cfg.main == "single_source":
                    self._seed(seed)
                else:
                    self._seed_folds(seed)
        if cfg.ablations.variants:
            with self._timed("ablations"):
                self._ablations(cfg.seeds[0])
        if cfg.tuning.enabled:
            self._tuning()
        if cfg.multi_source.folds and cfg.main == "single_source":
            for seed in cfg.seeds:
                with self._timed(f"multi-source (seed {seed})"):
                    self._multi_source(seed)
        if cfg.subnetworks.systems:
            for seed in cfg.seeds:
                with self._timed(f"subnetworks (seed {seed})"):
                    self._subnetworks(seed)
        return self.state

    def _language_sfts(self) -> TrainedSFTs:
        cfg = self.cfg
        pipe = cfg.pipeline
        if cfg.reuse_from:
            adopt(Path(cfg.reuse_from) / "mlm-head", self.out / "mlm-head", self.log)
        with self._timed("MLM head"):
            trained = train_pipeline_sfts(pipe, self.executor, [], self.log, with_task=False,   # the head only
                                          with_head=bool(cfg.methods))   # full FT alone needs no head
        for i, lang in enumerate(self.languages if cfg.methods else [], 1):
            with self._timed(f"language SFTs ({lang})"):
                self._language(trained, i, lang)
        if cfg.mlm_loss.enabled:
            with self._timed("held-out MLM loss"):
                self._mlm_loss(trained)
        return trained

    def _mlm_loss(self, trained: TrainedSFTs) -> None:
        diagnostics = MLMDiagnostics(self.cfg, trained.head, self.out / "diagnostics", self.log, self.report_only)
        for method in self.cfg.methods:
            with self._unit(f"held-out MLM loss ({method})"):
                dirs = {lang: self._language_sft_dir(method, lang) for lang in self.languages}
                self.state.mlm_loss[method] = diagnostics.method(method, dirs)

    def _language(self, trained: TrainedSFTs, i: int, lang: str) -> None:
        cfg = self.cfg
        phase1 = self._phase1(f"language-{lang}")
        self.log(f"== language {i}/{len(self.languages)}: {lang} ==")
        if cfg.reuse_from:
            for method in cfg.methods:
                adopt(Path(cfg.reuse_from) / "sfts" / method / f"lang-{lang}",
                       self.out / "sfts" / method / f"lang-{lang}", self.log)
        jobs = {method: trained.language_job(lang, self._config_with(language_selection=cfg.selection(method, "language")),
                                             phase1=phase1) for method in cfg.methods}
        directories = {method: self.out / "sfts" / method / f"lang-{lang}" for method in cfg.methods}
        if not all(saved_with(directories[m], job_key(job)) for m, job in jobs.items()):
            with self._unit(f"language SFT phase 1 ({lang})"):
                self._run_phase1(trained.language_job(lang, phase1=phase1))
        for method, job in jobs.items():
            with self._unit(f"language SFT {method} ({lang})"):
                self._run_sft(job, directories[method])
                self.state.language_sft_dirs.setdefault(method, {})[lang] = str(directories[method])

    def _language_sft_dir(self, method: str, lang: str) -> str:
        directory = self.state.language_sft_dirs.get(method, {}).get(lang)
        if directory is None:
            raise MissingUnit(f"language SFT {method} ({lang})")
        return directory

    def _language_sft(self, method: str, lang: str) -> SparseFineTuning:
        return SparseFineTuning.load(self._language_sft_dir(method, lang))

    def _task_job(self, method: str | None, seed: int, selection: SelectionConfig | None = None) -> TaskJob:
        """The task SFT job of ``method`` (None: on theta0, the full fine-tuning baseline) at
        ``seed``, with its phase-1 store."""
        lang_path = None
        if method is not None:   # MissingUnit in report-only mode
            lang_path = self._language_sft_dir(method, self.cfg.pipeline.source_language)
        return self.trained.task_job(lang_path, self._config_with(seed=seed, task_selection=selection),
                                     phase1=self._phase1(f"task-{method or FULL_FT}-seed{seed}"))

    def _task_phase1(self, method: str | None, seed: int) -> Phase1Store:
        """The task SFT's phase-1 store of ``method`` (None: the full fine-tuning baseline) at ``seed``."""
        return self._run_phase1(self._task_job(method, seed))

    def _task_sft(self, method: str, seed: int, selection: SelectionConfig, name: str) -> SparseFineTuning:
        self._task_phase1(method, seed)
        return self._run_sft(self._task_job(method, seed, selection), self.out / "sfts" / f"seed{seed}" / name)

    def _record(self, part: str, system: str, seed: int, scores, with_lang: bool, extra=None) -> None:
        for (lang, split), s in scores.items():
            self.state.records.append(Record(part, system, seed, lang, split, s["macro_f1"], s["accuracy"],
                                             int(s["n"]), with_lang, dict(extra or {})))

    def _seed(self, seed: int) -> None:
        cfg, ev = self.cfg, self.evaluator
        langs = self.languages
        if cfg.full_ft:
            with self._unit(f"full fine-tuning (seed {seed})"):
                self.log(f"== seed {seed}: full fine-tuning ==")
                store = self._task_phase1(None, seed)
                scores = ev.scores(f"full_ft-seed{seed}-{store.digest}", langs, lambda lang: ev.fully_fine_tuned(store))
                self._record("main", FULL_FT, seed, scores, with_lang=False)
        for method in cfg.methods:
            with self._unit(f"task SFT {method} (seed {seed})"):
                self._seed_method(seed, method)

    def _seed_method(self, seed: int, method: str) -> None:
        cfg, ev = self.cfg, self.evaluator
        langs = self.languages
        self.log(f"== seed {seed}: task SFT, {method} ==")
        task = self._task_sft(method, seed, cfg.selection(method, "task"), method)
        self.state.task_sft_dirs.setdefault(method, {})[seed] = str(task.source)
        lang_sfts = {lang: self._language_sft(method, lang) for lang in langs}
        key = f"{method}-seed{seed}-{key_of(task)}-" + scores_key({lang: key_of(s) for lang, s in lang_sfts.items()})
        scores = ev.scores(key, langs, lambda lang, task=task, lang_sfts=lang_sfts: ev.composed(task, lang_sfts[lang]))
        self._record("main", method, seed, scores, with_lang=True)
        alone = ev.scores(f"{method}-seed{seed}-{key_of(task)}-alone", langs, lambda lang, task=task: ev.composed(task, None))
        self._record("main", method, seed, alone, with_lang=False)
        # the same composition with the source language's SFT in place of the target's: separates
        # the effect of swapping in the target's SFT from that of the adapted body
        source = lang_sfts[cfg.pipeline.source_language]
        swapped = ev.scores(f"{method}-seed{seed}-{key_of(task)}-source-{key_of(source)}", self.targets,
                            lambda lang, task=task, source=source: ev.composed(task, source))
        self._record(SOURCE_SFT_PART, method, seed, swapped, with_lang=True)
        self._overlaps("main", method, seed, task, lang_sfts)
        if seed == cfg.seeds[0]:   # how far each language SFT moves what the task head reads
            shifts = ev.head_input_shift(
                key, langs, lambda lang, task=task: ev.composed(task, None),
                {"own": lambda lang, task=task, lang_sfts=lang_sfts: ev.composed(task, lang_sfts[lang]),
                 "source": lambda lang, task=task, source=source: ev.composed(task, source)})
            for lang, row in shifts.items():
                for composition, values in row.items():
                    self.state.head_input_shift.append({"system": method, "seed": seed, "language": lang,
                                                        "composition": composition, **values})

    def _overlaps(self, part: str, system: str, seed: int, task: SparseFineTuning,
                  lang_sfts: dict[str, SparseFineTuning], languages: list[str] | None = None) -> None:

        for lang in languages or self.targets:
            o = mask_overlap(task, lang_sfts[lang])
            self.state.overlaps.append({"part": part, "system": system, "seed": seed, "language": lang, **o})

    def _multi_task(self, method: str | None, seed: int, fold: int,
                    selection: SelectionConfig | None = None) -> tuple[Phase1Store, SparseFineTuning | None]:
        """The multi-source task SFT of ``method`` for ``fold`` (trained on the languages outside
        it): its phase-1 store and, for a method, the SFT (phase 2 from the store). ``method``
        None: full fine-tuning on the same data (theta0, no language SFTs), phase 1 only."""
        cfg = self.cfg
        sources = cfg.fold_sources(fold)
        config = self._config_with(seed=seed, task_selection=selection,
                                   task_max_examples=cfg.multi_source.max_examples_per_language)
        paths = {lang: self.state.language_sft_dirs[method][lang] for lang in sources} if method else {}
        job = MultiSourceJob(config, self.trained.fingerprint, tuple(sources), paths,
                             phase1=self._phase1(f"multi-{method or FULL_FT}-fold{fold}-seed{seed}"))
        directory = self.out / "sfts" / f"seed{seed}" / f"multi-{method}-fold{fold}"
        if method is not None and cfg.reuse_from:
            adopt(Path(cfg.reuse_from) / "sfts" / f"seed{seed}" / directory.name, directory, self.log)
        assert job.phase1 is not None
        store = Phase1Store(job.phase1.directory, phase1_key(job))
        if method is None or not saved_with(directory, job_key(job)):
            store = self._run_phase1(job)
        if method is None:
            return store, None
        return store, self._run_sft(job, directory)

    def _fold_banner(self, seed: int, what: str, fold: int) -> list[str]:
        cfg = self.cfg
        held_out = cfg.fold_targets(fold)
        self.log(f"== seed {seed}: {what}, fold {fold + 1}/{cfg.multi_source.folds}: trained on "
                 f"{', '.join(cfg.fold_sources(fold))}; evaluated on {', '.join(held_out)} ==")
        return held_out

    def _seed_folds(self, seed: int) -> None:
        """The main table, leave-fold-out: every system's multi-source task model per fold."""
        cfg = self.cfg
        for fold in range(cfg.multi_source.folds):
            if cfg.full_ft:
                with self._unit(f"full fine-tuning (fold {fold}, seed {seed})"):
                    self._fold_full_ft(seed, fold)
            for method in cfg.methods:
                with self._unit(f"multi-source task SFT {method} (fold {fold}, seed {seed})"):
                    self._fold_method(seed, fold, method)

    def _fold_full_ft(self, seed: int, fold: int) -> None:
        ev = self.evaluator
        held_out = self._fold_banner(seed, "full fine-tuning (multi-source)", fold)
        store, _ = self._multi_task(None, seed, fold)
        scores = ev.scores(f"full_ft-fold{fold}-seed{seed}-{store.digest}", held_out,
                           lambda lang, store=store: ev.fully_fine_tuned(store))
        self._record("main", FULL_FT, seed, scores, with_lang=False, extra={"fold": fold})

    def _fold_method(self, seed: int, fold: int, method: str) -> None:
        cfg, ev = self.cfg, self.evaluator
        held_out = self._fold_banner(seed, f"multi-source task SFT, {method}", fold)
        _, task = self._multi_task(method, seed, fold, cfg.selection(method, "task"))
        assert task is not None
        if fold == 0:
            self.state.task_sft_dirs.setdefault(method, {})[seed] = str(task.source)
        lang_sfts = {lang: self._language_sft(method, lang) for lang in held_out}
        scores = ev.scores(f"{method}-fold{fold}-seed{seed}-{key_of(task)}", held_out,
                           lambda lang, task=task, lang_sfts=lang_sfts: ev.composed(task, lang_sfts[lang]))
        self._record("main", method, seed, scores, with_lang=True, extra={"fold": fold})
        alone = ev.scores(f"{method}-fold{fold}-seed{seed}-{key_of(task)}-alone", held_out,
                          lambda lang, task=task: ev.composed(task, None))
        self._record("main", method, seed, alone, with_lang=False, extra={"fold": fold})
        self._overlaps("main", method, seed, task, lang_sfts, held_out)

    def _multi_source(self, seed: int) -> None:
        """The multi-source section beside a single-source main table."""
        cfg = self.cfg
        for method in cfg.multi_source.methods:
            for fold in range(cfg.multi_source.folds):
                with self._unit(f"multi-source task SFT {method} (fold {fold}, seed {seed})"):
                    self._multi_source_unit(seed, fold, method)

    def _multi_source_unit(self, seed: int, fold: int, method: str) -> None:
        cfg, ev = self.cfg, self.evaluator
        held_out = self._fold_banner(seed, f"multi-source task SFT, {method}", fold)
        _, task = self._multi_task(method, seed, fold, cfg.selection(method, "task"))
        assert task is not None
        lang_sfts = {lang: self._language_sft(method, lang) for lang in held_out}
        scores = ev.scores(f"multi-{method}-fold{fold}-seed{seed}-{key_of(task)}", held_out,
                           lambda lang, task=task, lang_sfts=lang_sfts: ev.composed(task, lang_sfts[lang]))
        self._record("multi_source", method, seed, scores, with_lang=True,
                     extra={"fold": fold, "sources": cfg.fold_sources(fold)})

    # -- language-specific subnetworks ------------------------------------------------------------

    def _subnetworks(self, seed: int) -> None:
        cfg = self.cfg
        for fold in range(cfg.multi_source.folds):
            for system in cfg.subnetworks.systems:
                with self._unit(f"subnetworks {system} (fold {fold}, seed {seed})"):
                    self._subnetwork_unit(seed, fold, system)

    def _subnetwork_unit(self, seed: int, fold: int, system: str) -> None:
        cfg, ev = self.cfg, self.evaluator
        sub = cfg.subnetworks.system(system)
        held_out = self._fold_banner(seed, f"subnetworks, {system}", fold)
        sources = cfg.fold_sources(fold)
        method = cfg.subnetworks.language_sfts
        paths = {lang: self.state.language_sft_dirs.get(method, {}).get(lang) for lang in sources} if method else None
        if paths is not None and not all(paths.values()):
            raise MissingUnit(f"language SFTs {method} of {', '.join(lang for lang, p in paths.items() if not p)}")
        config = self._config_with(seed=seed, task_max_examples=cfg.multi_source.max_examples_per_language)
        job = SubnetworkJob(config, self.trained.fingerprint, tuple(sources), paths or {}, sub,
                            masks_cache=str(self.out / "subnetworks" / "probes"))
        key = job_key(job)
        directory = self.out / "subnetworks" / f"seed{seed}" / f"{system}-fold{fold}"
        model = reuse_subnetwork_model(directory, key, self.log)
        self._count(model is None)
        if model is None:
            self.executor.run(job, directory, self.log)
            model = SubnetworkModel.load(directory)
            self.log(f"saved {directory} ({model.sft.nnz:,} changed entries)")
        self.state.sft_dirs[str((directory / "model").relative_to(self.out))] = str(directory / "model")
        lang_sfts = {lang: self._language_sft(method, lang) for lang in held_out} if method else {}
        scores = ev.scores(f"subnet-{system}-fold{fold}-seed{seed}-{key}", held_out,
                           lambda lang, model=model, lang_sfts=lang_sfts: ev.composed(model.sft_for(lang),
                                                                                      lang_sfts.get(lang)))
        self._record("subnetworks", system, seed, scores, with_lang=method is not None,
                     extra={"fold": fold, "sources": sources})
        self.state.subnetwork_stats.append({"system": system, "seed": seed, "fold": fold,
                                            **subnetwork_statistics(model, held_out)})

    # -- the tuned table (deftx.workflows.experiments.tuning) ----------------------------------------

    def _tuning(self) -> None:
        """Per system: its trials at the first seed, scored on every tuned language's validation
        split; per language, the champion trial; then the champions at every seed, scored on the
        evaluation splits (part ``tuned``)."""
        cfg, tuning = self.cfg, self.cfg.tuning
        metric = spec_of(cfg.pipeline).metric
        for system in tuning.systems:
            trials = tuning.trials_for(system)
            scores: dict[int, dict[str, float]] = {}
            task_dirs: dict[int, str] = {}
            with self._timed(f"tuning {system} ({len(trials)} trials)"):
                for i, sample in enumerate(trials):
                    with self._unit(f"tuning {system}, trial {i + 1}"):
                        self.log(f"== tuning {system}: trial {i + 1}/{len(trials)} ({describe_sample(sample)}) ==")
                        got, task_dir = self._tuned_scores(system, sample, cfg.seeds[0], tuning.languages, ["valid"])
                        scores[i] = {lang: got[(lang, "valid")][metric] for lang in tuning.languages}
                        if task_dir is not None:
                            task_dirs[i] = task_dir
                        self._record("tuning", system, cfg.seeds[0], got, with_lang=system != FULL_FT,
                                     extra={"trial": i, "settings": sample})
            if len(scores) < len(trials):   # report-only, part-way: no champion yet
                continue
            best = champions(scores, tuning.languages, tuning.champion)
            self.state.tuning[system] = {"trials": trials, "champions": best, "valid": scores, "task_sft_dirs": task_dirs}
            self.log(f"[tuning {system}] champions: " + ", ".join(f"{lang} trial {i + 1}" for lang, i in best.items()))
        for seed in cfg.seeds:
            with self._timed(f"tuned champions (seed {seed})"):
                for system, found in self.state.tuning.items():
                    for lang, i in found["champions"].items():
                        settings = found["trials"][i]
                        with self._unit(f"tuned {system} for {lang} (seed {seed})"):
                            got, _ = self._tuned_scores(system, settings, seed, [lang])
                            self._record("tuned", system, seed, got, with_lang=system != FULL_FT,
                                         extra={"trial": i, "settings": settings})

    def _tuned_scores(self, system: str, sample: dict[str, Any], seed: int, languages: list[str],
                      splits: list[str] | None = None) -> tuple[dict, str | None]:
        """Scores of ``system`` trained with the settings ``sample`` at ``seed`` (units cached on disk
        by the settings, so a champion at the trials' seed is its trial), and the task SFT's
        directory (None for full fine-tuning)."""
        ev, tag = self.evaluator, sample_tag(sample)
        config = self._config_with(seed=seed)
        if system == FULL_FT:
            for name in ("learning_rate", "epochs"):
                if name in sample:
                    setattr(config.task_sft.full, name, sample[name])
            job = self.trained.task_job(None, config.validate(), phase1=self._phase1(f"tune-{FULL_FT}-{tag}-seed{seed}"))
            store = self._run_phase1(job)
            return ev.scores(f"full_ft-seed{seed}-{store.digest}", languages,
                             lambda lang: ev.fully_fine_tuned(store), splits), None
        config.task_sft.selection = trial_selection(self.cfg.selection(system, "task"), sample)
        if "learning_rate" in sample:
            config.task_sft.sparse.learning_rate = sample["learning_rate"]
        job = self.trained.task_job(self._language_sft_dir(system, self.cfg.pipeline.source_language),
                                    config.validate(), phase1=self._phase1(f"task-{system}-seed{seed}"))
        directory = self.out / "sfts" / f"seed{seed}" / f"tune-{system}-{tag}"
        if not saved_with(directory, job_key(job)):   # phase 1 is only needed to train the SFT
            self._run_phase1(job)
        task = self._run_sft(job, directory)
        lang_sfts = {lang: self._language_sft(system, lang) for lang in languages}
        key = f"{system}-seed{seed}-{key_of(task)}-" + scores_key({lang: key_of(s) for lang, s in lang_sfts.items()})
        return ev.scores(key, languages, lambda lang: ev.composed(task, lang_sfts[lang]), splits), str(task.source)

    def _ablations(self, seed: int) -> None:
        for variant in self.cfg.ablations.variants:
            with self._unit(f"ablation {variant} (seed {seed})"):
                self._ablation(seed, variant)

    def _ablation(self, seed: int, variant: str) -> None:
        cfg, ev = self.cfg, self.evaluator
        base = cfg.ablations.base
        lang_sfts = {lang: self._language_sft(base, lang) for lang in self.languages}
        selection = cfg.ablation_selection(variant)
        self.log(f"== ablation {variant}: task SFT re-selected from the {base} phase 1 (seed {seed}) ==")
        task = self._task_sft(base, seed, selection, f"ablation-{variant}")
        scores = ev.scores(f"ablation-{variant}-{key_of(task)}", self.targets,
                           lambda lang, task=task, lang_sfts=lang_sfts: ev.composed(task, lang_sfts[lang]))
        self._record("ablation", variant, seed, scores, with_lang=True,
                     extra={"selection": selection.hyperparameters(), "nnz": task.nnz,
                            "ranks": task.metadata.selection.get("ranks", {})})
        self._overlaps("ablation", variant, seed, task, lang_sfts)


def run_experiment(cfg: ExperimentConfig, log: Log = print, executor: Executor | None = None,
                   report_only: bool = False) -> ExperimentState:
    return Experiment(cfg, executor, log, report_only=report_only).run()
