"""PNG figures logged to MLflow: mask density per layer, singular-value spectra with the chosen
rank marked, F1 per language, and a sweep's trials (density vs score, coloured by rank).

Pure functions from data to a matplotlib ``Figure`` built without pyplot, so importing this module
changes no global matplotlib state (backend, open figures) and needs no display; the caller logs or
saves it. None is returned when there is nothing to plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure

from deftx.analysis import layer_key, layer_of, type_key


def _subplots(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **kwargs):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


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
    fig, ax = _subplots(figsize=(8, 3.5))
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
    fig, ax = _subplots(figsize=(7, 4))
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
    fig, ax = _subplots(figsize=(max(4, 0.9 * len(langs) + 2), 3.5))
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
    fig, ax = _subplots(figsize=(6, 4))
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
    """Release ``fig``'s contents (figures here are not registered with pyplot, so nothing else
    holds them)."""
    if fig is not None:
        fig.clear()


def spectra_by_type_figure(curves: Mapping[str, Mapping[str, torch.Tensor]], title: str):
    """Normalised singular values per layer type: ``curves[label][layer type]`` is one spectrum
    (e.g. from ``mean_normalised_spectrum``). One subplot per layer type, one line per label,
    x = index (1-based), log y. None when there is no non-empty spectrum."""
    types: set[str] = set()
    for per_type in curves.values():
        types.update(kind for kind, values in per_type.items() if values.numel())
    if not types:
        return None
    kinds = sorted(types, key=type_key)
    ncols = min(3, len(kinds))
    nrows = math.ceil(len(kinds) / ncols)
    fig, axes = _subplots((4.2 * ncols, 3.2 * nrows), nrows, ncols, squeeze=False)
    flat = axes.reshape(-1)
    for ax, kind in zip(flat, kinds):
        for label, per_type in curves.items():
            values = per_type.get(kind)
            if values is None or not values.numel():
                continue
            ys = values.detach().reshape(-1).float().cpu().numpy()
            ax.semilogy(range(1, len(ys) + 1), ys, label=label)
        ax.set_title(kind)
        ax.set_xlabel("index")
        ax.set_ylabel("normalised singular value")
        ax.legend(fontsize=7)
    for ax in flat[len(kinds):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def density_by_layer_figure(densities: Mapping[str, Mapping[str, float]], title: str):
    """Grouped bars of the selected fraction (in %) per layer: ``densities[method][layer]`` (e.g.
    from ``density_by_layer``), one bar per method in each layer's group; a layer a method lacks
    gets no bar. None when there is no data."""
    methods = [m for m, per_layer in densities.items() if per_layer]
    if not methods:
        return None
    layers = sorted({layer for m in methods for layer in densities[m]}, key=layer_key)
    width = 0.8 / len(methods)
    fig, ax = _subplots((max(6.0, 0.5 * len(layers) * len(methods) + 2), 3.8))
    for i, method in enumerate(methods):
        xs = [x - 0.4 + width * (i + 0.5) for x in range(len(layers))]
        ys = [100 * densities[method].get(layer, math.nan) for layer in layers]
        ax.bar(xs, ys, width, label=method)
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    ax.set_ylabel("selected entries (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def grouped_bars(groups: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 ylabel: str, title: str):
    """Grouped bars with error bars: ``series[name] = (values, errors)``, one value per group."""
    fig, ax = _subplots((max(6.0, 0.9 * len(groups) * max(1, len(series)) / 2.5 + 2), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, (values, errors)) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))]
        ax.bar(xs, list(values), width, yerr=list(errors), capsize=2, label=name)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
