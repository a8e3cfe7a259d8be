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
from typing import Any

import torch

from deftx import __version__
from deftx.compose import Composition
from deftx.config import PipelineConfig, SFTConfig
from deftx.data import NUSAX_LABELS, NUSAX_LANGUAGE_NAMES, load_nusax_mt_text, load_nusax_senti
from deftx.errors import DeftxError
from deftx.evaluation import evaluate
from deftx.masks import embedding_parameter_names, parameter_roles
from deftx.models import load_classifier, load_masked_lm, load_tokenizer, resolve_model_path
from deftx.sft import SFTMetadata, SparseFineTuning, current_base_fingerprint, read_metadata
from deftx.training.batches import classification_stream, masked_lm_stream
from deftx.training.lt_sft import train_head_only, train_sparse_fine_tuning
from deftx.training.objectives import classification_loss, masked_lm_loss

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


def train_language_sft(model_path: str, tokenizer, lang: str, sft_cfg: SFTConfig, *, model_id: str,
                       data_source: str, max_length: int, seed: int, log: Log,
                       texts: list[str] | None = None,
                       head_init: dict[str, torch.Tensor] | None = None) -> SparseFineTuning:
    """A language SFT by masked LM on ``lang``'s NusaX-MT train text (or the given ``texts``).

    A base model without a pretrained MLM head gets its head from ``head_init`` (a shared warm-up,
    see :func:`warm_up_mlm_head`) or, failing that, a warm-up on ``lang``'s text alone."""
    texts = _capped(texts if texts is not None else load_nusax_mt_text(lang, data_source), sft_cfg.max_train_examples)
    model, has_head = load_masked_lm(model_path, seed=seed)
    fingerprint = current_base_fingerprint(model)
    head_source = "pretrained"
    if not has_head and head_init is not None:
        _load_head(model, head_init)
        head_source = "shared warm-up"
    elif not has_head:
        head_source = f"warm-up on {lang} ({sft_cfg.head_warmup_steps} steps)"
        log(f"[lang {lang}] the base model has no pretrained MLM head: training it for "
            f"{sft_cfg.head_warmup_steps} steps first")
    meta = SFTMetadata(kind="language", language=lang, method=sft_cfg.selection.method,
                       selection=sft_cfg.selection.hyperparameters(), base_model=model_id,
                       base_fingerprint=fingerprint, tokenizer=model_id,
                       training={"data": f"NusaX-MT train ({data_source})", "seed": seed,
                                 "mlm_probability": sft_cfg.mlm_probability,
                                 "mlm_head": head_source})
    result = train_sparse_fine_tuning(
        model, kind="language", loss_fn=masked_lm_loss, cfg=sft_cfg, metadata=meta,
        embedding_names=frozenset(embedding_parameter_names(model)), head_warmup=head_source.startswith("warm-up"),
        label=f"lang {lang}", log=log, stream_for=lambda bs: masked_lm_stream(
            tokenizer, texts, batch_size=bs, seed=seed, max_length=max_length,
            mlm_probability=sft_cfg.mlm_probability))
    return result.sft


