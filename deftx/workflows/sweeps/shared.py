"""Sweeps of the selection hyperparameters per target language: everything except Ray Tune itself.

What is shared and what each trial recomputes (``sft: language``, the default):
  once per sweep        the MLM head warm-up (when the base model has none), the source-language
                        SFT and the task SFT on top of it (the NusaX pipeline's, reused if present)
  once per language     the target language SFT's head warm-up + phase 1 (``Phase1Store``): phase 1
                        does not depend on the selection, so no trial trains it again
  every trial           the selection (method, budget, rank rule, residual, SVD target) from the
                        stored phase 1, phase 2, and the evaluation of theta0 + phi_task + phi_lang

With ``sft: task`` the roles swap: the language SFTs are shared (the pipeline's), the task SFT's
phase 1 is stored once, and every trial selects and trains the task SFT's phase 2.

``deftx.workflows.sweeps.tune`` runs the trials as a Tune experiment per language; this module prepares the
shared work, turns a sampled point into a training job, and scores the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deftx.config import ConfigError, PipelineConfig, SelectionConfig, from_dict, to_dict
from deftx.core.sft import SparseFineTuning
from deftx.data import NUSAX_LABELS, check_language, load_nusax_senti
from deftx.errors import DataError
from deftx.evaluation import ClassifierScorer
from deftx.jobs.executors import Executor
from deftx.jobs.spec import LanguageJob, Log, Phase1, TaskJob
from deftx.models import resolve_model_path
from deftx.workflows.pipeline import run_phase1, train_pipeline_sfts
from deftx.workflows.sweeps.space import SearchSpace, selection_from_sample


def check_sweep(cfg: PipelineConfig, space: SearchSpace, languages: list[str], num_samples: int) -> list[str]:
    """Validate a sweep before any work: returns the normalised target languages."""
    if space.dataset != cfg.data.dataset:
        hint = (" (sweeps run the NusaX pipeline only; AmericasNLI runs as `deftx experiment americasnli`)"
                if space.dataset == "americasnli" else "")
        raise ConfigError(f"{space.source or 'space'}: a {space.dataset} search space, but the pipeline trains on "
                          f"{cfg.data.dataset}{hint}")
    if num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {num_samples}")
    if not languages:
        raise ConfigError("--languages: give at least one target language")
    out = []
    for code in languages:
        try:
            lang = check_language(code, cfg.data.dataset)
        except DataError as exc:
            raise ConfigError(f"--languages: {exc}") from None
        if lang == cfg.source_language:
            raise ConfigError(f"--languages: {lang} is the source language; sweep target languages")
        if lang in out:
            raise ConfigError(f"--languages: {lang} is listed twice")
        out.append(lang)
    for lang in out:
        space.for_language(lang)
    return out


@dataclass
class SharedWork:
    """Plain data for trials (it travels to Tune's trial processes): the pipeline config as a dict
    (absolute paths), the base model's fingerprint and the shared artifacts."""

    config: dict[str, Any]
    fingerprint: str
    sft: str                                    # "language" or "task": which SFT the trials train
    task_sft: str | None                        # shared task SFT (sft == language)
    source_sft: str                             # the source-language SFT (under the task SFT)
    language_sfts: dict[str, str] = field(default_factory=dict)   # shared target SFTs (sft == task)
    head_dir: str | None = None
    phase1: dict[str, str] = field(default_factory=dict)          # lang (or "task") -> store directory
    seconds: dict[str, float] = field(default_factory=dict)       # wall time of each shared step

    def pipeline_config(self) -> PipelineConfig:
        return from_dict(PipelineConfig, self.config).validate()

    def job(self, lang: str, cfg: PipelineConfig | None = None) -> LanguageJob | TaskJob:
        """The swept SFT's job for target ``lang`` (phase 1 from the shared store)."""
        cfg = cfg or self.pipeline_config()
        if self.sft == "language":
            return LanguageJob(cfg, self.fingerprint, lang, head=self.head_dir, phase1=Phase1(self.phase1[lang]))
        return TaskJob(cfg, self.fingerprint, cfg.source_language, language_sft=self.source_sft,
                       phase1=Phase1(self.phase1["task"]))


def prepare_shared_work(cfg: PipelineConfig, space: SearchSpace, languages: list[str], executor: Executor,
                        log: Log = print) -> SharedWork:
    """Train (or reuse) what no trial's hyperparameters change. ``cfg`` has absolute paths."""
    out = Path(cfg.output_dir)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if space.sft == "language":
        trained = train_pipeline_sfts(cfg, executor, [cfg.source_language], log)
    else:
        trained = train_pipeline_sfts(cfg, executor, [cfg.source_language, *languages], log)
    seconds["pipeline SFTs"] = time.perf_counter() - started
    assert trained.task_dir is not None
    shared = SharedWork(config=to_dict(cfg), fingerprint=trained.fingerprint, sft=space.sft,
                        task_sft=str(trained.task_dir), source_sft=str(trained.language_dir(cfg.source_language)),
                        head_dir=trained.head)
    if space.sft == "task":
        shared.language_sfts = {lang: str(trained.language_dir(lang)) for lang in languages}
        shared.phase1 = {"task": str(out / "phase1" / f"task-{cfg.source_language}")}
    else:
        shared.phase1 = {lang: str(out / "phase1" / f"language-{lang}") for lang in languages}
    for lang in (languages if space.sft == "language" else [cfg.source_language]):
        job = shared.job(lang, cfg)
        step = time.perf_counter()
        if run_phase1(job, executor, log, f"== phase 1 of the {space.sft} SFT ({lang}), shared by every trial ==")[1]:
            seconds[f"phase 1 {space.sft}-{lang}"] = time.perf_counter() - step
    shared.seconds = seconds
    return shared


def trial_job(shared: SharedWork, lang: str, sample: dict[str, Any]) -> tuple[LanguageJob | TaskJob, SelectionConfig]:
    """The training job of one trial: the swept SFT with the sampled selection, phase 1 from the
    store."""
    cfg = shared.pipeline_config()
    sft_cfg = cfg.language_sft if shared.sft == "language" else cfg.task_sft
    selection = selection_from_sample(sft_cfg.selection, sample)
    sft_cfg.selection = selection
    cfg.validate()
    return shared.job(lang, cfg), selection


def composed_parts(shared: SharedWork, lang: str, trial_sft: str) -> tuple[str, str]:
    """(task SFT dir, language SFT dir) of the trial's composed model for target ``lang``."""
    if shared.sft == "language":
        assert shared.task_sft is not None
        return shared.task_sft, trial_sft
    return trial_sft, shared.language_sfts[lang]


def score_composition(cfg: PipelineConfig, task_dir: str, lang_dir: str, lang: str, split: str) -> dict[str, float]:
    """macro-F1 and accuracy of theta0 + phi_task + phi_lang on the objective's split:
    ``target_valid`` (``lang``'s validation examples) or ``source_valid``."""

    eval_lang = lang if split == "target_valid" else cfg.source_language
    scorer = ClassifierScorer(resolve_model_path(cfg.model.name_or_path, log=lambda line: None), NUSAX_LABELS,
                              seed=cfg.seed, batch_size=cfg.eval_batch_size, max_length=cfg.model.max_length)
    with scorer.composed(SparseFineTuning.load(task_dir), SparseFineTuning.load(lang_dir)):
        res = scorer.score(load_nusax_senti(eval_lang, "valid", cfg.data.source))
    return {f"{split}_macro_f1": res["macro_f1"], f"{split}_accuracy": res["accuracy"], f"{split}_n": res["n"]}
