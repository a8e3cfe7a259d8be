"""What makes runs resumable, in one place: the key of a job (a digest of everything that changes
its result, derived from the typed job alone), the decision to reuse a finished output, and the
keys of the other caches (probe masks, evaluation scores).

A job's key covers its kind, its languages, the base model (name, fingerprint, maximum length),
the seed, the data and task, the settings of the SFT it trains and the exact artifacts it starts
from (by their checksums, not their paths), and the deftx version. It leaves out what only says
where or how work runs: output and store directories, the cluster, tracking, threads, evaluation
batch sizes, probes. A phase-1-only job's key leaves out the selection and phase 2 as well, so every
selection shares one phase 1.

``tests/test_cache_keys.py`` changes every field of every kind of job, one at a time, and checks
that the key changes exactly when the field is one that changes the result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from deftx import __version__
from deftx.config import PipelineConfig, SFTConfig
from deftx.core.io import sha256_file
from deftx.core.sft import SparseFineTuning, current_base_fingerprint, read_metadata
from deftx.errors import DeftxError
from deftx.jobs.head import HEAD_INFO, head_problem
from deftx.jobs.spec import (
    HeadJob,
    Job,
    LanguageJob,
    Log,
    MultiSourceJob,
    Phase1,
    SubnetworkJob,
    TaskJob,
    head_languages,
)
from deftx.models import load_masked_lm
from deftx.subnetworks.artifact import SubnetworkModel

KEY_FIELD = "config_digest"    # where an SFT's metadata (training) and a head's info record their key


def digest(parts: Any) -> str:
    """A short, stable digest of JSON-able ``parts`` (16 hex digits)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- job keys ---------------------------------------------------------------------------------------


