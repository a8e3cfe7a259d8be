"""Readable output: progress of long work only (short evaluations stay silent), the end-of-run
summary naming every SFT, the MLflow run and the registered models, and the Ray workers' own
output sent to files while deftx's lines still reach the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deftx.cli import main
from deftx.training import progress as progress_module
from deftx.training.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_quiet_progress_prints_only_work_that_lasts(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    lines: list[str] = []
    short = Progress("eval jav", 3, sink=lines.append, quiet_for=5.0, unit="batch")
    for i in range(1, 4):
        clock.now += 1.0
        short.update(i)
    assert lines == []                                  # 3 s of work: silent
    long = Progress("eval sun", 10, sink=lines.append, min_interval=10.0, quiet_for=5.0, unit="batch")
    for i in range(1, 11):
        clock.now += 2.0
        long.update(i)
    # the first line once 5 s have passed, then every 10 s, then the last
    assert [line.split(" (")[0] for line in lines] == ["[eval sun] batch 3/10", "[eval sun] batch 8/10",
                                                      "[eval sun] batch 10/10"]
    assert "done in 20s" in lines[-1]
    training = Progress("phase", 2, sink=lines.append)        # training progress is unchanged
    clock.now += 1.0
    training.update(1, loss=1.5)
    assert lines[-1].startswith("[phase] step 1/2 loss 1.5 (")


@pytest.mark.slow
def test_the_end_of_a_pipeline_says_where_everything_is(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["pipeline", "--local", "--output-dir", str(out), "--set", f"model.name_or_path={tiny_model_dir}",
            "--set", "target_languages=[jav]", "--set", "language_sft.head_warmup_steps=2",
            "--set", "language_sft.full.max_steps=2", "--set", "language_sft.sparse.max_steps=2",
            "--set", "task_sft.full.max_steps=2", "--set", "task_sft.sparse.max_steps=2",
            "--set", "max_eval_examples=20", "--set", "language_sft.max_train_examples=32",
            "--set", f"tracking.uri={store}"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    tail = printed.out.split("wall time", 1)[1]
    for name in ("lang-ind", "lang-jav", "task-nusax_senti"):
        assert f"  {name}" in tail and str(out / "sfts" / name) in tail
    import mlflow

    client = mlflow.MlflowClient(store)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("deftx-nusax_senti-pipeline-run")
                                             .experiment_id]) if r.info.run_name == "pipeline-run"]
    assert f"MLflow: run {run.info.run_id} in experiment deftx-nusax_senti-pipeline-run ({store};" in tail
    assert "registered: deftx-nusax_senti-jav v1 @champion" in tail
    assert "INFO mlflow" not in printed.err                   # MLflow's own INFO lines stay out
    results = json.loads((out / "results.json").read_text())
    assert results["sfts"]["task-nusax_senti"] == str(out / "sfts" / "task-nusax_senti")


def test_worker_output_goes_to_a_file_and_deftx_lines_to_the_terminal(tmp_path):
    """What the Ray worker setup hook does in each worker process, run in a child process: fd 1
    and 2 (C-level writes included, as torch's and Ray's own messages are) go to the log file;
    deftx's lines still reach the original stderr."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from deftx.ray_env import driver_stream, redirect_worker_output\n"
        "path = redirect_worker_output(Path(sys.argv[1]))\n"
        "os.write(2, b'[W socket.cpp] a C-level warning\\n')\n"
        "print('a library print', flush=True)\n"
        "print('a library warning', file=sys.stderr, flush=True)\n"
        "print('[lang jav phase 1/2 (full)] step 1/2', file=driver_stream(), flush=True)\n"
        "print(path, file=driver_stream(), flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "logs")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "[lang jav phase 1/2 (full)] step 1/2" and len(lines) == 2 and done.stdout == ""
    logged = Path(lines[1]).read_text()
    assert Path(lines[1]).parent == tmp_path / "logs"
    assert "a C-level warning" in logged and "a library print" in logged and "a library warning" in logged
