"""Live tracking: a phase's metrics are in the MLflow store while the phase still runs (read from
another process), an interrupted run ends KILLED, and a failing store never stops training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deftx.tracking.live import LiveRun, MlflowSink, metric_key
from deftx.training import live

ROOT = Path(__file__).resolve().parents[1]


def test_metric_keys_extend_the_per_step_loss_keys():
    assert metric_key("lang jav phase 1/2 (full)", "loss") == "loss.phase1_full"
    assert metric_key("task ind phase 2/2 (sparse)", "lr") == "lr.phase2_sparse"
    assert metric_key("mlm head warm-up", "steps_per_s") == "steps_per_s.head_warmup"


def test_a_failing_store_warns_once_and_training_goes_on(tmp_path):
    lines: list[str] = []
    sink = MlflowSink(LiveRun(f"sqlite:///{tmp_path / 'db.sqlite'}", "no-such-run"), log=lines.append, every=0.0)
    with live.sending_to(sink):
        for step in range(1, 4):
            live.emit("lang jav phase 1/2 (full)", step, {"loss": 1.0, "lr": 1e-4})
    assert len(lines) == 1 and lines[0].startswith("WARNING: live metrics to MLflow stopped")
    live.emit("x", 1, {"loss": 1.0})   # no sink outside the block: nothing happens


@pytest.mark.slow
def test_metrics_are_in_the_store_while_the_phase_runs(tiny_model_dir, tmp_path):
    import mlflow

    db = tmp_path / "mlflow.db"
    out = tmp_path / "lang-jav"
    steps = 20000   # far more than the test waits for: the phase is still running when it reads
    cmd = [sys.executable, "-m", "deftx", "train-lang", "--local", "--lang", "jav", "--output-dir", str(out),
           "--set", f"model.name_or_path={tiny_model_dir}", "--set", "language_sft.head_warmup_steps=2",
           "--set", f"language_sft.full.max_steps={steps}", "--set", "language_sft.full.epochs=5000",
           "--set", "language_sft.sparse.max_steps=2",
           "--set", "language_sft.max_train_examples=64", "--set", f"tracking.uri=sqlite:///{db}",
           "--set", f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "DEFTX_LIVE_FLUSH_SECONDS": "0.5", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    seen = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and seen is None:
            time.sleep(1.0)
            # the store is created by the trainer; open it only once training runs (two processes
            # creating the same sqlite store at once race in MLflow's schema migration)
            if not any("phase 1/2 (full)] step" in line for line in list(lines)):
                continue
            client = mlflow.MlflowClient(f"sqlite:///{db}")
            experiment = client.get_experiment_by_name("deftx-nusax_senti-train-lang")
            if experiment is None:
                continue
            for run in client.search_runs([experiment.experiment_id]):
                history = client.get_metric_history(run.info.run_id, "loss.phase1_full")
                if len(history) >= 5:
                    seen = (run, history, client.get_metric_history(run.info.run_id, "lr.phase1_full"),
                            client.get_metric_history(run.info.run_id, "steps_per_s.phase1_full"))
        assert seen is not None, "".join(lines[-20:]) or "no live metrics within 240 s"
        assert proc.poll() is None and not out.exists()   # read while phase 1 still runs
        run, losses, lrs, rates = seen
        assert run.info.status == "RUNNING" and run.info.run_name == "lang-jav"
        assert max(m.step for m in losses) < steps and len(lrs) >= 1 and all(m.value > 0 for m in rates)
        proc.send_signal(signal.SIGTERM)   # as `kill` or a scheduler would: the run ends KILLED
        assert proc.wait(timeout=120) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    assert client.get_run(run.info.run_id).info.status == "KILLED"
