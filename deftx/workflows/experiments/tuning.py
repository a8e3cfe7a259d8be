"""Per-language tuning on validation for a results experiment's tuned table (pure parts: the
configuration, the trials drawn from each system's space, the champion of each language).

For every tuned system (``full_ft`` or one of the experiment's methods) the same ``trials``
settings are drawn from its space (seeded, so a resumed experiment draws them again) and each is
trained once, at the experiment's first seed, on the source language. Each trial is scored on the
*validation* split of every tuned language (for an SFT method: the task SFT composed with that
language's SFT); a language's champion is its best trial there (ties: the earlier trial). The
champions are then trained with every seed and scored on the experiment's evaluation splits: test
scores never choose anything.

Because a trial's training does not depend on the language it is scored on, one set of trials
serves every language: it is the per-language random search each language would run with the same
draws, at the cost of one. What a space may tune:

* ``full_ft``: ``learning_rate`` and ``epochs`` of the fully fine-tuned baseline (``task_sft.full``);
* an SFT method: the task SFT's selection (``density``, ``rank_rule``, ``rank``, ``energy``,
  ``residual_keep``, ``svd_target``, ``denoise_embeddings``; see ``deftx.workflows.sweeps.space``)
  and ``learning_rate``, its phase-2 learning rate (``task_sft.sparse``). The method's language SFTs
  and the task SFT's phase 1 stay those of the fixed table, so trials differ only in what is tuned.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from deftx.config import ConfigError, SelectionConfig
from deftx.workflows.sweeps.space import (
    TUNABLE,
    Dimension,
    parse_dimension,
    parse_setting_dimension,
    selection_from_sample,
)

CHAMPION_RULES = ("per_language", "average")
FULL_FT = "full_ft"   # the fully fine-tuned baseline's system name (re-exported by config.py)
PHASE_KEYS = ("learning_rate", "epochs")
SELECTION_KEYS = tuple(k for k in TUNABLE if k != "method")
SFT_KEYS = (*SELECTION_KEYS, "learning_rate")


@dataclass
class TuningConfig:
    """``languages``: the targets tuned (empty: no tuned table). ``trials``: settings drawn per
    system. ``systems``: system name (``full_ft`` or a method) -> its space, each key a constant or
    ``{choice: [...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}``.
    ``seed``: the draws' seed. ``champion``: ``per_language`` (each target's best trial on its own
    validation split) or ``average`` (one champion per system, the best trial on the tuned targets'
    average: several validation splits instead of one, so less of the choice is the split's noise)."""

    languages: list[str] = field(default_factory=list)
    trials: int = 8
    seed: int = 0
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)
    champion: str = "per_language"

    @property
    def enabled(self) -> bool:
        return bool(self.languages)

    def validate(self, methods: list[str], targets: list[str], main: str) -> None:
        if self.champion not in CHAMPION_RULES:
            raise ConfigError(f"tuning.champion: unknown rule {self.champion!r}; valid: {', '.join(CHAMPION_RULES)}")
        if not self.enabled:   # no tuned table; a preset's spaces stay unused (`--set 'tuning.languages=[]'`)
            return
        if main != "single_source":
            raise ConfigError("tuning: implemented for main: single_source (trials train on the source language)")
        if len(set(self.languages)) != len(self.languages):
            raise ConfigError("tuning.languages: a language is listed twice")
        for lang in self.languages:
            if lang not in targets:
                raise ConfigError(f"tuning.languages: {lang!r} is not a target language ({', '.join(targets)})")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ConfigError(f"tuning.trials: must be an integer >= 1, got {self.trials!r}")
        if not self.systems:
            raise ConfigError(f"tuning.systems: give at least one system to tune ({FULL_FT} or a method: "
                              f"{', '.join(methods) or 'none configured'})")
        for name in self.systems:
            if name != FULL_FT and name not in methods:
                raise ConfigError(f"tuning.systems.{name}: neither {FULL_FT} nor one of the methods "
                                  f"({', '.join(methods) or 'none'})")
            self.space(name)

    def space(self, system: str) -> dict[str, Dimension]:
        """The validated dimensions of ``system``'s space, by name."""
        section = self.systems.get(system)
        key = f"tuning.systems.{system}"
        if not isinstance(section, dict) or not section:
            raise ConfigError(f"{key}: expected a non-empty mapping of settings to tune, got {section!r}")
        allowed = PHASE_KEYS if system == FULL_FT else SFT_KEYS
        out: dict[str, Dimension] = {}
        for name, spec in section.items():
            where = f"{key}.{name}"
            if name not in allowed:
                raise ConfigError(f"{where}: not tunable for {'full fine-tuning' if system == FULL_FT else 'an SFT'}"
                                  f"; tunable: {', '.join(allowed)}")
            out[name] = _phase_dimension(name, spec, where) if name in PHASE_KEYS else parse_dimension(name, spec, where)
        if "rank" in out and "energy" in out and "rank_rule" not in out:
            raise ConfigError(f"{key}: tunes both rank and energy; add rank_rule ({{choice: [fixed, energy]}} or a "
                              "constant) to say which one a trial uses")
        return out

    def describe(self, system: str) -> str:
        """``learning_rate loguniform [1e-05, 0.0001], epochs 3`` for the report."""
        return ", ".join(f"{name} {dim.values[0]!r}" if dim.kind == "constant" else f"{name} {dim.kind} {list(dim.values)}"
                         for name, dim in self.space(system).items())

    def trials_for(self, system: str) -> list[dict[str, Any]]:
        """The ``trials`` settings of ``system``, the same on every call; of the rank rule's two
        values, only the one the trial's rule uses."""
        return [active(sample) for sample in draw_trials(self.space(system), self.trials, f"{self.seed}:{system}")]


