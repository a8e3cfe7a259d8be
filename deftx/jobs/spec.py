"""A unit of work (the shared MLM head, a language SFT, a task SFT, a multi-source or subnetwork
task model) as plain data that can travel to distributed workers, and the kinds of directory
each leaves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deftx.config import PipelineConfig, from_dict
from deftx.core.io import OutputKind
from deftx.core.sft import SFT_OUTPUT

Log = Callable[[str], None]


def capped(items: list, limit: int | None) -> list:
    """The first ``limit`` items (all of them for None)."""
    return items if limit is None else items[:limit]


JOB_KINDS = ("mlm_head", "language", "task")
HEAD_FILE, HEAD_INFO, JOB_INFO = "head.safetensors", "head.json", "job.json"
HEAD_FORMAT, JOB_FORMAT = "deftx-mlm-head", "deftx-job"
MLM_HEAD_OUTPUT = OutputKind("an MLM head directory", HEAD_INFO,
                             lambda doc: doc.get("format") == HEAD_FORMAT or {"digest", "steps"} <= set(doc))
JOB_MARKER_OUTPUT = OutputKind("a phase-1 job marker", JOB_INFO,
                               lambda doc: doc.get("format") == JOB_FORMAT or {"phase1_dir", "digest"} <= set(doc))


@dataclass
class SFTJob:
    """One unit of training (the shared MLM head, a language SFT or a task SFT) as plain data, so
    that it can travel to distributed workers. ``config`` is a ``PipelineConfig`` as a dict."""

    kind: str
    language: str
    config: dict[str, Any]
    digest: str
    head_path: str | None = None
    language_sft_path: str | None = None
    phase1_dir: str | None = None       # a Phase1Store to read phase 1 from, or to fill
    phase1_digest: str | None = None
    phase1_only: bool = False           # fill the store and stop (no SFT output)
    probe: dict[str, Any] | None = None  # language SFTs: {"every", "task_sft", "language", "split", "report_path"}
    sources: list[str] | None = None    # multi-source task SFT: the labelled languages it trains on
    source_sft_paths: dict[str, str] | None = None   # ... and the language SFT applied to each one's batches
    subnetworks: dict[str, Any] | None = None        # multi-source with subnetworks: a SubnetworkConfig as a dict
    masks_cache: str | None = None                   # ... and where probe masks are shared between such jobs

    def __post_init__(self) -> None:
        if self.kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {self.kind!r}; valid: {', '.join(JOB_KINDS)}")

    @property
    def name(self) -> str:
        if self.kind == "mlm_head":
            return "mlm-head"
        who = ("subnetworks-" if self.subnetworks is not None else "multi-") + "-".join(self.sources) \
            if self.sources else self.language
        return f"{self.kind}-{who}" + ("-phase1" if self.phase1_only else "")

    def pipeline_config(self) -> PipelineConfig:
        return from_dict(PipelineConfig, self.config)

    def subnetwork_config(self):
        from deftx.subnetworks.config import SubnetworkConfig

        return from_dict(SubnetworkConfig, self.subnetworks or {}, "subnetworks").validate()


def job_output_kind(job: SFTJob) -> OutputKind:
    """The kind of directory ``job`` leaves (what its executor may replace)."""
    from deftx.subnetworks.artifact import SUBNETWORK_OUTPUT

    if job.phase1_only:
        return JOB_MARKER_OUTPUT
    if job.kind == "mlm_head":
        return MLM_HEAD_OUTPUT
    return SUBNETWORK_OUTPUT if job.subnetworks is not None else SFT_OUTPUT


def pipeline_languages(cfg: PipelineConfig) -> list[str]:
    return [cfg.source_language] + [t for t in cfg.target_languages if t != cfg.source_language]


def head_languages(cfg: PipelineConfig) -> list[str]:
    """The languages whose text trains the shared MLM head: the pipeline's, or for AmericasNLI with
    its offline (multi-source) training the targets only (English text is only on the hub)."""
    langs = pipeline_languages(cfg)
    if cfg.data.dataset == "americasnli" and cfg.data.source != "hub":
        langs = [lang for lang in langs if lang != "eng"]
    return langs

