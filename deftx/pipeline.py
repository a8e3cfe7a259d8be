"""The NusaX zero-shot pipeline and the single-SFT recipes it is made of.

1. a language SFT per language (source + targets): masked LM on NusaX-MT train text;
2. a task SFT for sentiment on the source language, trained on theta0 + phi_lang(source);
3. per target language: theta0 + phi_task + phi_lang(target), macro-F1 on the NusaX test set
   (beside it the task SFT alone, to show what the language SFT adds).

Finished SFTs are saved under ``output_dir/sfts/`` with a digest of everything that determines
them; a re-run with the same settings reuses them, so an interrupted pipeline loses at most the SFT
it was training.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from deftx import __version__
from deftx.config import PipelineConfig, SFTConfig, from_dict
from deftx.core.io import OutputKind, atomic_directory, sha256_file, write_json
from deftx.core.roles import parameter_roles
from deftx.core.sft import SFT_OUTPUT, SFTMetadata, SparseFineTuning, current_base_fingerprint, read_metadata
from deftx.errors import DeftxError
from deftx.evaluation import ClassifierScorer
from deftx.models import load_classifier, load_masked_lm, load_tokenizer, resolve_model_path
from deftx.tasks import task_spec
from deftx.training.batches import classification_stream, masked_lm_stream
from deftx.training.lt_sft import train_head_only, train_sparse_fine_tuning
from deftx.training.objectives import classification_loss, masked_lm_loss
from deftx.training.phase import PhaseResult
from deftx.training.phase1_store import Phase1Store
from deftx.training.runtime import LocalRuntime, TrainingRuntime

Log = Callable[[str], None]


def config_digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reuse(directory: Path, digest: str, log: Log) -> SparseFineTuning | None:
    if not (directory / "sft.json").is_file():
        return None
    try:
        if read_metadata(directory).get("training", {}).get("config_digest") != digest:
            log(f"{directory}: settings changed, retraining")
            return None
        sft = SparseFineTuning.load(directory)
    except DeftxError as exc:
        log(f"{directory}: unusable ({exc}); retraining")
        return None
    log(f"reusing {directory} (same settings)")
    return sft


def _capped(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def _start_model_builder(model_path: str, seed: int, head: dict[str, torch.Tensor] | None):
    """A function building the masked-LM model at a language SFT's start weights."""
    def build() -> torch.nn.Module:
        model, _ = load_masked_lm(model_path, seed=seed)
        if head is not None:
            _load_head(model, head)
        return model

    return build


def train_language_sft(model_path: str, tokenizer, lang: str, sft_cfg: SFTConfig, *, model_id: str,
                       data_source: str, max_length: int, seed: int, log: Log,
                       texts: list[str] | None = None,
                       head_init: dict[str, torch.Tensor] | None = None,
                       runtime: TrainingRuntime | None = None, phase1: Phase1Store | None = None,
                       stop_after_phase1: bool = False, task: str = "nusax_senti") -> SparseFineTuning | None:
    """A language SFT by masked LM on ``lang``'s unlabelled text of ``task`` (NusaX-MT train
    sentences, AmericasNLP text; see :mod:`deftx.tasks`) or the given ``texts``.

    A base model without a pretrained MLM head gets its head from ``head_init`` (a shared warm-up,
    see :func:`warm_up_mlm_head`) or, failing that, a warm-up on ``lang``'s text alone.
    Returns None on the ranks of a distributed runtime other than 0, and with ``stop_after_phase1``
    (which only fills ``phase1``)."""
    spec = task_spec(task)
    texts = _capped(texts if texts is not None else spec.text(lang, data_source), sft_cfg.max_train_examples)
    model, has_head = load_masked_lm(model_path, seed=seed)
    if head_init is not None:
        _load_head(model, head_init)
    build = _start_model_builder(model_path, seed, head_init)
    fingerprint = current_base_fingerprint(model)
    head_source = "pretrained"
    if head_init is not None:
        head_source = "shared warm-up"
    elif not has_head:
        head_source = f"warm-up on {lang} ({sft_cfg.head_warmup_steps} steps)"
        log(f"[lang {lang}] the base model has no pretrained MLM head: training it for "
            f"{sft_cfg.head_warmup_steps} steps first")
    meta = SFTMetadata(kind="language", language=lang, method=sft_cfg.selection.method,
                       selection=sft_cfg.selection.hyperparameters(), base_model=model_id,
                       base_fingerprint=fingerprint, tokenizer=model_id,
                       training={"data": f"{spec.dataset} unlabelled text ({data_source})", "seed": seed,
                                 "mlm_probability": sft_cfg.mlm_probability,
                                 "mlm_head": head_source})
    result = train_sparse_fine_tuning(
        _first_then(model, build), kind="language", loss_fn=masked_lm_loss, cfg=sft_cfg, metadata=meta,
        head_warmup=head_source.startswith("warm-up"), label=f"lang {lang}", log=log, runtime=runtime,
        phase1=phase1, stop_after_phase1=stop_after_phase1, stream_for=lambda bs: masked_lm_stream(tokenizer, texts, batch_size=bs, seed=seed, max_length=max_length,
                                               mlm_probability=sft_cfg.mlm_probability))
    return result.sft


