"""What a user's machine exposes: run outside the tests' loopback-only namespace (on the network the
session started on), the embedded Ray that deftx starts and the head of infra/local/up.sh listen on
127.0.0.1 only (every TCP listener and UDP socket of their processes, including torch's rendezvous
store on the rank-0 Ray Train worker), nothing answers at the machine's other addresses, and
infra/local/down.sh stops its own head and no other Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback import on_host_network

from deftx.ray_env import EMBEDDED_RAY_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("listener_probe.py")
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
PORTS = {"RAY_PORT": "6412", "RAY_DASHBOARD_PORT": "8312", "MLFLOW_PORT": "5012"}

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]   # see tests/conftest.py


def _user_env(home: Path) -> dict[str, str]:
    """The environment of a user who has never configured Ray: no RAY_* variables, an empty HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return env


def _exposed(report: dict) -> list[str]:
    return [f"{r['proto']} {r['address']}:{r['port']} ({r['process'][:60]})" for r in report["listeners"]
            if r["address"] not in LOOPBACK]


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)


def test_ray_instances_listen_on_loopback_only_and_down_sh_stops_only_its_own(tmp_path):
    """One embedded Ray as deftx starts it (checked while 2 Ray Train workers train, so that
    torch's rendezvous store is among its sockets), then, while it keeps running, the head and
    MLflow server of infra/local/up.sh; infra/local/down.sh then stops that head and leaves the
    embedded Ray alone, as it would another user's Ray."""
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "infra"
    env = {**_user_env(home), **PORTS, "DEFTX_INFRA_DIR": str(state)}
    net = on_host_network()
    hold = tmp_path / "hold"
    hold.mkdir()
    out = tmp_path / "embedded.json"
    embedded = subprocess.Popen([sys.executable, str(PROBE), "embedded", str(out), str(hold)], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **net)
    sid = None
    try:
        _wait_for(hold / "up", embedded, 600)
        report = json.loads(out.read_text())
        training = report["training"]
        assert training and training["world"] == 2, "the probe did not look while the workers trained"
        assert training["master_port"] in {r["port"] for r in report["listeners"]}   # the rendezvous store
        assert training["ray_metrics"] == EMBEDDED_RAY_DEFAULTS     # no metric exporter in the Ray processes
        assert len(report["listeners"]) >= 10        # GCS, raylet, workers, agents, dashboard, metrics
        assert _exposed(report) == []
        assert report["reachable_from_outside"] == []
        embedded_gcs = int((hold / "up").read_text())

        try:
            up = subprocess.run([str(ROOT / "infra/local/up.sh")], env=env, capture_output=True, text=True,
                                timeout=300, **net)
            assert up.returncode == 0, up.stderr + up.stdout
            sid = int((state / "ray.sid").read_text())
            mlflow_pid = (state / "mlflow.pid").read_text().strip()
            for mode, target in (("session", str(sid)), ("pids", mlflow_pid)):
                probed = tmp_path / f"{mode}.json"
                probe = subprocess.run([sys.executable, str(PROBE), mode, target, str(probed)], env=env,
                                       capture_output=True, text=True, timeout=120, **net)
                assert probe.returncode == 0, probe.stderr[-2000:]
                report = json.loads(probed.read_text())
                assert report["listeners"], f"no listener found for {mode} {target}"
                assert _exposed(report) == []
                assert report["reachable_from_outside"] == []
                if mode == "session":
                    assert any(r["port"] == int(PORTS["RAY_PORT"]) for r in report["listeners"])
        finally:
            down = subprocess.run([str(ROOT / "infra/local/down.sh")], env=env, capture_output=True, text=True,
                                  timeout=180, **net)
        assert down.returncode == 0, down.stderr
        assert sid is not None and "stopped the Ray head" in down.stdout
        left = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout.split()
        assert left == [], f"processes of the up.sh head still running: {left}"
        current = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"
        assert not (current.is_file() and current.read_text() == f"127.0.0.1:{PORTS['RAY_PORT']}")
        os.kill(embedded_gcs, 0)        # the other Ray is untouched
        assert embedded.poll() is None
    finally:
        (hold / "stop").touch()
        try:
            embedded.wait(timeout=60)
        except subprocess.TimeoutExpired:
            embedded.kill()
