"""What makes runs resumable: digests of everything that determines a result, and the reuse of a
finished SFT whose recorded digest matches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from deftx.core.sft import SparseFineTuning, read_metadata
from deftx.errors import DeftxError
from deftx.jobs.spec import Log


def config_digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reuse_sft(directory: Path, digest: str, log: Log) -> SparseFineTuning | None:
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

