"""Search spaces for sweeps: plain YAML files (``tune_spaces/*.yaml``) read into validated data.

A space file has a shared ``default`` space and per-language overrides, the objective and how the
search runs. No Ray here: ``deftx.workflows.sweeps.shared`` turns a :class:`SearchSpace` into Tune distributions, and
:func:`selection_from_sample` turns one sampled point into the ``SelectionConfig`` a trial trains with.

A dimension is a constant (``density: 0.01``) or one of::

    {choice: [a, b, ...]}    {uniform: [low, high]}    {loguniform: [low, high]}    {randint: [low, high]}

(``randint`` includes ``high``). Tunable keys: ``method`` (lt_sft / deft_x), ``density``,
``rank_rule`` (fixed / energy), ``rank`` (used when rank_rule is fixed), ``energy`` (used when it is
energy), ``residual_keep``, ``svd_target``, ``denoise_embeddings``. The DeFT-X keys are ignored by
LT-SFT trials, and the inactive rank rule's key by DeFT-X trials.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deftx.config import METHODS, SelectionConfig, clear_alternatives, read_yaml
from deftx.core.options import SVD_TARGETS
from deftx.data import check_language
from deftx.errors import ConfigError, DataError

KINDS = ("choice", "uniform", "loguniform", "randint")
RANK_RULES = ("fixed", "energy")
SFT_SCOPES = ("language", "task")
OBJECTIVE_SPLITS = ("target_valid", "source_valid")
OBJECTIVE_METRICS = ("macro_f1", "accuracy")
SEARCHERS = ("optuna", "random")
SCHEDULERS = ("asha", "median", "none")


@dataclass(frozen=True)
class Dimension:
    """One tunable value: ``kind`` is ``constant`` (``values == (v,)``), ``choice`` (the options) or
    a range kind (``values == (low, high)``)."""

    name: str
    kind: str
    values: tuple[Any, ...]

    def sample(self, rng: random.Random) -> Any:
        """A value drawn as the Tune distribution of the same kind would (for tests and dry runs)."""
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "choice":
            return rng.choice(self.values)
        low, high = self.values
        if self.kind == "uniform":
            return rng.uniform(low, high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        return rng.randint(low, high)

    def candidates(self) -> list[Any]:
        """Every value the dimension can take, for the discrete kinds; the bounds otherwise."""
        return list(self.values)


def _check_value(name: str, value: Any, key: str) -> None:
    """Whether ``value`` is a valid setting of tunable ``name``."""
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{key}: {problem}")

    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "method":
        if value not in METHODS:
            raise fail(f"unknown method {value!r}; valid: {', '.join(METHODS)}")
    elif name == "rank_rule":
        if value not in RANK_RULES:
            raise fail(f"unknown rank rule {value!r}; valid: {', '.join(RANK_RULES)}")
    elif name == "svd_target":
        if value not in SVD_TARGETS:
            raise fail(f"unknown SVD target {value!r}; valid: {', '.join(SVD_TARGETS)}")
    elif name == "denoise_embeddings":
        if not isinstance(value, bool):
            raise fail(f"expected true or false, got {value!r}")
    elif name == "rank":
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise fail(f"a rank must be a positive integer, got {value!r}")
    elif name in ("density", "energy"):
        if not (number and 0.0 < value <= 1.0):
            raise fail(f"must be in (0, 1], got {value!r}")
    elif name == "residual_keep":
        if not (number and 0.0 <= value <= 1.0):
            raise fail(f"must be in [0, 1], got {value!r}")


TUNABLE = ("method", "density", "rank_rule", "rank", "energy", "residual_keep", "svd_target", "denoise_embeddings")
_DISCRETE = ("method", "rank_rule", "svd_target", "denoise_embeddings")


def _number(value: Any, key: str) -> float:
    number = value
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return number


def spec_kind(spec: Any, key: str) -> tuple[str, list] | None:
    """The ``(kind, arguments)`` of a dimension written as ``{kind: [...]}``, None for a constant;
    a clear error for anything else."""
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise ConfigError(f"{key}: write a list of options as {{choice: [...]}}")
        return None
    if len(spec) > 1 and set(spec) <= set(KINDS):
        raise ConfigError(f"{key}: one kind per setting, got {' and '.join(spec)} (a --set merges into the "
                          "value it overrides; write the whole setting in a config file instead)")
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{key}: expected one of {{{'|'.join(KINDS)}: [...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{key}.{kind}: expected a non-empty list, got {args!r}")
    return kind, args


def parse_dimension(name: str, spec: Any, key: str) -> Dimension:
    """``spec`` as written in a space file -> a validated :class:`Dimension`."""
    if name not in TUNABLE:
        raise ConfigError(f"{key}: {name!r} is not tunable; tunable keys: {', '.join(TUNABLE)}")
    parsed = spec_kind(spec, key)
    if parsed is None:
        value = _number(spec, key) if name in ("density", "energy", "residual_keep") else spec
        _check_value(name, value, key)
        return Dimension(name, "constant", (value,))
    kind, args = parsed
    if kind == "choice":
        options = tuple(_number(v, key) if name in ("density", "energy", "residual_keep") else v for v in args)
        for v in options:
            _check_value(name, v, f"{key}.choice")
        if len(set(map(repr, options))) != len(options):
            raise ConfigError(f"{key}.choice: lists an option twice")
        return Dimension(name, kind, options)
    if name in _DISCRETE:
        raise ConfigError(f"{key}: {name} takes {{choice: [...]}} or a constant, not {kind}")
    if name == "rank" and kind != "randint":
        raise ConfigError(f"{key}: a rank is an integer; use {{randint: [low, high]}} or {{choice: [...]}}")
    low, high = _range(kind, args, key)
    for v in (low, high):
        _check_value(name, v, f"{key}.{kind}")
    return Dimension(name, kind, (low, high))


def _range(kind: str, args: list, key: str) -> tuple[float, float]:
    """The ``[low, high]`` of a ``uniform``, ``loguniform`` or ``randint`` dimension, checked."""
    if len(args) != 2:
        raise ConfigError(f"{key}.{kind}: expected [low, high], got {args!r}")
    low, high = (_number(v, f"{key}.{kind}") for v in args)
    if kind == "randint" and not all(float(v).is_integer() for v in (low, high)):
        raise ConfigError(f"{key}.randint: bounds must be integers, got {args!r}")
    if not low < high:
        raise ConfigError(f"{key}.{kind}: low must be below high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{key}.loguniform: bounds must be > 0, got {args!r}")
    return (int(low), int(high)) if kind == "randint" else (float(low), float(high))


def parse_setting_dimension(name: str, spec: Any, key: str) -> Dimension:
    """A dimension over any setting (a dotted key of a subnetwork system); its values are checked by
    validating the system with each of them (see ``deftx.workflows.sweeps.subnetworks``)."""
    parsed = spec_kind(spec, key)
    if parsed is None:
        return Dimension(name, "constant", (spec,))
    kind, args = parsed
    if kind == "choice":
        return Dimension(name, kind, tuple(args))
    return Dimension(name, kind, _range(kind, args, key))


@dataclass(frozen=True)
class Objective:
    """What a trial is scored by: ``metric`` of the composed model on ``split`` (``target_valid``:
    the target language's NusaX validation split; ``source_valid``: the source language's, for
    strictly zero-shot selection), maximised."""

    metric: str = "macro_f1"
    split: str = "target_valid"

    @property
    def key(self) -> str:
        """The name under which trials report it (e.g. ``target_valid_macro_f1``)."""
        return f"{self.split}_{self.metric}"


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping on the objective, reported after every ``eval_every`` steps of phase 2."""

    kind: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class SearchSpace:
    dataset: str
    source: Path | None
    sft: str = "language"
    objective: Objective = field(default_factory=Objective)
    searcher: str = "optuna"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    eval_every: int = 0
    default: dict[str, Dimension] = field(default_factory=dict)
    languages: dict[str, dict[str, Dimension]] = field(default_factory=dict)

    def for_language(self, lang: str) -> dict[str, Dimension]:
        """The default space with ``lang``'s overrides applied."""
        try:
            lang = check_language(lang, self.dataset)
        except DataError as exc:
            raise ConfigError(f"{self.source or 'search space'}: {exc}") from None
        return {**self.default, **self.languages.get(lang, {})}

    def check(self) -> None:
        """Every language's space must determine a trial's selection without ambiguity."""
        for lang in [None, *self.languages]:
            dims = {**self.default, **self.languages.get(lang, {})} if lang else self.default
            if "rank" in dims and "energy" in dims and "rank_rule" not in dims:
                where = f"languages.{lang}" if lang else "default"
                raise ConfigError(f"{self.source or 'space'}: {where} tunes both rank and energy; add rank_rule "
                                  "({choice: [fixed, energy]} or a constant) to say which one a trial uses")

    def describe(self, lang: str) -> dict[str, str]:
        out = {}
        for name, dim in self.for_language(lang).items():
            out[name] = repr(dim.values[0]) if dim.kind == "constant" else f"{dim.kind}{list(dim.values)}"
        return out


