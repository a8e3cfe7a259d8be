"""Running one job on every rank of a runtime (this process, or DeepSpeed workers), and what it
leaves on rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deftx.config import PipelineConfig
from deftx.core.io import atomic_directory, sha256_file, write_json
from deftx.core.sft import SparseFineTuning
from deftx.errors import DeftxError
from deftx.jobs.recipes import (
    train_language_sft,
    train_multi_source_task_sft,
    train_subnetwork_model,
    train_task_sft,
    warm_up_mlm_head,
)
from deftx.jobs.spec import (
    HEAD_FILE,
    HEAD_FORMAT,
    HEAD_INFO,
    JOB_FORMAT,
    JOB_INFO,
    JOB_MARKER_OUTPUT,
    MLM_HEAD_OUTPUT,
    Log,
    SFTJob,
    capped,
    head_languages,
)
from deftx.models import load_masked_lm, load_tokenizer, resolve_model_path
from deftx.tasks import task_spec
from deftx.training.phase1_store import Phase1Store
from deftx.training.runtime import LocalRuntime, TrainingRuntime


class JobOutput:
    """What a job produced on rank 0: an SFT or a head, saved by ``save(directory)``."""

    def __init__(self, sft: SparseFineTuning | None = None, head: dict[str, torch.Tensor] | None = None,
                 info: dict[str, Any] | None = None, model: Any = None) -> None:
        self.sft, self.head, self.info, self.model = sft, head, info or {}, model   # model: a SubnetworkModel

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self.model is not None:
            self.model.save(directory, overwrite=True)
            return
        if self.sft is None and self.head is None:   # a phase-1-only job: a marker with its info
            with atomic_directory(directory, overwrite=True, kind=JOB_MARKER_OUTPUT) as tmp:
                write_json(tmp / JOB_INFO, {"format": JOB_FORMAT, **self.info})
            return
        if self.sft is not None:
            self.sft.save(directory, overwrite=True)
            return
        assert self.head is not None
        with atomic_directory(directory, overwrite=True, kind=MLM_HEAD_OUTPUT) as tmp:
            save_file(self.head, str(tmp / HEAD_FILE))
            write_json(tmp / HEAD_INFO, {"format": HEAD_FORMAT, **self.info,
                                         "sha256": sha256_file(tmp / HEAD_FILE)})


def load_head(directory: str | Path) -> dict[str, torch.Tensor]:
    """The MLM head saved in ``directory``, verified against the checksum in its ``head.json``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    problem = head_problem(directory)
    if problem is not None:
        raise DeftxError(f"{directory}: {problem}")
    try:
        return load_file(str(directory / HEAD_FILE))
    except Exception as exc:  # safetensors raises several types for a bad file
        raise DeftxError(f"{directory / HEAD_FILE}: not a readable safetensors file ({exc})") from None


