"""The SFT model registry on MLflow: registered models, tags, the ``champion`` alias, lookup.

Names:
  ``deftx-lang-<lang>``        language SFTs (plain artifact: the SFT directory)
  ``deftx-task-<task>``        task SFTs (plain artifact)
  ``deftx-<task>-<lang>``      composed zero-shot models: an MLflow pyfunc model that contains its
                               task and language SFTs (``deftx.mlflow_model.ComposedSFTModel``)

Every version is tagged with its metrics, method, hyperparameters and base fingerprint. A version
is registered once per SFT (a version whose ``weights_sha256`` tag matches is reused), so repeating
a registration - e.g. ``deftx registry sync`` after a partial upload - never duplicates it.

``champion`` (per composed model) points at the version with the best score on the same objective:
it moves only when a new version scores strictly higher. With a local sqlite store the
compare-and-move runs under a file lock; with a server, sweeps re-check the alias when they end
(:meth:`Registry.reconcile_champion`), so concurrent trials cannot leave it on a worse version.

Registrations that cannot reach MLflow are written as JSON records (``PendingRegistration``) under
the run's output directory and uploaded later by ``deftx registry sync``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deftx import __version__
from deftx.core.compose import COMPOSED_OUTPUT, Composition, export_hf_model
from deftx.core.io import check_output_dir, replace_json
from deftx.core.sft import SparseFineTuning, current_base_fingerprint, read_metadata
from deftx.errors import DeftxError, first_line
from deftx.mlflow_model import DATA_DIR, LANGUAGE_ARTIFACT, LOADER_MODULE, TASK_ARTIFACT, ComposedPredictor
from deftx.models import load_classifier, load_tokenizer, resolve_model_path
from deftx.tracking.tracker import RunHandle, Tracker, flatten_params

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CHAMPION = "champion"
PENDING_DIR = "registry-pending"
TAG_SCORE, TAG_OBJECTIVE = "score", "objective"
TAG_BASE = "base_fingerprint"   # on every SFT and composed version (sft_tags)


class RegistryError(DeftxError):
    """A registry lookup or registration failed (the message says what exists instead)."""


def language_model_name(lang: str) -> str:
    return f"deftx-lang-{lang}"


def task_model_name(task: str) -> str:
    return f"deftx-task-{task}"


def composed_model_name(task: str, lang: str) -> str:
    return f"deftx-{task}-{lang}"


@dataclass(frozen=True)
class ModelRef:
    """``NAME@ALIAS``, ``NAME/VERSION`` or ``NAME`` (the latest version)."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        text = text.strip()
        text = text.removeprefix("models:/")
        if "@" in text:
            name, alias = text.split("@", 1)
            if not name or not alias:
                raise RegistryError(f"{text!r}: expected NAME@ALIAS, NAME/VERSION or NAME")
            return cls(name, alias=alias)
        if "/" in text:
            name, version = text.rsplit("/", 1)
            if not name or not version.isdigit():
                raise RegistryError(f"{text!r}: expected NAME@ALIAS, NAME/VERSION or NAME")
            return cls(name, version=version)
        if not text:
            raise RegistryError("empty model reference")
        return cls(text)

    def __str__(self) -> str:
        return self.name + (f"@{self.alias}" if self.alias else f"/{self.version}" if self.version else "")


def sft_tags(sft_dir: str | Path) -> dict[str, str]:
    """Tags describing an SFT directory: kind, language, task, method, hyperparameters, metrics,
    base model and fingerprint, and the weights checksum (the identity used to avoid duplicates)."""
    doc = read_metadata(sft_dir)
    tags = {"kind": doc.get("kind"), "language": doc.get("language"), "task": doc.get("task"),
            "method": doc.get("method"), "base_model": doc.get("base_model"),
            "base_fingerprint": doc.get("base_fingerprint"), "weights_sha256": doc.get("weights_sha256"),
            "nnz": doc.get("nnz"), "deftx_version": doc.get("deftx_version")}
    selection = {k: v for k, v in (doc.get("selection") or {}).items() if not isinstance(v, (dict, list))}
    tags.update({f"selection.{k}": v for k, v in selection.items()})
    tags.update({f"metrics.{k}": v for k, v in flatten_params(doc.get("metrics") or {}).items()})
    return {k: str(v) for k, v in tags.items() if v is not None and v != ""}


