"""The Ray layer: each training job (MLM head, language SFT, task SFT) is one Ray Train
``TorchTrainer`` run whose workers execute ``deftx.jobs.run.run_job`` with a ``DeepSpeedRuntime``.

Thin on purpose: the training loop, the selection and the checkpoint contents live in the library;
this module starts or joins Ray, checks that the cluster can host the workers, maps checkpoints to
``ray.train.report`` and back, and copies the finished artifact out of the run's last checkpoint.

- Address: ``cluster.address`` (GCS ``HOST:6379`` or ``ray://HOST:10001``), else ``RAY_ADDRESS``
  (set by ``ray job submit``), else an embedded Ray on 127.0.0.1 with this machine's CPUs.
- Runs are named ``<output dir name>-<job>-<digest>`` under ``cluster.storage_path``: re-running an
  interrupted job with the same settings resumes it from its latest checkpoint.
- Worker failures: ``FailureConfig(max_failures)``; the restarted group resumes from the latest
  checkpoint (phase, step, masks, optimizer, RNG).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deftx.config import ClusterConfig, to_dict
from deftx.core.io import atomic_directory
from deftx.errors import DeftxError, first_line
from deftx.jobs.cache import job_key
from deftx.jobs.spec import Job, Log, job_from_dict, job_to_dict
from deftx.ray_env import (
    GCS_PORT_VAR,
    SETUP_HOOK,
    WORKER_LOG_DIR_VAR,
    driver_stream,
    environment,
    free_loopback_port,
    prepare_ray_process,
    start_failure_message,
    verbose,
)
from deftx.tracking.live import LiveRun

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and
# notices a finished run only at the next poll: 0.5 s cut the tear-down of a run from 4.3 s to 1.4 s
# here, for one small call per worker and poll. A value in the environment wins.
RUNTIME_ENV_VARS = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
CONNECT_TIMEOUT_S = 5.0


class ClusterError(DeftxError):
    """Ray cannot be reached, or cannot host the configured workers."""


def _host_port(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` or ``ray://HOST:PORT`` -> (host, port); None for 'auto' and other forms."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS
_SETTINGS_FRAME = 4


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds, naming the address, if nothing listens there or what
    listens is not a gRPC server (Ray's GCS and client server are; a dashboard, an MLflow server or
    any HTTP/1 service is not, and Ray would retry connecting to it for minutes)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(_HTTP2_PREFACE)
            reply = b""
            while len(reply) < 9:
                chunk = conn.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except TimeoutError:
        reply = b""
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} "
                           f"(is the head running? `ray status --address {address}`)") from None
    if len(reply) < 9 or reply[3] != _SETTINGS_FRAME:
        raise ClusterError(f"{address} answers, but not as a Ray cluster (no gRPC server there): give the head's GCS "
                           f"address HOST:6379 or ray://HOST:10001 (a dashboard address http://HOST:8265 is for "
                           f"`ray job submit`)")


def connect(cluster: ClusterConfig, log: Log = print, log_dir: Path | None = None) -> str:
    """Join the configured Ray cluster, or start an embedded one on 127.0.0.1. Returns a description.
    With ``log_dir`` (and not ``--verbose``) the workers' own output goes to files there."""
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    prepare_ray_process(address)   # before `import ray` reads the settings (see deftx/ray_env.py)
    import ray

    env = {"env_vars": dict(RUNTIME_ENV_VARS)}
    if ray.is_initialized():
        return "the Ray instance already initialised in this process"
    env["worker_process_setup_hook"] = SETUP_HOOK
    redirect = log_dir is not None and not verbose()
    if redirect:
        env["env_vars"][WORKER_LOG_DIR_VAR] = str(log_dir)

    def say_where() -> None:
        if redirect:
            log(f"Ray, torch and DeepSpeed messages of the workers go to {log_dir}/worker-*.log "
                f"(--verbose shows them here)")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            raise ClusterError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
        say_where()
        return f"Ray cluster at {address}"
    cpus = os.cpu_count() or 1
    log(f"starting an embedded Ray on 127.0.0.1 ({cpus} CPUs)")
    port = free_loopback_port()
    # collectives over loopback; Ray's own lookups in the workers (Ray Train's cleanup actor asks the
    # state API, which otherwise follows the newest `ray start` on the machine) find this instance
    env["env_vars"].update(GLOO_SOCKET_IFNAME="lo", RAY_ADDRESS=f"127.0.0.1:{port}")
    since = time.time()
    try:
        with environment(**{GCS_PORT_VAR: str(port)}):
            context = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", runtime_env=env, log_to_driver=True,
                     logging_config=ray.LoggingConfig(log_level="WARNING"))
    except Exception as exc:  # Ray raises several types (RuntimeError, TimeoutError, ...) for a failed start
        with contextlib.suppress(Exception):
            ray.shutdown()
        raise ClusterError(start_failure_message(exc, since)) from None
    warm_autoscaling_coordinator()
    url = getattr(context, "dashboard_url", None)
    if url:
        log(f"Ray dashboard: http://{url.removeprefix('http://')}")
    say_where()
    return "embedded Ray on 127.0.0.1"


