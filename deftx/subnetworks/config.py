"""What a user sets for subnetwork training (``subnetworks:`` in a YAML file or ``--set``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deftx.config import PhaseConfig, SelectionConfig
from deftx.errors import ConfigError
from deftx.subnetworks.masks import TARGET_POLICIES

MODES = ("none", "static", "dynamic")
COVERS = ("encoder", "all")
META_LEARNING = ("none", "reptile", "fomaml")


def _fail(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {problem}")


def _default_selection() -> SelectionConfig:
    return SelectionConfig(method="lt_sft", density=0.3, energy=None)


@dataclass
class SubnetworkConfig:
    """Multi-source training where a batch of language l only updates l's subnetwork m_l.

    ``mode``: ``none`` (plain multi-source: every batch updates everything), ``static`` (m_l fixed
    before training) or ``dynamic`` (m_l re-selected every ``reselect_every`` optimizer steps from
    l's accumulated gradient). Initial masks: a ``probe_steps``-step full fine-tune from theta0 on
    l's data alone, scored by ``selection`` (LT-SFT change magnitude or DeFT-X denoised change) at
    ``selection.density`` of the maskable entries per language; ``structured`` keeps whole attention
    heads and FFN neurons. ``meta_learning`` (``reptile`` / ``fomaml``): each optimizer step is one
    outer step on one language: ``inner_steps`` masked SGD steps (``inner_learning_rate``) on that
    language's batches (FOMAML: one more batch as the query), then the meta-gradient goes through the
    phase's optimizer. ``unseen_target``: which part of the trained change a language without a
    subnetwork uses at test time (``related`` needs ``related[target]``, a source language).
    ``cover``: the tensors subnetworks restrict: ``encoder`` (every maskable tensor but the
    embeddings, which every language trains, like the classifier head) or ``all``.
    """

    mode: str = "static"
    selection: SelectionConfig = field(default_factory=_default_selection)
    structured: bool = False
    cover: str = "encoder"
    probe_steps: int = 30
    probe_learning_rate: float = 1e-4
    reselect_every: int = 0
    meta_learning: str = "none"
    inner_steps: int = 2
    inner_learning_rate: float = 1e-3
    unseen_target: str = "union"
    related: dict[str, str] = field(default_factory=dict)
    train: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=2.0, learning_rate=5e-5))

    def validate(self, key: str = "subnetworks") -> SubnetworkConfig:
        if self.mode not in MODES:
            raise _fail(f"{key}.mode", f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.meta_learning not in META_LEARNING:
            raise _fail(f"{key}.meta_learning",
                        f"unknown algorithm {self.meta_learning!r}; valid: {', '.join(META_LEARNING)}")
        if self.unseen_target not in TARGET_POLICIES:
            raise _fail(f"{key}.unseen_target",
                        f"unknown policy {self.unseen_target!r}; valid: {', '.join(TARGET_POLICIES)}")
        if self.cover not in COVERS:
            raise _fail(f"{key}.cover", f"unknown cover {self.cover!r}; valid: {', '.join(COVERS)}")
        self.selection.validate(f"{key}.selection")
        self.train.validate(f"{key}.train")
        if self.selection.density is None:
            raise _fail(f"{key}.selection.density", "a subnetwork is sized by density (a fraction per language)")
        if self.mode == "dynamic":
            if self.reselect_every < 1:
                raise _fail(f"{key}.reselect_every", f"dynamic masks need an interval >= 1, got {self.reselect_every}")
            if self.selection.svd_target != "delta":
                raise _fail(f"{key}.selection.svd_target", "dynamic masks score accumulated gradients, which have "
                            "no finetuned/pretrained weights to decompose: use delta")
        elif self.reselect_every:
            raise _fail(f"{key}.reselect_every", f"only dynamic masks are re-selected (mode is {self.mode})")
        if self.mode != "none" and self.probe_steps < 1:
            raise _fail(f"{key}.probe_steps", f"must be >= 1, got {self.probe_steps}")
        if not self.probe_learning_rate > 0:
            raise _fail(f"{key}.probe_learning_rate", f"must be > 0, got {self.probe_learning_rate}")
        if self.meta_learning != "none":
            if self.inner_steps < 1:
                raise _fail(f"{key}.inner_steps", f"must be >= 1, got {self.inner_steps}")
            if not self.inner_learning_rate > 0:
                raise _fail(f"{key}.inner_learning_rate", f"must be > 0, got {self.inner_learning_rate}")
        if not isinstance(self.related, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.related.items()):
            raise _fail(f"{key}.related", f"expected a mapping target -> source language, got {self.related!r}")
        return self

    def check_languages(self, sources: list[str], targets: list[str], key: str = "subnetworks") -> None:
        """``related`` names sources, and covers every unseen target when the policy needs it."""
        for target, source in self.related.items():
            if source not in sources:
                raise _fail(f"{key}.related.{target}", f"{source!r} is not a source language "
                            f"({', '.join(sources)})")
        if self.unseen_target == "related":
            missing = [t for t in targets if t not in sources and t not in self.related]
            if missing:
                raise _fail(f"{key}.related", f"unseen_target is 'related' but no related language is set for "
                            f"{', '.join(missing)}")

    @property
    def batches_per_step(self) -> int:
        """Batches one optimizer step consumes (meta-learning: a whole inner loop)."""
        if self.meta_learning == "none":
            return 1
        return self.inner_steps + (1 if self.meta_learning == "fomaml" else 0)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "density": self.selection.density,
                               "selection": self.selection.method, "structured": self.structured,
                               "cover": self.cover,
                               "meta_learning": self.meta_learning, "unseen_target": self.unseen_target}
        if self.mode == "dynamic":
            out["reselect_every"] = self.reselect_every
        if self.meta_learning != "none":
            out.update(inner_steps=self.inner_steps, inner_learning_rate=self.inner_learning_rate)
        return out
