"""Attention heads and FFN neurons of a BERT-family encoder (BERT, XLM-R, e5), as groups of entries.

Head h of a layer owns rows ``h*d .. (h+1)*d`` of the query, key and value weights and biases and
the same columns of the attention output projection (d = hidden / heads). FFN neuron j owns row j
of the intermediate weight, entry j of its bias and column j of the FFN output weight. A
structured subnetwork keeps or drops such a group as a whole.

Names are those of ``deftx.core.roles.body_parameters`` (relative to the base model, e.g.
``encoder.layer.3.attention.self.query.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

_LAYER = re.compile(r"^(?P<layer>.*layer\.\d+)\.(?P<part>attention\.self\.(?:query|key|value)\.(?:weight|bias)"
                    r"|attention\.output\.dense\.weight|intermediate\.dense\.(?:weight|bias)|output\.dense\.weight)$")
_HEAD_ROWS = tuple(f"attention.self.{m}.{p}" for m in ("query", "key", "value") for p in ("weight", "bias"))
_HEAD_COLS = "attention.output.dense.weight"
_NEURON_ROWS = ("intermediate.dense.weight", "intermediate.dense.bias")
_NEURON_COLS = "output.dense.weight"


class StructureError(ValueError):
    """The model's tensors do not have the layout structured subnetworks need."""


@dataclass(frozen=True)
class LayerGroups:
    """The tensors of one encoder layer that heads and neurons are made of (full names)."""

    layer: str
    head_rows: tuple[str, ...]      # split along dim 0 into heads
    head_cols: str | None           # split along dim 1 into heads
    neuron_rows: tuple[str, ...]    # split along dim 0 into neurons
    neuron_cols: str | None         # split along dim 1 into neurons


@dataclass(frozen=True)
class EncoderStructure:
    num_heads: int
    layers: tuple[LayerGroups, ...]

    @property
    def grouped(self) -> frozenset[str]:
        """Every tensor that belongs to heads or neurons."""
        out: set[str] = set()
        for g in self.layers:
            out.update(g.head_rows + g.neuron_rows)
            out.update(n for n in (g.head_cols, g.neuron_cols) if n)
        return frozenset(out)


def encoder_structure(shapes: Mapping[str, tuple[int, ...]], num_heads: int) -> EncoderStructure:
    """Find the heads and neurons among ``shapes`` (body name -> shape); a clear error if there are
    none or if a tensor does not split into ``num_heads`` heads."""
    if num_heads < 1:
        raise StructureError(f"num_heads must be >= 1, got {num_heads}")
    parts: dict[str, dict[str, str]] = {}
    for name in shapes:
        m = _LAYER.match(name)
        if m:
            parts.setdefault(m["layer"], {})[m["part"]] = name
    if not parts:
        raise StructureError("no encoder layer with attention/FFN tensors named as in BERT or XLM-R; "
                             "structured subnetworks need that layout (use structured: false)")
    layers = []
    for layer in sorted(parts, key=_layer_key):
        found = parts[layer]
        group = LayerGroups(layer=layer, head_rows=tuple(found[p] for p in _HEAD_ROWS if p in found),
                            head_cols=found.get(_HEAD_COLS),
                            neuron_rows=tuple(found[p] for p in _NEURON_ROWS if p in found),
                            neuron_cols=found.get(_NEURON_COLS))
        for name in group.head_rows:
            _check_divisible(name, shapes[name][0], num_heads)
        if group.head_cols:
            _check_divisible(group.head_cols, shapes[group.head_cols][1], num_heads)
        layers.append(group)
    return EncoderStructure(num_heads=num_heads, layers=tuple(layers))


def _layer_key(layer: str) -> tuple[str, int]:
    head, _, index = layer.rpartition(".")
    return head, int(index)


def _check_divisible(name: str, size: int, heads: int) -> None:
    if size % heads:
        raise StructureError(f"{name}: size {size} does not split into {heads} attention heads")


def _groups(g: LayerGroups, shapes: Mapping[str, tuple[int, ...]], num_heads: int):
    """(kind, row-split tensors, column-split tensor, number of groups) of layer ``g``."""
    yield "heads", g.head_rows, g.head_cols, num_heads
    if g.neuron_rows or g.neuron_cols:
        n = shapes[g.neuron_rows[0]][0] if g.neuron_rows else shapes[g.neuron_cols][1]  # type: ignore[index]
        yield "neurons", g.neuron_rows, g.neuron_cols, n


def group_means(tensors: Mapping[str, torch.Tensor], structure: EncoderStructure) -> dict[str, torch.Tensor]:
    """Per group (keys ``<layer>.heads`` / ``<layer>.neurons``) the mean of its entries' values
    (float64): a head's or neuron's score, or the fraction of it a mask selects."""
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    for g in structure.layers:
        for kind, rows, cols, n in _groups(g, shapes, structure.num_heads):
            if not (rows or cols):
                continue
            total = torch.zeros(n, dtype=torch.float64)
            count = 0
            for name in rows:
                total += tensors[name].double().reshape(n, -1).sum(1)
                count += tensors[name].numel() // n
            if cols:
                t = tensors[cols].double()
                total += t.reshape(t.shape[0], n, -1).sum((0, 2))
                count += t.numel() // n
            out[f"{g.layer}.{kind}"] = total / count
    return out


def expand_groups(per_group: Mapping[str, torch.Tensor], structure: EncoderStructure,
                  shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`group_means`: each grouped tensor filled with its groups' values."""
    out: dict[str, torch.Tensor] = {}
    for g in structure.layers:
        for kind, rows, cols, n in _groups(g, shapes, structure.num_heads):
            values = per_group.get(f"{g.layer}.{kind}")
            if values is None:
                continue
            for name in rows:
                out[name] = values.repeat_interleave(_numel(shapes[name]) // n).view(shapes[name])
            if cols:
                r, c = shapes[cols]
                out[cols] = values.repeat_interleave(c // n).expand(r, c).clone()
    return out


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