@dataclass
class PendingRegistration:
    """A registration to do (now, or later by ``deftx registry sync`` if MLflow is unreachable):
    a composed model (task + language SFT) with its score, or a single SFT when ``language_sft`` is
    the only part given and ``task_sft`` is None."""

    experiment: str
    run_name: str
    task: str
    language: str
    task_sft: str | None
    language_sft: str | None
    score: float | None = None
    objective: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def save(self, output_dir: str | Path) -> Path:
        directory = Path(output_dir) / PENDING_DIR
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.run_name}-{uuid.uuid4().hex[:8]}.json"
        replace_json(path, asdict(self), indent=2)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PendingRegistration:
        """A saved record, validated: a :class:`RegistryError` naming the file and the problem."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RegistryError(f"{path}: unreadable registration record ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{path}: a registration record must be a JSON object")
        fields = cls.__dataclass_fields__
        unknown = sorted(set(doc) - set(fields))
        if unknown:
            raise RegistryError(f"{path}: unknown field {unknown[0]!r} in the registration record")
        for name, types in _PENDING_TYPES.items():
            if name not in doc:
                if name in _PENDING_REQUIRED:
                    raise RegistryError(f"{path}: the registration record has no {name!r}")
                continue
            value = doc[name]
            if not isinstance(value, types) or isinstance(value, bool):
                raise RegistryError(f"{path}: {name!r} has the wrong type ({type(value).__name__})")
        if not doc.get("task_sft") and not doc.get("language_sft"):
            raise RegistryError(f"{path}: the registration record names no SFT")
        return cls(**doc)

    def check(self) -> None:
        """The SFT directories it names still load (checksums included)."""

        for part in (self.task_sft, self.language_sft):
            if part:
                SparseFineTuning.load(part)


_PENDING_REQUIRED = ("experiment", "run_name", "task", "language", "task_sft", "language_sft")
_PENDING_TYPES: dict[str, tuple[type, ...]] = {
    "experiment": (str,), "run_name": (str,), "task": (str,), "language": (str,),
    "task_sft": (str, type(None)), "language_sft": (str, type(None)), "score": (int, float, type(None)),
    "objective": (str, type(None)), "params": (dict,), "metrics": (dict,), "tags": (dict,),
}


@dataclass(frozen=True)
class VersionInfo:
    """One registered version, as deftx reports it (the version number as a string)."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]
    created: int | None = None

    @classmethod
    def of(cls, mv) -> VersionInfo:
        return cls(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}), mv.creation_timestamp)


@dataclass
class Registered:
    """The versions one registration produced (None where that part was not registered)."""

    language_version: str | None = None
    task_version: str | None = None
    composed_version: str | None = None
    champion: bool = False


