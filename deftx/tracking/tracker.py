"""MLflow tracking: one experiment per job, a parent run per pipeline or sweep, nested runs per
phase or trial; flattened params, per-step and final metrics, artifacts.

Only the driver (or rank 0) logs. Everything goes through an explicit ``MlflowClient`` (no global
"active run"), so concurrent trials in one process cannot log into each other's runs.

Where it goes (``tracking.uri``): null -> a local sqlite store ``mlflow/mlflow.db`` with artifacts
in ``mlflow/artifacts/`` under the working directory; or a server URL such as the one
``infra/local/up.sh`` starts (``http://127.0.0.1:5000``); or any MLflow URI. ``MLFLOW_TRACKING_URI``
is used when the config gives none.

Failure behaviour: tracking must never cost a training run. If the store cannot be reached at the
start, or a call fails later, the tracker warns once and turns into a no-op (``tracker.offline``);
the caller keeps its artifacts on local disk and records what to register (see
``deftx.tracking.registry.PendingRegistration``), which ``deftx registry sync`` uploads later.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Log = Callable[[str], None]

DEFAULT_DIR = "mlflow"
# MLflow's HTTP client retries a dead server for minutes by default (7 retries, backoff factor 2,
# 120 s timeout); a trainer should notice within seconds and carry on. Users can override these.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MAX_PARAM_LENGTH = 6000   # MLflow 3 accepts up to 6000 characters per param value
REACH_TIMEOUT_S = 3.0


def quiet_mlflow() -> None:
    """MLflow's INFO lines (store creation, migrations) stay out of deftx's output unless
    ``--verbose``; importing mlflow sets its loggers to INFO, so this runs after the import."""
    import logging

    if os.environ.get("DEFTX_VERBOSE", "") in ("", "0"):
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def default_tracking_uri(root: str | Path | None = None) -> str:
    """``sqlite:///<root>/mlflow/mlflow.db`` (root: the working directory)."""
    base = Path(root or os.getcwd()).resolve() / DEFAULT_DIR
    return f"sqlite:///{base / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else the local default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def local_artifact_root(uri: str) -> str | None:
    """For a sqlite store, the artifact directory beside its database; None for servers (they
    choose, or proxy, the artifact store)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> ``{"a.b.c": "value"}`` with string values MLflow accepts (no nested
    dict failures; over-long values truncated with a marker)."""
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            if not value:
                out[key] = "{}"
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        else:
            text = "null" if value is None else (",".join(map(str, value)) if isinstance(value, (list, tuple))
                                                 else str(value))
            if len(text) > MAX_PARAM_LENGTH:
                marker = "...[truncated]"
                text = text[:MAX_PARAM_LENGTH - len(marker)] + marker
            out[key] = text

    walk(data, prefix)
    return out


