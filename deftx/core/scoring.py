"""Mask selection after phase 1: a per-tensor scoring step followed by one global top-K.

The scoring step is pluggable: LT-SFT scores an entry by the magnitude of its phase-1 change,
DeFT-X by the magnitude of the SVD-denoised change (``deftx.core.denoise``). Scorers work on one tensor
at a time, so a distributed selection can score only the tensors a worker owns and then run the
exact threshold search of ``deftx.core.topk`` over all workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from deftx.core.denoise import DenoiseInfo, denoise_with_info
from deftx.core.options import SVD_TARGETS
from deftx.core.topk import KeySource, TensorKeys, score_keys, top_k_of_sources


class MaskScorer(Protocol):
    """Scores one maskable tensor from its values before (theta0) and after (theta1) phase 1."""

    def __call__(self, name: str, theta0: torch.Tensor, theta1: torch.Tensor) -> torch.Tensor: ...


def change_magnitude(name: str, theta0: torch.Tensor, theta1: torch.Tensor) -> torch.Tensor:
    """LT-SFT score: |theta1 - theta0|."""
    return (theta1.detach().float() - theta0.detach().float()).abs_()


class ChangeKeys:
    """The keys of :func:`change_magnitude` computed a slice at a time (a ``KeySource`` of
    ``deftx.core.topk``): the selection reads the change where it needs it instead of holding a
    score tensor as large as the model. Element-wise, so the keys equal those of the whole tensor."""

    def __init__(self, theta0: torch.Tensor, theta1: torch.Tensor) -> None:
        if theta0.shape != theta1.shape:
            raise ValueError(f"shapes differ: {tuple(theta0.shape)} vs {tuple(theta1.shape)}")
        self._a = theta0.detach().reshape(-1)
        self._b = theta1.detach().reshape(-1)
        self.numel = self._a.numel()

    def _score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return score_keys((b.float() - a.float()).abs_())

    def sample(self, stride: int) -> torch.Tensor:
        return self._score(self._a[::stride], self._b[::stride])

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        return self._score(self._a[start:stop], self._b[start:stop])

    def keys(self) -> torch.Tensor:
        return self._score(self._a, self._b)


@dataclass
class DenoisedChangeScorer:
    """DeFT-X score: |denoise(theta1 - theta0)| for 2-D matrices, |theta1 - theta0| otherwise.

    Embedding matrices (``embedding_names``) skip the SVD unless ``denoise_embeddings`` is set.
    The rank and solver chosen per matrix are recorded in ``infos``.
    """

    rank: int | None = None
    energy: float | None = 0.9
    residual_keep: float = 0.0
    svd_target: str = "delta"
    denoise_embeddings: bool = False
    embedding_names: frozenset[str] = frozenset()
    solver: str = "auto"
    infos: dict[str, DenoiseInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.svd_target not in SVD_TARGETS:
            raise ValueError(f"unknown svd_target {self.svd_target!r}; valid: {', '.join(SVD_TARGETS)}")

    def denoises(self, name: str, shape: torch.Size | tuple[int, ...]) -> bool:
        return len(shape) == 2 and (self.denoise_embeddings or name not in self.embedding_names)

    def __call__(self, name: str, theta0: torch.Tensor, theta1: torch.Tensor) -> torch.Tensor:
        if not self.denoises(name, theta0.shape):
            return change_magnitude(name, theta0, theta1)
        delta = theta1.detach().float() - theta0.detach().float()
        basis = {"delta": None, "finetuned": theta1, "pretrained": theta0}[self.svd_target]
        denoised, info = denoise_with_info(delta, self.rank, self.energy, self.residual_keep,
                                           basis=basis, solver=self.solver)  # type: ignore[arg-type]
        self.infos[name] = info
        return denoised.abs_()


@dataclass
class SelectionReport:
    """Summary of one selection, stored in SFT metadata and logged."""

    k: int
    selected: int
    maskable: int
    density_by_tensor: dict[str, float]
    ranks: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_masks(cls, k: int, masks: Mapping[str, torch.Tensor], ranks: Mapping[str, int]) -> SelectionReport:
        counts = {n: int(torch.count_nonzero(m)) for n, m in sorted(masks.items())}  # one pass per mask
        return cls(k=k, selected=sum(counts.values()), maskable=sum(m.numel() for m in masks.values()),
                   density_by_tensor={n: c / max(masks[n].numel(), 1) for n, c in counts.items()},
                   ranks=dict(ranks))

    def as_dict(self) -> dict:
        return {"k": self.k, "selected": self.selected, "maskable": self.maskable,
                "ranks": dict(self.ranks)}


def select_masks(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor], k: int,
                 scorer: MaskScorer = change_magnitude) -> tuple[dict[str, torch.Tensor], SelectionReport]:
    """Score every tensor, then pick exactly ``k`` entries globally (``deftx.core.topk`` tie rule)."""
    if set(theta0) != set(theta1):
        raise ValueError("theta0 and theta1 must hold the same tensors")
    sources = {n: key_source(scorer, n, theta0[n], theta1[n]) for n in sorted(theta0)}
    flat = top_k_of_sources(sources, k)
    del sources
    masks = {n: flat[n].view(theta0[n].shape) for n in sorted(theta0)}
    infos = getattr(scorer, "infos", {})
    return masks, SelectionReport.from_masks(k, masks, {n: i.rank for n, i in infos.items()})


def is_elementwise(scorer: MaskScorer, name: str, shape: tuple[int, ...]) -> bool:
    """True when ``scorer`` scores every entry of this tensor from that entry alone (the plain
    change magnitude: LT-SFT, and tensors DeFT-X does not denoise), so any part of the tensor can
    be scored on its own. False for unknown scorers."""
    return scorer is change_magnitude or (isinstance(scorer, DenoisedChangeScorer)
                                          and not scorer.denoises(name, shape))


def denoised_tensors(scorer: MaskScorer, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, bool] | None:
    """Which tensors ``scorer`` scores by an SVD (None when it has no such notion)."""
    denoises = getattr(scorer, "denoises", None)
    return {n: bool(denoises(n, s)) for n, s in shapes.items()} if callable(denoises) else None


def key_source(scorer: MaskScorer, name: str, theta0: torch.Tensor, theta1: torch.Tensor) -> KeySource:
    """The selection keys of one tensor (or of a part of an element-wise-scored one): computed
    lazily when its score is the plain change magnitude, else from the scorer's tensor."""
    if is_elementwise(scorer, name, tuple(theta0.shape)):
        return ChangeKeys(theta0, theta1)
    return TensorKeys(score_keys(scorer(name, theta0, theta1)))


def make_scorer(method: str, *, rank: int | None = None, energy: float | None = None,
                residual_keep: float = 0.0, svd_target: str = "delta", denoise_embeddings: bool = False,
                embedding_names: frozenset[str] = frozenset(), solver: str = "auto") -> MaskScorer:
    """The scorer for ``method`` ("lt_sft" or "deft_x")."""
    if method == "lt_sft":
        return change_magnitude
    if method == "deft_x":
        return DenoisedChangeScorer(rank=rank, energy=energy, residual_keep=residual_keep,
                                    svd_target=svd_target, denoise_embeddings=denoise_embeddings,
                                    embedding_names=embedding_names, solver=solver)
    raise ValueError(f"unknown method {method!r}; valid: lt_sft, deft_x")