class Registry:
    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    @property
    def client(self):
        return self.tracker.client

    # -- registration -------------------------------------------------------------------------

    def _ensure_model(self, name: str, description: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name, description=description)
            except MlflowException:
                self.client.get_registered_model(name)   # created concurrently: fine if it exists now

    def _existing_version(self, name: str, checksum: str) -> str | None:
        found = self.client.search_model_versions(f"name='{name}' and tags.weights_sha256='{checksum}'")
        return str(min(int(v.version) for v in found)) if found else None

    def register_sft(self, run: RunHandle, sft_dir: str | Path) -> str:
        """Register an SFT directory as a version of ``deftx-lang-<lang>`` / ``deftx-task-<task>``
        (reusing the version that already holds these weights)."""
        tags = sft_tags(sft_dir)
        name = language_model_name(tags["language"]) if tags["kind"] == "language" else task_model_name(
            tags.get("task", "task"))
        self._ensure_model(name, f"deftx {tags['kind']} SFTs")
        existing = self._existing_version(name, tags["weights_sha256"])
        if existing is not None:
            return existing
        folder = f"sfts/{Path(sft_dir).name}"
        self.client.log_artifacts(run.run_id, str(sft_dir), folder)
        version = self.client.create_model_version(name, source=f"{run.artifact_uri}/{folder}", run_id=run.run_id,
                                                   tags=tags, description=f"{tags['kind']} SFT")
        return str(version.version)

    def register_composed(self, run: RunHandle, pending: PendingRegistration, part_versions: dict[str, str]) -> str:
        """Save the pyfunc model (both SFTs as data, the installed deftx as code) into ``run`` and
        register it."""
        import mlflow.pyfunc


        name = composed_model_name(pending.task, pending.language)
        self._ensure_model(name, f"deftx zero-shot model: {pending.task} SFT + {pending.language} language SFT")
        task_tags, lang_tags = sft_tags(pending.task_sft), sft_tags(pending.language_sft)
        tags = {**{f"task.{k}": v for k, v in task_tags.items() if not k.startswith("metrics.")},
                **{f"language.{k}": v for k, v in lang_tags.items() if not k.startswith("metrics.")},
                "base_fingerprint": task_tags.get("base_fingerprint", ""),
                "weights_sha256": f"{task_tags['weights_sha256']}+{lang_tags['weights_sha256']}",
                **{f"{k}_version": v for k, v in part_versions.items()},
                **{f"metrics.{k}": str(v) for k, v in pending.metrics.items()},
                **{f"params.{k}": v for k, v in flatten_params(pending.params).items()}, **pending.tags}
        if pending.score is not None:
            tags.update({TAG_SCORE: repr(float(pending.score)), TAG_OBJECTIVE: pending.objective or ""})
        existing = self._existing_version(name, tags["weights_sha256"])
        if existing is not None:
            return existing
        with tempfile.TemporaryDirectory(prefix="deftx-pyfunc-") as tmp:
            local, data = Path(tmp) / "model", Path(tmp) / DATA_DIR
            shutil.copytree(pending.task_sft, data / TASK_ARTIFACT)
            shutil.copytree(pending.language_sft, data / LANGUAGE_ARTIFACT)
            mlflow.pyfunc.save_model(   # code: the installed deftx, imported by name; data: the two SFTs
                str(local), loader_module=LOADER_MODULE, data_path=str(data),
                pip_requirements=[f"deftx=={__version__}", "torch==2.13.0", "transformers==5.23.0"],
                metadata={"deftx": {"task": pending.task, "language": pending.language,
                                    "base_model": task_tags.get("base_model")}})
            self.client.log_artifacts(run.run_id, str(local), "composed-model")
        version = self.client.create_model_version(name, source=f"{run.artifact_uri}/composed-model",
                                                   run_id=run.run_id, tags=tags,
                                                   description=f"theta0 + phi_task({pending.task}) + "
                                                               f"phi_lang({pending.language})")
        return str(version.version)

    def submit(self, pending: PendingRegistration, output_dir: str | Path | None = None,
               parent: RunHandle | None = None) -> Registered | None:
        """Register ``pending`` now; if MLflow is unreachable (or fails), save it under
        ``output_dir`` for ``deftx registry sync`` and return None."""
        def register() -> Registered:
            out = Registered()
            with self.tracker.run(pending.experiment, pending.run_name, parent=parent, params=pending.params,
                                  tags={"deftx.registration": "1", **pending.tags}) as run:
                if run.run_id is None:
                    raise RuntimeError(self.tracker.problem or "MLflow is unreachable")
                self.tracker.log_metrics(run, pending.metrics)
                parts: dict[str, str] = {}
                if pending.language_sft:
                    out.language_version = parts["language_sft"] = self.register_sft(run, pending.language_sft)
                if pending.task_sft:
                    out.task_version = parts["task_sft"] = self.register_sft(run, pending.task_sft)
                if pending.task_sft and pending.language_sft:
                    out.composed_version = self.register_composed(run, pending, parts)
                    if pending.score is not None and pending.objective:
                        out.champion = self.promote_champion(composed_model_name(pending.task, pending.language),
                                                             out.composed_version, pending.objective, pending.score)
            return out

        result = self.tracker.call(f"registering {pending.run_name}", register)
        if result is None and output_dir is not None:
            path = pending.save(output_dir)
            self.tracker.log(f"WARNING: {pending.run_name} not registered ({self.tracker.problem}); saved {path} - "
                             f"run `deftx registry sync {output_dir}` when MLflow is back")
        return result

    # -- the champion alias -------------------------------------------------------------------

    @contextlib.contextmanager
    def _champion_lock(self) -> Iterator[None]:
        uri = self.tracker.uri
        if not uri.startswith("sqlite:///"):
            yield
            return
        lock_path = Path(uri[len("sqlite:///"):]).with_suffix(".champion.lock")
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def current_champion(self, name: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            return None

    def promote_champion(self, name: str, version: str, objective: str, score: float) -> bool:
        """Point ``champion`` at ``version`` if there is none, or if ``score`` beats the champion's
        score on the same ``objective``. A champion scored on another objective, or trained on
        another base model (its ``base_fingerprint`` tag), is not comparable and stays: the alias
        never silently switches to an SFT of another base."""
        with self._champion_lock():
            current = self.current_champion(name)
            if current is not None:
                if str(current.version) == str(version):
                    return True
                base = self.client.get_model_version(name, str(version)).tags.get(TAG_BASE)
                if current.tags.get(TAG_BASE) and base and current.tags.get(TAG_BASE) != base:
                    self.tracker.log(f"{name}: champion v{current.version} was trained on base model "
                                     f"{current.tags.get('base_model') or '?'} ({current.tags[TAG_BASE][:19]}...), "
                                     f"v{version} on another ({base[:19]}...); the champion stays (move the alias "
                                     f"by hand if you switch base models)")
                    return False
                if current.tags.get(TAG_OBJECTIVE) != objective:
                    self.tracker.log(f"{name}: champion v{current.version} was scored on "
                                     f"{current.tags.get(TAG_OBJECTIVE) or 'no objective'}, not {objective}; "
                                     "it stays")
                    return False
                if not score > float(current.tags.get(TAG_SCORE, "-inf")):
                    return False
            self.client.set_registered_model_alias(name, CHAMPION, version)
            return True

    def reconcile_champion(self, name: str, objective: str) -> str | None:
        """Make ``champion`` the best version on ``objective`` (after concurrent trials)."""
        with self._champion_lock():
            versions = [v for v in self.client.search_model_versions(f"name='{name}'")
                        if v.tags.get(TAG_OBJECTIVE) == objective and TAG_SCORE in v.tags]
            current = self.current_champion(name)
            if current is not None and current.tags.get(TAG_BASE):   # only versions on the champion's base
                versions = [v for v in versions if v.tags.get(TAG_BASE) in (None, current.tags[TAG_BASE])]
            if not versions:
                return None
            if current is not None and current.tags.get(TAG_OBJECTIVE) not in (None, objective):
                return str(current.version)
            best = max(versions, key=lambda v: (float(v.tags[TAG_SCORE]), -int(v.version)))
            if current is None or float(best.tags[TAG_SCORE]) > float(current.tags.get(TAG_SCORE, "-inf")):
                self.client.set_registered_model_alias(name, CHAMPION, str(best.version))
                return str(best.version)
            return str(current.version)

    # -- lookup -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(m.name for m in self.client.search_registered_models(max_results=1000)
                      if m.name.startswith("deftx-"))

    def resolve(self, ref: ModelRef | str) -> VersionInfo:
        """The version ``ref`` names; a missing name/alias/version says what exists."""
        from mlflow.exceptions import MlflowException

        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        try:
            model = self.client.get_registered_model(ref.name)
        except MlflowException:
            names = self.names()
            raise RegistryError(f"no registered model {ref.name!r} in {self.tracker.uri}; registered: "
                                f"{', '.join(names) if names else 'none (run a pipeline or sweep first)'}") from None
        aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
        if ref.alias:
            if ref.alias not in aliases:
                have = ", ".join(f"@{a} (v{v})" for a, v in sorted(aliases.items())) or "no aliases"
                raise RegistryError(f"{ref.name} has no alias {ref.alias!r}; it has {have}")
            return VersionInfo.of(self.client.get_model_version(ref.name, aliases[ref.alias]))
        versions = sorted(self.client.search_model_versions(f"name='{ref.name}'"), key=lambda v: int(v.version))
        if not versions:
            raise RegistryError(f"{ref.name} has no versions")
        if ref.version is None:
            return VersionInfo.of(versions[-1])
        for v in versions:
            if str(v.version) == ref.version:
                return VersionInfo.of(v)
        raise RegistryError(f"{ref.name} has no version {ref.version}; versions: "
                            f"{', '.join(str(v.version) for v in versions)}")

    def listing(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.names():
            model = self.client.get_registered_model(name)
            versions = self.client.search_model_versions(f"name='{name}'")
            aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
            latest = max(versions, key=lambda v: int(v.version)) if versions else None
            rows.append({"name": name, "versions": len(versions),
                         "aliases": dict(sorted(aliases.items())),
                         "latest": str(latest.version) if latest else None,
                         "score": (self.client.get_model_version(name, aliases[CHAMPION]).tags.get(TAG_SCORE)
                                   if CHAMPION in aliases else None)})
        return rows

    def show(self, ref: ModelRef | str) -> dict[str, Any]:
        version = self.resolve(ref)
        model = self.client.get_registered_model(version.name)
        aliases = sorted(a for a, v in (model.aliases or {}).items() if str(v) == version.version)
        return {"name": version.name, "version": version.version, "aliases": aliases, "source": version.source,
                "run_id": version.run_id, "created": version.created, "tags": version.tags}

    def download(self, ref: ModelRef | str, destination: str | Path) -> Path:
        """The version's files (an SFT directory, or the pyfunc model directory) under ``destination``."""
        version = self.resolve(ref)
        return self._download(version.source, destination)

    def _download(self, uri: str, destination: str | Path) -> Path:
        import mlflow.artifacts

        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination),
                                                        tracking_uri=self.tracker.uri)
        except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing or unreadable artifact
            raise RegistryError(f"cannot download {uri} from {self.tracker.uri}: {first_line(exc)}") from None
        return Path(local)

    def fetch_sfts(self, ref: ModelRef | str, destination: str | Path) -> tuple[VersionInfo, Path, Path | None]:
        """Download only the SFT data of a version (never its code): for a composed model its task
        and language SFT directories (located through ``MLmodel``, read as plain YAML), for an SFT
        version its directory. Each is loaded and checked against the checksums the registry
        recorded when it was registered. Returns (version, task or language SFT dir, language SFT
        dir or None)."""

        version = self.resolve(ref)
        destination = Path(destination)
        if version.tags.get("kind") in ("language", "task"):
            local = self._download(version.source, destination / "sft")
            _verify_sft(local, version, version.tags.get("weights_sha256"))
            return version, local, None
        model_dir = destination / "model"
        self._download(f"{version.source.rstrip('/')}/MLmodel", model_dir)
        task_rel, lang_rel = composed_sft_dirs(model_dir)
        task = self._download(f"{version.source.rstrip('/')}/{task_rel}", model_dir / Path(task_rel).parent)
        lang = self._download(f"{version.source.rstrip('/')}/{lang_rel}", model_dir / Path(lang_rel).parent)
        _verify_sft(task, version, version.tags.get("task.weights_sha256"), TASK_ARTIFACT)
        _verify_sft(lang, version, version.tags.get("language.weights_sha256"), LANGUAGE_ARTIFACT)
        return version, task, lang


