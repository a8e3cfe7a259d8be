"""The phase-1 result of an SFT, kept on disk so that runs differing only after phase 1 share it.

Phase 1 (and the head warm-up before it) does not depend on the selection (method, budget, rank
rule, residual, SVD target) nor on phase 2, so a sweep over those trains phase 1 once per language
and every trial starts at the selection: it reads theta1 from here instead of training again.

Contents: ``phase1.safetensors`` (theta1 of every maskable tensor, fp32) and, when a warm-up ran,
``head_start.safetensors`` (the head at the start of phase 1); ``head_end.safetensors`` (the head
after phase 1: with theta1 it is the fully fine-tuned model, the baseline of the experiments); ``phase1.json`` holds the digest of
everything phase 1 depends on (computed by the caller) and the results of the phases it replaces.
A store whose digest differs is never used. On a multi-node cluster the directory must be on storage
that every worker can read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deftx.core.io import OutputKind, atomic_directory, write_json
from deftx.errors import DeftxError

THETA1_FILE, HEAD_FILE, INFO_FILE = "phase1.safetensors", "head_start.safetensors", "phase1.json"
HEAD_END_FILE = "head_end.safetensors"
FORMAT_NAME = "deftx-phase1"
PHASE1_OUTPUT = OutputKind("a phase-1 store", INFO_FILE,
                           lambda doc: doc.get("format") == FORMAT_NAME or {"digest", "phases", "tensors"} <= set(doc))


@dataclass
class Phase1State:
    theta1: dict[str, torch.Tensor]                      # maskable tensors after phase 1
    head_start: dict[str, torch.Tensor] = field(default_factory=dict)  # head after the warm-up, if any
    phases: list[dict[str, Any]] = field(default_factory=list)         # warm-up and phase-1 results
    head_end: dict[str, torch.Tensor] = field(default_factory=dict)   # head after phase 1 (full fine-tuning)


class Phase1Store:
    """A directory holding one phase-1 result, valid for ``digest`` only."""

    def __init__(self, directory: str | Path, digest: str) -> None:
        self.directory = Path(directory)
        self.digest = digest

    def exists(self) -> bool:
        return self._stored_digest() == self.digest

    def _stored_digest(self) -> str | None:
        try:
            return json.loads((self.directory / INFO_FILE).read_text(encoding="utf-8")).get("digest")
        except (OSError, ValueError):
            return None

    def load(self) -> Phase1State | None:
        """The stored state, or None when there is none for this digest."""
        if not self.exists():
            return None
        from safetensors.torch import load_file

        try:
            info = json.loads((self.directory / INFO_FILE).read_text(encoding="utf-8"))
            theta1 = load_file(str(self.directory / THETA1_FILE))
            head_path = self.directory / HEAD_FILE
            head = load_file(str(head_path)) if head_path.is_file() else {}
            end_path = self.directory / HEAD_END_FILE
            head_end = load_file(str(end_path)) if end_path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise DeftxError(f"{self.directory}: unreadable phase-1 store ({exc}); delete it to retrain") from None
        return Phase1State(theta1=theta1, head_start=head, phases=info.get("phases", []), head_end=head_end)

    def save(self, state: Phase1State) -> None:
        from safetensors.torch import save_file

        with atomic_directory(self.directory, overwrite=True, kind=PHASE1_OUTPUT) as tmp:
            save_file({n: v.detach().float().contiguous() for n, v in state.theta1.items()}, str(tmp / THETA1_FILE))
            if state.head_start:
                save_file({n: v.detach().contiguous() for n, v in state.head_start.items()}, str(tmp / HEAD_FILE))
            if state.head_end:
                save_file({n: v.detach().contiguous() for n, v in state.head_end.items()}, str(tmp / HEAD_END_FILE))
            write_json(tmp / INFO_FILE, {"format": FORMAT_NAME, "digest": self.digest, "phases": state.phases,
                                         "tensors": len(state.theta1)})
