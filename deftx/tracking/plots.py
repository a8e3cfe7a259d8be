"""PNG figures logged to MLflow: mask density per layer, singular-value spectra with the chosen
rank marked, F1 per language, and a sweep's trials (density vs score, coloured by rank).

Pure functions from data to a matplotlib ``Figure`` (Agg backend: no display needed); the caller
logs or saves it. None is returned when there is nothing to plot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

_LAYER = re.compile(r"layers?\.(\d+)\.")


def layer_of(name: str) -> str:
    """``encoder.layer.3.attention...`` -> ``layer 3``; embeddings -> ``embeddings``."""
    match = _LAYER.search(name)
    if match:
        return f"layer {int(match.group(1))}"
    return "embeddings" if "embeddings" in name else "other"


def mask_density_per_layer(nnz: Mapping[str, int], numel: Mapping[str, int], title: str = ""):
    """Bar chart of the selected fraction per layer (``nnz`` and ``numel`` per tensor)."""
    totals: dict[str, list[int]] = {}
    for name, count in nnz.items():
        layer = layer_of(name)
        agg = totals.setdefault(layer, [0, 0])
        agg[0] += count
        agg[1] += numel[name]
    if not totals:
        return None

    def order(layer: str) -> tuple[int, int]:
        return (0, 0) if layer == "embeddings" else (1, int(layer.split()[1])) if layer.startswith("layer") else (2, 0)

    layers = sorted(totals, key=order)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(layers)), [100 * totals[layer][0] / max(totals[layer][1], 1) for layer in layers])
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    ax.set_ylabel("selected entries (%)")
    ax.set_title(title or "mask density per layer")
    fig.tight_layout()
    return fig


def singular_spectra(spectra: Mapping[str, torch.Tensor], ranks: Mapping[str, int] | None = None, title: str = ""):
    """Singular values of a few change matrices (log scale), with the rank DeFT-X kept marked."""
    if not spectra:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in spectra.items():
        line, = ax.semilogy(range(1, len(values) + 1), values.float().numpy(), label=name)
        rank = (ranks or {}).get(name)
        if rank:
            ax.axvline(rank, color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(title or "singular values of the phase-1 change (dashed: kept rank)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def language_bars(scores: Mapping[str, float], metric: str, title: str = "", baseline: Mapping[str, float] | None = None):
    """Bars of ``metric`` (a fraction, shown in %) per language, optionally beside a baseline."""
    langs = list(scores)
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(langs) + 2), 3.5))
    width = 0.4 if baseline else 0.8
    xs = range(len(langs))
    ax.bar([x - (width / 2 if baseline else 0) for x in xs], [100 * scores[lang] for lang in langs], width,
           label=metric)
    if baseline:
        ax.bar([x + width / 2 for x in xs], [100 * baseline.get(lang, 0.0) for lang in langs], width,
               label="baseline")
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs), langs)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title or metric)
    fig.tight_layout()
    return fig


def trial_scatter(rows: Sequence[Mapping[str, Any]], metric: str, title: str = ""):
    """Each finished trial: density (log x) against its score, marker by method, colour by rank."""
    points = [r for r in rows if r.get("score") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("lt_sft", "o"), ("deft_x", "^")):
        mine = [r for r in points if r["config"].get("method", "lt_sft") == method]
        if not mine:
            continue
        ranks = [float(r["config"].get("rank") or 0) if r["config"].get("rank_rule", "fixed") == "fixed" else 0.0
                 for r in mine]
        scatter = ax.scatter([r["config"].get("density", float("nan")) for r in mine],
                             [100 * r["score"] for r in mine], c=ranks, marker=marker, cmap="viridis",
                             label=method, edgecolors="k")
    ax.set_xscale("log")
    ax.set_xlabel("density")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=8)
    fig.colorbar(scatter, ax=ax, label="rank (0: energy rule or LT-SFT)")
    ax.set_title(title or "trials")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    if fig is not None:
        plt.close(fig)