def warm_autoscaling_coordinator(timeout: float = 120.0) -> None:
    """Start Ray Train's AutoscalingCoordinator actor and wait until it answers.

    Every Ray Train run asks this detached actor (created by the first run that needs it) for its
    workers' resources, with a 5 s timeout. On a busy 2-core machine the actor's process takes longer
    to start, and the controller then logs a warning with a traceback into the run's output
    (harmless: an embedded Ray has fixed resources). Created here, right after the embedded Ray
    starts, it is ready before any run asks. Ray versions without it are left alone."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    import ray

    with contextlib.suppress(Exception):   # only a courtesy: a run works without it
        ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote("deftx-warm-up"),
                timeout=timeout)


def check_resources(cluster: ClusterConfig, available: dict[str, float]) -> None:
    """The configured workers must fit the cluster's current resources (before any training)."""
    cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    wanted = cluster.num_workers * cluster.cpus_per_worker
    if wanted > cpus + 1e-9:
        raise ClusterError(f"cluster.num_workers={cluster.num_workers} x cluster.cpus_per_worker="
                           f"{cluster.cpus_per_worker:g} needs {wanted:g} CPUs but the Ray cluster has {cpus:g}; "
                           f"lower num_workers or cpus_per_worker (or set cluster.check_resources: false on an "
                           f"autoscaling cluster)")
    if cluster.use_gpu and gpus < cluster.num_workers:
        raise ClusterError(f"cluster.use_gpu is true with {cluster.num_workers} workers (one GPU each) but the Ray "
                           f"cluster has {gpus:g} GPUs; set cluster.use_gpu: false to train on CPUs")


def _report_sink(metrics: dict[str, Any], directory: Path | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
    ray.train.report(metrics, checkpoint=checkpoint)


ARTIFACT_DIR = "artifact"


def _quiet_report_lines() -> None:
    """Ray Train logs every ``report`` call at INFO ("Reporting training result ...", one line per
    rank and checkpoint) on a logger named after its source file, whatever the run's log level."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop: one job on every rank, under DeepSpeed."""
    import ray.train
    import torch

    from deftx.jobs.run import run_job
    from deftx.training.distributed.runtime import DeepSpeedRuntime

    cluster = ClusterConfig(**config["cluster"])
    job = job_from_dict(config["job"])
    torch.set_num_threads(cluster.threads_per_worker)
    _quiet_report_lines()
    rank = ray.train.get_context().get_world_rank()
    log: Log = (lambda line: print(line, file=driver_stream(), flush=True)) if rank == 0 else (lambda line: None)
    checkpoint = ray.train.get_checkpoint()
    with (checkpoint.as_directory() if checkpoint is not None else nullcontext(None)) as resume_dir:
        if resume_dir is not None and (Path(resume_dir) / ARTIFACT_DIR).is_dir():
            log(f"[{job.name}] the run already finished; nothing to do")
            return
        runtime = DeepSpeedRuntime(zero_stage=cluster.zero_stage, checkpoint_every=cluster.checkpoint_every,
                                   checkpoint_minutes=cluster.checkpoint_minutes,
                                   sink=_report_sink, resume_from=resume_dir, report_every=cluster.report_every,
                                   status_dir=cluster.status_dir)
        live = LiveRun(**config["live"]) if config.get("live") else None
        output = run_job(job, runtime, log, live)
    if rank == 0:
        assert output is not None
        with tempfile.TemporaryDirectory(prefix="deftx-artifact-") as tmp:
            output.save(Path(tmp) / ARTIFACT_DIR)
            ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report({"done": 1}, checkpoint=None)


class RayExecutor:
    """Runs each job as a Ray Train ``TorchTrainer`` of ``cluster.num_workers`` DeepSpeed workers."""

    def __init__(self, cluster: ClusterConfig, default_storage: Path, log: Log = print,
                 log_dir: Path | None = None) -> None:
        self.cluster = cluster
        self.log_dir = log_dir
        self.storage = Path(cluster.storage_path).resolve() if cluster.storage_path else default_storage
        self.log = log
        self._connected = False
        self.description = ""

    def prepare(self) -> None:
        self._ensure_connected()

    def _ensure_connected(self) -> None:
        if self._connected:
            return
        import ray

        self.description = connect(self.cluster, self.log, self.log_dir)
        if self.cluster.check_resources:
            check_resources(self.cluster, ray.cluster_resources())
        self.log(f"phases run on {self.cluster.num_workers} Ray Train workers ({self.description}), DeepSpeed "
                 f"ZeRO-{self.cluster.zero_stage}, checkpoints in {self.storage}")
        self._connected = True

    def run(self, job: Job, directory: Path, log: Log, live: LiveRun | None = None) -> None:
        self._ensure_connected()
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        run_name = f"{Path(job.config.output_dir).name}-{job.name}-{job_key(job)[:10]}"
        self.storage.mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"job": job_to_dict(job), "cluster": to_dict(self.cluster),
                               "live": asdict(live) if live is not None else None},
            torch_config=TorchConfig(backend="nccl" if self.cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=self.cluster.num_workers, use_gpu=self.cluster.use_gpu,
                                         resources_per_worker={"CPU": self.cluster.cpus_per_worker}),
            run_config=RunConfig(name=run_name, storage_path=str(self.storage),
                                 failure_config=FailureConfig(max_failures=self.cluster.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 logging_config=LoggingConfig(log_level="WARNING")),
        )
        started = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; keep the first line of the cause
            raise ClusterError(f"{job.name}: the Ray Train run {run_name} failed: {_first_line(exc)} "
                               f"(full logs under {self.storage / run_name})") from exc
        if result.checkpoint is None:
            raise ClusterError(f"{job.name}: the Ray Train run {run_name} finished without an artifact")
        with result.checkpoint.as_directory() as ckpt:
            source = Path(ckpt) / ARTIFACT_DIR
            if not source.is_dir():
                raise ClusterError(f"{job.name}: the last checkpoint of {run_name} holds no artifact")
            with atomic_directory(directory, overwrite=True, kind=job.output_kind()) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
        log(f"[{job.name}] done on {self.cluster.num_workers} workers in {time.perf_counter() - started:.0f} s "
            f"(run {run_name})")


def _first_line(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return f"{type(seen).__name__}: {first_line(seen)}" if str(seen).strip() else type(seen).__name__
