"""Training throughput of one phase under Ray Train + DeepSpeed (1 worker, ZeRO-2, torch AdamW as
client optimizer) against the plain single-process loop (fused torch AdamW), on the same model
(offline multilingual-e5-small classifier), the same NusaX batches and the same thread count.

    python benchmarks/throughput.py [--steps 12] [--quick]

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
from _common import benchmark_model_path, machine_info, table

WARMUP = 2


def measure(model_path: str, steps: int, distributed: bool) -> dict:
    """Build the model and batches, run ``steps`` full-phase steps, return the timing."""
    from deftx.data import NUSAX_LABELS, load_nusax_senti
    from deftx.masks import parameter_roles
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
        from deftx.training.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(model, params, learning_rate=5e-5, weight_decay=0.0, total_steps=steps,
                                 zero_stage=2, micro_batch_size=16)
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

    result = measure(config["model_path"], config["steps"], distributed=True)
    with open(config["out"], "w") as fh:  # same machine; Ray Train V2 keeps metrics only with checkpoints
        json.dump(result, fh)
    ray.train.report(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="a tiny random model (seconds)")
    args = parser.parse_args()
    print(machine_info())
    model_path = benchmark_model_path(args.quick)

    plain = measure(model_path, args.steps, distributed=False)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo",
                                       "PYTHONWARNINGS": "ignore::FutureWarning"}})
    try:
        out = os.path.join(tempfile.mkdtemp(), "result.json")
        started = time.perf_counter()
        trainer = TorchTrainer(_ray_loop, train_loop_config={"model_path": model_path, "steps": args.steps, "out": out},
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                               run_config=RunConfig(name="throughput", storage_path=tempfile.mkdtemp()))
        trainer.fit()
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    import json

    with open(out) as fh:
        dist_rate = json.load(fh)["steps_per_second"]
    train_time = args.steps / dist_rate
    print(f"\none full phase of {args.steps} steps, batch 16, {'tiny model' if args.quick else 'e5-small'} "
          f"classifier, 2 threads; steps/s after {WARMUP} warm-up steps")
    print(table(["loop", "steps/s", "ratio"],
                [["plain single process (TorchEngine)", f"{plain['steps_per_second']:.3f}", "1.00"],
                 ["Ray Train + DeepSpeed ZeRO-2, W=1", f"{dist_rate:.3f}",
                  f"{dist_rate / plain['steps_per_second']:.2f}"]]))
    print(f"\nRay run wall time {wall:.1f} s, of which about {wall - train_time:.1f} s start-up and tear-down "
          f"(actors, imports, model load, DeepSpeed initialisation)")


if __name__ == "__main__":
    main()
