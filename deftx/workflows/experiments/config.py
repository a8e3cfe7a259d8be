"""Configuration of a results experiment: one pipeline configuration (model, data, phases, cluster,
tracking), the methods compared, seeds, budget, multi-source folds, DeFT-X ablations.

Presets ship as ``deftx/presets/experiments/<dataset>-<preset>.yaml``; everything is validated
before any model is loaded (:meth:`ExperimentConfig.validate`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deftx.config import (
    ConfigError,
    PipelineConfig,
    SelectionConfig,
    apply_overrides,
    clear_alternatives,
    from_dict,
    merge,
    to_dict,
)
from deftx.data.languages import AMERICASNLI_LANGUAGES, NUSAX_LANGUAGES
from deftx.tasks import DATASET_TASK
from deftx.workflows.experiments.tuning import FULL_FT, TuningConfig

# composable-sft's XLM-R base budgets (train_sa.sh / train_mlm.sh: 24 and 13 x 768^2 entries) over
# XLM-R base's maskable parameters as deftx counts them (every encoder tensor except LayerNorm and
# the pooler, word embeddings included; tests/test_experiments.py recounts it on a meta-device model).
XLMR_BASE_MASKABLE = 277_414_656
XLMR_TASK_K = 14_155_776
XLMR_LANGUAGE_K = 7_667_712
BUDGETS = ("xlmr-base", "config")
SOURCE_SFT_PART = "source_sft"   # records of task SFT + the source language's SFT, scored on the targets
EXPERIMENT_DATASETS = ("nusax", "americasnli", "table")
MAIN_LAYOUTS = ("single_source", "leave_fold_out")


def xlmr_densities() -> dict[str, float]:
    """Densities of composable-sft's XLM-R base budgets: task 5.10%, language 2.76%."""
    return {"task": XLMR_TASK_K / XLMR_BASE_MASKABLE, "language": XLMR_LANGUAGE_K / XLMR_BASE_MASKABLE}


@dataclass
class MultiSourceConfig:
    """Multi-source task SFTs trained leave-fold-out: the targets are split into ``folds`` groups
    (round robin over the target list); the task SFT evaluated on a fold's targets is trained on
    the labelled data of every ``candidates`` language outside that fold (default: the source and
    all targets), at most ``max_examples_per_language`` each. ``folds`` 0 turns it off;
    ``folds`` equal to the number of targets is leave-one-target-out."""

    folds: int = 0
    methods: list[str] = field(default_factory=lambda: ["lt_sft"])
    candidates: list[str] | None = None
    max_examples_per_language: int | None = None


@dataclass
class AblationConfig:
    """DeFT-X ablations of the task SFT: every variant re-selects from the same task phase 1 (the
    ``base`` method's, first seed) with the base selection plus its overrides, trains phase 2, and
    is composed with the ``base`` method's language SFTs. Scored on validation and test."""

    base: str = "deft_x_energy"
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class SubnetworkSystemsConfig:
    """Multi-source task models with language-specific subnetworks (``deftx.subnetworks``), trained
    leave-fold-out on the ``multi_source`` folds: every system's ``SubnetworkConfig`` is ``base``
    plus its entry in ``systems``. Batches are shifted by, and targets composed with, the language
    SFTs of the method ``language_sfts`` (null: none)."""

    language_sfts: str | None = "lt_sft"
    base: dict[str, Any] = field(default_factory=dict)
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)

    def system(self, name: str):
        from deftx.subnetworks.config import SubnetworkConfig

        if name not in self.systems:
            raise ConfigError(f"subnetworks.systems: unknown system {name!r}; valid: {', '.join(self.systems)}")
        overrides = self.systems[name] or {}
        if not isinstance(overrides, dict) or not isinstance(self.base, dict):
            raise ConfigError(f"subnetworks.systems.{name}: expected a mapping of subnetwork settings")
        data = merge(merge(to_dict(SubnetworkConfig()), self.base), overrides)
        key = f"subnetworks.systems.{name}"
        return from_dict(SubnetworkConfig, data, key).validate(key)


@dataclass
class MLMLossConfig:
    """Held-out MLM loss of the language SFTs (``deftx.held_out_mlm``), per method: theta0 and
    theta0 + each language's SFT on every language's held-out adaptation text, at most
    ``max_lines`` lines each (a hash-chosen sample). Needs ``pipeline.language_sft.held_out`` > 0."""

    enabled: bool = False
    max_lines: int = 512
    batch_size: int = 32
    seed: int = 0


