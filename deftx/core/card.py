"""Model cards (``README.md``) for SFT directories and composed-model exports.

A card is what the Hugging Face Hub shows for a repository: YAML front matter (library, base model,
tags, language) and a Markdown body. It documents the SFT: kind, language or task, method and
selection settings, K, base model and fingerprint, and how to compose it. The card is generated
from ``sft.json``, which stays the source of truth; nothing reads the card back.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

CARD_FILE = "README.md"
PROVENANCE_NAME = "deftx_composition.json"   # written beside the card by deftx.core.compose
_LANG_CODE = re.compile(r"^[a-z]{2,3}$")


def _yaml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)   # a JSON string is a valid YAML scalar


def _front_matter(base_model: str, tags: list[str], languages: list[str]) -> list[str]:
    lines = ["---", "library_name: deftx"]
    if base_model and not base_model.startswith(("/", ".", "~", "offline:")):
        lines.append(f"base_model: {_yaml_str(base_model)}")   # a Hub id; a local path is not a link
    if languages:
        lines += ["language:"] + [f"- {lang}" for lang in languages]
    lines += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    return lines


def _languages(value: str | None) -> list[str]:
    return [c for c in (value or "").split("+") if _LANG_CODE.match(c)]


def sft_card(doc: Mapping[str, Any]) -> str:
    """The card of an SFT from its ``sft.json`` content (``doc``)."""
    kind = doc.get("kind", "?")
    method = doc.get("method", "?")
    subject = doc.get("language") if kind == "language" else doc.get("task")
    tensors = doc.get("tensors", {})
    total = sum(math.prod(int(s) for s in t.get("shape", [])) for t in tensors.values())
    nnz = int(doc.get("nnz", 0))
    tags = ["deftx", "sparse-fine-tuning", f"{kind}-sft", method.replace("_", "-")]
    out = _front_matter(doc.get("base_model", ""), tags, _languages(doc.get("language")))
    out += [f"# {kind.capitalize()} SFT: {subject or '?'}", "",
            f"A sparse fine-tuning (SFT) written by deftx {doc.get('deftx_version', '')}: a sparse difference "
            f"over the base model's encoder weights" + (" plus a dense classification head" if kind == "task"
                                                       else "") + ".", ""]
    rows = [("kind", kind), ("language", doc.get("language") or "-"), ("task", doc.get("task") or "-"),
            ("method", method), ("selection", _compact(doc.get("selection", {}))),
            ("K (changed entries)", f"{nnz:,} of {total:,} body entries ({100 * nnz / total:.3f}%)" if total
             else f"{nnz:,}"),
            ("head", ", ".join(f"{n} {'x'.join(map(str, h.get('shape', [])))}" for n, h in doc.get("head", {}).items())
             or "none"),
            ("base model", doc.get("base_model") or "-"), ("base fingerprint", doc.get("base_fingerprint") or "-"),
            ("labels", ", ".join(doc.get("label_names") or []) or "-"),
            ("trained on", _compact(doc.get("trained_on", {}))), ("training", _compact(doc.get("training", {}))),
            ("metrics", _compact(doc.get("metrics", {}))), ("created", doc.get("created") or "-")]
    out += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows] + [""]
    out += ["## How to use it", "",
            "The base model's weights must match the fingerprint above; deftx checks it when applying.", ""]
    if kind == "task":
        out += ["Zero-shot transfer to a target language: compose with that language's SFT "
                "(theta0 + phi_task + phi_language; the head comes from this task SFT):", "",
                "```python", "import deftx", "",
                "task = deftx.SparseFineTuning.from_pretrained(\"THIS_REPO\")",
                "lang = deftx.SparseFineTuning.from_pretrained(\"LANGUAGE_SFT_REPO\")",
                "path = deftx.resolve_model_path(task.metadata.base_model)",
                "model = deftx.load_classifier(path, task.metadata.label_names)",
                "with deftx.Composition(task, lang).applied(model):",
                "    ...  # model is now theta0 + phi_task + phi_language",
                "```", "", "or export the composition as a plain Hugging Face model:", "",
                "```", "deftx sft compose --task TASK_SFT_DIR --lang-sft LANGUAGE_SFT_DIR --output-dir composed/", "```", ""]
    else:
        out += ["Compose it with a task SFT trained on another language, to transfer that task to "
                f"{subject or 'this language'} (its masked-LM head is not used there):", "",
                "```", "deftx sft compose --task TASK_SFT_DIR --lang-sft THIS_SFT_DIR --output-dir composed/", "```", "",
                "or in Python: `deftx.Composition(task_sft, deftx.SparseFineTuning.from_pretrained(\"THIS_REPO\"))`.",
                ""]
    out += ["Files: `sft.json` (metadata, shapes, checksum) and `sft.safetensors` (indices and values); "
            "`deftx sft inspect DIR` prints them.", ""]
    return "\n".join(out)


def composed_card(provenance: Mapping[str, Any], labels: list[str] | None) -> str:
    """The card of a composed-model export (a plain Hugging Face classifier)."""
    comp = provenance.get("composition", {})
    task, lang = comp.get("task") or {}, comp.get("language") or {}
    target = lang.get("language")
    out = _front_matter(str(provenance.get("base_model", "")), ["deftx", "sparse-fine-tuning", "text-classification"],
                        _languages(target))
    out += ["# Composed model (deftx)", "",
            f"theta0 + phi_task ({task.get('task') or '?'}, trained on {task.get('language') or '?'})"
            + (f" + phi_language ({target})" if lang else " (no language SFT)")
            + ", written as a plain Hugging Face sequence classifier: "
              "`AutoModelForSequenceClassification.from_pretrained(DIR)` loads it without deftx.", "",
            f"- created by: {provenance.get('created_by', '-')}",
            f"- base model: {provenance.get('base_model') or '-'} ({provenance.get('base_fingerprint') or '-'})",
            f"- labels: {', '.join(labels or []) or '-'}",
            f"- task SFT: {task.get('method', '?')}, {task.get('nnz', 0):,} entries, from {comp.get('task_source') or '-'}",
            "- language SFT: " + (f"{lang.get('method', '?')}, {lang.get('nnz', 0):,} entries, from "
                                   f"{comp.get('language_source') or '-'}" if lang else "none"),
            "", f"Provenance in full: `{PROVENANCE_NAME}`.", ""]
    return "\n".join(out)


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if value else "-"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