def head_problem(directory: Path, digest: str | None = None) -> str | None:
    """Why the MLM head in ``directory`` cannot be used (for ``digest``, if given), or None."""
    try:
        info = json.loads((directory / HEAD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"no readable {HEAD_INFO} ({type(exc).__name__})"
    if not isinstance(info, dict):
        return f"{HEAD_INFO} is not an object"
    if digest is not None and info.get("digest") != digest:
        return "settings changed"
    recorded = info.get("sha256")
    if not isinstance(recorded, str):
        return f"{HEAD_INFO} records no checksum of {HEAD_FILE}"
    try:
        found = sha256_file(directory / HEAD_FILE)
    except OSError as exc:
        return f"{HEAD_FILE} is unreadable ({exc.strerror or exc})"
    if found != recorded:
        return f"{HEAD_FILE} does not match its checksum (truncated or modified after saving)"
    return None


def run_job(job: SFTJob, runtime: TrainingRuntime | None = None, log: Log = print) -> JobOutput | None:
    """Run ``job`` (on every rank of a distributed runtime); the output on rank 0, None elsewhere."""
    runtime = runtime or LocalRuntime()
    cfg = job.pipeline_config()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_path = resolve_model_path(cfg.model.name_or_path, log=log)
    tokenizer = load_tokenizer(model_path)
    common = dict(max_length=cfg.model.max_length, seed=cfg.seed, log=log, runtime=runtime, task=cfg.task)
    spec = task_spec(cfg.task)
    if job.kind == "mlm_head":
        texts = [t for lang in head_languages(cfg)
                 for t in capped(spec.text(lang, cfg.data.source), cfg.language_sft.max_train_examples)]
        model, _ = load_masked_lm(model_path, seed=cfg.seed)
        values, phase = warm_up_mlm_head(model, tokenizer, texts, cfg.language_sft, max_length=cfg.model.max_length,
                                         seed=cfg.seed, log=log, runtime=runtime)
        if runtime.rank != 0:
            return None
        return JobOutput(head=values, info={"digest": job.digest, "steps": phase.steps,
                                            "final_loss": phase.final_loss, "sentences": len(texts)})
    if job.probe and job.kind == "language":
        runtime = _probed(runtime, job, cfg, model_path, tokenizer)
        common["runtime"] = runtime
    phase1 = Phase1Store(job.phase1_dir, job.phase1_digest or "") if job.phase1_dir else None
    if job.phase1_only and phase1 is None:
        raise ValueError(f"{job.name}: phase1_only needs phase1_dir")
    if job.kind == "language":
        head = load_head(job.head_path) if job.head_path else None
        sft = train_language_sft(model_path, tokenizer, job.language, cfg.language_sft,
                                 model_id=cfg.model.name_or_path, data_source=cfg.data.source, head_init=head,
                                 phase1=phase1, stop_after_phase1=job.phase1_only, **common)
    elif job.sources and job.subnetworks is not None:
        paths = job.source_sft_paths or {}
        lang_sfts = {lang: SparseFineTuning.load(paths[lang]) if paths.get(lang) else None for lang in job.sources}
        model = train_subnetwork_model(model_path, tokenizer, list(job.sources), lang_sfts, job.subnetwork_config(),
                                       max_train_examples=cfg.task_sft.max_train_examples,
                                       model_id=cfg.model.name_or_path, data_source=cfg.data.source,
                                       masks_cache=job.masks_cache, **common)
        if model is None:
            return None
        model.info["config_digest"] = job.digest
        return JobOutput(model=model)
    elif job.sources:
        paths = job.source_sft_paths or {}
        lang_sfts = {lang: SparseFineTuning.load(paths[lang]) if paths.get(lang) else None for lang in job.sources}
        sft = train_multi_source_task_sft(model_path, tokenizer, list(job.sources), lang_sfts, cfg.task_sft,
                                          model_id=cfg.model.name_or_path, data_source=cfg.data.source,
                                          phase1=phase1, stop_after_phase1=job.phase1_only, **common)
    else:
        lang_sft = SparseFineTuning.load(job.language_sft_path) if job.language_sft_path else None
        sft = train_task_sft(model_path, tokenizer, job.language, lang_sft, cfg.task_sft,
                             model_id=cfg.model.name_or_path, data_source=cfg.data.source,
                             eval_batch_size=cfg.eval_batch_size, phase1=phase1,
                             stop_after_phase1=job.phase1_only, **common)
    if job.phase1_only:
        return JobOutput(info={"phase1_dir": job.phase1_dir, "digest": job.phase1_digest}) if runtime.rank == 0 else None
    if sft is None:
        return None
    sft.metadata.training["config_digest"] = job.digest
    return JobOutput(sft=sft)


def _probed(runtime: TrainingRuntime, job: SFTJob, cfg: PipelineConfig, model_path: str, tokenizer) -> TrainingRuntime:
    """``runtime`` scoring the language SFT with the task SFT every ``probe.every`` phase-2 steps."""
    from deftx.training.probe import ProbedRuntime, language_probe

    spec = job.probe or {}
    split = spec["split"]
    lang = spec["language"] if split == "target_valid" else cfg.source_language
    task = task_spec(cfg.task)
    examples = task.evaluation(lang, "valid", cfg.data.source) if runtime.rank == 0 else []
    probe = language_probe(model_path, tokenizer, SparseFineTuning.load(spec["task_sft"]), examples,
                           task.num_labels, split, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                           max_length=cfg.model.max_length) if runtime.rank == 0 else (lambda values, step: {})
    return ProbedRuntime(runtime, kind="language", every=int(spec["every"]), probe=probe,
                         report_path=spec["report_path"])