@dataclass
class ExperimentConfig:
    """``main``: ``single_source`` (task SFT on the source language, the NusaX setting) or
    ``leave_fold_out`` (multi-source task SFTs per fold of ``multi_source``, the offline AmericasNLI
    setting); see :mod:`deftx.workflows.experiments.runner`. ``main_table`` false trains no main-table task
    models: the subnetwork systems alone (the methods then give the language SFTs), or without
    systems only the language SFTs (a subnetwork sweep's shared work).
    ``hyperparameters``: how the settings were chosen, stated in the report."""

    dataset: str = "nusax"
    preset: str = "custom"
    main: str = "single_source"
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])   # task SFT seeds (language SFTs: pipeline.seed)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> selection overrides
    full_ft: bool = True
    main_table: bool = True   # false: no main-table task models; the methods only give language SFTs
    budget: str = "xlmr-base"
    multi_source: MultiSourceConfig = field(default_factory=MultiSourceConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)
    analysis: bool = True
    mlm_loss: MLMLossConfig = field(default_factory=MLMLossConfig)
    subnetworks: SubnetworkSystemsConfig = field(default_factory=SubnetworkSystemsConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)   # the tuned table (tuning.py)
    eval_splits: list[str] = field(default_factory=lambda: ["test", "valid"])
    results_dir: str = "benchmarks/results"
    reuse_from: str | None = None   # another experiment's output directory: its MLM head and language SFTs
    hyperparameters: str | None = None   # how the settings were chosen, for the report (default: fixed up front)

    @property
    def trains_task_models(self) -> bool:
        """False when the experiment gives language SFTs (and their diagnostics) only: no main table,
        no subnetwork systems, no tuned table; its seeds then train nothing."""
        return self.main_table or bool(self.subnetworks.systems) or self.tuning.enabled

    def validate(self) -> ExperimentConfig:
        if self.dataset not in EXPERIMENT_DATASETS:
            raise ConfigError(f"dataset: unknown experiment dataset {self.dataset!r}; "
                              f"valid: {', '.join(EXPERIMENT_DATASETS)}")
        if not self.eval_splits or not set(self.eval_splits) <= {"test", "valid"}:
            raise ConfigError(f"eval_splits: must list test and/or valid; got {self.eval_splits}")
        if self.main not in MAIN_LAYOUTS:
            raise ConfigError(f"main: unknown layout {self.main!r}; valid: {', '.join(MAIN_LAYOUTS)}")
        if self.pipeline.data.dataset != self.dataset:
            raise ConfigError(f"pipeline.data.dataset: {self.pipeline.data.dataset!r} in a {self.dataset} experiment")
        try:
            self.pipeline.validate()
        except ConfigError as exc:
            raise ConfigError(f"pipeline.{exc}") from None
        if self.dataset == "table":
            table = self.pipeline.data.table
            for lang in [self.pipeline.source_language, *self.pipeline.target_languages]:
                for split in self.eval_splits:
                    if lang not in getattr(table, split):
                        raise ConfigError(f"pipeline.data.table.{split}: no table for {lang!r}; an experiment scores "
                                          f"the source and every target on each of eval_splits ({', '.join(self.eval_splits)})")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds: a seed is listed twice")
        if not self.methods and not self.full_ft:
            raise ConfigError("methods: give at least one method (or full_ft: true)")
        if not self.main_table and self.ablations.variants:
            raise ConfigError("ablations: re-select the main table's task SFT; they need main_table: true")
        if FULL_FT in self.methods:
            raise ConfigError(f"methods.{FULL_FT}: reserved; full fine-tuning is switched on by full_ft: true")
        for name in self.methods:
            self.selection(name, "task")
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget: unknown budget {self.budget!r}; valid: {', '.join(BUDGETS)}")
        ms = self.multi_source
        targets = self.pipeline.target_languages
        if ms.folds < 0 or ms.folds > len(targets):
            raise ConfigError(f"multi_source.folds: must be in [0, {len(targets)}] (the number of targets), got {ms.folds}")
        if ms.folds:
            for name in ms.methods:
                if name not in self.methods:
                    raise ConfigError(f"multi_source.methods: {name!r} is not one of the methods "
                                      f"({', '.join(self.methods)})")
            for lang in ms.candidates or []:
                if lang != self.pipeline.source_language and lang not in targets:
                    raise ConfigError(f"multi_source.candidates: {lang} is neither the source nor a target "
                                      "(it would have no language SFT)")
            if ms.max_examples_per_language is not None and ms.max_examples_per_language < 1:
                raise ConfigError("multi_source.max_examples_per_language: must be >= 1 or null")
            if self.pipeline.cluster.backend == "ray" and self.pipeline.cluster.zero_stage == 3:
                raise ConfigError("multi_source: a batch is computed at theta + phi_lang by a functional call, "
                                  "which needs whole parameters; use cluster.zero_stage 0-2 (ZeRO-3 partitions them)")
            for i in range(ms.folds):
                if not self.fold_sources(i):
                    raise ConfigError(f"multi_source: fold {i} would have no source language")
        if self.mlm_loss.enabled:
            self._validate_mlm_loss()
        self.tuning.validate(list(self.methods), list(targets), self.main)
        if self.main == "leave_fold_out" and not ms.folds:
            raise ConfigError("multi_source.folds: main: leave_fold_out needs at least 1 fold")
        if self.subnetworks.systems:
            self._validate_subnetworks()
        if self.ablations.variants:
            if self.main != "single_source":
                raise ConfigError("ablations: implemented for main: single_source (they re-select the source "
                                  "task SFT); remove them or use single_source")
            if self.ablations.base not in self.methods:
                raise ConfigError(f"ablations.base: {self.ablations.base!r} is not one of the methods "
                                  f"({', '.join(self.methods)})")
            for name in self.ablations.variants:
                self.ablation_selection(name)
        return self

    def _validate_mlm_loss(self) -> None:
        settings = self.mlm_loss
        if not self.pipeline.language_sft.held_out:
            raise ConfigError("mlm_loss.enabled: needs held-out text; set pipeline.language_sft.held_out "
                              "(e.g. 0.02) or mlm_loss.enabled: false")
        if not self.methods:
            raise ConfigError("mlm_loss.enabled: scores the methods' language SFTs; give at least one method")
        for name in ("max_lines", "batch_size"):
            if getattr(settings, name) < 1:
                raise ConfigError(f"mlm_loss.{name}: must be >= 1, got {getattr(settings, name)}")

    def _validate_subnetworks(self) -> None:
        sub = self.subnetworks
        if not self.multi_source.folds:
            raise ConfigError("subnetworks: trained leave-fold-out; set multi_source.folds >= 1")
        if sub.language_sfts is not None and sub.language_sfts not in self.methods:
            raise ConfigError(f"subnetworks.language_sfts: {sub.language_sfts!r} is not one of the methods "
                              f"({', '.join(self.methods)}); or null for no language SFTs")
        cluster = self.pipeline.cluster
        for name in sub.systems:
            system = sub.system(name)
            for fold in range(self.multi_source.folds):
                system.check_languages(self.fold_sources(fold), self.fold_targets(fold), f"subnetworks.systems.{name}")
            if cluster.backend == "ray" and cluster.zero_stage == 3 and system.meta_learning != "none":
                raise ConfigError(f"subnetworks.systems.{name}: meta-learning needs cluster.zero_stage 0-2")

    def densities(self) -> dict[str, float | None]:
        if self.budget == "xlmr-base":
            return dict(xlmr_densities())
        return {"task": self.pipeline.task_sft.selection.density, "language": self.pipeline.language_sft.selection.density}

    def selection(self, method: str, kind: str) -> SelectionConfig:
        """The selection of ``method`` for a ``kind`` SFT: the pipeline's, the method's overrides,
        the budget's density."""
        if method not in self.methods:
            raise ConfigError(f"unknown method {method!r}; valid: {', '.join(self.methods)}")
        base = self.pipeline.task_sft.selection if kind == "task" else self.pipeline.language_sft.selection
        return self._selection(asdict(base), self.methods[method], kind, f"methods.{method}")

    def ablation_selection(self, variant: str) -> SelectionConfig:
        base = self.selection(self.ablations.base, "task")
        overrides = self.ablations.variants[variant]
        return self._selection(asdict(base), overrides, "task", f"ablations.variants.{variant}", keep_budget=True)

    def _selection(self, base: dict[str, Any], overrides: dict[str, Any], kind: str, key: str,
                   keep_budget: bool = False) -> SelectionConfig:
        data = copy.deepcopy(base)
        if not isinstance(overrides, dict):
            raise ConfigError(f"{key}: expected a mapping of selection settings, got {overrides!r}")
        data = clear_alternatives({**data, **overrides}, overrides)
        if not keep_budget:
            density = self.densities()[kind]
            if density is not None and "density" not in overrides and "k" not in overrides:
                data["density"], data["k"] = density, None
        selection = from_dict(SelectionConfig, data, key)
        selection.validate(key)
        return selection

    def fold_targets(self, fold: int) -> list[str]:
        return self.pipeline.target_languages[fold:: self.multi_source.folds]

    def candidates(self) -> list[str]:
        """The languages multi-source task SFTs may train on: ``multi_source.candidates``, else the
        source and the targets (AmericasNLI offline: the targets; English MultiNLI is on the hub)."""
        pipe = self.pipeline
        if self.multi_source.candidates:
            return list(dict.fromkeys(self.multi_source.candidates))
        if self.dataset == "americasnli" and pipe.data.source != "hub":
            return list(pipe.target_languages)
        return list(dict.fromkeys([pipe.source_language, *pipe.target_languages]))

    def fold_sources(self, fold: int) -> list[str]:
        held_out = set(self.fold_targets(fold))
        return [lang for lang in self.candidates() if lang not in held_out]

    def sft_languages(self) -> list[str]:
        """The languages that get language SFTs: the source (single-source layout) and targets, plus
        any multi-source candidate."""
        pipe = self.pipeline
        langs = list(pipe.target_languages)
        if self.main == "single_source":
            langs = [pipe.source_language, *langs]
        if self.multi_source.folds:
            langs += self.candidates()
        return list(dict.fromkeys(langs))

    def output_dir(self) -> Path:
        return Path(self.pipeline.output_dir)