def sync_pending(registry: Registry, output_dirs: list[str | Path], log=print) -> tuple[int, int]:
    """Upload the registrations saved while MLflow was unreachable. Returns (done, still pending).

    Records are independent: a malformed record, or one whose SFTs are gone or corrupt, is reported
    with its own problem and left in place, and the records after it are still uploaded (each one
    through its own client, so one failure does not turn tracking off for the others). Only an
    unreachable server stops the sync."""
    done = left = 0
    records = []
    for root in output_dirs:
        directory = Path(root) / PENDING_DIR
        records += [(directory, path) for path in sorted(directory.glob("*.json"))] if directory.is_dir() else []
    for i, (directory, path) in enumerate(records):
        try:
            pending = PendingRegistration.load(path)
            pending.check()
        except DeftxError as exc:
            left += 1
            reason = str(exc).splitlines()[0].removeprefix(f"{path}: ")
            log(f"still pending: {path}: {reason}")
            continue
        attempt = Registry(Tracker(registry.tracker.uri, log=lambda line: None, training=False))
        if attempt.tracker.offline:
            left += len(records) - i
            log(f"still pending: {len(records) - i} record(s) from {path} on: {attempt.tracker.problem}")
            break
        result = attempt.submit(pending)   # no output_dir: a failure must not duplicate the record
        if result is None:
            left += 1
            log(f"still pending: {path}: {attempt.tracker.problem}")
            continue
        path.unlink()
        done += 1
        log(f"registered {pending.run_name}: composed v{result.composed_version}, "
            f"language v{result.language_version}, task v{result.task_version}"
            + (" (champion)" if result.champion else ""))
    for directory in {d for d, _ in records}:
        if directory.is_dir() and not any(directory.iterdir()):
            shutil.rmtree(directory, ignore_errors=True)
    return done, left


