"""The composed zero-shot model (theta0 + phi_task + phi_lang) as a predictor, and as an MLflow
pyfunc model whose code is the installed deftx package.

A registered composed model is a directory of data only::

    MLmodel                       python_function flavor, loader_module: deftx.mlflow_model
    data/sfts/task_sft/           the task SFT (sft.safetensors + sft.json)
    data/sfts/language_sft/       the target language's SFT

``mlflow.pyfunc.load_model("models:/deftx-nusax_senti-jav@champion")`` imports *this module by
name* from the Python environment and calls :func:`_load_pyfunc`; no code is stored with the model
(versions registered by earlier deftx releases stored a copy of this module among their files;
deftx itself never runs it, see :func:`deftx.tracking.registry.composed_sft_dirs`). The base model is not
stored either: it is loaded from the id recorded in the task SFT (``DEFTX_BASE_MODEL`` overrides
it) and must match the SFTs' base fingerprint.

Trust: ``mlflow.pyfunc.load_model`` does what the downloaded ``MLmodel`` file says, and whoever can
write the store can change that file. deftx's own lookups (``deftx predict``, ``deftx registry
get``, :func:`deftx.tracking.registry.load_model`) read ``MLmodel`` as plain YAML, load only the two SFT
directories (safetensors + JSON, checksummed) and build the predictor from the installed deftx.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DATA_DIR = "sfts"                       # the data_path saved with the pyfunc model
TASK_ARTIFACT, LANGUAGE_ARTIFACT = "task_sft", "language_sft"
BASE_OVERRIDE_ENV = "DEFTX_BASE_MODEL"
LOADER_MODULE = __name__


def texts_of(model_input: Any) -> list[str]:
    """A list of strings from what pyfunc callers pass: a list/tuple, a string, a pandas Series,
    or a DataFrame (its ``text`` column, else its first column)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - mlflow depends on pandas
        pd = None
    if isinstance(model_input, str):
        return [model_input]
    if pd is not None and isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column].tolist()]
    if pd is not None and isinstance(model_input, pd.Series):
        return [str(t) for t in model_input.tolist()]
    if isinstance(model_input, (list, tuple)):
        return [str(t) for t in model_input]
    raise TypeError(f"expected texts (a list of strings, a Series or a DataFrame), got {type(model_input).__name__}")


class ComposedPredictor:
    """theta0 + phi_task (+ head) + phi_lang on the base model named in the task SFT, predicting
    label names. Built from SFT directories (data), never from stored code."""

    def __init__(self, task_dir: str | Path, language_dir: str | Path | None = None,
                 base_model: str | None = None) -> None:
        from deftx.core.compose import Composition
        from deftx.core.sft import SparseFineTuning
        from deftx.errors import SFTFormatError
        from deftx.models import load_classifier, load_tokenizer, resolve_model_path

        task = SparseFineTuning.load(task_dir)
        language = SparseFineTuning.load(language_dir) if language_dir is not None else None
        self.composition = Composition(task, language)
        self.labels = list(task.metadata.label_names or [])
        if not self.labels:
            raise SFTFormatError(f"{task_dir}: the task SFT records no label names")
        base = base_model or os.environ.get(BASE_OVERRIDE_ENV) or task.metadata.base_model
        if not base:
            raise SFTFormatError(f"{task_dir}: the task SFT records no base model (set {BASE_OVERRIDE_ENV})")
        path = resolve_model_path(base, log=lambda line: None)
        self.tokenizer = load_tokenizer(path)
        self.model = load_classifier(path, self.labels)
        self.composition.apply(self.model)   # checks the base fingerprint
        self.model.eval()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from deftx.data.examples import Example
        from deftx.evaluation import predict

        texts = texts_of(model_input)
        examples = [Example(text=t, label=0) for t in texts]
        preds = predict(self.model, self.tokenizer, examples, max_length=int((params or {}).get("max_length", 128)))
        return [self.labels[p] for p in preds]


def _load_pyfunc(data_path: str) -> ComposedPredictor:
    """MLflow's entry point for ``loader_module`` models: ``data_path`` is the model's data folder."""
    root = Path(data_path)
    language = root / LANGUAGE_ARTIFACT
    return ComposedPredictor(root / TASK_ARTIFACT, language if language.is_dir() else None)
