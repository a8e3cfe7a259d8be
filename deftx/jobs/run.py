"""Running one job on every rank of a runtime (this process, or DeepSpeed workers), and what it
leaves on rank 0."""

from __future__ import annotations

from functools import singledispatch
from pathlib import Path
from typing import Any

import torch

from deftx.config import PipelineConfig
from deftx.core.io import atomic_directory, write_json
from deftx.core.sft import SparseFineTuning
from deftx.jobs.cache import KEY_FIELD, job_key, phase1_key
from deftx.jobs.head import load_head, save_head
from deftx.jobs.recipes import (
    train_language_sft,
    train_multi_source_task_sft,
    train_subnetwork_model,
    train_task_sft,
    warm_up_mlm_head,
)
from deftx.jobs.spec import (
    JOB_FORMAT,
    JOB_INFO,
    JOB_MARKER_OUTPUT,
    HeadJob,
    Job,
    LanguageJob,
    Log,
    MultiSourceJob,
    SubnetworkJob,
    TaskJob,
    head_languages,
)
from deftx.models import load_masked_lm, load_tokenizer, resolve_model_path
from deftx.tasks import spec_of
from deftx.tracking.live import LiveRun
from deftx.training.phase1_store import Phase1Store
from deftx.training.probe import ProbedRuntime, language_probe
from deftx.training.runtime import LocalRuntime, TrainingRuntime


class JobOutput:
    """What a job produced on rank 0: an SFT, a head, a subnetwork model, or (a phase-1-only job)
    a marker with its info; saved by ``save(directory)``."""

    def __init__(self, sft: SparseFineTuning | None = None, head: dict[str, torch.Tensor] | None = None,
                 info: dict[str, Any] | None = None, model: Any = None) -> None:
        self.sft, self.head, self.info, self.model = sft, head, info or {}, model   # model: a SubnetworkModel

    def save(self, directory: Path) -> None:
        if self.model is not None:
            self.model.save(directory, overwrite=True)
        elif self.sft is not None:
            self.sft.save(directory, overwrite=True)
        elif self.head is not None:
            save_head(directory, self.head, self.info)
        else:
            with atomic_directory(directory, overwrite=True, kind=JOB_MARKER_OUTPUT) as tmp:
                write_json(tmp / JOB_INFO, {"format": JOB_FORMAT, **self.info})


class _Context:
    """What every recipe needs: the tokenizer, the resolved model path, the common arguments."""

    def __init__(self, job: Job, runtime: TrainingRuntime, log: Log) -> None:
        cfg = job.config
        self.cfg, self.runtime, self.log = cfg, runtime, log
        self.model_path = resolve_model_path(cfg.model.name_or_path, log=log)
        self.tokenizer = load_tokenizer(self.model_path)
        self.key = job_key(job)

    def common(self, runtime: TrainingRuntime | None = None) -> dict[str, Any]:
        cfg = self.cfg
        return dict(max_length=cfg.model.max_length, seed=cfg.seed, log=self.log, runtime=runtime or self.runtime,
                    task=spec_of(cfg), model_id=cfg.model.name_or_path, data_source=cfg.data.source)


def run_job(job: Job, runtime: TrainingRuntime | None = None, log: Log = print,
            live: LiveRun | None = None) -> JobOutput | None:
    """Run ``job`` (on every rank of a distributed runtime); the output on rank 0, None elsewhere.
    The output records the job's key (:func:`deftx.jobs.cache.job_key`). With ``live``, rank 0
    logs every step's metrics to that MLflow run while the phases train."""
    runtime = runtime or LocalRuntime()
    if job.config.threads:
        torch.set_num_threads(job.config.threads)
    if live is None or runtime.rank != 0:
        return _run(job, _Context(job, runtime, log))
    from deftx.tracking.live import MlflowSink
    from deftx.training.live import sending_to

    sink = MlflowSink(live, log)
    try:
        with sending_to(sink):
            return _run(job, _Context(job, runtime, log))
    finally:
        sink.flush()


def _phase1_store(job: LanguageJob | TaskJob | MultiSourceJob) -> Phase1Store | None:
    return Phase1Store(job.phase1.directory, phase1_key(job)) if job.phase1 is not None else None


