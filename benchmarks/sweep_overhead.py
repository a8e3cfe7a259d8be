"""Sweep overhead: a Tune sweep of N trials against N bare trainings of the same configurations,
and the time the sweep saves by reusing shared work (phase 1 of the swept language SFT).

    python benchmarks/sweep_overhead.py [--trials 4] [--lang jav] [--quick]

Both sides start after the shared pipeline SFTs (MLM head, source-language SFT, task SFT) exist:
they are trained once first, and their time is reported separately. Then:

* sweep: ``deftx.workflows.sweeps.tune.run_sweep`` with ``cluster.backend: local`` (trials in Tune trial actors,
  random search, no early stopping, MLflow tracking + registration to a temporary sqlite store):
  one shared phase 1 of the target language SFT, then per trial selection + phase 2 + evaluation +
  registration;
* bare: for each configuration the sweep ran, the language SFT trained from scratch in this process
  (head warm-up reused as in the pipeline, phase 1, selection, phase 2) and the same evaluation,
  no Tune, no MLflow.

Printed: wall times, the overhead ratio (sweep / bare), the per-trial cost, and the phase-1 time the
sweep did not spend. Default: the offline e5-small with the demo preset's language SFT settings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from _common import benchmark_model_path, machine_info, table

from deftx.ray_env import prepare_ray_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--lang", default="jav")
    parser.add_argument("--quick", action="store_true", help="a tiny random model and short phases (seconds)")
    parser.add_argument("--output-dir", help="keep the run here (default: a temporary directory)")
    parser.add_argument("--reuse-from", help="copy the shared pipeline SFTs (MLM head, source SFT, task SFT) from "
                                             "this pipeline output directory of the same preset first")
    args = parser.parse_args()
    print(machine_info())
    prepare_ray_process(None)

    from dataclasses import replace

    from deftx.config import load_pipeline_config
    from deftx.jobs.executors import LocalExecutor
    from deftx.workflows.pipeline import start_run, train_pipeline_sfts
    from deftx.workflows.sweeps.shared import score_composition, trial_job
    from deftx.workflows.sweeps.space import space_from_dict
    from deftx.workflows.sweeps.tune import run_sweep

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="deftx-sweep-bench-"))
    if args.reuse_from:
        import shutil

        for part in ("mlm-head", "sfts/lang-ind", "sfts/task-nusax_senti"):
            if (Path(args.reuse_from) / part).is_dir() and not (out / part).exists():
                shutil.copytree(Path(args.reuse_from) / part, out / part)
    overrides = [f"output_dir={out}", "cluster.backend=local", f"tracking.uri=sqlite:///{out / 'mlflow' / 'mlflow.db'}"]
    if args.quick:
        overrides += [f"model.name_or_path={benchmark_model_path(True)}", "language_sft.head_warmup_steps=2",
                      "language_sft.full.max_steps=6", "language_sft.sparse.max_steps=6",
                      "task_sft.full.max_steps=3", "task_sft.sparse.max_steps=3", "language_sft.max_train_examples=64"]
    cfg = load_pipeline_config(preset="demo", overrides=overrides)
    space = space_from_dict({"dataset": "nusax", "searcher": "random", "scheduler": {"kind": "none"}, "eval_every": 0,
                             "default": {"method": {"choice": ["lt_sft", "deft_x"]},
                                         "density": {"loguniform": [0.005, 0.05]}, "rank_rule": "fixed",
                                         "rank": {"choice": [8, 16, 32]}}})
    log = lambda line: None

    started = time.perf_counter()
    cfg_abs, executor = start_run(cfg, log, LocalExecutor())
    train_pipeline_sfts(cfg_abs, executor, [cfg.source_language], log)
    shared_pipeline = time.perf_counter() - started

    started = time.perf_counter()
    result = run_sweep(cfg, space, [args.lang], args.trials, name="bench", log=log)
    sweep_wall = time.perf_counter() - started
    phase1 = sum(v for k, v in result.shared_seconds.items() if k.startswith("phase 1"))
    configs = [row["config"] for row in result.languages[0].rows]

    from deftx.jobs.cache import base_identity
    from deftx.models import resolve_model_path
    from deftx.workflows.sweeps.shared import SharedWork  # the same shared SFTs, without the phase-1 store

    fingerprint, _ = base_identity(cfg_abs, resolve_model_path(cfg_abs.model.name_or_path))
    shared = SharedWork(config=asdict(cfg_abs), fingerprint=fingerprint, sft="language", task_sft=str(out / "sfts" / f"task-{cfg.task}"),
                        source_sft=str(out / "sfts" / f"lang-{cfg.source_language}"),
                        head_dir=str(out / "mlm-head") if (out / "mlm-head").is_dir() else None,
                        phase1={args.lang: ""})
    started = time.perf_counter()
    for i, config in enumerate(configs):
        job, _ = trial_job(shared, args.lang, config)
        bare = replace(job, phase1=None)   # trained from scratch: no phase-1 store
        LocalExecutor().run(bare, out / "bare" / str(i), log)
        score_composition(cfg_abs, shared.task_sft, str(out / "bare" / str(i)), args.lang, "target_valid")
    bare_wall = time.perf_counter() - started

    n = len(configs)
    print(f"\nsweep of {n} trials ({args.lang}, {'tiny model' if args.quick else 'e5-small'}, demo "
          f"language-SFT settings, local backend) vs {n} bare trainings of the same configurations")
    print(table(["what", "wall s", "per trial s"], [
        ["shared pipeline SFTs (head, source SFT, task SFT; before both)", f"{shared_pipeline:.1f}", "-"],
        ["sweep: total (incl. Ray start, shared phase 1, Tune, MLflow, registry)", f"{sweep_wall:.1f}",
         f"{sweep_wall / n:.1f}"],
        ["sweep: shared phase 1 (once)", f"{phase1:.1f}", "-"],
        ["bare: N trainings from scratch + evaluation", f"{bare_wall:.1f}", f"{bare_wall / n:.1f}"]]))
    per_bare, per_sweep = bare_wall / n, (sweep_wall - phase1) / n
    print(f"\noverhead ratio sweep / bare = {sweep_wall / bare_wall:.2f}")
    print(f"saved by reusing phase 1: {phase1 * (n - 1):.0f} s ({phase1:.1f} s spent once instead of {n} times)")
    print(f"per trial: sweep {per_sweep:.1f} s (selection + phase 2 + evaluation + Tune + MLflow + registry) vs bare "
          f"{per_bare:.1f} s (phase 1 + selection + phase 2 + evaluation); Tune + tracking overhead about "
          f"{per_sweep - (per_bare - phase1):.1f} s per trial")
    print(f"results under {out}")


if __name__ == "__main__":
    main()