def _load_head(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = parameter_roles(model, "language").head
    if set(params) != set(values):
        raise DeftxError(f"MLM head tensors {sorted(values)} do not match the model's {sorted(params)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])


def warm_up_mlm_head(model: torch.nn.Module, tokenizer, texts: list[str], sft_cfg: SFTConfig, *,
                     max_length: int, seed: int, directory: Path, digest: str, log: Log) -> dict[str, torch.Tensor]:
    """Train the freshly initialised MLM head of ``model`` (a base model released without one,
    decoder untied) once, on ``texts`` (all the pipeline's languages), and cache it in
    ``directory`` under ``digest``; every language SFT then starts from this head."""
    from safetensors.torch import load_file, save_file

    from deftx.io import atomic_directory, write_json

    marker = directory / "head.json"
    try:
        if json.loads(marker.read_text()).get("digest") == digest:
            values = load_file(str(directory / "head.safetensors"))
            log(f"reusing {directory} (same settings)")
            return values
    except (OSError, ValueError, RuntimeError):
        pass  # no usable cache: train
    log(f"== MLM head warm-up: the base model has no pretrained MLM head; training it alone for "
        f"{sft_cfg.head_warmup_steps} steps on {len(texts)} sentences ==")
    roles = parameter_roles(model, "language")
    stream = masked_lm_stream(tokenizer, texts, batch_size=sft_cfg.full.batch_size, seed=seed,
                              max_length=max_length, mlm_probability=sft_cfg.mlm_probability)
    phase = train_head_only(model, roles.maskable, roles.head, stream, masked_lm_loss,
                            steps=sft_cfg.head_warmup_steps, learning_rate=sft_cfg.head_warmup_learning_rate,
                            label="mlm", log=log)
    values = {n: p.detach().clone().contiguous() for n, p in roles.head.items()}
    with atomic_directory(directory, overwrite=True) as tmp:
        save_file(values, str(tmp / "head.safetensors"))
        write_json(tmp / "head.json", {"digest": digest, "steps": phase.steps, "final_loss": phase.final_loss,
                                       "sentences": len(texts)})
    return values


def train_task_sft(model_path: str, tokenizer, source_lang: str, lang_sft: SparseFineTuning | None,
                   sft_cfg: SFTConfig, *, model_id: str, data_source: str, max_length: int, seed: int,
                   log: Log, eval_batch_size: int = 64) -> SparseFineTuning:
    """A NusaX sentiment task SFT on ``source_lang``, trained on theta0 + ``lang_sft``."""
    train = _capped(load_nusax_senti(source_lang, "train", data_source), sft_cfg.max_train_examples)
    model = load_classifier(model_path, NUSAX_LABELS, seed=seed)
    fingerprint = current_base_fingerprint(model)
    trained_on: dict[str, Any] = {}
    if lang_sft is not None:
        lang_sft.apply(model, with_head=False)
        trained_on = {"language_sft": lang_sft.metadata.language, "language_sft_nnz": lang_sft.nnz,
                      "language_sft_source": lang_sft.source}
    meta = SFTMetadata(kind="task", task="nusax_senti", language=source_lang, method=sft_cfg.selection.method,
                       selection=sft_cfg.selection.hyperparameters(), base_model=model_id,
                       base_fingerprint=fingerprint, tokenizer=model_id, label_names=list(NUSAX_LABELS),
                       trained_on=trained_on,
                       training={"data": f"NusaX-senti {source_lang} train ({data_source})", "seed": seed})
    result = train_sparse_fine_tuning(
        model, kind="task", loss_fn=classification_loss, cfg=sft_cfg, metadata=meta,
        embedding_names=frozenset(embedding_parameter_names(model)), label=f"task {source_lang}", log=log,
        stream_for=lambda bs: classification_stream(tokenizer, train, batch_size=bs, seed=seed,
                                                    max_length=max_length))
    valid = load_nusax_senti(source_lang, "valid", data_source)
    result.sft.metadata.metrics["source_valid"] = evaluate(model, tokenizer, valid, len(NUSAX_LABELS),
                                                           batch_size=eval_batch_size, max_length=max_length)
    return result.sft


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


def run_pipeline(cfg: PipelineConfig, log: Log = print) -> PipelineResult:
    """Train (or reuse) every SFT of the pipeline, then evaluate the compositions."""
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
    model_path = resolve_model_path(cfg.model.name_or_path, log=log)
    tokenizer = load_tokenizer(model_path)
    probe, has_head = load_masked_lm(model_path, seed=cfg.seed)
    common = {"model": cfg.model.name_or_path, "base_fingerprint": current_base_fingerprint(probe),
              "max_length": cfg.model.max_length, "seed": cfg.seed, "data": cfg.data.source, "deftx": __version__}

    languages = [cfg.source_language] + [t for t in cfg.target_languages if t != cfg.source_language]
    texts = {lang: _capped(load_nusax_mt_text(lang, cfg.data.source), cfg.language_sft.max_train_examples)
             for lang in languages}
    head_digest = config_digest({**common, "kind": "mlm-head", "languages": languages,
                                 "steps": cfg.language_sft.head_warmup_steps,
                                 "lr": cfg.language_sft.head_warmup_learning_rate,
                                 "batch": cfg.language_sft.full.batch_size, "mlm": cfg.language_sft.mlm_probability})
    head = None
    if not has_head and cfg.language_sft.head_warmup_steps > 0:
        head = warm_up_mlm_head(probe, tokenizer, [t for lang in languages for t in texts[lang]], cfg.language_sft,
                                max_length=cfg.model.max_length, seed=cfg.seed, directory=out / "mlm-head",
                                digest=head_digest, log=log)
    del probe
    lang_sfts: dict[str, SparseFineTuning] = {}
    for i, lang in enumerate(languages, 1):
        directory = out / "sfts" / f"lang-{lang}"
        digest = config_digest({**common, "kind": "language", "lang": lang, "sft": asdict(cfg.language_sft),
                                "head": head_digest if head is not None else None})
        sft = _reuse(directory, digest, log)
        if sft is None:
            log(f"== language SFT {i}/{len(languages)}: {lang} ({NUSAX_LANGUAGE_NAMES[lang]}) ==")
            sft = train_language_sft(model_path, tokenizer, lang, cfg.language_sft, model_id=cfg.model.name_or_path,
                                     data_source=cfg.data.source, max_length=cfg.model.max_length,
                                     seed=cfg.seed, log=log, texts=texts[lang], head_init=head)
            sft.metadata.training["config_digest"] = digest
            sft.save(directory, overwrite=True)
            log(f"saved {directory} ({sft.nnz:,} entries)")
        lang_sfts[lang] = sft

    directory = out / "sfts" / f"task-{cfg.task}"
    digest = config_digest({**common, "kind": "task", "source": cfg.source_language,
                            "lang_sft": lang_sfts[cfg.source_language].metadata.training.get("config_digest"),
                            "sft": asdict(cfg.task_sft)})
    task_sft = _reuse(directory, digest, log)
    if task_sft is None:
        log(f"== task SFT: {cfg.task} on {cfg.source_language} ==")
        task_sft = train_task_sft(model_path, tokenizer, cfg.source_language, lang_sfts[cfg.source_language],
                                  cfg.task_sft, model_id=cfg.model.name_or_path, data_source=cfg.data.source,
                                  max_length=cfg.model.max_length, seed=cfg.seed, log=log,
                                  eval_batch_size=cfg.eval_batch_size)
        task_sft.metadata.training["config_digest"] = digest
        task_sft.save(directory, overwrite=True)
        log(f"saved {directory} ({task_sft.nnz:,} entries)")

    log("== zero-shot evaluation ==")
    classifier = load_classifier(model_path, NUSAX_LABELS, seed=cfg.seed)
    result = PipelineResult(method=cfg.task_sft.selection.method, output_dir=str(out))
    for lang in languages:
        test = _capped(load_nusax_senti(lang, "test", cfg.data.source), cfg.max_eval_examples)
        kwargs = dict(batch_size=cfg.eval_batch_size, max_length=cfg.model.max_length)
        with Composition(task_sft, lang_sfts[lang]).applied(classifier):
            composed = evaluate(classifier, tokenizer, test, len(NUSAX_LABELS), **kwargs)
        with Composition(task_sft).applied(classifier):
            alone = evaluate(classifier, tokenizer, test, len(NUSAX_LABELS), **kwargs)
        role = "source" if lang == cfg.source_language else "target"
        result.rows.append({"language": lang, "name": NUSAX_LANGUAGE_NAMES[lang], "role": role,
                            "macro_f1": composed["macro_f1"], "accuracy": composed["accuracy"],
                            "task_only_macro_f1": alone["macro_f1"], "n": composed["n"]})
        log(f"[eval {lang}] macro-F1 {100 * composed['macro_f1']:.1f} with language SFT, "
            f"{100 * alone['macro_f1']:.1f} task SFT only")
    result.seconds = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(result.table() + f"\n\nwall time {result.seconds:.0f} s\n", encoding="utf-8")
    return result
