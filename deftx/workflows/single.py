"""One SFT, or one subnetwork model, trained into a directory the user names: what ``deftx
train-lang``, ``train-task`` and ``train-subnetworks`` run (on the configured executor: Ray Train
workers under DeepSpeed, or this process)."""

from __future__ import annotations

from pathlib import Path

from deftx.config import PipelineConfig, to_dict
from deftx.core.sft import SparseFineTuning
from deftx.errors import DeftxError
from deftx.jobs.cache import base_identity
from deftx.jobs.executors import Executor, make_executor
from deftx.jobs.spec import LanguageJob, Log, SubnetworkJob, TaskJob
from deftx.models import resolve_model_path
from deftx.subnetworks.artifact import SubnetworkModel
from deftx.subnetworks.config import SubnetworkConfig
from deftx.tracking.runs import log_sft
from deftx.tracking.tracker import Tracker
from deftx.workflows.pipeline import absolute_paths, check_run_outputs


def _prepared(cfg: PipelineConfig, log: Log) -> tuple[PipelineConfig, str, Executor]:
    """``cfg`` with absolute paths and its outputs checked, the base model's fingerprint, and a
    prepared executor (started before the model is read, as the pipeline does)."""
    check_run_outputs(cfg)
    cfg = absolute_paths(cfg)
    executor = make_executor(cfg, log)
    executor.prepare()
    fingerprint, _ = base_identity(cfg, resolve_model_path(cfg.model.name_or_path, log=log))
    return cfg, fingerprint, executor


def train_language(cfg: PipelineConfig, lang: str, out: Path, log: Log = print) -> SparseFineTuning:
    """A language SFT of ``lang`` in ``out`` (a base model without an MLM head warms one up on
    ``lang``'s text first)."""
    cfg, fingerprint, executor = _prepared(cfg, log)
    executor.run(LanguageJob(cfg, fingerprint, lang), out.resolve(), log)
    return SparseFineTuning.load(out)


def train_task(cfg: PipelineConfig, source: str, out: Path, language_sft: str | None = None,
               log: Log = print) -> SparseFineTuning:
    """A task SFT on ``source``'s labelled data in ``out``, on theta0 + the language SFT in
    ``language_sft`` (if given)."""
    if language_sft is not None:
        kind = SparseFineTuning.load(language_sft).metadata.kind
        if kind != "language":
            raise DeftxError(f"{language_sft}: --lang-sft must be a language SFT, got a {kind} SFT")
        language_sft = str(Path(language_sft).resolve())
    cfg, fingerprint, executor = _prepared(cfg, log)
    executor.run(TaskJob(cfg, fingerprint, source, language_sft=language_sft), out.resolve(), log)
    return SparseFineTuning.load(out)


def train_subnetworks(cfg: PipelineConfig, sources: list[str], sub: SubnetworkConfig, out: Path,
                      language_sfts: dict[str, str] | None = None, log: Log = print) -> SubnetworkModel:
    """A multi-source task model with language-specific subnetworks in ``out``, each source's
    batches at theta + its language SFT (``language_sfts``: source -> directory); tracked in MLflow
    (``cfg.tracking``)."""

    if not sources:
        raise DeftxError("--sources: give at least one source language")
    paths = {lang: str(Path(d).resolve()) for lang, d in (language_sfts or {}).items()}
    for lang, directory in paths.items():
        if lang not in sources:
            raise DeftxError(f"--lang-sft {lang}=...: {lang} is not one of the sources ({', '.join(sources)})")
        if SparseFineTuning.load(directory).metadata.kind != "language":
            raise DeftxError(f"--lang-sft {lang}={directory}: not a language SFT")
    sub.check_languages(sources, [])
    cfg, fingerprint, executor = _prepared(cfg, log)
    executor.run(SubnetworkJob(cfg, fingerprint, tuple(sources), paths, sub), out.resolve(), log)
    model = SubnetworkModel.load(out)
    tracker = Tracker(cfg.tracking.uri, enabled=cfg.tracking.enabled, log=log)
    run = log_sft(tracker, cfg.experiment_name("subnetworks"), None, out / "model", f"subnetworks-{out.name}",
                  extra_params={"subnetworks": to_dict(sub), "sources": sources, "mask_sizes": mask_sizes(model),
                                "output": str(out.resolve())})
    tracker.log_file(run, out / "subnetworks.json", "model")
    return model


def mask_sizes(model: SubnetworkModel) -> dict[str, int]:
    """The number of entries in each language's mask."""
    return {lang: sum(int(m.sum()) for m in ms.values()) for lang, ms in model.masks.items()}
