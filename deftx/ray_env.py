"""Process-wide Ray settings that must be in place before Ray starts, the loopback-only embedded
instance, and the diagnosis of a Ray that fails to start. No Ray import at module level.

Token authentication: Ray reads ``RAY_AUTH_MODE`` into a process-wide cache the first time
``ray`` (its ``_raylet`` extension) is imported. ``ray.init`` creates ``~/.ray/auth_token`` only
if that cache says "token", while the GCS it spawns reads the variable afresh. Setting the variable
after ``import ray`` therefore starts a GCS that demands a token nobody created (on a machine
without ``~/.ray/auth_token`` the GCS aborts and ``ray.init`` times out). :func:`settle_auth_mode`
sets the variable and, when Ray is already imported, makes Ray re-read it, so the order of
imports no longer matters.

Loopback only: on Linux Ray replaces a requested node address of 127.0.0.1 by the machine's
routable address (``resolve_ip_for_localhost``) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is
0, and every Ray server (GCS, raylet, workers' gRPC, dashboard agent, runtime-env agent, metrics
exporters) picks "loopback or all interfaces" from that node address; there is no bind-address
setting. :func:`prepare_ray_process` sets the variable for an embedded Ray and for a cluster joined
at a loopback address (where it also keeps Ray from dialling 127.0.0.1 at the routable address).
The one listener Ray does not open itself is torch's rendezvous store on the rank-0 Ray Train
worker, which binds all interfaces whatever ``MASTER_ADDR`` says: :func:`loopback_rendezvous`, a
worker setup hook, hands it a socket bound to 127.0.0.1 when the group's address is loopback.

Metrics export: every Ray process (the driver included) runs a periodic OpenTelemetry metric
reader for Ray's own Prometheus metrics, and that reader can crash the process it runs in (a
segfault in ``TemporalMetricStorage::buildMetrics``, seen once in this project's test suite in
the driver of an embedded Ray while two Ray Train workers trained). An embedded Ray has no
Prometheus to read those metrics, so :func:`prepare_ray_process` turns Ray's metrics collection off
for it (``RAY_enable_metrics_collection=0`` and ``RAY_enable_open_telemetry=0``: with both, no
Ray process starts a metric exporter thread). Set either variable yourself to keep Ray's default.
A Ray cluster that deftx joins keeps its own settings.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

AUTH_MODE_VAR = "RAY_AUTH_MODE"
DEFAULT_AUTH_MODE = "token"   # `ray job submit` and `ray start` must use the same mode (README, cluster section)
SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"   # "0": node address 127.0.0.1 stays 127.0.0.1
GCS_PORT_VAR = "RAY_GCS_SERVER_PORT"
EMBEDDED_RAY_DEFAULTS = {"RAY_enable_metrics_collection": "0", "RAY_enable_open_telemetry": "0"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SETUP_HOOK = "deftx.ray_env.worker_setup"
WORKER_LOG_DIR_VAR = "DEFTX_WORKER_LOG_DIR"   # set by the driver unless verbose: where workers' own output goes
VERBOSE_VAR = "DEFTX_VERBOSE"

_driver_stream = None   # a worker's original stderr, kept for deftx's own lines when fd 2 goes to a file


def verbose() -> bool:
    """Whether Ray's and DeepSpeed's own output should stay on the terminal (``--verbose``)."""
    return os.environ.get(VERBOSE_VAR, "") not in ("", "0")


def worker_setup() -> None:
    """Ray worker setup hook: the loopback rendezvous (:func:`loopback_rendezvous`), and, when the
    driver names a log directory, the worker's own output (Ray's, torch's and DeepSpeed's
    messages on fd 1 and 2) sent to ``<dir>/worker-<pid>.log``."""
    loopback_rendezvous()
    directory = os.environ.get(WORKER_LOG_DIR_VAR)
    if directory:
        try:
            redirect_worker_output(Path(directory))
        except OSError:   # e.g. a node of a cluster that cannot write the driver's directory: keep the output
            pass


def redirect_worker_output(directory: Path) -> Path:
    """Send this process's fd 1 and 2 (and ``sys.stdout`` / ``sys.stderr``) to a log file in
    ``directory``; deftx's lines go to the original stderr (:func:`driver_stream`), which Ray
    forwards to the driver."""
    global _driver_stream
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"worker-{os.getpid()}.log"
    if _driver_stream is None:
        sys.stderr.flush()
        sys.stdout.flush()
        _driver_stream = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    return path


def driver_stream():
    """Where a worker writes the lines the user should see (the original stderr after
    :func:`redirect_worker_output`, else ``sys.stderr``)."""
    return _driver_stream or sys.stderr


def host_of(address: str) -> str | None:
    """``HOST:PORT``, ``ray://HOST:PORT`` or ``http://HOST:PORT`` -> HOST (None if there is none)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("[") and "]" in rest:          # [IPv6]:PORT
        host = rest[1:rest.index("]")]
    elif rest.count(":") == 1:                         # HOST:PORT
        host = rest.split(":", 1)[0]
    else:                                              # HOST, or a bare IPv6 address
        host = rest
    return host or None