def experiment_presets() -> dict[str, list[tuple[str, str]]]:
    """Per dataset, its experiment presets as (name, one-line description)."""
    from deftx.config.loading import summary_line

    folder = resources.files("deftx.presets").joinpath("experiments")
    out: dict[str, list[tuple[str, str]]] = {d: [] for d in EXPERIMENT_DATASETS}
    for file in sorted(folder.iterdir(), key=lambda f: f.name):
        for dataset in EXPERIMENT_DATASETS:
            if file.name.startswith(f"{dataset}-") and file.name.endswith(".yaml"):
                name = file.name.removeprefix(f"{dataset}-").removesuffix(".yaml")
                out[dataset].append((name, summary_line(file.read_text(encoding="utf-8"))))
    return out


def _preset_text(dataset: str, preset: str) -> str:
    folder = resources.files("deftx.presets").joinpath("experiments")
    file = folder.joinpath(f"{dataset}-{preset}.yaml")
    if not file.is_file():
        available = sorted(p.name.removeprefix(f"{dataset}-").removesuffix(".yaml")
                           for p in folder.iterdir() if p.name.startswith(f"{dataset}-"))
        raise ConfigError(f"--preset: no {dataset} experiment preset {preset!r}; available: {', '.join(available) or 'none'}")
    return file.read_text(encoding="utf-8")


