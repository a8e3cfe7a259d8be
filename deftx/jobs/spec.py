"""One unit of work as a typed, frozen value: the shared MLM head, a language SFT, a task SFT, a
multi-source task SFT, or a model with language-specific subnetworks.

A job holds everything that determines its result (the validated pipeline config, the base model's
fingerprint, the languages, the paths of the artifacts it starts from) plus where it may keep work
that does not change the result (a phase-1 store, a probe report, a mask cache). It crosses process
boundaries as plain data (:func:`job_to_dict`) and is validated again on arrival
(:func:`job_from_dict`). What makes two jobs "the same" for reuse is decided in
:mod:`deftx.jobs.cache` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from deftx.config import PipelineConfig, from_dict, to_dict
from deftx.core.io import OutputKind
from deftx.core.sft import SFT_OUTPUT
from deftx.errors import ConfigError
from deftx.jobs.head import MLM_HEAD_OUTPUT
from deftx.subnetworks.artifact import SUBNETWORK_OUTPUT
from deftx.subnetworks.config import SubnetworkConfig

Log = Callable[[str], None]


def capped(items: list, limit: int | None) -> list:
    """The first ``limit`` items (all of them for None)."""
    return items if limit is None else items[:limit]


JOB_INFO, JOB_FORMAT = "job.json", "deftx-job"
JOB_MARKER_OUTPUT = OutputKind("a phase-1 job marker", JOB_INFO,
                               lambda doc: doc.get("format") == JOB_FORMAT or {"phase1_dir", "digest"} <= set(doc))


@dataclass(frozen=True)
class Phase1:
    """Where an SFT's phase 1 is kept (a ``Phase1Store``): read from it if it holds this job's
    phase 1, else fill it. ``only``: fill the store and stop (the job leaves a marker, no SFT)."""

    directory: str
    only: bool = False


@dataclass(frozen=True)
class Probe:
    """Score a language SFT with a task SFT every ``every`` phase-2 steps, on ``split``
    (``target_valid``: ``language``'s validation set; ``source_valid``), into ``report_path``."""

    every: int
    task_sft: str
    language: str
    split: str
    report_path: str


@dataclass(frozen=True)
class _Job:
    config: PipelineConfig
    fingerprint: str          # of the base model's weights (deftx.core.fingerprint)

    kind = ""

    def __post_init__(self) -> None:
        if not isinstance(self.config, PipelineConfig):
            raise TypeError(f"{type(self).__name__}.config: a PipelineConfig, got {type(self.config).__name__}")
        if not self.fingerprint:
            raise ConfigError(f"{type(self).__name__}: the base model's fingerprint is missing")

    @property
    def name(self) -> str:
        raise NotImplementedError

    def output_kind(self) -> OutputKind:
        """The kind of directory the job leaves (what its executor may replace)."""
        raise NotImplementedError


@dataclass(frozen=True)
class HeadJob(_Job):
    """The MLM head warm-up shared by the language SFTs of a base model released without one."""

    kind = "mlm_head"

    @property
    def name(self) -> str:
        return "mlm-head"

    def output_kind(self) -> OutputKind:
        return MLM_HEAD_OUTPUT


class _PhasedJob(_Job):
    """A job whose phase 1 may be kept in (or read from) a store: an SFT, or with ``phase1.only``
    the store's marker. Subclasses define ``phase1`` and ``_who``."""

    phase1: Phase1 | None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phase1 is not None and not isinstance(self.phase1, Phase1):
            raise TypeError(f"{type(self).__name__}.phase1: a Phase1")
        if getattr(self, "language", None) == "":
            raise ConfigError(f"{type(self).__name__}: no language")

    @property
    def phase1_only(self) -> bool:
        return self.phase1 is not None and self.phase1.only

    @property
    def _who(self) -> str:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self._who + ("-phase1" if self.phase1_only else "")

    def output_kind(self) -> OutputKind:
        return JOB_MARKER_OUTPUT if self.phase1_only else SFT_OUTPUT


@dataclass(frozen=True)
class LanguageJob(_PhasedJob):
    """A language SFT: masked LM on ``language``'s text, from the shared head at ``head``."""

    language: str = ""
    head: str | None = None
    phase1: Phase1 | None = None
    probe: Probe | None = None

    kind = "language"

    @property
    def _who(self) -> str:
        return f"language-{self.language}"


@dataclass(frozen=True)
class TaskJob(_PhasedJob):
    """A task SFT on ``language``'s labelled data, on theta0 + the language SFT at ``language_sft``
    (None: on theta0)."""

    language: str = ""
    language_sft: str | None = None
    phase1: Phase1 | None = None

    kind = "task"

    @property
    def _who(self) -> str:
        return f"task-{self.language}"


def _check_sources(job: Any) -> None:
    if not job.sources:
        raise ConfigError(f"{type(job).__name__}: give at least one source language")
    if len(set(job.sources)) != len(job.sources):
        raise ConfigError(f"{type(job).__name__}: a source language is listed twice ({', '.join(job.sources)})")
    extra = sorted(set(job.language_sfts) - set(job.sources))
    if extra:
        raise ConfigError(f"{type(job).__name__}: language SFTs for {', '.join(extra)}, which are not sources")
    object.__setattr__(job, "sources", tuple(job.sources))
    object.__setattr__(job, "language_sfts", dict(job.language_sfts))


@dataclass(frozen=True)
class MultiSourceJob(_PhasedJob):
    """A task SFT on the labelled data of several ``sources``, each batch at theta + its language's
    SFT (``language_sfts``: source -> directory; a source without one trains at theta0)."""

    sources: tuple[str, ...] = ()
    language_sfts: Mapping[str, str] = field(default_factory=dict)
    phase1: Phase1 | None = None

    kind = "multi_source"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sources(self)

    @property
    def _who(self) -> str:
        return "task-multi-" + "-".join(self.sources)


@dataclass(frozen=True)
class SubnetworkJob(_Job):
    """A multi-source task model trained with language-specific subnetworks (``subnetworks``);
    ``masks_cache``: a directory where probe masks are shared between such jobs."""

    sources: tuple[str, ...] = ()
    language_sfts: Mapping[str, str] = field(default_factory=dict)
    subnetworks: SubnetworkConfig = field(default_factory=SubnetworkConfig)
    masks_cache: str | None = None

    kind = "subnetworks"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sources(self)
        if not isinstance(self.subnetworks, SubnetworkConfig):
            raise TypeError("SubnetworkJob.subnetworks: a SubnetworkConfig")
        self.subnetworks.validate()

    @property
    def name(self) -> str:
        return "task-subnetworks-" + "-".join(self.sources)

    def output_kind(self) -> OutputKind:
        return SUBNETWORK_OUTPUT


Job = HeadJob | LanguageJob | TaskJob | MultiSourceJob | SubnetworkJob
JOB_TYPES: dict[str, type] = {cls.kind: cls for cls in (HeadJob, LanguageJob, TaskJob, MultiSourceJob, SubnetworkJob)}


def with_phase1(job: Job, directory: str, only: bool = False) -> Job:
    """``job`` reading its phase 1 from (or filling) the store in ``directory``."""
    return replace(job, phase1=Phase1(directory, only))  # type: ignore[arg-type]


def job_to_dict(job: Job) -> dict[str, Any]:
    """``job`` as plain data (JSON-able) to send to another process."""
    data: dict[str, Any] = {"kind": job.kind}
    for f in fields(job):
        value = getattr(job, f.name)
        if isinstance(value, (PipelineConfig, SubnetworkConfig, Phase1, Probe)):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        data[f.name] = value
    return data


def job_from_dict(data: Mapping[str, Any]) -> Job:
    """The job ``data`` describes, validated as when it was built (a config that does not validate
    is an error here too, not a surprise halfway through training)."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in JOB_TYPES:
        raise ConfigError(f"unknown job kind {kind!r}; valid: {', '.join(JOB_TYPES)}")
    cls = JOB_TYPES[kind]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{kind} job: unknown fields {', '.join(unknown)}")
    data["config"] = from_dict(PipelineConfig, data["config"], "config").validate()
    if data.get("phase1") is not None:
        data["phase1"] = Phase1(**data["phase1"])
    if data.get("probe") is not None:
        data["probe"] = Probe(**data["probe"])
    if "subnetworks" in data:
        data["subnetworks"] = from_dict(SubnetworkConfig, data["subnetworks"], "subnetworks")
    if "sources" in data:
        data["sources"] = tuple(data["sources"])
    return cls(**data)


def pipeline_languages(cfg: PipelineConfig) -> list[str]:
    return [cfg.source_language] + [t for t in cfg.target_languages if t != cfg.source_language]


def head_languages(cfg: PipelineConfig) -> list[str]:
    """The languages whose text trains the shared MLM head: the pipeline's, or for AmericasNLI with
    its offline (multi-source) training the targets only (English text is only on the hub)."""
    langs = pipeline_languages(cfg)
    if cfg.data.dataset == "americasnli" and cfg.data.source != "hub":
        langs = [lang for lang in langs if lang != "eng"]
    return langs
