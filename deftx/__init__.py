"""deftx: composable sparse fine-tuning (LT-SFT and DeFT-X) for zero-shot cross-lingual transfer.

The public Python API (everything below is importable as ``deftx.NAME``; each name is loaded on
first use, so ``import deftx`` stays light and the core never imports Ray):

    SparseFineTuning, SFTMetadata, SparseDelta     an SFT artifact (load, save, apply, revert)
    Composition, export_hf_model                    theta0 + phi_task + phi_lang, and its HF export
    select_masks, global_top_k                      LT-SFT / DeFT-X mask selection, exact global top-K
    PipelineConfig, SFTConfig, SelectionConfig,     validated configuration
    load_pipeline_config
    resolve_model_path, load_classifier,            base models and tokenizers
    load_masked_lm, load_tokenizer
    run_pipeline, train_language, train_task        the main job, and one language or task SFT
    load_model                                      a registered composed model (MLflow registry)
    DeftxError, ConfigError                         the errors deftx raises for bad input

Compose two trained SFTs (the README's main job leaves them under ``runs/demo/sfts/``) and score a
sentence::

    import torch
    import deftx

    task = deftx.SparseFineTuning.load("runs/demo/sfts/task-nusax_senti")
    lang = deftx.SparseFineTuning.load("runs/demo/sfts/lang-jav")
    path = deftx.resolve_model_path(task.metadata.base_model)
    model, tokenizer = deftx.load_classifier(path, task.metadata.label_names), deftx.load_tokenizer(path)
    with deftx.Composition(task, lang).applied(model), torch.no_grad():   # theta0 + phi_task + phi_jav
        logits = model(**tokenizer(["Aku seneng banget karo layanan iki"], return_tensors="pt")).logits
    print(task.metadata.label_names[int(logits.argmax())])

``tests/test_public_api.py`` runs this example on tiny SFTs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "SparseFineTuning": "deftx.core.sft", "SFTMetadata": "deftx.core.sft", "SparseDelta": "deftx.core.sft",
    "Composition": "deftx.core.compose", "export_hf_model": "deftx.core.compose",
    "select_masks": "deftx.core.scoring", "global_top_k": "deftx.core.topk",
    "PipelineConfig": "deftx.config", "SFTConfig": "deftx.config", "SelectionConfig": "deftx.config",
    "load_pipeline_config": "deftx.config",
    "resolve_model_path": "deftx.models", "load_classifier": "deftx.models", "load_masked_lm": "deftx.models",
    "load_tokenizer": "deftx.models",
    "run_pipeline": "deftx.workflows.pipeline", "train_language": "deftx.workflows.single",
    "train_task": "deftx.workflows.single",
    "load_model": "deftx.tracking.registry",
    "DeftxError": "deftx.errors", "ConfigError": "deftx.errors",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deftx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