def is_loopback(address: str | None) -> bool:
    host = host_of(address) if address else None
    return host is not None and (host in LOOPBACK_HOSTS or host.startswith("127."))


def prepare_ray_process(address: str | None) -> None:
    """Settle this process's Ray settings before Ray starts or is joined at ``address`` (None: an
    embedded Ray): the authentication mode, for a Ray on this machine the loopback rule, and for
    an embedded Ray no metrics export (see the module's docstring); a variable already set wins."""
    if address is None:
        for key, value in EMBEDDED_RAY_DEFAULTS.items():
            os.environ.setdefault(key, value)
    settle_auth_mode()   # also makes an already imported Ray re-read its RAY_* configuration
    if address is None or is_loopback(address):
        os.environ.setdefault(SINGLE_MACHINE_VAR, "0")
        if "ray._private.ray_constants" in sys.modules:   # read at import: refresh it
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = os.environ[SINGLE_MACHINE_VAR].strip().lower() in ("1", "true")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block (inherited by the processes it starts)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def loopback_rendezvous() -> None:
    """Ray worker setup hook: torch's rendezvous store (a TCPStore on rank 0, unauthenticated) is
    created on a socket bound to 127.0.0.1 when the process group's address is loopback, instead
    of on all interfaces. Other addresses (a multi-node cluster) are left alone."""
    import importlib

    import torch.distributed as dist

    rendezvous = importlib.import_module("torch.distributed.rendezvous")   # the module, not the function
    original = rendezvous._create_c10d_store
    if getattr(original, "_deftx_loopback", False):
        return

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        ipv4_loopback = hostname == "localhost" or str(hostname).startswith("127.")
        if rank != 0 or not ipv4_loopback or rendezvous._torchelastic_use_agent_store():
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        return dist.TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                             multi_tenant=True, master_listen_fd=listener.detach(), use_libuv=use_libuv)

    create_store._deftx_loopback = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create_store


def settle_auth_mode() -> str:
    """Set ``RAY_AUTH_MODE`` (token unless the user chose a mode) so that this process, the Ray
    processes it starts and the job CLI agree; returns the mode. Safe to call at any time."""
    mode = os.environ.setdefault(AUTH_MODE_VAR, DEFAULT_AUTH_MODE)
    if "ray._raylet" in sys.modules:
        # Ray has cached its configuration already (imported before this call): re-read it, as
        # ray.init does itself when it enables token authentication by default.
        from ray._raylet import Config

        Config.initialize("")
    return mode


def ray_temp_root() -> Path:
    """Where Ray keeps its sessions (``RAY_TMPDIR``, else the system's temporary directory)."""
    return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"


_FATAL = re.compile(r"^\[[^\]]*\s[CF]\s[^\]]*\]\s*(?:\([^)]*\)\s*)?(?:[\w./-]+:\d+:\s*)?(?P<message>.*)$")
_BOILERPLATE = re.compile(r"An unexpected system state has occurred\..*?we'll work with you to fix it\.\s*")
_CHECK = re.compile(r"Check failed:\s*\S.*?\s(?=[A-Z])")
_MAX_CAUSE = 300


def _fatal_line(path: Path) -> str | None:
    """The message of the first fatal (``C``/``F`` level) record in a Ray component log."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        match = _FATAL.match(line)
        if match:
            message = _BOILERPLATE.sub("", match.group("message"))
            message = _CHECK.sub("", message, count=1).strip()
            return message[:_MAX_CAUSE] if message else None
    return None


def diagnose_start_failure(since: float, root: Path | None = None) -> tuple[str | None, Path | None]:
    """After a failed local start: (the first fatal message of a Ray component, its log file), from
    the newest session directory created at or after ``since`` (a ``time.time()`` value). The log
    directory is returned even when no fatal record explains the failure."""
    root = root or ray_temp_root()
    try:
        sessions = [p for p in root.glob("session_2*") if p.is_dir() and p.stat().st_mtime >= since - 1]
    except OSError:
        return None, None
    if not sessions:
        return None, None
    logs = max(sessions, key=lambda p: p.stat().st_mtime) / "logs"
    candidates = sorted(logs.glob("*.err"), key=lambda p: (not p.name.startswith(("gcs_server", "raylet")), p.name))
    for path in candidates:
        cause = _fatal_line(path)
        if cause:
            return cause, path
    return None, logs if logs.is_dir() else None


def start_failure_message(exc: BaseException, since: float, root: Path | None = None) -> str:
    """One line for a Ray that did not start: the cause from Ray's own logs when one is there,
    else the exception's first line, and where to look."""
    cause, where = diagnose_start_failure(since, root)
    if cause is None:
        text = str(exc).strip().splitlines()
        cause = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
    return f"could not start the embedded Ray: {cause}" + (f" (log: {where})" if where else "")
