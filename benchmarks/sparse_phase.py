"""Phase 2 at the scale of K against the dense-masked phase 2 and against phase 1, in one process, on
the same model (offline multilingual-e5-small classifier), the same NusaX batches, the same masks
(random, at density K) and 2 threads: seconds per optimizer step, trainable entries, AdamW state.

    python benchmarks/sparse_phase.py [--steps 10] [--densities 0.01,0.05] [--quick]

Step times are medians after 2 warm-up steps. The ratio the issue tracks is phase-2 step time /
phase-1 step time at K = 5%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import add_json_option, benchmark_model_path, machine_info, mb, table, write_json

WARMUP = 2


def _model(model_path: str):
    from deftx.core.roles import parameter_roles
    from deftx.data import NUSAX_LABELS
    from deftx.models import load_classifier

    model = load_classifier(model_path, NUSAX_LABELS, seed=0)
    roles = parameter_roles(model, "task")
    for p in roles.frozen.values():
        p.requires_grad_(False)
    return model, roles


def _masks(params, density: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.rand(p.shape, generator=gen) < density for n, p in params.items()}


def _state_bytes(engine, params) -> int:
    total = 0
    for p in params:
        for value in engine.optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.numel() > 1:
                total += value.numel() * value.element_size()
    return total


def measure(model_path: str, mode: str, density: float, steps: int) -> dict:
    from deftx.data import load_nusax_senti
    from deftx.models import load_tokenizer
    from deftx.training.batches import classification_stream
    from deftx.training.engine import TorchEngine
    from deftx.training.objectives import classification_loss
    from deftx.training.phase import run_phase
    from deftx.training.sparse import SparseUpdate
    from deftx.training.sparse_values import SparsePhase

    torch.set_num_threads(2)
    tok = load_tokenizer(model_path)
    model, roles = _model(model_path)
    start = {n: p.detach().clone() for n, p in roles.maskable.items()}
    masks = _masks(roles.maskable, density)
    after: list = []
    if mode == "phase 1 (full)":
        trainable = list(roles.maskable.values())
    elif mode == "phase 2, dense-masked":
        sparse = SparseUpdate(roles.maskable, masks, start)
        sparse.install()
        trainable = sparse.trainable()
        after = [sparse.project]
    else:
        phase = SparsePhase(model, roles.maskable, masks, start)
        phase.install()
        trainable = phase.trainable()
    params = trainable + list(roles.head.values())
    engine = TorchEngine(model, params, learning_rate=5e-5, weight_decay=0.01, total_steps=steps)
    stream = classification_stream(tok, load_nusax_senti("ind", "train"), batch_size=16, seed=0, max_length=128)
    stamps: list[float] = [time.perf_counter()]
    run_phase(engine, stream.batch_at, classification_loss, num_steps=steps, name="bench", after_step=after,
              on_step=lambda step, loss: stamps.append(time.perf_counter()), log=lambda s: None)
    per_step = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:])]
    return {"seconds": statistics.median(per_step), "trainable": sum(p.numel() for p in trainable),
            "state": _state_bytes(engine, trainable)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--densities", default="0.01,0.05")
    parser.add_argument("--quick", action="store_true", help="a tiny random model (a smoke run, not a result)")
    add_json_option(parser)
    args = parser.parse_args()
    print(machine_info())
    path = benchmark_model_path(args.quick)
    full = measure(path, "phase 1 (full)", 1.0, args.steps)
    rows = [["phase 1 (full)", "-", f"{full['seconds']:.3f}", "1.00", f"{full['trainable']:,}", mb(full["state"])]]
    figures: dict = {"phase 1": full}
    for density in (float(d) for d in args.densities.split(",")):
        for mode in ("phase 2, dense-masked", "phase 2, K values"):
            res = measure(path, mode, density, args.steps)
            figures[f"{mode} @ {density:g}"] = res
            rows.append([mode, f"{density:g}", f"{res['seconds']:.3f}", f"{res['seconds'] / full['seconds']:.2f}",
                         f"{res['trainable']:,}", mb(res["state"])])
    print(table(["phase", "density", "s/step (median)", "vs phase 1", "trainable entries", "AdamW state (body)"],
                rows))
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
