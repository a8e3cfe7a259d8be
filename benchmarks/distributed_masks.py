"""Distributed mask selection under DeepSpeed ZeRO-3: wall time and peak RSS per worker of
gather-own + denoise/score + exact global top-K + bit-packed mask all-gather, for W=1 and W=2, and
against gathering every tensor on rank 0, selecting there and broadcasting the masks.

Models: random weights with the shapes of the offline e5-small and of XLM-R base (maskable body:
embeddings + 12 layers, LayerNorm excluded); theta1 = theta0 + a random change of 1e-3 scale.
Method: DeFT-X (energy 0.9; embeddings skip the SVD, as by default), K = 1% of maskable entries.

    python benchmarks/distributed_masks.py [--quick] [--models e5,xlmr]

Run it on an idle machine (2 workers share the 2 cores; each worker uses 1 thread).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import add_json_option, gb, machine_info, peak_rss, reset_peak_rss, table, write_json
from torch import nn

SHAPES = {
    "e5": dict(vocab=250037, hidden=384, ffn=1536, layers=12),
    "xlmr": dict(vocab=250002, hidden=768, ffn=3072, layers=12),
    "quick": dict(vocab=30000, hidden=256, ffn=1024, layers=4),
}


def body_shapes(vocab: int, hidden: int, ffn: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embeddings.word_embeddings.weight": (vocab, hidden),
                                          "embeddings.position_embeddings.weight": (514, hidden)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"] = (hidden, hidden)
            shapes[p + name + ".bias"] = (hidden,)
        shapes[p + "intermediate.dense.weight"] = (ffn, hidden)
        shapes[p + "intermediate.dense.bias"] = (ffn,)
        shapes[p + "output.dense.weight"] = (hidden, ffn)
        shapes[p + "output.dense.bias"] = (hidden,)
    return shapes


class Tensors(nn.Module):
    """A module holding the tensors (names with '.' replaced), and a trivial forward for DeepSpeed."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, change: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = sorted(shapes)
        self.params = nn.ParameterList()
        for name in self.names:
            base = torch.randn(shapes[name], generator=g) * 0.02
            if change:
                base += torch.randn(shapes[name], generator=g) * 1e-3
            self.params.append(nn.Parameter(base))

    def by_name(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.names, self.params))


def theta0_of(shapes, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """theta0 for ``names`` only, regenerated from the seed (no rank holds all of theta0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        base = torch.randn(shapes[name], generator=g) * 0.02
        torch.randn(shapes[name], generator=g)  # keep the stream aligned with Tensors(change=True)
        if name in names:
            out[name] = base
    return out


def _worker(rank: int, world: int, store: str, model: str, strategy: str, out: str) -> None:
    os.environ.update(GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    import deepspeed

    from deftx.core.scoring import denoised_tensors, is_elementwise, make_scorer, select_masks
    from deftx.core.topk import resolve_budget
    from deftx.training.distributed.engine import gather_owned
    from deftx.training.distributed.selection import distributed_select_masks, local_part, plan_shards

    shapes = body_shapes(**SHAPES[model])
    module = Tensors(shapes, seed=0, change=True)
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-3),
                                      config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                                              "zero_allow_untested_optimizer": True})
    params = module.by_name()
    embeddings = frozenset(n for n in shapes if "embeddings" in n)
    scorer = make_scorer("deft_x", energy=0.9, embedding_names=embeddings)
    k = resolve_budget(sum(math.prod(s) for s in shapes.values()), density=0.01)
    plan = plan_shards(shapes, world, denoised=denoised_tensors(scorer, shapes),
                       elementwise={n: is_elementwise(scorer, n, s) for n, s in shapes.items()})
    needed = plan.needed(rank) if strategy == "distributed" else (dict.fromkeys(shapes) if rank == 0 else {})
    # theta_start is in memory before a real selection: prepared before the clock starts
    theta0 = {n: local_part(t, needed[n]) for n, t in theta0_of(shapes, list(needed), 0).items()}
    dist.barrier()
    reset_peak_rss()
    start = time.perf_counter()
    mine = gather_owned(params, needed, 3)
    gathered_at = time.perf_counter()
    if strategy == "distributed":
        masks, report = distributed_select_masks(plan, theta0, mine, k, scorer)
    else:  # everything to rank 0, select there, broadcast the bit-packed masks
        if rank == 0:
            masks, report = select_masks(theta0, mine, k, scorer)
            flat = torch.cat([masks[n].reshape(-1) for n in sorted(shapes)])
            packed = torch.from_numpy(np.packbits(flat.numpy().astype(np.uint8)))
        else:
            packed = torch.zeros((sum(math.prod(s) for s in shapes.values()) + 7) // 8, dtype=torch.uint8)
        dist.broadcast(packed, 0)
    dist.barrier()
    gather_seconds = gathered_at - start
    seconds = time.perf_counter() - start
    peak = peak_rss()
    stats = torch.tensor([seconds, float(peak), gather_seconds], dtype=torch.float64)
    gathered = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        torch.save({"seconds": [float(t[0]) for t in gathered], "peak": [float(t[1]) for t in gathered],
                    "gather": [float(t[2]) for t in gathered],
                    "k": k, "maskable": sum(math.prod(s) for s in shapes.values())}, out)
    del engine
    dist.destroy_process_group()


def run(model: str, world: int, strategy: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), model, strategy, out), nprocs=world, join=True)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="e5,xlmr")
    parser.add_argument("--quick", action="store_true", help="a small model only (seconds)")
    add_json_option(parser)
    args = parser.parse_args()
    print(machine_info())
    models = ["quick"] if args.quick else args.models.split(",")
    rows = []
    figures: dict = {}
    for model in models:
        results = {(w, s): run(model, w, s) for w, s in ((1, "distributed"), (2, "distributed"), (2, "rank0"))}
        one, two, rank0 = results[(1, "distributed")], results[(2, "distributed")], results[(2, "rank0")]
        t1, t2, t0 = max(one["seconds"]), max(two["seconds"]), max(rank0["seconds"])
        p1, p2, p0 = max(one["peak"]), max(two["peak"]), max(rank0["peak"])
        g1, g2, g0 = max(one["gather"]), max(two["gather"]), max(rank0["gather"])
        figures[model] = {"w1_seconds": t1, "w2_seconds": t2, "rank0_seconds": t0, "maskable": two["maskable"]}
        rows.append([model, f"{two['maskable']:,}", f"{t1:.2f} ({g1:.2f})", f"{t2:.2f} ({g2:.2f})",
                     f"{t0:.2f} ({g0:.2f})", f"{t2 / t1:.2f}x", f"{t2 / t0:.2f}x", gb(p1), gb(p2), gb(p0)])
    print("\nDeFT-X selection (energy 0.9, K = 1%) under ZeRO-3; seconds = slowest rank; peak RSS = largest "
          "rank, whole process, during the selection (the kernel peak-RSS watermark is reset just before)")
    print("(in brackets: of which gathering the ZeRO-3 partitions; ratios are times, lower is faster)")
    print(table(["model", "maskable", "W=1 s", "W=2 s", "W=2 all-on-rank-0 s", "W=2 / W=1",
                 "W=2 / rank-0", "peak W=1", "peak W=2", "peak rank-0"], rows))
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
