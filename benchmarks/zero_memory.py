"""Peak memory per worker of a task SFT's phase 1 (dense) and phase 2 (sparse) under DeepSpeed
ZeRO 0 / 2 / 3 with 2 workers (gloo over loopback), on the offline multilingual-e5-small classifier.

    python benchmarks/zero_memory.py [--steps 3] [--quick]

Peak RSS of the whole worker process from the creation of the phase's engine to its end (the
kernel's peak-RSS watermark is reset when the engine is created). ``--quick`` uses a tiny random
model instead of e5 (seconds, for checking the script).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import (
    add_json_option,
    benchmark_model_path,
    gb,
    machine_info,
    peak_rss,
    reset_peak_rss,
    table,
    write_json,
)


def _worker(rank: int, world: int, store: str, stage: int, model_path: str, steps: int, out: str) -> None:
    os.environ.update(GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from deftx.config import PhaseConfig, SelectionConfig, SFTConfig
    from deftx.core.sft import SFTMetadata
    from deftx.data import NUSAX_LABELS, load_nusax_senti
    from deftx.models import load_classifier, load_tokenizer
    from deftx.training.batches import classification_stream
    from deftx.training.distributed.runtime import DeepSpeedRuntime
    from deftx.training.lt_sft import train_sparse_fine_tuning
    from deftx.training.objectives import classification_loss

    peaks: dict[str, int] = {}

    class Measured(DeepSpeedRuntime):
        phase = 0

        def engine(self, *a, **kw):
            reset_peak_rss()
            return super().engine(*a, **kw)

        def end_phase(self, engine):
            self.phase += 1
            peaks[f"phase {self.phase}"] = peak_rss()
            super().end_phase(engine)

    tok = load_tokenizer(model_path)
    rows = load_nusax_senti("ind", "train")[: 8 * steps]
    phase = PhaseConfig(max_steps=steps, batch_size=8, learning_rate=5e-5)
    cfg = SFTConfig(selection=SelectionConfig(density=0.01), full=phase, sparse=phase)
    train_sparse_fine_tuning(
        lambda: load_classifier(model_path, NUSAX_LABELS, seed=0), kind="task", loss_fn=classification_loss,
        cfg=cfg, metadata=SFTMetadata(kind="task", base_fingerprint="bench", label_names=list(NUSAX_LABELS)),
        stream_for=lambda bs: classification_stream(tok, rows, batch_size=bs, seed=0, max_length=128),
        runtime=Measured(zero_stage=stage), log=lambda s: None)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, peaks)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stages", default="0,2,3", help="ZeRO stages to measure")
    add_json_option(parser)
    args = parser.parse_args()
    print(machine_info())
    model_path = benchmark_model_path(args.quick)
    rows = []
    figures: dict = {}
    stages = [int(s) for s in args.stages.split(",")]
    for stage in stages:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.pt")
            mp.spawn(_worker, args=(2, os.path.join(tmp, "store"), stage, model_path, args.steps, out), nprocs=2,
                     join=True)
            peaks = torch.load(out)
        worst = [max(p[f"phase {i}"] for p in peaks) for i in (1, 2)]
        figures[str(stage)] = worst
        rows.append([f"ZeRO-{stage}", *(gb(b) for b in worst)])
    print(f"\npeak RSS per worker (largest of 2 ranks), task SFT on {'a tiny model' if args.quick else 'e5-small'}, "
          f"{args.steps} steps per phase, batch 8 (4 per rank), torch AdamW as DeepSpeed's client optimizer")
    print(table(["stage", "phase 1 (dense)", "phase 2 (sparse)"], rows))
    if "0" in figures:
        for stage, worst in figures.items():
            if stage != "0":
                ratios = [b / ref for b, ref in zip(worst, figures["0"])]
                print(f"ZeRO-{stage} / ZeRO-0: phase 1 {ratios[0]:.2f}x, phase 2 {ratios[1]:.2f}x")
    write_json(args.json, {"peak_rss_bytes": figures})


if __name__ == "__main__":
    main()