def compose_from_registry(registry: Registry, ref: ModelRef | str, out_dir: str | Path, *,
                          base_model: str | None = None, overwrite: bool = False, log=print) -> Path:
    """``deftx registry get``: download a composed model (or a task SFT), verify the base
    fingerprint, compose into a standalone Hugging Face model directory at ``out_dir``."""

    version = registry.resolve(ref)
    if version.tags.get("kind") == "language":
        raise RegistryError(f"{version.name}/{version.version} is a language SFT; compose a model from a composed "
                            f"model (deftx-<task>-<lang>) or a task SFT")
    check_output_dir(out_dir, overwrite, COMPOSED_OUTPUT, hint="pass overwrite=True to replace it")
    with tempfile.TemporaryDirectory(prefix="deftx-get-") as tmp:
        version, first, second = registry.fetch_sfts(version_ref(version), tmp)
        task = SparseFineTuning.load(first)
        language = SparseFineTuning.load(second) if second is not None else None
        if task.metadata.kind != "task":
            raise RegistryError(f"{version.name}/{version.version} is a {task.metadata.kind} SFT; compose a "
                                f"model from a composed model (deftx-<task>-<lang>) or a task SFT")
        composition = Composition(task, language)
        base = base_model or task.metadata.base_model
        path = resolve_model_path(base, log=log)
        model = load_classifier(path, task.metadata.label_names or [])

        found = current_base_fingerprint(model)
        if task.metadata.base_fingerprint and found != task.metadata.base_fingerprint:
            raise RegistryError(f"{version.name}/{version.version} was trained on a base model with fingerprint "
                                f"{task.metadata.base_fingerprint[:19]}..., but {base} has {found[:19]}...")
        return export_hf_model(composition, model, load_tokenizer(path), out_dir, overwrite=overwrite)


