"""What the pipeline and sweeps log to MLflow about SFTs (the driver only; workers never log).

- ``log_sft``: a run per SFT (nested under the pipeline's or sweep's run): its hyperparameters,
  the loss curve of every phase as step metrics, final metrics, the mask-density-per-layer plot,
  and ``sft.json``.
- ``spectra_figure``: singular values of the phase-1 change of a few matrices, read from a
  ``Phase1Store``, with the rank DeFT-X kept for each marked.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from deftx.core.sft import read_metadata
from deftx.tracking.live import phase_metric
from deftx.tracking.plots import close, mask_density_per_layer, singular_spectra
from deftx.tracking.tracker import RunHandle, Tracker


def log_sft(tracker: Tracker, experiment: str, parent: RunHandle | None, sft_dir: str | Path, run_name: str,
            extra_params: dict[str, Any] | None = None, existing: RunHandle | None = None) -> RunHandle:
    """A finished run describing the SFT in ``sft_dir``: ``existing``, the run its training logged
    live metrics to (``deftx.tracking.live``), completed; else a new run, with the per-step losses
    the SFT records."""
    doc = read_metadata(sft_dir)
    training = doc.get("training") or {}
    params = {"kind": doc.get("kind"), "language": doc.get("language"), "task": doc.get("task"),
              "method": doc.get("method"), "selection": {k: v for k, v in (doc.get("selection") or {}).items()
                                                         if not isinstance(v, (dict, list))},
              "base_model": doc.get("base_model"), "training": {k: v for k, v in training.items() if k != "phases"},
              **(extra_params or {})}
    tags = {"deftx.kind": str(doc.get("kind")), "deftx.sft_dir": str(sft_dir),
            "deftx.base_model": str(doc.get("base_model")), "deftx.base_fingerprint": str(doc.get("base_fingerprint"))}
    if existing is not None:
        tracker.log_params(existing, params)
        tracker.set_tags(existing, tags)
    opened = tracker.run(experiment, run_name, parent=parent, params=params, tags=tags) if existing is None else \
        _completing(tracker, existing)
    with opened as run:
        for phase in training.get("phases", []):
            name = phase_metric(phase.get("name", "phase"))
            if existing is None:   # a live run has every step already
                for step, loss in enumerate(phase.get("losses", []), 1):
                    tracker.log_metrics(run, {name: loss}, step=step)
            tracker.log_metrics(run, {f"{name}.final": phase.get("final_loss"), f"{name}.seconds": phase.get("seconds")})
        tracker.log_metrics(run, {"nnz": doc.get("nnz", 0), **{f"metrics.{k}": v for k, v in
                                                              (doc.get("metrics") or {}).items()}})
        tensors = doc.get("tensors") or {}
        fig = mask_density_per_layer({n: t["nnz"] for n, t in tensors.items()},
                                     {n: _numel(t["shape"]) for n, t in tensors.items()},
                                     title=f"{run_name}: selected entries per layer")
        if fig is not None:
            tracker.log_figure(run, fig, "plots/mask-density-per-layer.png")
            close(fig)
        tracker.log_file(run, Path(sft_dir) / "sft.json", "sft")
    return run


@contextlib.contextmanager
def _completing(tracker: Tracker, run: RunHandle) -> Iterator[RunHandle]:
    """An open run, ended FINISHED after the block (FAILED if it raises)."""
    try:
        yield run
    except BaseException:
        tracker.end_run(run, "FAILED")
        raise
    tracker.end_run(run)


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def representative_matrices(names: list[str], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """A few 2-D, non-embedding matrices: the query and FFN-in weights of the first, middle and last layer."""
    layers = sorted({int(m.group(1)) for n in names if (m := re.search(r"layer\.(\d+)\.", n))})
    if not layers:
        return [n for n in names if len(shapes[n]) == 2 and "embeddings" not in n][:4]
    picks = {layers[0], layers[len(layers) // 2], layers[-1]}
    return [n for n in sorted(names) if len(shapes[n]) == 2 and "embeddings" not in n
            and any(f"layer.{i}." in n for i in picks) and ("query" in n or "intermediate" in n)]


def spectra_figure(phase1_dir: str | Path, base_values: dict[str, torch.Tensor], ranks: dict[str, int], title: str,
                   limit: int = 128):
    """Singular values of theta1 - theta0 (the phase-1 change) for representative matrices."""
    from safetensors import safe_open

    path = Path(phase1_dir) / "phase1.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        names = [n for n in handle.keys() if n in base_values]
        shapes = {n: tuple(base_values[n].shape) for n in names}
        spectra = {}
        for name in representative_matrices(names, shapes):
            change = handle.get_tensor(name).float() - base_values[name].float()
            spectra[name.replace("encoder.layer.", "L").replace(".weight", "")] = torch.linalg.svdvals(change)[:limit]
    short_ranks = {name.replace("encoder.layer.", "L").replace(".weight", ""): r for name, r in ranks.items()}
    return singular_spectra(spectra, short_ranks, title=title)
