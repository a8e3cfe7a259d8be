"""A first run on a machine where Ray was never used: an empty HOME (no ~/.ray/auth_token, no
compiled DeepSpeed ops, no caches) and no RAY_* variables, the CLI on the Ray backend; and the
one-line error when Ray cannot start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# the real first line a GCS wrote when it aborted for want of a token (before the fix)
GCS_ABORT = ("[2026-12-02 00:26:54,115 C 2450 2450] (gcs_server) authentication_token_loader.cc:115:  An unexpected "
             "system state has occurred. You have likely discovered a bug in Ray. Please report this issue at "
             "https://github.com/ray-project/ray/issues and we'll work with you to fix it. Check failed: has_token || "
             "ignore_auth_mode Token authentication is enabled but Ray couldn't find an authentication token. Create a "
             "token file at ~/.ray/auth_token, or store the token in any file and set RAY_AUTH_TOKEN_PATH to point to "
             "it, or set the RAY_AUTH_TOKEN environment variable.")


def _fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    return env


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_cli_on_the_ray_backend_runs_with_an_empty_home(tiny_model_dir, tmp_path):
    """`deftx train-task` on 2 Ray Train workers (the README's default backend) with nothing in HOME:
    Ray creates its token itself, the SFT is written, no traceback, and DeepSpeed builds no C++ op
    (the shared-memory op it compiles for inference is never needed)."""
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "task"
    cmd = [sys.executable, "-m", "deftx", "train-task", "--set", f"model.name_or_path={tiny_model_dir}",
           "--set", "task_sft.full.max_steps=2", "--set", "task_sft.sparse.max_steps=2",
           "--set", "task_sft.max_train_examples=32", "--set", f"output_dir={tmp_path / 'run'}", "--output-dir", str(out)]
    done = subprocess.run(cmd, env=_fresh_env(home), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "starting an embedded Ray on 127.0.0.1" in done.stderr and "saved task SFT" in done.stdout
    assert "Traceback" not in text
    assert (home / ".ray" / "auth_token").stat().st_size > 0          # made by ray.init, token mode
    assert "built successfully" not in text and not (home / ".cache" / "torch_extensions").exists()
    assert "Reporting training result" not in text
    from deftx.core.sft import SparseFineTuning

    sft = SparseFineTuning.load(out)
    assert sft.nnz > 0 and sft.metadata.training["world_size"] == 2


def test_start_failure_names_the_cause_and_the_log(tmp_path):
    from deftx.ray_env import diagnose_start_failure, start_failure_message

    logs = tmp_path / "ray" / "session_2026-12-02_00-26-54_072356_2422" / "logs"
    logs.mkdir(parents=True)
    (logs / "gcs_server.err").write_text(GCS_ABORT + "\n*** StackTrace Information ***\n/x/gcs_server(+0x1) [0x1]\n")
    (logs / "raylet.err").write_text("")
    cause, where = diagnose_start_failure(0.0, tmp_path / "ray")
    assert cause.startswith("Token authentication is enabled but Ray couldn't find an authentication token.")
    assert where == logs / "gcs_server.err"
    message = start_failure_message(RuntimeError("Timed out waiting for file .../gcs_server_port_abc"), 0.0,
                                    tmp_path / "ray")
    assert message.startswith("could not start the embedded Ray: Token authentication is enabled")
    assert message.endswith(f"(log: {logs / 'gcs_server.err'})") and "\n" not in message
    # no session written since the start: the exception's own first line
    later = start_failure_message(RuntimeError("boom\nmore"), 4e9, tmp_path / "ray")
    assert later == "could not start the embedded Ray: RuntimeError: boom"


def test_a_ray_that_does_not_start_is_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    """The embedded start fails (here: ray.init raises after a GCS wrote its fatal line): the CLI
    prints one line naming the cause and Ray's log file, exit status 2, nothing trained."""
    import ray

    from deftx.cli import main

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def failing_init(*args, **kwargs):
        logs = tmp_path / "ray" / "session_2099-01-01_00-00-00_000000_1" / "logs"
        logs.mkdir(parents=True)
        (logs / "gcs_server.err").write_text(GCS_ABORT + "\n")
        raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y")

    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    code = main(["train-task", "--set", "model.name_or_path=/nonexistent-not-loaded", "--output-dir", str(tmp_path / "t"),
                 "--set", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("deftx: error: could not start the embedded Ray: Token authentication is enabled")
    assert "gcs_server.err)" in last and "Traceback" not in err
    assert not (tmp_path / "t").exists()


def test_settle_auth_mode_after_ray_was_imported(monkeypatch):
    """Ray caches RAY_AUTH_MODE when it is imported; setting the variable later must reach that
    cache, or ray.init would not create the token its GCS then demands."""
    import ray  # noqa: F401 - imported first on purpose
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    from deftx.ray_env import settle_auth_mode

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    Config.initialize("")
    assert get_authentication_mode() != AuthenticationMode.TOKEN
    try:
        assert settle_auth_mode() == "token"
        assert get_authentication_mode() == AuthenticationMode.TOKEN
    finally:
        monkeypatch.undo()
        Config.initialize("")


def test_an_embedded_ray_exports_no_metrics_unless_the_user_says_so(monkeypatch):
    """Ray's metric exporter thread can crash the process it runs in, and an embedded Ray has no
    Prometheus to read it: deftx turns it off there, keeps a user's own setting, and leaves the
    settings of a cluster it joins alone."""
    from deftx.ray_env import EMBEDDED_RAY_DEFAULTS, prepare_ray_process

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in EMBEDDED_RAY_DEFAULTS})
    prepare_ray_process("10.1.2.3:6379")
    assert not any(key in os.environ for key in EMBEDDED_RAY_DEFAULTS)
    os.environ["RAY_enable_open_telemetry"] = "1"
    prepare_ray_process(None)
    assert os.environ["RAY_enable_open_telemetry"] == "1"
    assert os.environ["RAY_enable_metrics_collection"] == "0"


def test_a_failed_ray_train_run_names_the_cause_given_after_a_colon():
    """Ray Train reports a run killed by Ray's out-of-memory monitor as "Training failed due to
    controller error:" with the cause on the next line; deftx's one-line error keeps that cause."""
    from deftx.errors import CAUSE_CHARS, first_line
    from deftx.jobs.ray import _first_line

    cause = ("4 worker(s) were killed due to the node running low on memory. Memory on the node "
             "(IP: 127.0.0.1) was 22.18GB used / 23.54GB limit (0.942369)")
    outer = RuntimeError("run failed")
    outer.__cause__ = RuntimeError(f"Training failed due to controller error:\n\n{cause}\nObject store: ...")
    assert _first_line(outer) == f"RuntimeError: Training failed due to controller error: {cause}"
    long = ValueError("it failed:\n" + "x" * 1000)
    assert first_line(long) == "it failed: " + "x" * (CAUSE_CHARS - 3) + "..."
    assert first_line(ValueError("one line\nmore")) == "one line"
    assert first_line(ValueError("")) == "ValueError" and _first_line(ValueError("")) == "ValueError"
