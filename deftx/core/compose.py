"""Composition of a task SFT (with its head) and a language SFT (without its head), and export of
the composed model as a standalone Hugging Face directory.

Zero-shot transfer to language t: theta0 + phi_task + phi_lang(t), with the classifier head from
the task SFT. Applying a composition applies its parts one after the other (task, then language)
and reverting undoes them in reverse order, so both are exact; the composed weights equal
applying the two SFTs by hand in the same order.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from deftx import __version__
from deftx.core.card import CARD_FILE, PROVENANCE_NAME, composed_card
from deftx.core.io import OutputKind, atomic_directory
from deftx.core.sft import SparseFineTuning
from deftx.errors import SFTFormatError

PROVENANCE_FILE = PROVENANCE_NAME
COMPOSED_OUTPUT = OutputKind("a composed model directory", PROVENANCE_FILE,
                             lambda doc: str(doc.get("created_by", "")).startswith("deftx "))


class Composition:
    """theta0 + phi_task (+ head) + phi_language."""

    def __init__(self, task: SparseFineTuning, language: SparseFineTuning | None = None) -> None:
        if task.metadata.kind != "task":
            raise SFTFormatError(f"{task.source or 'task SFT'}: expected a task SFT, got a {task.metadata.kind} SFT")
        if language is not None:
            if language.metadata.kind != "language":
                raise SFTFormatError(f"{language.source or 'language SFT'}: expected a language SFT, "
                                     f"got a {language.metadata.kind} SFT")
            a, b = task.metadata.base_fingerprint, language.metadata.base_fingerprint
            if a and b and a != b:
                raise SFTFormatError(f"{language.source or 'language SFT'}: trained on a different base model "
                                     f"than the task SFT {task.source or ''} ({b[:19]}... vs {a[:19]}...)")
        self.task = task
        self.language = language

    @property
    def parts(self) -> list[tuple[SparseFineTuning, bool]]:
        parts = [(self.task, True)]
        if self.language is not None:
            parts.append((self.language, False))
        return parts

    @property
    def label_names(self) -> list[str] | None:
        return self.task.metadata.label_names

    def apply(self, model: nn.Module) -> None:
        done: list[SparseFineTuning] = []
        try:
            for sft, with_head in self.parts:
                sft.apply(model, with_head=with_head)
                done.append(sft)
        except BaseException:
            for sft in reversed(done):
                sft.revert(model)
            raise

    def revert(self, model: nn.Module) -> None:
        for sft, _ in reversed(self.parts):
            sft.revert(model)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        self.apply(model)
        try:
            yield model
        finally:
            self.revert(model)

    def describe(self) -> dict:
        out = {"task": self.task.summary(), "task_source": self.task.source}
        if self.language is not None:
            out.update(language=self.language.summary(), language_source=self.language.source)
        return out


def export_hf_model(composition: Composition, model: nn.Module, tokenizer, directory: str | Path,
                    overwrite: bool = False) -> Path:
    """Write theta0 + phi_task + phi_lang as a plain Hugging Face model directory (weights, config
    with label names, tokenizer) that ``AutoModelForSequenceClassification.from_pretrained`` loads
    without deftx. ``model`` must be a classifier built on the SFTs' base model. Atomic."""
    labels = composition.label_names
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    directory = Path(directory)
    with composition.applied(model), atomic_directory(directory, overwrite=overwrite, kind=COMPOSED_OUTPUT) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {"created_by": f"deftx {__version__}", "composition": composition.describe(),
                      "base_model": composition.task.metadata.base_model,
                      "base_fingerprint": composition.task.metadata.base_fingerprint}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(composed_card(provenance, labels), encoding="utf-8")
    return directory
