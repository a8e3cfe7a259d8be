"""What a Ray instance listens on, seen from the machine's own network (run by test_listeners.py
outside the tests' loopback-only namespace, as a user's machine would see it).

    python listener_probe.py embedded OUT.json [HOLD]
                                                   start Ray as deftx does, run a 2-worker Ray Train
                                                   group, list the sockets while it trains; with HOLD
                                                   (a folder), then write HOLD/up (the GCS pid) and
                                                   keep Ray running until HOLD/stop exists
    python listener_probe.py session SID OUT.json  the sockets of the processes of session SID
                                                   (a head started by infra/local/up.sh)
    python listener_probe.py pids PID,... OUT.json  the sockets of these processes and their children

Every listening TCP socket and bound UDP socket of the instance's processes is reported with its
address, and each port is also dialled at every non-loopback address of the machine.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from deftx.ray_env import EMBEDDED_RAY_DEFAULTS

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def descendants(pids: set[int]) -> set[int]:
    out = set(pids)
    for pid in pids:
        try:
            out |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            continue
    return out


def instance_pids(roots: set[int], marker: str | None = None) -> set[int]:
    found = set(roots)
    if marker:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if marker in " ".join(proc.info["cmdline"] or []):
                found.add(proc.info["pid"])
    return descendants(found)


def external_addresses() -> list[str]:
    out = []
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6) and not a.address.startswith(("127.", "::1", "fe80")):
                out.append(a.address.split("%")[0])
    return out


def dial(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect((address, port))
            return True
        except OSError:
            return False


def listeners(pids: set[int]) -> dict:
    rows = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in pids or not conn.laddr:
            continue
        tcp_listen = conn.type == socket.SOCK_STREAM and conn.status == psutil.CONN_LISTEN
        udp = conn.type == socket.SOCK_DGRAM
        if not (tcp_listen or udp):
            continue
        try:
            name = " ".join(psutil.Process(conn.pid).cmdline())[:120]
        except psutil.Error:
            name = "?"
        rows.append({"pid": conn.pid, "process": name, "proto": "tcp" if tcp_listen else "udp",
                     "address": conn.laddr.ip, "port": conn.laddr.port})
    outside = external_addresses()
    reachable = [f"{a}:{r['port']}" for r in rows if r["proto"] == "tcp" for a in outside if dial(a, r["port"])]
    return {"listeners": rows, "external_addresses": outside, "reachable_from_outside": reachable,
            "processes": len(pids)}


def _train_loop(config: dict) -> None:
    """Rank 0 announces the rendezvous port and waits until the driver has looked."""
    import ray.train
    import torch
    import torch.distributed as dist

    total = torch.ones(1)
    dist.all_reduce(total)
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["ready"]).write_text(json.dumps({"master_port": int(os.environ["MASTER_PORT"]),
                                                     "pid": os.getpid(), "world": int(total.item()),
                                                     "ray_metrics": {k: os.environ.get(k) for k in
                                                                     EMBEDDED_RAY_DEFAULTS}}))
        deadline = time.time() + 120
        while not Path(config["done"]).exists() and time.time() < deadline:
            time.sleep(0.2)
    dist.barrier()


def embedded(out: Path, hold: Path | None = None) -> None:
    from deftx.config import ClusterConfig
    from deftx.jobs.ray import connect

    connect(ClusterConfig(), log=lambda line: None)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
    work = Path(tempfile.mkdtemp(prefix="listener-probe-"))
    ready, done = work / "ready.json", work / "done"
    result: dict = {}

    def look() -> None:
        deadline = time.time() + 240
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        result.update(listeners(instance_pids({os.getpid()}, session)))
        result["training"] = json.loads(ready.read_text()) if ready.exists() else None
        done.touch()

    watcher = threading.Thread(target=look, daemon=True)
    watcher.start()
    TorchTrainer(_train_loop, train_loop_config={"ready": str(ready), "done": str(done)},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="listener-probe", storage_path=str(work / "storage"))).fit()
    watcher.join(timeout=60)
    result["session"] = session
    out.write_text(json.dumps(result, indent=1))
    if hold is not None:
        gcs = ray._private.worker._global_node.all_processes["gcs_server"][0].process.pid
        (hold / "up").write_text(str(gcs))
        deadline = time.time() + 600
        while not (hold / "stop").exists() and time.time() < deadline:
            time.sleep(0.2)
    ray.shutdown()


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "embedded":
        embedded(Path(argv[1]), Path(argv[2]) if len(argv) > 2 else None)
    elif mode == "session":
        sid = int(argv[1])
        members = {p.pid for p in psutil.process_iter() if _sid(p.pid) == sid}
        Path(argv[2]).write_text(json.dumps(listeners(descendants(members)), indent=1))
    elif mode == "pids":
        roots = {int(p) for p in argv[1].split(",") if p}
        Path(argv[2]).write_text(json.dumps(listeners(descendants(roots)), indent=1))
    else:
        raise SystemExit(f"unknown mode {mode}")


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


if __name__ == "__main__":
    main(sys.argv[1:])