def load_experiment(dataset: str, preset: str | None = None, config_file: str | None = None,
                    overrides: list[str] | None = None) -> ExperimentConfig:
    """A validated experiment: a preset or a YAML file, then ``key=value`` overrides (``pipeline.``
    keys reach the pipeline configuration, e.g. ``pipeline.cluster.backend=ray``)."""
    if (preset is None) == (config_file is None):
        raise ConfigError("give exactly one of --preset or --config")
    text = _preset_text(dataset, preset) if preset is not None else Path(config_file).read_text(encoding="utf-8")  # type: ignore[arg-type]
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_file or preset}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_file or preset}: expected a mapping at the top level")
    data.setdefault("dataset", dataset)
    if data["dataset"] != dataset:
        raise ConfigError(f"{config_file}: an experiment on {data['dataset']}, not {dataset}")
    if dataset not in EXPERIMENT_DATASETS:
        raise ConfigError(f"unknown experiment dataset {dataset!r}; valid: {', '.join(EXPERIMENT_DATASETS)}")
    if preset is not None:
        data.setdefault("preset", preset)
    data = apply_overrides(data, overrides or [])
    defaults = to_dict(PipelineConfig())
    defaults["data"]["dataset"], defaults["task"] = dataset, DATASET_TASK[dataset]
    pipeline = merge(defaults, data.pop("pipeline", {}) or {})
    if pipeline.get("target_languages") == "all" and dataset == "table":   # every language with evaluation data
        tables = (pipeline.get("data") or {}).get("table") or {}
        codes = sorted(set(tables.get("test") or {}) | set(tables.get("valid") or {}))
        pipeline["target_languages"] = [c for c in codes if c != pipeline["source_language"]]
    elif pipeline.get("target_languages") == "all":
        codes = NUSAX_LANGUAGES if dataset == "nusax" else AMERICASNLI_LANGUAGES
        pipeline["target_languages"] = [c for c in codes if c != pipeline["source_language"]]
    cfg = from_dict(ExperimentConfig, {**data, "pipeline": {}})
    cfg.pipeline = from_dict(PipelineConfig, pipeline, "pipeline")
    return cfg.validate()
