"""The shared MLM head a warm-up job leaves: its tensors, its info and their integrity check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deftx.core.io import OutputKind, atomic_directory, sha256_file, write_json
from deftx.errors import DeftxError

HEAD_FILE, HEAD_INFO = "head.safetensors", "head.json"
HEAD_FORMAT = "deftx-mlm-head"
MLM_HEAD_OUTPUT = OutputKind("an MLM head directory", HEAD_INFO,
                             lambda doc: doc.get("format") == HEAD_FORMAT or {"digest", "steps"} <= set(doc))


def save_head(directory: Path, values: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Save ``values`` with ``info`` (its key under ``digest``) and the tensors' checksum, atomically."""
    with atomic_directory(directory, overwrite=True, kind=MLM_HEAD_OUTPUT) as tmp:
        save_file(values, str(tmp / HEAD_FILE))
        write_json(tmp / HEAD_INFO, {"format": HEAD_FORMAT, **info, "sha256": sha256_file(tmp / HEAD_FILE)})


def load_head(directory: str | Path) -> dict[str, torch.Tensor]:
    """The MLM head saved in ``directory``, verified against the checksum in its ``head.json``."""
    directory = Path(directory)
    problem = head_problem(directory)
    if problem is not None:
        raise DeftxError(f"{directory}: {problem}")
    try:
        return load_file(str(directory / HEAD_FILE))
    except Exception as exc:  # safetensors raises several types for a bad file
        raise DeftxError(f"{directory / HEAD_FILE}: not a readable safetensors file ({exc})") from None


def head_problem(directory: Path, key: str | None = None) -> str | None:
    """Why the MLM head in ``directory`` cannot be used (for ``key``, if given), or None."""
    try:
        info = json.loads((directory / HEAD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"no readable {HEAD_INFO} ({type(exc).__name__})"
    if not isinstance(info, dict):
        return f"{HEAD_INFO} is not an object"
    if key is not None and info.get("digest") != key:
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
