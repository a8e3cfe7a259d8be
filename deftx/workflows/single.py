"""One SFT, or one subnetwork model, trained into a directory the user names: what ``deftx
train-lang``, ``train-task`` and ``train-subnetworks`` run (on the configured executor: Ray Train
workers under DeepSpeed, or this process)."""

from __future__ import annotations

import copy
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
from deftx.tracking.live import LiveRuns
from deftx.tracking.runs import log_sft
from deftx.tracking.tracker import Tracker
from deftx.workflows.pipeline import absolute_paths, check_run_outputs

DEFAULT_HELD_OUT = 0.02   # the share of your own text kept for the held-out MLM loss


def with_own_text(cfg: PipelineConfig, lang: str, text: list[str], held_out: float | None = None) -> PipelineConfig:
    """``cfg`` training ``lang``'s SFT on ``text`` (files, ``hf:`` datasets or bundled source names;
    :mod:`deftx.data.text`), any language code allowed, keeping ``held_out`` of it (default 2%, or
    the config's if it sets one) for the held-out MLM loss. Checked before any work."""
    from deftx.config.schema import check_language_code
    from deftx.data.text import resolve_sources

    check_language_code(lang, "--lang")
    resolve_sources(lang, text)
    cfg = copy.deepcopy(cfg)
    cfg.language_sft.text = list(text)
    cfg.language_sft.held_out = held_out if held_out is not None else (cfg.language_sft.held_out or DEFAULT_HELD_OUT)
    cfg.language_sft.validate("language_sft")
    return cfg


def with_own_table(cfg: PipelineConfig, source: str, train: str, valid: str | None = None, *,
                   text_column: str = "text", pair_column: str | None = None, label_column: str = "label",
                   labels: list[str] | None = None, metric: str = "accuracy", name: str = "task") -> PipelineConfig:
    """``cfg`` training a task SFT of ``source`` on your own labelled table ``train`` (validation
    table ``valid``), the dataset ``table`` (:mod:`deftx.data.tables`). Checked before any work."""
    from deftx.config.schema import DataConfig, TableConfig

    cfg = copy.deepcopy(cfg)
    table = TableConfig(name=name, train={source: train}, valid={source: valid} if valid else {},
                        text_column=text_column, pair_column=pair_column, label_column=label_column,
                        labels=labels, metric=metric)
    cfg.data = DataConfig(dataset="table", source="bundled", table=table)
    cfg.task, cfg.source_language, cfg.target_languages = "table", source, [source]
    cfg.language_sft.text = None
    return cfg.validate()


def held_out_mlm_report(cfg: PipelineConfig, lang: str, sft_dir: Path, log: Log = print,
                        max_lines: int = 256) -> dict[str, float] | None:
    """The held-out MLM loss of ``lang``'s text (the lines ``language_sft.held_out`` kept out of
    training) for theta0 and theta0 + the SFT, both with the SFT's MLM head; recorded in the SFT's
    metrics (``held_out_mlm``). None when no text was held out."""
    from deftx.held_out_mlm import THETA0, held_out_set, loss_matrix
    from deftx.models import load_masked_lm, load_tokenizer
    from deftx.tasks import spec_of

    if not cfg.language_sft.held_out:
        return None
    lines = spec_of(cfg).adaptation_text(lang, cfg.data.source, cfg.language_sft, part="held_out")
    if not lines:
        log(f"[mlm-loss] {lang}: no line fell in the held-out slice; not measured")
        return None
    path = resolve_model_path(cfg.model.name_or_path, log=log)
    sft = SparseFineTuning.load(sft_dir)
    model, _ = load_masked_lm(path, seed=cfg.seed)
    data = held_out_set(load_tokenizer(path), lang, lines, max_length=cfg.model.max_length, max_lines=max_lines,
                        probability=cfg.language_sft.mlm_probability)
    head_only = SparseFineTuning({}, sft.head, sft.metadata)
    with head_only.applied(model):   # theta0's row with the SFT's head: the difference is the body's
        rows = loss_matrix(model, {lang: data}, {"sft": sft}, with_head=False, log=lambda _: None)
    report = {"lines": float(data.lines), "theta0": rows[THETA0][lang], "sft": rows["sft"][lang]}
    log(f"[mlm-loss] {lang} held-out text ({data.lines} lines, {data.predicted} masked tokens): theta0 "
        f"{report['theta0']:.3f}, theta0 + SFT {report['sft']:.3f} nats per token")
    sft.metadata.metrics["held_out_mlm"] = report
    sft.save(sft_dir, overwrite=True)
    return report


def _prepared(cfg: PipelineConfig, log: Log) -> tuple[PipelineConfig, str, Executor]:
    """``cfg`` with absolute paths and its outputs checked, the base model's fingerprint, and a
    prepared executor (started before the model is read, as the pipeline does)."""
    check_run_outputs(cfg)
    cfg = absolute_paths(cfg)
    executor = make_executor(cfg, log)
    executor.prepare()
    fingerprint, _ = base_identity(cfg, resolve_model_path(cfg.model.name_or_path, log=log))
    return cfg, fingerprint, executor


def _tracked_run(cfg: PipelineConfig, job, out: Path, executor: Executor, experiment: str, log: Log,
                 after=None) -> SparseFineTuning:
    """Run ``job`` into ``out`` with its MLflow run open while it trains (live metrics), then
    (after ``after(out)``, e.g. a held-out score stored in the SFT) complete that run as the
    pipeline does for each SFT (``cfg.tracking``)."""
    out = out.resolve()
    tracker = Tracker(cfg.tracking.uri, enabled=cfg.tracking.enabled, log=log)
    live = LiveRuns(tracker, experiment)
    run = live.start(out.name, out)
    try:
        executor.run(job, out, log, live=run)
        if after is not None:
            after(out)
    except BaseException as exc:
        live.failed(out, isinstance(exc, KeyboardInterrupt))
        raise
    handle = log_sft(tracker, experiment, None, out, out.name, extra_params={"output": str(out)},
                     existing=live.take(out))
    if handle.run_id is not None:
        log(f"MLflow: run {handle.run_id} in experiment {experiment} ({tracker.uri})")
    return SparseFineTuning.load(out)


def train_language(cfg: PipelineConfig, lang: str, out: Path, log: Log = print) -> SparseFineTuning:
    """A language SFT of ``lang`` in ``out`` (a base model without an MLM head warms one up on
    ``lang``'s text first); with ``language_sft.held_out``, its held-out MLM loss is measured and
    stored in the SFT (:func:`held_out_mlm_report`). Tracked in MLflow while it trains."""
    cfg, fingerprint, executor = _prepared(cfg, log)
    return _tracked_run(cfg, LanguageJob(cfg, fingerprint, lang), out, executor, cfg.experiment_name("train-lang"),
                        log, after=lambda directory: held_out_mlm_report(cfg, lang, directory, log))


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
    return _tracked_run(cfg, TaskJob(cfg, fingerprint, source, language_sft=language_sft), out, executor,
                        cfg.experiment_name("train-task"), log)


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