def _first_then(model: torch.nn.Module, build):
    """A builder that returns the already built ``model`` first, then fresh ones."""
    first = [model]

    def builder() -> torch.nn.Module:
        return first.pop() if first else build()

    return builder


def _load_head(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = parameter_roles(model, "language").head
    if set(params) != set(values):
        raise DeftxError(f"MLM head tensors {sorted(values)} do not match the model's {sorted(params)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])


def warm_up_mlm_head(model: torch.nn.Module, tokenizer, texts: list[str], sft_cfg: SFTConfig, *,
                     max_length: int, seed: int, log: Log,
                     runtime: TrainingRuntime | None = None) -> tuple[dict[str, torch.Tensor], PhaseResult]:
    """Train the freshly initialised MLM head of ``model`` (a base model released without one,
    decoder untied) alone, on ``texts`` (all the pipeline's languages); every language SFT then
    starts from this head."""
    runtime = runtime or LocalRuntime()
    runtime.log(f"== MLM head warm-up: the base model has no pretrained MLM head; training it alone for "
                f"{sft_cfg.head_warmup_steps} steps on {len(texts)} sentences ==", log)
    roles = parameter_roles(model, "language")
    stream = masked_lm_stream(tokenizer, texts, batch_size=sft_cfg.full.batch_size, seed=seed,
                              max_length=max_length, mlm_probability=sft_cfg.mlm_probability)
    phase = train_head_only(model, roles.maskable, roles.head, stream, masked_lm_loss,
                            steps=sft_cfg.head_warmup_steps, learning_rate=sft_cfg.head_warmup_learning_rate,
                            label="mlm", log=log, runtime=runtime)
    values = runtime.read(roles.head) or {}
    return {n: v.detach().clone().contiguous() for n, v in values.items()}, phase


def train_task_sft(model_path: str, tokenizer, source_lang: str, lang_sft: SparseFineTuning | None,
                   sft_cfg: SFTConfig, *, model_id: str, data_source: str, max_length: int, seed: int,
                   log: Log, eval_batch_size: int = 64,
                   runtime: TrainingRuntime | None = None, phase1: Phase1Store | None = None,
                   stop_after_phase1: bool = False, task: str = "nusax_senti") -> SparseFineTuning | None:
    """A task SFT (``task``: NusaX sentiment by default) on ``source_lang``'s labelled data, trained
    on theta0 + ``lang_sft``, with its scores on the source validation split (theta0 + lang_sft +
    task SFT) in its metrics.
    Returns None on the ranks of a distributed runtime other than 0."""
    spec = task_spec(task)
    train = _capped(spec.train(source_lang, data_source), sft_cfg.max_train_examples)
    base = load_classifier(model_path, spec.labels, seed=seed)
    fingerprint = current_base_fingerprint(base)

    def build() -> torch.nn.Module:
        model = load_classifier(model_path, spec.labels, seed=seed)
        if lang_sft is not None:
            lang_sft.apply(model, with_head=False)
        return model

    if lang_sft is not None:
        lang_sft.apply(base, with_head=False)
    trained_on: dict[str, Any] = {}
    if lang_sft is not None:
        trained_on = {"language_sft": lang_sft.metadata.language, "language_sft_nnz": lang_sft.nnz,
                      "language_sft_source": lang_sft.source}
    meta = SFTMetadata(kind="task", task=spec.name, language=source_lang, method=sft_cfg.selection.method,
                       selection=sft_cfg.selection.hyperparameters(), base_model=model_id,
                       base_fingerprint=fingerprint, tokenizer=model_id, label_names=list(spec.labels),
                       trained_on=trained_on,
                       training={"data": f"{spec.name} {source_lang} training data ({data_source})", "seed": seed})
    result = train_sparse_fine_tuning(
        _first_then(base, build), kind="task", loss_fn=classification_loss, cfg=sft_cfg, metadata=meta,
        label=f"task {source_lang}", log=log, runtime=runtime, phase1=phase1, stop_after_phase1=stop_after_phase1,
        stream_for=lambda bs: classification_stream(tokenizer, train, batch_size=bs, seed=seed,
                                                    max_length=max_length))
    if result.sft is None:
        return None
    scorer = ClassifierScorer(model_path, spec.labels, seed=seed, batch_size=eval_batch_size, max_length=max_length,
                              tokenizer=tokenizer)
    with scorer.composed(result.sft, lang_sft):
        result.sft.metadata.metrics["source_valid"] = scorer.score(spec.evaluation(source_lang, "valid", data_source))
    return result.sft


@dataclass
class _MultiSource:
    """What every multi-source trainer starts from: the base classifier, the per-language batches
    and the loss that applies each language's SFT to its own batches."""

    spec: Any
    base: torch.nn.Module
    fingerprint: str
    loss: Any
    stream_for: Callable[[int], Any]
    trained_on: dict[str, Any]
    data: str


def _multi_source(model_path: str, tokenizer, sources: list[str], lang_sfts: dict[str, SparseFineTuning | None],
                  max_train_examples: int | None, *, data_source: str, max_length: int, seed: int,
                  task: str) -> _MultiSource:
    from deftx.training.multi_source import MultiSourceStream, multi_source_loss

    if not sources:
        raise ValueError("multi-source training needs at least one source language")
    spec = task_spec(task)
    train = {lang: _capped(spec.train(lang, data_source), max_train_examples) for lang in sources}
    base = load_classifier(model_path, spec.labels, seed=seed)
    fingerprint = current_base_fingerprint(base)
    for lang in sources:
        sft = lang_sfts.get(lang)
        if sft is not None:
            sft.check_compatible(base, with_head=False, fingerprint=fingerprint)
    loss = multi_source_loss(classification_loss,
                             [lang_sfts[lang].diffs if lang_sfts.get(lang) is not None else None  # type: ignore[union-attr]
                              for lang in sources])

    def stream_for(batch_size: int) -> MultiSourceStream:
        return MultiSourceStream([classification_stream(tokenizer, train[lang], batch_size=batch_size, seed=seed + i,
                                                        max_length=max_length) for i, lang in enumerate(sources)],
                                 seed=seed)

    trained_on = {"multi_source": list(sources),
                  "language_sfts": {lang: (s.source if s is not None else None)
                                    for lang, s in lang_sfts.items() if lang in sources}}
    return _MultiSource(spec, base, fingerprint, loss, stream_for, trained_on,
                        f"{spec.name} training data of {', '.join(sources)} ({data_source})")


def train_multi_source_task_sft(model_path: str, tokenizer, sources: list[str],
                                lang_sfts: dict[str, SparseFineTuning | None], sft_cfg: SFTConfig, *,
                                model_id: str, data_source: str, max_length: int, seed: int, log: Log,
                                runtime: TrainingRuntime | None = None, phase1: Phase1Store | None = None,
                                stop_after_phase1: bool = False, task: str = "nusax_senti") -> SparseFineTuning | None:
    """A task SFT trained on the labelled data of several ``sources`` (at most
    ``max_train_examples`` each), on theta0, with each batch computed at theta + phi_lang of its
    language (``lang_sfts``; see :mod:`deftx.training.multi_source`). Both phases see the shifted
    batches; the SFT holds only the task's change."""
    ms = _multi_source(model_path, tokenizer, sources, lang_sfts, sft_cfg.max_train_examples,
                       data_source=data_source, max_length=max_length, seed=seed, task=task)
    spec = ms.spec
    meta = SFTMetadata(kind="task", task=spec.name, language="+".join(sources), method=sft_cfg.selection.method,
                       selection=sft_cfg.selection.hyperparameters(), base_model=model_id,
                       base_fingerprint=ms.fingerprint, tokenizer=model_id, label_names=list(spec.labels),
                       trained_on=ms.trained_on, training={"data": ms.data, "seed": seed})
    result = train_sparse_fine_tuning(
        _first_then(ms.base, lambda: load_classifier(model_path, spec.labels, seed=seed)), kind="task",
        loss_fn=ms.loss, cfg=sft_cfg, metadata=meta, label=f"task {'+'.join(sources)}", log=log, runtime=runtime,
        phase1=phase1, stop_after_phase1=stop_after_phase1, stream_for=ms.stream_for)
    return result.sft


def train_subnetwork_model(model_path: str, tokenizer, sources: list[str],
                           lang_sfts: dict[str, SparseFineTuning | None], sub_cfg, *,
                           max_train_examples: int | None, model_id: str, data_source: str, max_length: int,
                           seed: int, log: Log, runtime: TrainingRuntime | None = None,
                           task: str = "nusax_senti", masks_cache: str | None = None):
    """A multi-source task model trained with language-specific subnetworks (``sub_cfg``: a
    ``SubnetworkConfig``; see :mod:`deftx.subnetworks`), each batch shifted by its language's SFT
    as in :func:`train_multi_source_task_sft`. Returns a ``SubnetworkModel`` (None off rank 0).
    ``masks_cache``: a directory where the probes' masks are kept under a digest of everything they
    depend on, so systems that differ only after the probes (dynamic, meta-learning) share them."""
    from deftx.subnetworks.artifact import load_masks, save_masks, subnetwork_model
    from deftx.subnetworks.train import train_subnetworks

    runtime = runtime or LocalRuntime()
    ms = _multi_source(model_path, tokenizer, sources, lang_sfts, max_train_examples,
                       data_source=data_source, max_length=max_length, seed=seed, task=task)
    spec = ms.spec
    cached_path = None
    initial = None
    if masks_cache and sub_cfg.mode != "none":
        probe = {k: asdict(sub_cfg)[k] for k in ("selection", "structured", "cover", "probe_steps",
                                                 "probe_learning_rate")}
        digest = config_digest({"fingerprint": ms.fingerprint, "sources": list(sources), "seed": seed,
                                "max_examples": max_train_examples, "batch": sub_cfg.train.batch_size,
                                "data": data_source, "max_length": max_length, "probe": probe, "task": task,
                                "lang_sfts": {lang: (s.metadata.training.get("config_digest") if s else None)
                                              for lang, s in lang_sfts.items() if lang in sources}})
        cached_path = Path(masks_cache) / f"probe-masks-{digest}.safetensors"
        if cached_path.is_file():
            initial = load_masks(cached_path)
    result = train_subnetworks(_first_then(ms.base, lambda: load_classifier(model_path, spec.labels, seed=seed)),
                               languages=list(sources), stream=ms.stream_for(sub_cfg.train.batch_size),
                               loss_fn=ms.loss, cfg=sub_cfg, seed=seed, label=f"subnetworks {'+'.join(sources)}",
                               log=log, runtime=runtime, initial_masks=initial)
    if runtime.rank != 0:
        return None
    if cached_path is not None and initial is None:
        save_masks(cached_path, result.initial_masks)
    meta = SFTMetadata(kind="task", task=spec.name, language="+".join(sources), method="subnetworks",
                       selection={"subnetworks": sub_cfg.summary()}, base_model=model_id,
                       base_fingerprint=ms.fingerprint, tokenizer=model_id, label_names=list(spec.labels),
                       trained_on=ms.trained_on,
                       training={"data": ms.data, "seed": seed, "phases": [p.as_dict() for p in result.phases]})
    return subnetwork_model(result, meta, {**sub_cfg.summary(), "related": dict(sub_cfg.related)})


# -- jobs: one unit of training each, as plain data, run by an executor -------------------------


JOB_KINDS = ("mlm_head", "language", "task")
HEAD_FILE, HEAD_INFO, JOB_INFO = "head.safetensors", "head.json", "job.json"
HEAD_FORMAT, JOB_FORMAT = "deftx-mlm-head", "deftx-job"
MLM_HEAD_OUTPUT = OutputKind("an MLM head directory", HEAD_INFO,
                             lambda doc: doc.get("format") == HEAD_FORMAT or {"digest", "steps"} <= set(doc))
JOB_MARKER_OUTPUT = OutputKind("a phase-1 job marker", JOB_INFO,
                               lambda doc: doc.get("format") == JOB_FORMAT or {"phase1_dir", "digest"} <= set(doc))


@dataclass
class SFTJob:
    """One unit of training (the shared MLM head, a language SFT or a task SFT) as plain data, so
    that it can travel to distributed workers. ``config`` is a ``PipelineConfig`` as a dict."""

    kind: str
    language: str
    config: dict[str, Any]
    digest: str
    head_path: str | None = None
    language_sft_path: str | None = None
    phase1_dir: str | None = None       # a Phase1Store to read phase 1 from, or to fill
    phase1_digest: str | None = None
    phase1_only: bool = False           # fill the store and stop (no SFT output)
    probe: dict[str, Any] | None = None  # language SFTs: {"every", "task_sft", "language", "split", "report_path"}
    sources: list[str] | None = None    # multi-source task SFT: the labelled languages it trains on
    source_sft_paths: dict[str, str] | None = None   # ... and the language SFT applied to each one's batches
    subnetworks: dict[str, Any] | None = None        # multi-source with subnetworks: a SubnetworkConfig as a dict
    masks_cache: str | None = None                   # ... and where probe masks are shared between such jobs

    def __post_init__(self) -> None:
        if self.kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {self.kind!r}; valid: {', '.join(JOB_KINDS)}")

    @property
    def name(self) -> str:
        if self.kind == "mlm_head":
            return "mlm-head"
        who = ("subnetworks-" if self.subnetworks is not None else "multi-") + "-".join(self.sources) \
            if self.sources else self.language
        return f"{self.kind}-{who}" + ("-phase1" if self.phase1_only else "")

    def pipeline_config(self) -> PipelineConfig:
        return from_dict(PipelineConfig, self.config)

    def subnetwork_config(self):
        from deftx.subnetworks.config import SubnetworkConfig

        return from_dict(SubnetworkConfig, self.subnetworks or {}, "subnetworks").validate()


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


def job_output_kind(job: SFTJob) -> OutputKind:
    """The kind of directory ``job`` leaves (what its executor may replace)."""
    from deftx.subnetworks.artifact import SUBNETWORK_OUTPUT

    if job.phase1_only:
        return JOB_MARKER_OUTPUT
    if job.kind == "mlm_head":
        return MLM_HEAD_OUTPUT
    return SUBNETWORK_OUTPUT if job.subnetworks is not None else SFT_OUTPUT


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


def pipeline_languages(cfg: PipelineConfig) -> list[str]:
    return [cfg.source_language] + [t for t in cfg.target_languages if t != cfg.source_language]


def head_languages(cfg: PipelineConfig) -> list[str]:
    """The languages whose text trains the shared MLM head: the pipeline's, or for AmericasNLI with
    its offline (multi-source) training the targets only (English text is only on the hub)."""
    langs = pipeline_languages(cfg)
    if cfg.data.dataset == "americasnli" and cfg.data.source != "hub":
        langs = [lang for lang in langs if lang != "eng"]
    return langs


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
                 for t in _capped(spec.text(lang, cfg.data.source), cfg.language_sft.max_train_examples)]
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


class Executor(Protocol):
    def prepare(self) -> None:
        """Check that jobs can run (e.g. reach the cluster) before any work is done."""

    def run(self, job: SFTJob, directory: Path, log: Log) -> None:
        """Run ``job`` and leave its output in ``directory``."""


class LocalExecutor:
    """Every job in this process (the single-process reference; no Ray, no DeepSpeed)."""

    def prepare(self) -> None:
        pass

    def run(self, job: SFTJob, directory: Path, log: Log) -> None:
        output = run_job(job, LocalRuntime(), log)
        assert output is not None
        output.save(directory)


def make_executor(cfg: PipelineConfig, log: Log = print) -> Executor:
    """The executor of ``cfg.cluster.backend``: Ray Train workers under DeepSpeed, or this process."""
    if cfg.cluster.backend == "local":
        return LocalExecutor()
    from deftx.ray_train import RayExecutor  # the only place the library reaches for Ray

    return RayExecutor(cfg.cluster, default_storage=Path(cfg.output_dir).resolve() / "ray", log=log)


@dataclass
class PipelineResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    method: str = ""
    output_dir: str = ""

    def table(self) -> str:
        lines = [f"NusaX-senti test macro-F1 (method {self.method}; source language task SFT, zero-shot)",
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
    """What :func:`train_pipeline_sfts` produced: directories, loaded SFTs and their digests."""

    output_dir: Path
    common: dict[str, Any]                       # what every digest includes (model, fingerprint, ...)
    head_dir: Path | None
    head_digest: str | None
    language: dict[str, SparseFineTuning] = field(default_factory=dict)
    task: SparseFineTuning | None = None
    task_dir: Path | None = None

    def language_dir(self, lang: str) -> Path:
        return self.output_dir / "sfts" / f"lang-{lang}"


def _common_digest_parts(cfg: PipelineConfig, model_path: str) -> tuple[dict[str, Any], bool]:
    probe, has_head = load_masked_lm(model_path, seed=cfg.seed)
    common = {"model": cfg.model.name_or_path, "base_fingerprint": current_base_fingerprint(probe),
              "max_length": cfg.model.max_length, "seed": cfg.seed, "data": cfg.data.source, "deftx": __version__}
    return common, has_head


def language_sft_digest(trained: TrainedSFTs, lang: str, sft_cfg: SFTConfig) -> str:
    return config_digest({**trained.common, "kind": "language", "lang": lang, "sft": asdict(sft_cfg),
                          "head": trained.head_digest})


def phase1_digest(trained: TrainedSFTs, kind: str, lang: str, sft_cfg: SFTConfig, extra: Any = None) -> str:
    """The digest of everything an SFT's warm-up and phase 1 depend on: not the selection, not phase 2."""
    parts = {k: v for k, v in asdict(sft_cfg).items() if k not in ("selection", "sparse")}
    return config_digest({**trained.common, "kind": f"{kind}-phase1", "lang": lang, "sft": parts,
                          "head": trained.head_digest, "extra": extra})


def train_pipeline_sfts(cfg: PipelineConfig, executor: Executor, languages: list[str], log: Log = print,
                        with_task: bool = True) -> TrainedSFTs:
    """Train (or reuse) the shared MLM head, the language SFTs of ``languages`` and the task SFT
    (on the source language, on top of its language SFT) with ``executor``. ``cfg`` must have
    absolute paths (:func:`absolute_paths`)."""
    out = Path(cfg.output_dir)
    model_path = resolve_model_path(cfg.model.name_or_path, log=log)
    common, has_head = _common_digest_parts(cfg, model_path)
    config = asdict(cfg)
    all_langs = head_languages(cfg)
    head_digest = config_digest({**common, "kind": "mlm-head", "languages": all_langs,
                                 "steps": cfg.language_sft.head_warmup_steps,
                                 "lr": cfg.language_sft.head_warmup_learning_rate,
                                 "max_examples": cfg.language_sft.max_train_examples,
                                 "batch": cfg.language_sft.full.batch_size, "mlm": cfg.language_sft.mlm_probability})
    head_dir: Path | None = None
    if not has_head and cfg.language_sft.head_warmup_steps > 0:
        head_dir = out / "mlm-head"
        problem = head_problem(head_dir, head_digest) if (head_dir / HEAD_INFO).exists() else "none yet"
        if problem is None:
            log(f"reusing {head_dir} (same settings)")
        else:
            if problem == "settings changed":
                log(f"{head_dir}: settings changed, retraining")
            elif problem != "none yet":
                log(f"{head_dir}: unusable ({problem}); retraining")
            log(f"== MLM head warm-up ({cfg.language_sft.head_warmup_steps} steps; shared by the language SFTs) ==")
            executor.run(SFTJob("mlm_head", cfg.source_language, config, head_digest), head_dir, log)
    trained = TrainedSFTs(out, common, head_dir, head_digest if head_dir is not None else None)
    for i, lang in enumerate(languages, 1):
        directory = trained.language_dir(lang)
        digest = language_sft_digest(trained, lang, cfg.language_sft)
        sft = _reuse(directory, digest, log)
        if sft is None:
            log(f"== language SFT {i}/{len(languages)}: {lang} ({task_spec(cfg.task).language_name(lang)}) ==")
            executor.run(SFTJob("language", lang, config, digest,
                                head_path=str(head_dir) if head_dir is not None else None), directory, log)
            sft = SparseFineTuning.load(directory)
            log(f"saved {directory} ({sft.nnz:,} entries)")
        trained.language[lang] = sft
    if not with_task:
        return trained

    directory = out / "sfts" / f"task-{cfg.task}"
    source_sft = trained.language[cfg.source_language]
    digest = config_digest({**common, "kind": "task", "source": cfg.source_language,
                            "lang_sft": source_sft.metadata.training.get("config_digest"),
                            "sft": asdict(cfg.task_sft)})
    task_sft = _reuse(directory, digest, log)
    if task_sft is None:
        log(f"== task SFT: {cfg.task} on {cfg.source_language} ==")
        executor.run(SFTJob("task", cfg.source_language, config, digest,
                            language_sft_path=str(trained.language_dir(cfg.source_language))), directory, log)
        task_sft = SparseFineTuning.load(directory)
        log(f"saved {directory} ({task_sft.nnz:,} entries)")
    trained.task, trained.task_dir = task_sft, directory
    return trained


def check_run_outputs(cfg: PipelineConfig, *more: str | Path | None) -> None:
    """Before any work: the output directory, the checkpoint storage and ``more`` are directories
    (or can be created) and writable; a one-line :class:`deftx.core.io.OutputError` otherwise. (The
    MLflow store is not checked: tracking turns itself off with a warning when it cannot write.)"""
    from deftx.core.io import check_output_location

    for path in (cfg.output_dir, cfg.cluster.storage_path, cfg.cluster.status_dir, *more):
        if path:
            check_output_location(path)


def start_run(cfg: PipelineConfig, log: Log, executor: Executor | None) -> tuple[PipelineConfig, Executor]:
    """Absolute paths, the output directory with the resolved config, a prepared executor."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_run_outputs(cfg)
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
    from deftx.tracking import Tracker

    started = time.perf_counter()
    cfg, executor = start_run(cfg, log, executor)
    out = Path(cfg.output_dir)
    tracker = Tracker(cfg.tracking.uri, enabled=cfg.tracking.enabled, log=log)
    experiment = cfg.experiment_name(f"pipeline-{out.name}")
    run = tracker.start_run(experiment, f"pipeline-{out.name}", params=asdict(cfg),
                            tags={"deftx.output_dir": str(out), "deftx.version": __version__})
    tracker.log_file(run, out / "config.json")
    try:
        result = _train_and_evaluate(cfg, executor, log, started, tracker, run, experiment)
    except BaseException as exc:
        tracker.end_run(run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end_run(run)
    return result


def _train_and_evaluate(cfg: PipelineConfig, executor: Executor, log: Log, started: float, tracker, run,
                        experiment: str) -> PipelineResult:
    from deftx.pipeline_tracking import log_sft
    from deftx.plots import close, language_bars
    from deftx.registry import PendingRegistration, Registry

    languages = pipeline_languages(cfg)
    trained = train_pipeline_sfts(cfg, executor, languages, log)
    lang_sfts, task_sft = trained.language, trained.task
    assert task_sft is not None and trained.task_dir is not None
    out = Path(cfg.output_dir)
    for lang in languages:
        log_sft(tracker, experiment, run, trained.language_dir(lang), f"lang-{lang}")
    log_sft(tracker, experiment, run, trained.task_dir, f"task-{cfg.task}")
    model_path = resolve_model_path(cfg.model.name_or_path, log=log)
    tokenizer = load_tokenizer(model_path)

    log("== zero-shot evaluation ==")
    spec = task_spec(cfg.task)
    scorer = ClassifierScorer(model_path, spec.labels, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                              max_length=cfg.model.max_length, tokenizer=tokenizer)
    result = PipelineResult(method=cfg.task_sft.selection.method, output_dir=str(out))
    valid_scores: dict[str, float] = {}
    for lang in languages:
        test = _capped(spec.evaluation(lang, "test", cfg.data.source), cfg.max_eval_examples)
        with scorer.composed(task_sft, lang_sfts[lang]):
            composed = scorer.score(test)
            if lang != cfg.source_language and cfg.tracking.enabled:
                valid_scores[lang] = scorer.score(spec.evaluation(lang, "valid", cfg.data.source))["macro_f1"]
        with scorer.composed(task_sft):
            alone = scorer.score(test)
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
                        title="NusaX-senti test macro-F1: task + language SFT (bars) vs task SFT only",
                        baseline={r["language"]: r["task_only_macro_f1"] for r in result.rows})
    tracker.log_figure(run, fig, "plots/f1-per-language.png")
    close(fig)
    tracker.log_file(run, out / "results.md")
    if cfg.tracking.enabled and cfg.tracking.register:
        registry = Registry(tracker)
        for lang, score in valid_scores.items():
            row = next(r for r in result.rows if r["language"] == lang)
            pending = PendingRegistration(
                experiment=experiment, run_name=f"register-{out.name}-{lang}", task=cfg.task, language=lang,
                task_sft=str(trained.task_dir), language_sft=str(trained.language_dir(lang)), score=score,
                objective="target_valid_macro_f1",
                params={"pipeline": out.name, "method": cfg.task_sft.selection.method},
                metrics={"target_valid_macro_f1": score, "test_macro_f1": row["macro_f1"],
                         "test_task_only_macro_f1": row["task_only_macro_f1"]},
                tags={"deftx.pipeline": str(out)})
            done = registry.submit(pending, output_dir=out, parent=run)
            if done is not None:
                log(f"registered {pending.task}-{lang}: composed v{done.composed_version}"
                    + (" (champion)" if done.champion else ""))
    return result