def _section(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
    return value


def _choice(value: Any, valid: tuple[str, ...], key: str) -> str:
    if value not in valid:
        raise ConfigError(f"{key}: unknown value {value!r}; valid: {', '.join(valid)}")
    return value


def _dimensions(section: dict[str, Any], key: str) -> dict[str, Dimension]:
    return {name: parse_dimension(name, spec, f"{key}.{name}") for name, spec in section.items()}


TOP_KEYS = ("dataset", "sft", "objective", "searcher", "scheduler", "eval_every", "default", "languages")


def space_from_dict(data: dict[str, Any], source: Path | None = None) -> SearchSpace:
    where = str(source) if source else "space"
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(TOP_KEYS)}")
    dataset = data.get("dataset")
    try:
        check_language("ind" if dataset == "nusax" else "aym", dataset)
    except DataError:
        raise ConfigError(f"{where}.dataset: unknown dataset {dataset!r}; valid: nusax, americasnli") from None
    objective = _section(data, "objective", where)
    bad = sorted(set(objective) - {"metric", "split"})
    if bad:
        raise ConfigError(f"{where}.objective.{bad[0]}: unknown key; valid keys: metric, split")
    obj = Objective(metric=_choice(objective.get("metric", "macro_f1"), OBJECTIVE_METRICS, f"{where}.objective.metric"),
                    split=_choice(objective.get("split", "target_valid"), OBJECTIVE_SPLITS, f"{where}.objective.split"))
    sched = _section(data, "scheduler", where)
    bad = sorted(set(sched) - {"kind", "grace_period", "reduction_factor"})
    if bad:
        raise ConfigError(f"{where}.scheduler.{bad[0]}: unknown key; valid keys: kind, grace_period, reduction_factor")
    scheduler = SchedulerSpec(kind=_choice(sched.get("kind", "asha"), SCHEDULERS, f"{where}.scheduler.kind"),
                              grace_period=int(sched.get("grace_period", 1)),
                              reduction_factor=int(sched.get("reduction_factor", 2)))
    if scheduler.grace_period < 1 or scheduler.reduction_factor < 2:
        raise ConfigError(f"{where}.scheduler: grace_period must be >= 1 and reduction_factor >= 2")
    eval_every = data.get("eval_every", 0)
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ConfigError(f"{where}.eval_every: must be an integer >= 0 (0: evaluate at the end only), "
                          f"got {eval_every!r}")
    default = _dimensions(_section(data, "default", where), f"{where}.default")
    if not default:
        raise ConfigError(f"{where}.default: the shared space is empty")
    languages: dict[str, dict[str, Dimension]] = {}
    for lang, section in _section(data, "languages", where).items():
        try:
            code = check_language(str(lang), dataset)
        except DataError as exc:
            raise ConfigError(f"{where}.languages.{lang}: {exc}") from None
        if not isinstance(section, dict):
            raise ConfigError(f"{where}.languages.{lang}: expected a mapping, got {section!r}")
        languages[code] = _dimensions(section, f"{where}.languages.{lang}")
    sft = _choice(data.get("sft", "language"), SFT_SCOPES, f"{where}.sft")
    searcher = _choice(data.get("searcher", "optuna"), SEARCHERS, f"{where}.searcher")
    space = SearchSpace(dataset=dataset, source=source, sft=sft, objective=obj, searcher=searcher,
                        scheduler=scheduler, eval_every=eval_every, default=default, languages=languages)
    space.check()
    return space


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; every problem is a one-line ``ConfigError`` naming the key."""
    path = Path(path)
    return space_from_dict(read_yaml(path), source=path)


def _rank_rule(sample: dict[str, Any]) -> str | None:
    if "rank_rule" in sample:
        return sample["rank_rule"]
    if "rank" in sample:
        return "fixed"
    return "energy" if "energy" in sample else None


def selection_from_sample(base: SelectionConfig, sample: dict[str, Any]) -> SelectionConfig:
    """The selection a trial trains with: ``base`` with the sampled values (keys of ``TUNABLE``).
    Its ``hyperparameters()`` are what the trial records (the DeFT-X fields only for deft_x)."""
    unknown = sorted(set(sample) - set(TUNABLE))
    if unknown:
        raise ConfigError(f"sample: {unknown[0]!r} is not tunable")
    given = {name: sample[name] for name in ("method", "density", "residual_keep", "svd_target",
                                             "denoise_embeddings") if name in sample}
    rule = _rank_rule(sample)
    if rule == "fixed":
        given["rank"] = int(sample.get("rank", base.rank or 8))
    elif rule == "energy":
        given["energy"] = float(sample.get("energy", base.energy or 0.9))
    out = SelectionConfig(**clear_alternatives({**asdict(base), **given}, given))
    out.validate("sample")
    return out
