"""Shared helpers for the benchmarks in this directory (not part of the deftx package).

* machine info printed at the top of every run;
* process memory: current RSS, resetting the kernel's peak-RSS watermark, reading the peak;
* the e5-small-shaped model (random init) and a smaller ``--quick`` variant;
* small statistics / table formatting helpers.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from collections.abc import Sequence

# -- model shapes ----------------------------------------------------------------------------

E5_SMALL = dict(vocab_size=250037, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)
QUICK = dict(E5_SMALL, vocab_size=50000, num_hidden_layers=4)


def model_config(quick: bool) -> dict:
    return dict(QUICK if quick else E5_SMALL)


def build_model(quick: bool, seed: int = 0):
    """Random-init ``BertModel`` with the multilingual-e5-small shapes (or the quick variant).

    Deterministic for a given seed, so separate processes get bit-identical theta0.
    """
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**model_config(quick)), add_pooling_layer=False)
    model.requires_grad_(False)
    return model


def benchmark_model_path(quick: bool) -> str:
    """A Hugging Face model directory: a tiny random model built here (``quick``) or the offline e5."""
    if quick:
        import sys
        import tempfile
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import build_tiny_model

        return str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    from deftx.offline_model import ensure_offline_e5

    return str(ensure_offline_e5())


def describe_model(quick: bool, maskable: dict) -> str:
    cfg = model_config(quick)
    n = sum(p.numel() for p in maskable.values())
    return (f"{'QUICK ' if quick else ''}e5-small-shaped BertModel (random init): vocab {cfg['vocab_size']}, "
            f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, ffn {cfg['intermediate_size']}; "
            f"{n:,} maskable entries in {len(maskable)} tensors")


# -- machine info ----------------------------------------------------------------------------


def _parallel_backend(torch) -> str:
    for line in torch.__config__.parallel_info().splitlines():
        if line.startswith("ATen parallel backend:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine_info() -> str:
    import numpy as np
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = f", RAM {int(line.split()[1]) / 2**20:.1f} GiB"
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = ", ".join(f"{k}={os.environ.get(k, '(unset)')}"
                    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"))
    return (f"machine: {cpu}; {os.cpu_count()} logical cores ({affinity} usable){mem}\n"
            f"python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads, {_parallel_backend(torch)} backend), "
            f"numpy {np.__version__}, platform {platform.platform()}\n"
            f"env: {env}")


# -- memory ----------------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; falls back to ru_maxrss)."""
    kib = _status_kib("VmRSS")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the peak-RSS watermark (VmHWM, and with it ru_maxrss) to the current RSS.

    Uses ``/proc/self/clear_refs`` (Linux >= 4.0). Returns False when not possible; the peak then
    includes everything since process start (still fine when the run is lean before the method).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS in bytes since process start or the last :func:`reset_peak_rss`:
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        return kib
    return kib * 1024


# -- formatting ------------------------------------------------------------------------------


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def summary(values: Sequence[float], digits: int = 2) -> str:
    """'median [min-max] (n)'."""
    vals = list(values)
    if not vals:
        return "-"
    fmt = f"{{:.{digits}f}}"
    if len(vals) == 1:
        return f"{fmt.format(vals[0])} (1)"
    return (f"{fmt.format(statistics.median(vals))} [{fmt.format(min(vals))}-{fmt.format(max(vals))}] "
            f"({len(vals)})")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pastes directly into README.md)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def load_note(when: str) -> str:
    """The 1/5/15-minute load averages, with a warning when other work competes for the cores."""
    try:
        load = os.getloadavg()
    except OSError:
        return f"load average {when}: unavailable"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    note = f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({cores} cores)"
    if load[0] > cores + 0.5:
        note += ("\n  WARNING: the machine is busy. With other processes on the cores, OpenMP threads that "
                 "spin-wait make multi-threaded torch code (many parallel regions, SVDs) 10-40x slower while "
                 "single-threaded Python code is barely affected: timings and ratios are distorted. Re-run when "
                 "idle, or with OMP_WAIT_POLICY=PASSIVE (or --threads 1).")
    return note


def add_json_option(parser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the key figures to FILE (as JSON; "
                        "benchmarks/distributed_phases.py collects them into one table)")


def write_json(path: str | None, figures: dict) -> None:
    """Write ``figures`` to ``path`` (if given) for a collecting script."""
    if path:
        import json

        with open(path, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=1)
