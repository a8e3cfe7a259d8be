"""Which parameters an SFT may change, and exact global top-K selection of mask entries.

Pure functions over tensors; no Ray, no DeepSpeed.

Parameter roles (DESIGN §2, matching cambridgeltl/composable-sft):

* **body** = every parameter of the model's base encoder (``model.base_model``) except its pooler,
  named relative to the base model (``embeddings.word_embeddings.weight``,
  ``encoder.layer.0.attention.self.query.weight``). Relative names make a language SFT trained
  on a masked-LM model apply unchanged to a sequence-classification model of the same base.
* **maskable** = body minus LayerNorm parameters (found by module type, not by name, so a tied
  or re-registered parameter cannot hide from the filter).
* **head** = trainable parameters outside the body (classifier, pooler, MLM transform/bias),
  trained densely and stored as absolute values under their full model names.
* **frozen** = LayerNorm parameters of the body and the untied MLM decoder matrix.

Selection tie rule (used everywhere, also by the distributed selection): entries are ranked by
score, larger first; among equal scores the entry that comes first in *canonical order* wins.
Canonical order = tensors sorted by name (Python string order), then row-major flat index.
Scores are compared as float32 and must be finite and non-negative (``-0.0`` counts as ``0.0``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

SFTKind = Literal["language", "task"]
SFT_KINDS: tuple[str, ...] = ("language", "task")

# -- parameter roles -------------------------------------------------------------------------


def _is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "layernorm" in type(module).__name__.lower()


def base_model(model: nn.Module) -> nn.Module:
    """The encoder inside a task model (``model.base_model`` for Hugging Face models)."""
    return getattr(model, "base_model", model)


def body_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Encoder parameters (pooler excluded), keyed by names relative to the base model."""
    base = base_model(model)
    out: dict[str, nn.Parameter] = {}
    for name, param in base.named_parameters():
        if name.startswith("pooler."):
            continue
        out[name] = param
    return out


def layer_norm_parameter_ids(module: nn.Module) -> set[int]:
    """ids of all parameters that belong to LayerNorm modules below ``module``."""
    ids: set[int] = set()
    for sub in module.modules():
        if _is_layer_norm(sub):
            ids.update(id(p) for p in sub.parameters(recurse=False))
    return ids


def embedding_parameter_names(model: nn.Module) -> set[str]:
    """Body-relative names of parameters owned by ``nn.Embedding`` modules (word, position, type)."""
    base = base_model(model)
    ids = {id(p) for m in base.modules() if isinstance(m, nn.Embedding) for p in m.parameters(False)}
    return {n for n, p in body_parameters(model).items() if id(p) in ids}


def maskable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Body parameters an SFT may change: the encoder minus LayerNorm (same for both SFT kinds)."""
    ln = layer_norm_parameter_ids(base_model(model))
    return {n: p for n, p in body_parameters(model).items() if id(p) not in ln}


def mlm_decoder(model: nn.Module) -> nn.Module | None:
    """The output projection of a masked-LM head, or None when the model has no MLM head."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def untie_and_freeze_decoder(model: nn.Module) -> None:
    """Give the MLM decoder its own frozen copy of the word embeddings (composable-sft's
    ``--freeze_decoder``): body changes to the input embeddings then do not leak into the output
    projection, and the decoder is never part of an SFT."""
    decoder = mlm_decoder(model)
    if decoder is None:
        return
    weight = decoder.weight
    decoder.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False


@dataclass(frozen=True)
class ParameterRoles:
    """The partition of a model's parameters for one SFT kind (see module docstring)."""

    maskable: dict[str, nn.Parameter]  # body-relative names
    head: dict[str, nn.Parameter]  # full model names
    frozen: dict[str, nn.Parameter]  # full model names

    @property
    def num_maskable(self) -> int:
        return sum(p.numel() for p in self.maskable.values())