def numeric_metrics(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, flattened (e.g. ``source_valid.macro_f1``)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def server_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """For http(s) URIs, whether the tracking server answers its health check; True otherwise."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class RunHandle:
    """A run being logged to (``run_id`` None when the tracker is offline)."""

    run_id: str | None
    artifact_uri: str | None = None
    name: str = ""
    children: list[RunHandle] = field(default_factory=list)


class Tracker:
    """Logs to MLflow through one client; degrades to a warning and no-ops when MLflow fails."""

    def __init__(self, uri: str | None = None, *, enabled: bool = True, log: Log = print,
                 training: bool = True) -> None:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.uri = resolve_tracking_uri(uri)
        self.log = log
        self.training = training   # the warning on going offline speaks of a training run
        self.enabled = enabled
        self.offline = not enabled
        self.problem: str | None = None
        self._client = None
        self._experiments: dict[str, str] = {}
        if enabled and not server_reachable(self.uri):
            self._go_offline(f"the tracking server at {self.uri} does not answer")

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            quiet_mlflow()

            if self.uri.startswith("sqlite:///"):
                Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _go_offline(self, reason: str) -> None:
        if not self.offline or self.problem is None:
            self.problem = reason
            if self.enabled and self.training:
                self.log(f"WARNING: MLflow tracking is off for the rest of this run: {reason}. Training goes on; "
                         f"artifacts stay on local disk (`deftx registry sync` uploads them later)")
            elif self.enabled:
                self.log(f"WARNING: MLflow is not usable: {reason}")
        self.offline = True

    def call(self, what: str, fn: Callable[[], Any], default: Any = None) -> Any:
        """Run ``fn`` (an MLflow call); on failure warn once, go offline, return ``default``."""
        if self.offline:
            return default
        try:
            return _retry(fn)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._go_offline(f"{what} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            return default

    # -- experiments and runs -----------------------------------------------------------------

    def experiment_id(self, name: str) -> str | None:
        if name in self._experiments:
            return self._experiments[name]

        def get_or_create() -> str:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            root = local_artifact_root(self.uri)
            location = f"{root}/{name}" if root else None
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception:  # created concurrently by another trial
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
                return found.experiment_id

        exp = self.call(f"creating experiment {name}", get_or_create)
        if exp is not None:
            self._experiments[name] = exp
        return exp

    def start_run(self, experiment: str, name: str, *, parent: RunHandle | None = None,
                  params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> RunHandle:
        exp = self.experiment_id(experiment)
        if exp is None:
            return RunHandle(None, name=name)
        all_tags = dict(tags or {})
        if parent is not None and parent.run_id is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run = self.call(f"starting run {name}", lambda: self.client.create_run(exp, run_name=name, tags=all_tags))
        if run is None:
            return RunHandle(None, name=name)
        handle = RunHandle(run.info.run_id, run.info.artifact_uri, name)
        if parent is not None:
            parent.children.append(handle)
        if params:
            self.log_params(handle, params)
        return handle

    def end_run(self, run: RunHandle, status: str = "FINISHED") -> None:
        if run.run_id is not None:
            self.call("ending a run", lambda: self.client.set_terminated(run.run_id, status=status))

    @contextmanager
    def run(self, experiment: str, name: str, *, parent: RunHandle | None = None,
            params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> Iterator[RunHandle]:
        """A run that ends FINISHED, or FAILED / KILLED if the block raises."""
        handle = self.start_run(experiment, name, parent=parent, params=params, tags=tags)
        try:
            yield handle
        except KeyboardInterrupt:
            self.end_run(handle, "KILLED")
            raise
        except BaseException:
            self.end_run(handle, "FAILED")
            raise
        self.end_run(handle)

    # -- logging ------------------------------------------------------------------------------

    def log_params(self, run: RunHandle, params: Mapping[str, Any]) -> None:
        if run.run_id is None:
            return
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):   # MLflow's batch limit
            chunk = items[i:i + 100]
            self.call("logging params", lambda chunk=chunk: self.client.log_batch(run.run_id, params=chunk))

    def log_metrics(self, run: RunHandle, metrics: Mapping[str, Any], step: int = 0) -> None:
        if run.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items()]
        if items:
            self.call("logging metrics", lambda: self.client.log_batch(run.run_id, metrics=items))

    def set_tags(self, run: RunHandle, tags: Mapping[str, Any]) -> None:
        if run.run_id is None:
            return
        for key, value in tags.items():
            self.call("setting a tag", lambda k=key, v=value: self.client.set_tag(run.run_id, k, str(v)))

    def log_artifacts(self, run: RunHandle, local_dir: str | Path, artifact_path: str | None = None) -> str | None:
        """Upload a directory; returns its artifact URI, or None if not uploaded."""
        if run.run_id is None:
            return None
        done = self.call(f"uploading {local_dir}",
                         lambda: self.client.log_artifacts(run.run_id, str(local_dir), artifact_path) or True)
        if not done:
            return None
        return f"{run.artifact_uri}/{artifact_path}" if artifact_path else run.artifact_uri

    def log_file(self, run: RunHandle, path: str | Path, artifact_path: str | None = None) -> None:
        if run.run_id is not None:
            self.call(f"uploading {path}", lambda: self.client.log_artifact(run.run_id, str(path), artifact_path))

    def log_figure(self, run: RunHandle, figure: Any, artifact_file: str) -> None:
        if run.run_id is not None:
            self.call(f"uploading {artifact_file}", lambda: self.client.log_figure(run.run_id, figure, artifact_file))


def _retry(fn: Callable[[], Any], attempts: int = 5, delay: float = 0.2) -> Any:
    """Retry on sqlite lock contention (concurrent trials writing one local store)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay * (2 ** attempt))
    raise AssertionError("unreachable")
