"""infra/cluster cannot be run here (no cloud, no Kubernetes): parse every manifest and check that
it runs our entry points with our config, the pinned Ray version, token auth, a shared storage path
for checkpoints mounted on every node, and an MLflow tracking URI."""

from __future__ import annotations

import shlex
import subprocess
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
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if "ray start" in c)
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -q -e ~/deftx" in setup and "/shared" in setup
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("script", ["up.sh", "down.sh"])
def test_local_scripts_parse(script):
    path = ROOT / "infra" / "local" / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