def parameter_roles(model: nn.Module, kind: SFTKind) -> ParameterRoles:
    """Split ``model``'s parameters into maskable body, dense head and frozen parameters.

    For ``kind="language"`` the MLM decoder must already be untied (``untie_and_freeze_decoder``);
    a decoder still tied to the word embeddings is rejected because training the head would then
    silently train the embedding matrix densely.
    """
    if kind not in SFT_KINDS:
        raise ValueError(f"unknown SFT kind {kind!r}; valid: {', '.join(SFT_KINDS)}")
    body = body_parameters(model)
    body_ids = {id(p) for p in body.values()}
    maskable = maskable_parameters(model)
    decoder = mlm_decoder(model) if kind == "language" else None
    if decoder is not None and id(decoder.weight) in body_ids:
        raise ValueError("the MLM decoder is tied to the word embeddings; call untie_and_freeze_decoder first")
    decoder_id = id(decoder.weight) if decoder is not None else None
    head: dict[str, nn.Parameter] = {}
    frozen: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if id(param) in body_ids:
            continue
        if id(param) == decoder_id:
            frozen[name] = param
        else:
            head[name] = param
    base = base_model(model)
    prefix = _base_prefix(model)
    maskable_ids = {id(p) for p in maskable.values()}
    for name, param in base.named_parameters():
        if id(param) in body_ids and id(param) not in maskable_ids:
            frozen[prefix + name] = param
    return ParameterRoles(maskable=maskable, head=head, frozen=frozen)


def head_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the parameters an SFT's dense head may set on ``model``: trainable parameters
    outside the body (classifier, pooler, MLM transform and bias), never a body weight (embeddings,
    encoder, LayerNorm) and never the MLM decoder matrix."""
    body_ids = {id(p) for p in body_parameters(model).values()}
    decoder = mlm_decoder(model)
    decoder_id = id(decoder.weight) if decoder is not None and getattr(decoder, "weight", None) is not None else None
    return {name for name, param in model.named_parameters() if id(param) not in body_ids and id(param) != decoder_id}


def _base_prefix(model: nn.Module) -> str:
    base = base_model(model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name + "."
    return ""


# -- budgets ---------------------------------------------------------------------------------


def resolve_budget(total: int, *, k: int | None = None, density: float | None = None) -> int:
    """Number of entries to select out of ``total``: an explicit count ``k`` (0 <= k <= total)
    or a ``density`` in (0, 1] (rounded to the nearest integer). Exactly one must be given."""
    if (k is None) == (density is None):
        raise ValueError("give exactly one of k (a count) or density (a fraction in (0, 1])")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        if k > total:
            raise ValueError(f"k={k} exceeds the {total} maskable entries")
        return k
    assert density is not None
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return min(total, int(round(density * total)))


# -- exact global top-K ----------------------------------------------------------------------

_HI_BINS = 1 << 15  # float32 keys of finite non-negative numbers are < 0x7f800000: top 15 bits
_LO_BINS = 1 << 16
Reducer = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def score_keys(score: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of a finite, non-negative score tensor (flattened).

    For IEEE float32 x >= 0 the bit pattern read as int32 is monotone in x, so comparing keys
    compares scores exactly. ``-0.0`` (bit pattern 0x80000000) is mapped to the key of ``+0.0``.
    """
    flat = score.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    keys = flat.view(torch.int32)
    if keys.numel() and bool((keys < 0).any()):
        neg = keys < 0
        if bool((keys[neg] != torch.iinfo(torch.int32).min).any()):
            raise ValueError("scores must be non-negative")
        keys = torch.where(neg, torch.zeros((), dtype=torch.int32), keys)
    if keys.numel() and int(keys.max()) >= 0x7F800000:
        raise ValueError("scores must be finite (found inf or nan)")
    return keys


@dataclass(frozen=True)
class Threshold:
    """Result of the K-th-largest search: every entry with key > ``key`` is selected, and
    ``take_ties`` of the ``n_equal`` entries with key == ``key`` (the first ones in canonical order).
    ``key`` is -1 when nothing is selected (k = 0)."""

    key: int
    n_above: int
    n_equal: int
    take_ties: int

    @property
    def value(self) -> float:
        """The K-th largest score as a float (0.0 when k = 0)."""
        return float(torch.tensor([max(self.key, 0)], dtype=torch.int32).view(torch.float32))


