"""The composed SFT as an MLflow pyfunc model: ``mlflow.pyfunc.load_model("models:/deftx-nusax_senti-jav@champion")``
returns a model whose ``predict`` maps a list of texts (or a DataFrame/Series of them) to label names.

The model directory holds the task SFT and the language SFT as artifacts (a few MB each), not the
base model: ``load_context`` loads the base named in the task SFT (a hub id, ``offline:...`` or a
local path; ``DEFTX_BASE_MODEL`` overrides it), checks its fingerprint against the SFTs, and
applies theta0 + phi_task + phi_lang once.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow.models
import mlflow.pyfunc

TASK_ARTIFACT, LANGUAGE_ARTIFACT = "task_sft", "language_sft"
BASE_OVERRIDE_ENV = "DEFTX_BASE_MODEL"


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


class ComposedSFTModel(mlflow.pyfunc.PythonModel):
    """theta0 + phi_task + phi_lang, predicting label names."""

    def load_context(self, context) -> None:
        from deftx.compose import Composition
        from deftx.models import load_classifier, load_tokenizer, resolve_model_path
        from deftx.sft import SparseFineTuning

        task = SparseFineTuning.load(context.artifacts[TASK_ARTIFACT])
        language_dir = context.artifacts.get(LANGUAGE_ARTIFACT)
        language = SparseFineTuning.load(language_dir) if language_dir else None
        self.composition = Composition(task, language)
        self.labels = list(task.metadata.label_names or [])
        base = os.environ.get(BASE_OVERRIDE_ENV) or task.metadata.base_model
        path = resolve_model_path(base, log=lambda line: None)
        self.tokenizer = load_tokenizer(path)
        self.model = load_classifier(path, self.labels)
        self.composition.apply(self.model)   # checks the base fingerprint
        self.model.eval()

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from deftx.data.examples import Example
        from deftx.evaluation import predict

        texts = texts_of(model_input)
        examples = [Example(text=t, label=0) for t in texts]
        preds = predict(self.model, self.tokenizer, examples, max_length=int((params or {}).get("max_length", 128)))
        return [self.labels[p] for p in preds]


# models-from-code: MLflow executes this file to build the model it loads (nothing is unpickled)
mlflow.models.set_model(ComposedSFTModel())
