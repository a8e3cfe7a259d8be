"""infra/cluster cannot be run here (no cloud, no Kubernetes): parse every manifest and check that
it runs our entry points with our config, the pinned Ray version, token auth, a shared storage path
for checkpoints mounted on every node, and an MLflow tracking URI."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "infra" / "cluster"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("ray")


def _pods(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def _check_pods(spec: dict) -> None:
    assert spec["rayVersion"] == _ray_version()
    for pod in _pods(spec):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        ray_container = pod["containers"][0]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in ray_container["env"]
        # every Ray container has the same token (`ray start` fails without one; nodes must agree)
        assert {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "deftx-ray-token", "key": "token"}}} \
            in ray_container["env"]
        assert {"name": "shared", "mountPath": "/shared"} in ray_container["volumeMounts"]
        assert claims["shared"] == "deftx-shared"
    worker = _pods(spec)[1]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_cluster_pipeline_config_is_valid_and_uses_shared_storage():
    from deftx.config import load_pipeline_config

    cfg = load_pipeline_config(config=CLUSTER / "nusax-cluster.yaml")
    assert cfg.cluster.backend == "ray" and cfg.cluster.use_gpu and cfg.cluster.max_failures > 0
    assert cfg.cluster.storage_path.startswith("/shared/") and cfg.output_dir.startswith("/shared/")
    assert len(cfg.target_languages) == 10
    assert (cfg.language_sft.selection.k, cfg.task_sft.selection.k) == (7_667_712, 14_155_776)


def test_kuberay_rayjob_runs_the_pipeline_entry_point():
    job = _load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "ray_jobs/pipeline.py"] and (ROOT / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file()
    assert "cluster.storage_path=/shared/ray-storage" in argv
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_AUTH_MODE"] == "token" and env["MLFLOW_TRACKING_URI"].startswith("http://")
    _check_pods(job["spec"]["rayClusterSpec"])


def test_kuberay_raycluster_mounts_shared_storage_and_runs_mlflow():
    cluster = _load("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_pods(cluster["spec"])
    mlflow = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]
    assert mlflow["command"][:2] == ["mlflow", "server"] and "sqlite:////shared/mlflow/mlflow.db" in mlflow["command"]


def test_cluster_launcher_config():
    cfg = _load("ray-cluster-aws.yaml")
    assert cfg["head_node_type"] in cfg["available_node_types"]
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=/shared/ray/auth_token" in c for c in starts)
    creates = [c for c in cfg["setup_commands"] if "/shared/ray/auth_token" in c]
    assert len(creates) == 1 and "token_hex(32)" in creates[0] and "[ -s /shared/ray/auth_token ]" in creates[0]
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -q -e ~/deftx" in setup and "/shared" in setup
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("script", ["up.sh", "down.sh", "ensure-ray-token.sh"])
def test_local_scripts_parse(script):
    path = ROOT / "infra" / "local" / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_ensure_ray_token_creates_the_token_ray_start_needs(tmp_path):
    """On a fresh machine (no ~/.ray/auth_token) `ray start --head` with RAY_AUTH_MODE=token fails
    (only ray.init creates a token); up.sh runs ensure-ray-token.sh first. The check below is the one
    `ray start` makes (ensure_token_if_auth_enabled without creating a token)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    code = ("from ray._private.authentication.authentication_token_setup import "
            "ensure_token_if_auth_enabled as ensure; ensure(create_token_if_missing=False)")
    check = [sys.executable, "-c", code]
    script = [str(ROOT / "infra" / "local" / "ensure-ray-token.sh")]
    before = subprocess.run(check, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert before.returncode != 0 and "no authentication token was found" in before.stderr
    first = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    token = (tmp_path / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32 and token not in first.stdout + first.stderr and "created" in first.stdout
    assert subprocess.run(check, env=env, capture_output=True, text=True, timeout=120, check=False).returncode == 0
    again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and again.stdout == ""
    assert (tmp_path / ".ray" / "auth_token").read_text().strip() == token


def _dockerfile() -> tuple[dict[str, str], dict[str, dict[str, str]], str]:
    """(global ARG defaults, per stage its image, ENV, ARG defaults and WORKDIR, the file's text)."""
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    args: dict[str, str] = {}
    stages: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            image = words[1]
            for key, value in args.items():
                image = image.replace("${" + key + "}", value)
            current = stages.setdefault(words[3], {"image": image})
        elif words[0] in ("ARG", "ENV") and "=" in words[1]:
            key, value = words[1].split("=", 1)
            (current if current is not None else args)[key] = value
        elif words[0] == "WORKDIR" and current is not None:
            current["workdir"] = words[1]
    return args, stages, text


def test_the_manifests_image_is_built_from_our_dockerfile():
    """The Dockerfile cannot be built here (no image registry): check that it builds what the
    manifests run: Ray's image at our pinned Ray version and Python, the pinned torch from the
    index of the right build, deftx from this checkout at the job's working directory."""
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(d.split("==") for d in project["dependencies"] if "==" in d)
    args, stages, text = _dockerfile()
    assert set(stages) == {"base-cpu", "base-cuda", "image"} and args["FLAVOUR"] == "cpu"
    ray = _ray_version()
    assert stages["base-cpu"]["image"] == f"rayproject/ray:{ray}-py311"
    assert stages["base-cuda"]["image"] == f"rayproject/ray:{ray}-py311-gpu"
    assert stages["image"]["image"] == "base-cpu"       # FLAVOUR=cuda picks base-cuda
    assert stages["base-cpu"]["TORCH_INDEX"].endswith("/cpu") and stages["base-cuda"]["TORCH_INDEX"].endswith("/cu128")
    assert project["requires-python"].startswith(">=3.11")
    image = stages["image"]
    assert image["TORCH"] == pins["torch"] == importlib.metadata.version("torch").split("+")[0]
    assert image["workdir"] == "/app/deftx"
    for needed in ("COPY deftx ./deftx", "COPY ray_jobs ./ray_jobs", "COPY infra ./infra", "deftx --version"):
        assert needed in text, needed
    job = _load("kuberay-rayjob.yaml")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == image["workdir"]
    version = project["version"]
    for manifest in ("kuberay-rayjob.yaml", "kuberay-raycluster.yaml"):
        spec = _load(manifest)["spec"]
        spec = spec.get("rayClusterSpec", spec)
        head, worker = (pod["containers"][0]["image"] for pod in _pods(spec))
        assert head.endswith(f"/deftx:{version}") and worker.endswith(f"/deftx:{version}-cuda"), manifest
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