def _pick_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Largest bin b with (#entries in bins > b) < k <= (#entries in bins >= b).
    Returns (b, #entries in bins strictly above b)."""
    from_top = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # entries in bins >= b
    b = int(torch.nonzero(from_top >= k).max())
    above = int(from_top[b + 1]) if b + 1 < counts.numel() else 0
    return b, above


def find_threshold(keys: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]], k: int,
                   reduce: Reducer = _identity) -> Threshold:
    """Exact K-th largest key over several key tensors, by a two-pass radix histogram.

    ``keys`` is a list of key tensors (from :func:`score_keys`) or a callable returning a fresh
    iterable of them (so keys can be recomputed per pass instead of held in memory). ``reduce`` sums
    a histogram over processes (``all_reduce``) in the distributed selection; the histograms are
    integer counts, so the threshold is exact for any split of the entries over processes.
    """
    source = keys if callable(keys) else (lambda ks=list(keys): ks)
    hi = torch.zeros(_HI_BINS, dtype=torch.int64)
    for t in source():
        if t.numel():
            hi += torch.bincount(torch.bitwise_right_shift(t, 16), minlength=_HI_BINS)
    hi = reduce(hi)
    total = int(hi.sum())
    if not 0 <= k <= total:
        raise ValueError(f"k={k} is outside [0, {total}]")
    if k == 0:
        return Threshold(key=-1, n_above=0, n_equal=0, take_ties=0)
    b_hi, above_hi = _pick_bin(hi, k)
    lo = torch.zeros(_LO_BINS, dtype=torch.int64)
    for t in source():
        if t.numel():
            sel = t[torch.bitwise_right_shift(t, 16) == b_hi]
            if sel.numel():
                lo += torch.bincount(torch.bitwise_and(sel, 0xFFFF), minlength=_LO_BINS)
    lo = reduce(lo)
    b_lo, above_lo = _pick_bin(lo, k - above_hi)
    n_above = above_hi + above_lo
    n_equal = int(lo[b_lo])
    return Threshold(key=(b_hi << 16) | b_lo, n_above=n_above, n_equal=n_equal, take_ties=k - n_above)


def allocate_ties(tie_counts: list[int], take: int) -> list[int]:
    """Split ``take`` tied entries over tensors given in canonical order: earlier tensors first."""
    out = []
    for count in tie_counts:
        n = min(count, take)
        out.append(n)
        take -= n
    if take:
        raise ValueError("fewer tied entries than the threshold search counted")
    return out


def mask_from_keys(keys: torch.Tensor, threshold: Threshold, take_ties: int) -> torch.Tensor:
    """Flat boolean mask: keys above the threshold plus the first ``take_ties`` keys equal to it."""
    if threshold.key < 0:
        return torch.zeros(keys.shape, dtype=torch.bool)
    mask = keys > threshold.key
    if take_ties:
        tied = torch.nonzero(keys == threshold.key).flatten()[:take_ties]
        mask[tied] = True
    return mask


def global_top_k(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks selecting exactly ``k`` entries over all tensors together (one budget).

    Ranking and tie rule as in the module docstring. Work and memory are linear in the number of
    entries: two histogram passes over int32 keys (no sort, no concatenation of all scores).
    """
    names = sorted(scores)
    keys = {n: score_keys(scores[n]) for n in names}
    threshold = find_threshold([keys[n] for n in names], k)
    ties = [int((keys[n] == threshold.key).sum()) if threshold.take_ties else 0 for n in names]
    takes = allocate_ties(ties, threshold.take_ties)
    return {n: mask_from_keys(keys[n], threshold, t).view(scores[n].shape) for n, t in zip(names, takes)}


# -- statistics ------------------------------------------------------------------------------


def count_selected(masks: Mapping[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def density_by_tensor(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of selected entries per tensor."""
    return {n: float(m.sum()) / max(m.numel(), 1) for n, m in sorted(masks.items())}
