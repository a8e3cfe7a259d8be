"""Training throughput of one phase under Ray Train + DeepSpeed (1 worker, torch AdamW as client
optimizer; ZeRO stages 0 and 2) against the plain single-process loop (fused torch AdamW), on the
same model (offline multilingual-e5-small classifier), the same NusaX batches and the same thread
count. A DeepSpeed run without Ray (one spawned process, file-store rendezvous) separates the cost of
DeepSpeed from the cost of Ray.

    python benchmarks/throughput.py [--steps 12] [--stages 0,2] [--quick]

Steps/s are measured after 2 warm-up steps; the Ray run's start-up (actors, imports, DeepSpeed
initialisation) is reported separately. Starts an embedded Ray on 127.0.0.1 (run it under a
loopback-only network namespace on shared machines).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from _common import add_json_option, benchmark_model_path, machine_info, table, write_json

from deftx.ray_env import prepare_ray_process

WARMUP = 2


def measure(model_path: str, steps: int, distributed: bool, stage: int = 2) -> dict:
    """Build the model and batches, run ``steps`` full-phase steps, return the timing."""
    from deftx.core.roles import parameter_roles
    from deftx.data import NUSAX_LABELS, load_nusax_senti
    from deftx.models import load_classifier, load_tokenizer
    from deftx.training.batches import classification_stream
    from deftx.training.objectives import classification_loss
    from deftx.training.phase import run_phase

    torch.set_num_threads(2)
    tok = load_tokenizer(model_path)
    model = load_classifier(model_path, NUSAX_LABELS, seed=0)
    roles = parameter_roles(model, "task")
    for p in roles.frozen.values():
        p.requires_grad_(False)
    params = list(roles.maskable.values()) + list(roles.head.values())
    stream = classification_stream(tok, load_nusax_senti("ind", "train"), batch_size=16, seed=0, max_length=128)
    if distributed:
        from deftx.training.distributed.engine import DeepSpeedEngine

        engine = DeepSpeedEngine(model, params, learning_rate=5e-5, weight_decay=0.0, total_steps=steps,
                                 zero_stage=stage, micro_batch_size=16)
    else:
        from deftx.training.engine import TorchEngine

        engine = TorchEngine(model, params, learning_rate=5e-5, weight_decay=0.0, total_steps=steps)
    stamps: list[float] = []
    run_phase(engine, stream.batch_at, classification_loss, num_steps=steps, name="bench",
              on_step=lambda step, loss: stamps.append(time.perf_counter()), log=lambda s: None)
    return {"steps_per_second": (steps - WARMUP) / (stamps[-1] - stamps[WARMUP - 1])}


def _ray_loop(config: dict) -> None:
    import json

    import ray.train

    result = measure(config["model_path"], config["steps"], distributed=True, stage=config["stage"])
    with open(config["out"], "w") as fh:  # same machine; Ray Train V2 keeps metrics only with checkpoints
        json.dump(result, fh)
    ray.train.report(result)


def _plain_ds_worker(rank: int, model_path: str, steps: int, stage: int, store: str, out: str) -> None:
    import json

    import torch.distributed as dist

    os.environ.update(GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        with open(out, "w") as fh:
            json.dump(measure(model_path, steps, distributed=True, stage=stage), fh)
    finally:
        dist.destroy_process_group()


def measure_without_ray(model_path: str, steps: int, stage: int) -> dict:
    import json

    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp()
    out = os.path.join(tmp, "result.json")
    mp.spawn(_plain_ds_worker, args=(model_path, steps, stage, os.path.join(tmp, "store"), out), nprocs=1, join=True)
    with open(out) as fh:
        return json.load(fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--stages", default="0,2", help="ZeRO stages of the Ray runs")
    parser.add_argument("--quick", action="store_true", help="a tiny random model (seconds)")
    add_json_option(parser)
    args = parser.parse_args()
    print(machine_info())
    model_path = benchmark_model_path(args.quick)

    stages = [int(s) for s in args.stages.split(",")]
    plain = measure(model_path, args.steps, distributed=False)
    no_ray = measure_without_ray(model_path, args.steps, 2)

    prepare_ray_process(None)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo",
                                       "PYTHONWARNINGS": "ignore::FutureWarning"}})
    import json

    ray_runs: dict[int, tuple[float, float]] = {}
    try:
        for stage in stages:
            out = os.path.join(tempfile.mkdtemp(), "result.json")
            started = time.perf_counter()
            trainer = TorchTrainer(_ray_loop, train_loop_config={"model_path": model_path, "steps": args.steps,
                                                                 "out": out, "stage": stage},
                                   scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                                   run_config=RunConfig(name=f"throughput-z{stage}", storage_path=tempfile.mkdtemp()))
            trainer.fit()
            wall = time.perf_counter() - started
            with open(out) as fh:
                ray_runs[stage] = (json.load(fh)["steps_per_second"], wall)
    finally:
        ray.shutdown()
    base = plain["steps_per_second"]
    rows = [["plain single process (TorchEngine, fused AdamW)", f"{base:.3f}", "1.00"],
            ["DeepSpeed ZeRO-2, W=1, no Ray", f"{no_ray['steps_per_second']:.3f}",
             f"{no_ray['steps_per_second'] / base:.2f}"]]
    rows += [[f"Ray Train + DeepSpeed ZeRO-{stage}, W=1", f"{rate:.3f}", f"{rate / base:.2f}"]
             for stage, (rate, _) in ray_runs.items()]
    print(f"\none full phase of {args.steps} steps, batch 16, {'tiny model' if args.quick else 'e5-small'} "
          f"classifier, 2 threads; steps/s after {WARMUP} warm-up steps")
    print(table(["loop", "steps/s", "ratio"], rows))
    for stage, (rate, wall) in ray_runs.items():
        print(f"Ray run ZeRO-{stage}: wall time {wall:.1f} s, of which about {wall - args.steps / rate:.1f} s "
              f"start-up and tear-down (actors, imports, model load, DeepSpeed initialisation)")
    write_json(args.json, {"plain": base, "deepspeed_zero2_no_ray": no_ray["steps_per_second"],
                           "ray": {str(stage): rate for stage, (rate, _) in ray_runs.items()},
                           "ray_startup_seconds": {str(stage): wall - args.steps / rate
                                                   for stage, (rate, wall) in ray_runs.items()}})


if __name__ == "__main__":
    main()