def version_ref(version: VersionInfo) -> ModelRef:
    return ModelRef(version.name, version=version.version)


def _relative_inside(text: Any, what: str, where: Path) -> str:
    """A relative POSIX path that stays inside the model directory (no '..', not absolute)."""
    from pathlib import PurePosixPath

    if not isinstance(text, str) or not text.strip():
        raise RegistryError(f"{where}: no path for {what}")
    path = PurePosixPath(text.strip())
    if path.is_absolute() or any(part in ("..", "") for part in path.parts) or "\\" in text:
        raise RegistryError(f"{where}: the path of {what} ({text!r}) leaves the model directory")
    return str(path)


def composed_sft_dirs(model_dir: str | Path) -> tuple[str, str]:
    """The task and language SFT folders of a composed model, relative to its directory, read from
    its ``MLmodel`` file as plain YAML: ``<data>/task_sft`` for models whose code is deftx's
    ``loader_module``, or the ``task_sft`` / ``language_sft`` artifacts of models registered by
    earlier deftx releases. Nothing the model directory contains is imported or executed."""
    import yaml


    where = Path(model_dir) / "MLmodel"
    try:
        doc = yaml.safe_load(where.read_text(encoding="utf-8"))
        flavor = doc["flavors"]["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise RegistryError(f"{where}: not an MLflow pyfunc model file ({type(exc).__name__})") from None
    if not isinstance(flavor, dict):
        raise RegistryError(f"{where}: not an MLflow pyfunc model file")
    artifacts = flavor.get("artifacts")
    if isinstance(artifacts, dict) and TASK_ARTIFACT in artifacts:
        paths = []
        for name in (TASK_ARTIFACT, LANGUAGE_ARTIFACT):
            entry = artifacts.get(name)
            paths.append(_relative_inside(entry.get("path") if isinstance(entry, dict) else None, name, where))
        return paths[0], paths[1]
    data = _relative_inside(flavor.get("data"), "the model data", where)
    return f"{data}/{TASK_ARTIFACT}", f"{data}/{LANGUAGE_ARTIFACT}"


def _verify_sft(directory: Path, version: VersionInfo, registered_sha: str | None, part: str = "SFT") -> None:
    """The downloaded SFT loads (its own checksum, shapes, indices) and its weights are those the
    registry recorded for this version when it was registered."""

    sft = SparseFineTuning.load(directory)
    found = read_metadata(directory).get("weights_sha256")
    if registered_sha and found != registered_sha:
        raise RegistryError(f"{version.name}/{version.version}: the stored {part} is not the one registered "
                            f"(weights {str(found)[:12]}..., registered {registered_sha[:12]}...)")
    del sft


def open_registry(tracking_uri: str | None = None, log=print, create: bool = False) -> Registry:
    """The registry at ``tracking_uri`` (else ``MLFLOW_TRACKING_URI``, else ./mlflow); fails with a
    clear message when it cannot be reached, or (unless ``create``) when a local store does not exist."""
    tracker = Tracker(tracking_uri, log=lambda line: None, training=False)
    if tracker.offline:
        raise RegistryError(f"cannot reach the MLflow tracking server at {tracker.uri} "
                            f"(start it with infra/local/up.sh, or pass --tracking-uri)")
    if not create and tracker.uri.startswith("sqlite:///") and not Path(tracker.uri[len("sqlite:///"):]).is_file():
        raise RegistryError(f"no MLflow store at {tracker.uri[len('sqlite:///'):]} (run a pipeline or sweep here "
                            f"first, or pass --tracking-uri / set MLFLOW_TRACKING_URI)")
    tracker.log = log
    return Registry(tracker)


def load_model(ref: str, tracking_uri: str | None = None, base_model: str | None = None):
    """A registered composed model (e.g. ``deftx-nusax_senti-jav@champion``) as a predictor:
    ``.predict(list_of_texts)`` returns label names. Only the SFTs' data is downloaded and verified
    (see :meth:`Registry.fetch_sfts`); the code is the installed deftx."""

    registry = open_registry(tracking_uri)
    version = registry.resolve(ref)
    if not version.name.startswith("deftx-") or version.tags.get("kind") in ("language", "task"):
        raise RegistryError(f"{ref}: a {version.tags.get('kind')} SFT, not a composed model (deftx-<task>-<lang>)")
    with tempfile.TemporaryDirectory(prefix="deftx-predict-") as tmp:
        _, task_dir, language_dir = registry.fetch_sfts(version_ref(version), tmp)
        return ComposedPredictor(task_dir, language_dir, base_model=base_model)