def _sft_output(job: LanguageJob | TaskJob | MultiSourceJob, sft: SparseFineTuning | None,
                ctx: _Context) -> JobOutput | None:
    if ctx.runtime.rank != 0:
        return None
    if job.phase1_only:
        return JobOutput(info={"phase1_dir": job.phase1.directory, "digest": ctx.key})
    assert sft is not None
    sft.metadata.training[KEY_FIELD] = ctx.key
    return JobOutput(sft=sft)


def _language_sfts(paths: dict[str, str], sources: tuple[str, ...]) -> dict[str, SparseFineTuning | None]:
    return {lang: SparseFineTuning.load(paths[lang]) if paths.get(lang) else None for lang in sources}


@singledispatch
def _run(job: Any, ctx: _Context) -> JobOutput | None:
    raise TypeError(f"not a job: {type(job).__name__}")


@_run.register
def _(job: HeadJob, ctx: _Context) -> JobOutput | None:
    cfg = ctx.cfg
    spec = spec_of(cfg)
    texts = [t for lang in head_languages(cfg) for t in spec.adaptation_text(lang, cfg.data.source, cfg.language_sft)]
    model, _ = load_masked_lm(ctx.model_path, seed=cfg.seed)
    values, phase = warm_up_mlm_head(model, ctx.tokenizer, texts, cfg.language_sft, max_length=cfg.model.max_length,
                                     seed=cfg.seed, log=ctx.log, runtime=ctx.runtime)
    if ctx.runtime.rank != 0:
        return None
    return JobOutput(head=values, info={"digest": ctx.key, "steps": phase.steps,
                                        "final_loss": phase.final_loss, "sentences": len(texts)})


@_run.register
def _(job: LanguageJob, ctx: _Context) -> JobOutput | None:
    runtime = _probed(ctx.runtime, job, ctx.cfg, ctx.model_path, ctx.tokenizer) if job.probe else ctx.runtime
    head = load_head(job.head) if job.head else None
    sft = train_language_sft(ctx.model_path, ctx.tokenizer, job.language, ctx.cfg.language_sft, head_init=head,
                             phase1=_phase1_store(job), stop_after_phase1=job.phase1_only, **ctx.common(runtime))
    return _sft_output(job, sft, ctx)


@_run.register
def _(job: TaskJob, ctx: _Context) -> JobOutput | None:
    lang_sft = SparseFineTuning.load(job.language_sft) if job.language_sft else None
    sft = train_task_sft(ctx.model_path, ctx.tokenizer, job.language, lang_sft, ctx.cfg.task_sft,
                         eval_batch_size=ctx.cfg.eval_batch_size, phase1=_phase1_store(job), stop_after_phase1=job.phase1_only,
                         **ctx.common())
    return _sft_output(job, sft, ctx)


@_run.register
def _(job: MultiSourceJob, ctx: _Context) -> JobOutput | None:
    sft = train_multi_source_task_sft(ctx.model_path, ctx.tokenizer, list(job.sources),
                                      _language_sfts(dict(job.language_sfts), job.sources), ctx.cfg.task_sft,
                                      phase1=_phase1_store(job), stop_after_phase1=job.phase1_only, **ctx.common())
    return _sft_output(job, sft, ctx)


@_run.register
def _(job: SubnetworkJob, ctx: _Context) -> JobOutput | None:
    model = train_subnetwork_model(ctx.model_path, ctx.tokenizer, list(job.sources),
                                   _language_sfts(dict(job.language_sfts), job.sources), job.subnetworks,
                                   max_train_examples=ctx.cfg.task_sft.max_train_examples,
                                   masks_cache=job.masks_cache, **ctx.common())
    if model is None:
        return None
    model.info[KEY_FIELD] = ctx.key
    return JobOutput(model=model)


def _probed(runtime: TrainingRuntime, job: LanguageJob, cfg: PipelineConfig, model_path: str,
            tokenizer) -> TrainingRuntime:
    """``runtime`` scoring the language SFT with the task SFT every ``probe.every`` phase-2 steps."""
    spec = job.probe
    assert spec is not None
    split = spec.split
    lang = spec.language if split == "target_valid" else cfg.source_language
    task = spec_of(cfg)
    examples = task.evaluation(lang, "valid", cfg.data.source) if runtime.rank == 0 else []
    probe = language_probe(model_path, tokenizer, SparseFineTuning.load(spec.task_sft), examples,
                           task.num_labels, split, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                           max_length=cfg.model.max_length) if runtime.rank == 0 else (lambda values, step: {})
    return ProbedRuntime(runtime, kind="language", every=spec.every, probe=probe, report_path=spec.report_path)