def _phase_dimension(name: str, spec: Any, key: str) -> Dimension:
    dim = parse_setting_dimension(name, spec, key)
    values = dim.values
    if name == "epochs":
        if dim.kind in ("uniform", "loguniform"):
            raise ConfigError(f"{key}: epochs are whole numbers; use {{choice: [...]}} or {{randint: [lo, hi]}}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ConfigError(f"{key}: epochs must be integers >= 1, got {list(values)}")
    else:
        numbers = []
        for v in values:
            try:
                numbers.append(float(v))
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected a number, got {v!r}") from None
        if not all(math.isfinite(v) and v > 0 for v in numbers):
            raise ConfigError(f"{key}: a learning rate must be > 0, got {list(values)}")
        dim = Dimension(name, dim.kind, tuple(numbers))
    return dim


def _rounded(value: Any) -> Any:
    """Floats to 3 significant digits, so settings read well and repeat exactly."""
    if isinstance(value, float) and value != 0.0:
        return float(f"{value:.3g}")
    return value


def draw_trials(space: dict[str, Dimension], n: int, seed: str) -> list[dict[str, Any]]:
    """``n`` settings drawn from ``space`` (dimensions in name order) with a generator seeded by
    ``seed``: deterministic across processes and Python runs."""
    rng = random.Random(seed)
    return [{name: _rounded(space[name].sample(rng)) for name in sorted(space)} for _ in range(n)]


def active(sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` without the rank-rule value its rule does not use (``energy`` under a fixed
    rank, ``rank`` under the energy rule)."""
    rule = sample.get("rank_rule")
    unused = {"fixed": "energy", "energy": "rank"}.get(rule) if rule else None
    return {k: v for k, v in sample.items() if k != unused}


def champions(scores: dict[int, dict[str, float]], languages: list[str], rule: str = "per_language") -> dict[str, int]:
    """Per language, its champion trial (the earlier trial on a tie). ``scores[trial][language]``.
    ``per_language``: the trial with the highest validation score on that language; a language no
    trial was scored on has no champion. ``average``: for every language the trial with the highest
    mean over ``languages``, among the trials scored on all of them (none: no champion)."""
    def best(scored: list[tuple[int, float]]) -> int:
        return max(scored, key=lambda item: (item[1], -item[0]))[0]

    if rule == "average":
        complete = [(trial, sum(s[lang] for lang in languages) / len(languages))
                    for trial, s in sorted(scores.items()) if languages and all(lang in s for lang in languages)]
        return {lang: best(complete) for lang in languages} if complete else {}
    if rule != "per_language":
        raise ValueError(f"unknown champion rule {rule!r}; valid: {', '.join(CHAMPION_RULES)}")
    out: dict[str, int] = {}
    for lang in languages:
        scored = [(trial, s[lang]) for trial, s in sorted(scores.items()) if lang in s]
        if scored:
            out[lang] = best(scored)
    return out


def sample_tag(sample: dict[str, Any]) -> str:
    """A short digest of a trial's settings, naming its units on disk."""
    text = json.dumps(sample, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def trial_selection(base: SelectionConfig, sample: dict[str, Any]) -> SelectionConfig:
    """The task SFT selection of an SFT trial: ``base`` (the method's) with the sampled selection keys."""
    return selection_from_sample(base, {k: v for k, v in sample.items() if k in SELECTION_KEYS})


def describe(sample: dict[str, Any]) -> str:
    """``density=0.0123, learning_rate=0.0002`` for the report."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(sample.items()))
