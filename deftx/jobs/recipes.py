"""The training recipes a job runs: language SFTs (masked LM), the shared MLM head warm-up, task
SFTs on top of a language SFT, multi-source task SFTs and subnetwork models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deftx.config import SFTConfig
from deftx.core.roles import parameter_roles
from deftx.core.sft import SFTMetadata, SparseFineTuning, current_base_fingerprint
from deftx.errors import DeftxError
from deftx.evaluation import ClassifierScorer
from deftx.jobs.cache import key_of, probe_masks_key
from deftx.jobs.spec import Log, capped
from deftx.models import load_classifier, load_masked_lm
from deftx.subnetworks.artifact import load_masks, save_masks, subnetwork_model
from deftx.subnetworks.train import train_subnetworks
from deftx.tasks import TaskSpec, task_spec
from deftx.training.batches import classification_stream, masked_lm_stream
from deftx.training.head_init import initialise_mlm_head
from deftx.training.lt_sft import train_head_only, train_sparse_fine_tuning
from deftx.training.multi_source import MultiSourceStream, multi_source_loss
from deftx.training.objectives import classification_loss, masked_lm_loss
from deftx.training.phase import PhaseResult
from deftx.training.phase1_store import Phase1Store
from deftx.training.runtime import LocalRuntime, TrainingRuntime


def _start_model_builder(model_path: str, seed: int, head: dict[str, torch.Tensor] | None):
    """A function building the masked-LM model at a language SFT's start weights."""
    def build() -> torch.nn.Module:
        model, _ = load_masked_lm(model_path, seed=seed)
        if head is not None:
            set_mlm_head(model, head)
        return model

    return build


def train_language_sft(model_path: str, tokenizer, lang: str, sft_cfg: SFTConfig, *, model_id: str,
                       data_source: str, max_length: int, seed: int, log: Log,
                       texts: list[str] | None = None,
                       head_init: dict[str, torch.Tensor] | None = None,
                       runtime: TrainingRuntime | None = None, phase1: Phase1Store | None = None,
                       stop_after_phase1: bool = False, task: str | TaskSpec = "nusax_senti") -> SparseFineTuning | None:
    """A language SFT by masked LM on ``lang``'s unlabelled text of ``task`` (NusaX-MT train
    sentences, AmericasNLP text; see :mod:`deftx.tasks`) or the given ``texts``.

    A base model without a pretrained MLM head gets its head from ``head_init`` (a shared warm-up,
    see :func:`warm_up_mlm_head`) or, failing that, a warm-up on ``lang``'s text alone.
    Returns None on the ranks of a distributed runtime other than 0, and with ``stop_after_phase1``
    (which only fills ``phase1``)."""
    spec = task_spec(task)
    if texts is None:
        texts = spec.adaptation_text(lang, data_source, sft_cfg)
    else:
        texts = capped(texts, sft_cfg.max_train_examples)
    model, has_head = load_masked_lm(model_path, seed=seed)
    if head_init is not None:
        set_mlm_head(model, head_init)
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


def set_mlm_head(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy a saved MLM head (:func:`warm_up_mlm_head`'s values) into ``model``'s head parameters."""
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
    starts from this head. Its output bias first starts as ``sft_cfg.head_bias_init`` says
    (:func:`deftx.training.head_init.initialise_mlm_head`)."""
    runtime = runtime or LocalRuntime()
    runtime.log(f"== MLM head warm-up: the base model has no pretrained MLM head; training it alone for "
                f"{sft_cfg.head_warmup_steps} steps on {len(texts)} sentences ==", log)
    roles = parameter_roles(model, "language")
    stream = masked_lm_stream(tokenizer, texts, batch_size=sft_cfg.full.batch_size, seed=seed,
                              max_length=max_length, mlm_probability=sft_cfg.mlm_probability)
    initialise_mlm_head(model, stream, sft_cfg.head_bias_init)
    phase, values = train_head_only(model, roles.maskable, roles.head, stream, masked_lm_loss,
                                    steps=sft_cfg.head_warmup_steps,
                                    learning_rate=sft_cfg.head_warmup_learning_rate, label="mlm", log=log,
                                    runtime=runtime)
    return values, phase


def train_task_sft(model_path: str, tokenizer, source_lang: str, lang_sft: SparseFineTuning | None,
                   sft_cfg: SFTConfig, *, model_id: str, data_source: str, max_length: int, seed: int,
                   log: Log, eval_batch_size: int = 64,
                   runtime: TrainingRuntime | None = None, phase1: Phase1Store | None = None,
                   stop_after_phase1: bool = False, task: str | TaskSpec = "nusax_senti") -> SparseFineTuning | None:
    """A task SFT (``task``: NusaX sentiment by default) on ``source_lang``'s labelled data, trained
    on theta0 + ``lang_sft``, with its scores on the source validation split (theta0 + lang_sft +
    task SFT) in its metrics.
    Returns None on the ranks of a distributed runtime other than 0."""
    spec = task_spec(task)
    train = capped(spec.train(source_lang, data_source), sft_cfg.max_train_examples)
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
    if not spec.has(source_lang, "valid"):
        log(f"[task {source_lang}] no validation data: the SFT records no source_valid score")
        return result.sft
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
                  task: str | TaskSpec) -> _MultiSource:

    if not sources:
        raise ValueError("multi-source training needs at least one source language")
    spec = task_spec(task)
    train = {lang: capped(spec.train(lang, data_source), max_train_examples) for lang in sources}
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
                                stop_after_phase1: bool = False, task: str | TaskSpec = "nusax_senti") -> SparseFineTuning | None:
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
                           task: str | TaskSpec = "nusax_senti", masks_cache: str | None = None):
    """A multi-source task model trained with language-specific subnetworks (``sub_cfg``: a
    ``SubnetworkConfig``; see :mod:`deftx.subnetworks`), each batch shifted by its language's SFT
    as in :func:`train_multi_source_task_sft`. Returns a ``SubnetworkModel`` (None off rank 0).
    ``masks_cache``: a directory where the probes' masks are kept under a digest of everything they
    depend on, so systems that differ only after the probes (dynamic, meta-learning) share them."""

    runtime = runtime or LocalRuntime()
    ms = _multi_source(model_path, tokenizer, sources, lang_sfts, max_train_examples,
                       data_source=data_source, max_length=max_length, seed=seed, task=task)
    spec = ms.spec
    cached_path = None
    initial = None
    if masks_cache and sub_cfg.mode != "none":
        probe = {k: asdict(sub_cfg)[k] for k in ("selection", "structured", "cover", "probe_steps",
                                                 "probe_learning_rate")}
        digest = probe_masks_key({"fingerprint": ms.fingerprint, "sources": list(sources), "seed": seed,
                                  "max_examples": max_train_examples, "batch": sub_cfg.train.batch_size,
                                  "data": data_source, "max_length": max_length, "probe": probe, "task": task,
                                  "lang_sfts": {lang: (key_of(s) if s else None)
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

