"""Subnetwork masks: selection (unstructured or whole heads/neurons), union, and the mask an unseen
target language uses at test time. Pure functions over name -> tensor mappings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from deftx.core.scoring import MaskScorer, change_magnitude
from deftx.core.topk import count_selected, global_top_k
from deftx.subnetworks.structure import EncoderStructure, expand_groups, group_means

TARGET_POLICIES = ("union", "full", "related")


def select_subnetwork(start: Mapping[str, torch.Tensor], moved: Mapping[str, torch.Tensor], k: int,
                      scorer: MaskScorer = change_magnitude,
                      structure: EncoderStructure | None = None) -> dict[str, torch.Tensor]:
    """The ``k`` entries whose change ``start -> moved`` scores highest (the SFT selection code).

    With ``structure``, heads and FFN neurons are kept or dropped whole, ranked by the mean score of
    their entries against the single entries of the other tensors (embeddings, output biases, ...).
    A group that would only partly fit is dropped and its budget filled with the next-best single
    entries, so the count is exactly ``k`` whenever there are enough single entries, else at most k.
    """
    if set(start) != set(moved):
        raise ValueError("start and moved must hold the same tensors")
    scores = {n: scorer(n, start[n], moved[n]).float() for n in sorted(start)}
    if structure is None:
        return global_top_k(scores, k)
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    grouped = structure.grouped & set(scores)
    ranked = {**scores, **expand_groups(group_means({n: scores[n] for n in grouped}, structure), structure, shapes)}
    masks = global_top_k({n: t.float() for n, t in ranked.items()}, k)
    coverage = group_means({n: masks[n] for n in grouped}, structure)
    whole = {key: (c == 1.0).double() for key, c in coverage.items()}
    for name, keep in expand_groups(whole, structure, shapes).items():
        masks[name] = keep.bool()
    singles = sorted(set(scores) - grouped)
    short = k - count_selected(masks)
    if short > 0 and singles:
        taken = sum(int(masks[n].sum()) for n in singles)
        available = sum(scores[n].numel() for n in singles)
        masks.update(global_top_k({n: scores[n] for n in singles}, min(taken + short, available)))
    return masks


def union_masks(masks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Entries selected by any of ``masks`` (all over the same tensors)."""
    if not masks:
        raise ValueError("the union of no masks is undefined")
    out = {n: m.bool().clone() for n, m in masks[0].items()}
    for other in masks[1:]:
        if set(other) != set(out):
            raise ValueError("masks over different tensors cannot be united")
        for n, m in other.items():
            out[n] |= m.bool()
    return out


def target_mask(policy: str, target: str, masks: Mapping[str, Mapping[str, torch.Tensor]],
                touched: Mapping[str, torch.Tensor], related: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The part of the trained change an evaluation language uses.

    A source language (one with a mask) uses its own mask. An unseen target uses, by ``policy``:
    ``related``: the mask of ``related[target]`` (a source language); ``union``: the union of the
    source masks; ``full``: every entry training changed (``touched``; equals ``union`` for static
    masks, and is larger for dynamic ones, whose earlier masks also changed entries).
    """
    if policy not in TARGET_POLICIES:
        raise ValueError(f"unknown target policy {policy!r}; valid: {', '.join(TARGET_POLICIES)}")
    if target in masks:
        return {n: m.bool() for n, m in masks[target].items()}
    if policy == "full":
        return {n: m.bool() for n, m in touched.items()}
    if policy == "union":
        return union_masks(list(masks.values()))
    choice = (related or {}).get(target)
    if choice is None:
        raise ValueError(f"target policy 'related' has no related language for {target!r}")
    if choice not in masks:
        raise ValueError(f"the related language {choice!r} of {target!r} has no subnetwork; "
                         f"trained: {', '.join(sorted(masks))}")
    return {n: m.bool() for n, m in masks[choice].items()}