def input_key(directory: str | Path | None) -> str | None:
    """The identity of an artifact a job starts from: the checksum of an SFT's weights or of a
    head's tensors, as recorded (and verified on load) in its directory."""
    if directory is None:
        return None
    path = Path(directory)
    if (path / "sft.json").is_file():
        return str(read_metadata(path)["weights_sha256"])
    if (path / HEAD_INFO).is_file():
        try:
            info = json.loads((path / HEAD_INFO).read_text(encoding="utf-8"))
            return str(info["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            raise DeftxError(f"{path / HEAD_INFO}: unreadable or without a checksum") from None
    raise DeftxError(f"{path}: neither an SFT nor an MLM head directory")


def _data_parts(cfg: PipelineConfig) -> dict[str, Any]:
    data = asdict(cfg.data)
    table = data.pop("table")   # keys from before your own tables existed stay valid without one
    if isinstance(table, dict):   # the tables' content, not only their names: an edited file retrains
        for split in ("train", "valid", "test"):
            files = table.get(split)
            if isinstance(files, dict):
                table[f"{split}_sha256"] = {lang: sha256_file(Path(src).expanduser()) for lang, src in files.items()
                                            if isinstance(src, str) and not src.startswith("hf:")
                                            and Path(src).expanduser().is_file()}
    if table is not None:
        data["table"] = table
    return data


def _base_parts(job: Job) -> dict[str, Any]:
    cfg: PipelineConfig = job.config
    return {"kind": job.kind, "deftx": __version__, "model": asdict(cfg.model), "fingerprint": job.fingerprint,
            "seed": cfg.seed, "data": _data_parts(cfg), "task": cfg.task}


def _sft_parts(sft: SFTConfig, phase1_only: bool) -> dict[str, Any]:
    parts = asdict(sft)
    if not parts["held_out"]:               # keys from before the option stay valid when it is off
        parts.pop("held_out")
    if parts["head_bias_init"] == "zero" or not parts["head_warmup_steps"]:   # likewise (no warm-up: no effect)
        parts.pop("head_bias_init")
    if phase1_only:                         # phase 1 depends on neither the selection nor phase 2
        for name in ("selection", "sparse", "sparse_update"):
            parts.pop(name)
    return parts


def result_fields(job: Job) -> dict[str, Any]:
    """Everything that changes ``job``'s result, as plain data."""
    parts = _base_parts(job)
    cfg = job.config
    only = bool(getattr(job, "phase1_only", False))
    if isinstance(job, HeadJob):
        s = cfg.language_sft
        parts["languages"] = head_languages(cfg)
        parts["head"] = {"steps": s.head_warmup_steps, "learning_rate": s.head_warmup_learning_rate,
                         "max_train_examples": s.max_train_examples, "batch_size": s.full.batch_size,
                         "mlm_probability": s.mlm_probability, "text": s.text,
                         **({"held_out": s.held_out} if s.held_out else {}),
                         **({"bias_init": s.head_bias_init} if s.head_bias_init != "zero" else {})}
    elif isinstance(job, LanguageJob):
        parts.update(language=job.language, sft=_sft_parts(cfg.language_sft, only), head=input_key(job.head))
    elif isinstance(job, TaskJob):
        parts.update(language=job.language, sft=_sft_parts(cfg.task_sft, only),
                     language_sft=input_key(job.language_sft))
    elif isinstance(job, MultiSourceJob):
        parts.update(sources=list(job.sources), sft=_sft_parts(cfg.task_sft, only),
                     language_sfts={lang: input_key(p) for lang, p in sorted(job.language_sfts.items())})
    elif isinstance(job, SubnetworkJob):
        parts.update(sources=list(job.sources), subnetworks=asdict(job.subnetworks),
                     max_train_examples=cfg.task_sft.max_train_examples,
                     language_sfts={lang: input_key(p) for lang, p in sorted(job.language_sfts.items())})
    else:
        raise TypeError(f"not a job: {type(job).__name__}")
    parts["phase1_only"] = only
    return parts


def job_key(job: Job) -> str:
    """The key of ``job``'s output: equal keys, equal results."""
    return digest(result_fields(job))


def phase1_key(job: LanguageJob | TaskJob | MultiSourceJob) -> str:
    """The key of ``job``'s phase 1 (what its ``Phase1Store`` holds)."""
    return job_key(replace(job, phase1=Phase1(job.phase1.directory if job.phase1 else "", only=True)))


def probe_masks_key(parts: dict[str, Any]) -> str:
    """The key of a subnetwork trainer's probe masks (everything the probes depend on)."""
    return digest({"probe_masks": parts})


def scores_key(*parts: Any) -> str:
    """The key of cached evaluation scores: the keys of the models scored and what they were scored on."""
    return digest({"scores": list(parts)})


# -- reuse --------------------------------------------------------------------------------------------


def recorded_key(directory: str | Path) -> str:
    """The key recorded in the SFT saved in ``directory`` ("" if none)."""
    return str(read_metadata(directory).get("training", {}).get(KEY_FIELD, ""))


def key_of(sft: SparseFineTuning) -> str:
    return str(sft.metadata.training.get(KEY_FIELD, ""))


def saved_with(directory: Path, key: str) -> bool:
    """True if ``directory`` holds an SFT saved with ``key`` (so what it is trained from, e.g. a
    phase-1 store, is not needed)."""
    try:
        return (directory / "sft.json").is_file() and recorded_key(directory) == key
    except DeftxError:
        return False


def reuse_sft(directory: Path, key: str, log: Log) -> SparseFineTuning | None:
    """The SFT saved in ``directory`` if it was saved with ``key`` and is intact, else None (and why)."""
    if not (directory / "sft.json").is_file():
        return None
    try:
        if recorded_key(directory) != key:
            log(f"{directory}: settings changed, retraining")
            return None
        sft = SparseFineTuning.load(directory)
    except DeftxError as exc:
        log(f"{directory}: unusable ({exc}); retraining")
        return None
    log(f"reusing {directory} (same settings)")
    return sft


def reuse_head(directory: Path, key: str, log: Log) -> bool:
    """True if ``directory`` holds an intact MLM head saved with ``key`` (else says why not)."""
    problem = head_problem(directory, key) if (directory / HEAD_INFO).exists() else "none yet"
    if problem is None:
        log(f"reusing {directory} (same settings)")
        return True
    if problem == "settings changed":
        log(f"{directory}: settings changed, retraining")
    elif problem != "none yet":
        log(f"{directory}: unusable ({problem}); retraining")
    return False


def reuse_subnetwork_model(directory: Path, key: str, log: Log):
    """The subnetwork model saved in ``directory`` with ``key``, else None."""
    if not (directory / "subnetworks.json").is_file():
        return None
    try:
        model = SubnetworkModel.load(directory)
    except DeftxError as exc:
        log(f"{directory}: unusable ({exc}); retraining")
        return None
    if model.info.get(KEY_FIELD) != key:
        log(f"{directory}: settings changed, retraining")
        return None
    log(f"reusing {directory} (same settings)")
    return model


def base_identity(cfg: PipelineConfig, model_path: str) -> tuple[str, bool]:
    """(fingerprint of the base model's weights, whether it has a pretrained MLM head)."""
    model, has_head = load_masked_lm(model_path, seed=cfg.seed)
    return current_base_fingerprint(model), has_head
