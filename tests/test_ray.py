"""Real services: a Ray head and an MLflow server started by ``infra/local/up.sh`` on 127.0.0.1
(stopped by ``down.sh``), a tiny pipeline submitted with ``ray job submit`` of ``ray_jobs/pipeline.py``,
a worker killed by its pid in the middle of phase 2, and the errors a user meets before any training.

One head for the module: the test process joins it with one ``ray.init``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PORTS = {"RAY_PORT": "6391", "RAY_DASHBOARD_PORT": "8291", "MLFLOW_PORT": "5091"}
TINY = ["--set", "target_languages=[jav]", "--set", "language_sft.head_warmup_steps=2",
        "--set", "language_sft.full.max_steps=3", "--set", "language_sft.sparse.max_steps=3",
        "--set", "task_sft.full.max_steps=3", "--set", "task_sft.sparse.max_steps=3",
        "--set", "max_eval_examples=40", "--set", "language_sft.max_train_examples=64"]

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]   # see tests/conftest.py


def _env(state: Path) -> dict[str, str]:
    return {**os.environ, **PORTS, "DEFTX_INFRA_DIR": str(state), "RAY_AUTH_MODE": "token",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head + MLflow server from infra/local/up.sh (run twice: the second run must be a no-op)."""
    state = tmp_path_factory.mktemp("infra")
    env = _env(state)
    first = subprocess.run([str(ROOT / "infra/local/up.sh")], env=env, capture_output=True, text=True, timeout=240)
    try:
        assert first.returncode == 0, first.stderr + first.stdout
        again = subprocess.run([str(ROOT / "infra/local/up.sh")], env=env, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0 and "already running" in again.stdout
        yield {"gcs": f"127.0.0.1:{PORTS['RAY_PORT']}", "dashboard": f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}",
               "mlflow": f"http://127.0.0.1:{PORTS['MLFLOW_PORT']}", "env": env, "state": state}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        down = subprocess.run([str(ROOT / "infra/local/down.sh")], env=env, capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stderr
        assert not (state / "mlflow.pid").exists() and not (state / "ray.pid").exists()


def test_infra_services_listen_on_loopback_only(head):
    import urllib.request

    with urllib.request.urlopen(f"{head['mlflow']}/health", timeout=10) as reply:
        assert reply.status == 200
    listeners = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()
    addresses = [line.split()[3] for line in listeners]
    assert addresses and all("127.0.0.1" in a or a.startswith("[::1]") for a in addresses), addresses


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """One output directory for the pipeline job and the sweep job (which reuses its shared SFTs)."""
    return tmp_path_factory.mktemp("ray-job") / "job"


def test_ray_job_submit_runs_the_pipeline(head, tiny_model_dir, job_dir):
    """The README's command, verbatim apart from the tiny settings: SUCCEEDED, the SFTs exist, and
    the run is tracked and registered on the MLflow server that up.sh started."""
    from deftx.tracking.registry import open_registry

    out = job_dir
    cmd = ["ray", "job", "submit", "--address", head["dashboard"], "--working-dir", ".", "--",
           "python", "ray_jobs/pipeline.py", "--output-dir", str(out),
           "--set", f"model.name_or_path={tiny_model_dir}", *TINY, "--set", f"tracking.uri={head['mlflow']}"]
    done = subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    results = json.loads((out / "results.json").read_text())
    assert [r["language"] for r in results["rows"]] == ["ind", "jav"]
    for name in ("lang-ind", "lang-jav", "task-nusax_senti"):
        meta = json.loads((out / "sfts" / name / "sft.json").read_text())
        assert meta["nnz"] > 0 and meta["training"]["world_size"] == 2
    assert (out / "mlm-head" / "head.safetensors").is_file()
    champion = open_registry(head["mlflow"]).resolve("deftx-nusax_senti-jav@champion")
    assert champion.tags["deftx.pipeline"] == str(out)


def test_ray_job_submit_runs_a_sweep_of_ray_train_trials(head, tiny_model_dir, job_dir):
    """`ray job submit ... ray_jobs/sweep.py` (Optuna + ASHA): each trial launches a 2-worker
    TorchTrainer (Train V2 pattern, trial 0.01 CPU + workers 0.99); the pipeline's head, source SFT
    and task SFT are reused; every finished trial is a composed model registered on the MLflow
    server, the champion moves to the best of them, and lookup + compose + predict work from the
    registry; the trials' runs are nested under the sweep's, with their plots and loss curves."""
    from deftx.tracking.registry import load_model, open_registry

    space = job_dir.parent / "space.json"
    space.write_text(json.dumps({
        "dataset": "nusax", "eval_every": 2, "searcher": "optuna", "scheduler": {"kind": "asha"},
        "default": {"method": {"choice": ["lt_sft", "deft_x"]}, "density": {"loguniform": [0.01, 0.1]},
                    "rank": 2}}))
    cmd = ["ray", "job", "submit", "--address", head["dashboard"], "--working-dir", ".", "--",
           "python", "ray_jobs/sweep.py", "--space", str(space), "--languages", "jav", "--num-samples", "2",
           "--output-dir", str(job_dir), "--set", f"model.name_or_path={tiny_model_dir}", *TINY,
           "--set", f"tracking.uri={head['mlflow']}"]
    done = subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=1200)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert text.count("reusing ") >= 3      # MLM head, source-language SFT, task SFT
    result = json.loads((job_dir / "sweeps" / "job-sweep" / "result.json").read_text())
    assert result["languages"][0]["trials"] == 2
    registry = open_registry(head["mlflow"])
    versions = registry.client.search_model_versions("name='deftx-nusax_senti-jav'")
    from_sweep = [v for v in versions if v.tags.get("deftx.sweep") == "job-sweep"]
    assert 1 <= len(from_sweep) <= 2 and len(versions) == 1 + len(from_sweep)   # + the pipeline's
    for version in from_sweep:
        meta = json.loads((job_dir / "sweeps" / "job-sweep" / "jav" / version.tags["deftx.trial"] / "sft" /
                           "sft.json").read_text())
        assert meta["training"]["world_size"] == 2 and "phase1_reused_from" in meta["training"]
    assert len(from_sweep) == result["languages"][0]["finished"]
    # the sweep's own best (result.json) is its best registered version; the pipeline's version
    # competes for the champion too, so the champion is the best of all of them
    assert max(float(v.tags["score"]) for v in from_sweep) == pytest.approx(result["languages"][0]["best_score"])
    best = max(float(v.tags["score"]) for v in versions)
    champion = registry.resolve("deftx-nusax_senti-jav@champion")
    assert float(champion.tags["score"]) == best
    assert champion.tags["objective"] == "target_valid_macro_f1"
    labels = load_model("deftx-nusax_senti-jav@champion", head["mlflow"]).predict(["apik tenan", "ala banget"])
    assert len(labels) == 2 and set(labels) <= {"negative", "neutral", "positive"}
    runs = registry.client.search_runs([registry.tracker.experiment_id("deftx-nusax_senti-sweep-job-sweep")])
    parents = {r.info.run_name: r.info.run_id for r in runs}
    trial_runs = [r for r in runs if r.info.run_name.startswith("trial-jav-")]
    assert trial_runs and all(r.data.tags["mlflow.parentRunId"] == parents["sweep-job-sweep-jav"] for r in trial_runs)
    artifacts = [a.path for a in registry.client.list_artifacts(parents["sweep-job-sweep-jav"], "plots")]
    assert sorted(artifacts) == ["plots/spectra-jav.png", "plots/trials-jav.png"]
    trial_plots = [a.path for a in registry.client.list_artifacts(trial_runs[0].info.run_id, "plots")]
    assert trial_plots == ["plots/mask-density-per-layer.png"]
    assert registry.client.get_metric_history(trial_runs[0].info.run_id, "loss.phase2_sparse")


def _task_job(model_dir: Path, out: Path):
    from deftx.config import load_pipeline_config
    from deftx.jobs.spec import TaskJob
    from deftx.workflows.pipeline import absolute_paths

    cfg = absolute_paths(load_pipeline_config(overrides=[
        f"model.name_or_path={model_dir}", f"output_dir={out}", "task_sft.full.max_steps=4",
        "task_sft.sparse.max_steps=16", "task_sft.full.batch_size=8", "task_sft.sparse.batch_size=8",
        "task_sft.max_train_examples=128"]))
    return TaskJob(cfg, "test-fingerprint", "ind")


def _executor(head, **changes):
    from deftx.config import ClusterConfig
    from deftx.jobs.ray import RayExecutor

    cluster = ClusterConfig(address=head["gcs"], checkpoint_every=2, max_failures=1, **changes)
    return RayExecutor(cluster, default_storage=Path(head["state"]) / "storage", log=lambda line: None)


def _kill_in_phase_2(status: Path, killed: dict) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and not killed:
        try:
            info = json.loads((status / "rank1.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        if info["phase"] == "sparse" and 3 <= info["step"] < 14:
            os.kill(info["pid"], signal.SIGKILL)
            killed.update(info)
            return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def whole_sft(head, tiny_model_dir, tmp_path_factory):
    """The task SFT of an uninterrupted 2-worker run (ZeRO-0, the default: sparse embedding
    gradients), the reference of the tests below."""
    root = tmp_path_factory.mktemp("whole")
    _executor(head).run(_task_job(tiny_model_dir, root / "whole"), root / "whole-sft", print)
    return root / "whole-sft"


def test_killed_worker_resumes_and_ends_with_the_same_sft(head, tiny_model_dir, tmp_path, whole_sft):
    """SIGKILL one worker in the middle of phase 2: Ray Train restarts the group from the latest
    checkpoint (FailureConfig max_failures=1) and the SFT equals an uninterrupted run's, bit for bit,
    with the same validation scores. This run is a second, independent Ray Train run of the same job
    (new worker processes train its phase 1 and the start of phase 2 afresh), so the equality also
    shows that the Ray + DeepSpeed path is deterministic run to run."""
    from helpers import assert_same_sft

    from deftx.core.sft import SparseFineTuning

    status = tmp_path / "status"
    killed: dict = {}
    killer = threading.Thread(target=_kill_in_phase_2, args=(status, killed), daemon=True)
    killer.start()
    _executor(head, status_dir=str(status)).run(_task_job(tiny_model_dir, tmp_path / "killed"),
                                                tmp_path / "killed-sft", print)
    killer.join(timeout=5)
    assert killed, "the worker was not killed in phase 2 (it finished first?)"
    whole, resumed = SparseFineTuning.load(whole_sft), SparseFineTuning.load(tmp_path / "killed-sft")
    assert resumed.metadata.training["resumed_from"]["phase"] == "sparse"
    assert resumed.metadata.training["resumed_from"]["step"] <= killed["step"]
    assert whole.nnz > 0
    assert_same_sft(whole, resumed)
    assert whole.metadata.metrics == resumed.metadata.metrics and whole.metadata.metrics["source_valid"]


def test_subnetwork_job_runs_on_ray_train_workers_under_deepspeed(head, tiny_model_dir, tmp_path):
    """A multi-source subnetwork job (static masks + Reptile) on 2 Ray Train workers at ZeRO-2: the
    saved model has each source language's mask at the configured size, and its change lies inside
    the union of the masks (and the shared embeddings)."""
    from deftx.config import from_dict, load_pipeline_config
    from deftx.core.topk import count_selected
    from deftx.jobs.cache import job_key
    from deftx.jobs.spec import SubnetworkJob
    from deftx.subnetworks.artifact import SubnetworkModel
    from deftx.subnetworks.config import SubnetworkConfig
    from deftx.workflows.pipeline import absolute_paths

    cfg = absolute_paths(load_pipeline_config(overrides=[f"model.name_or_path={tiny_model_dir}",
                                                         f"output_dir={tmp_path}", "task_sft.max_train_examples=32",
                                                         "cluster.zero_stage=2"]))
    settings = {"mode": "static", "meta_learning": "reptile", "inner_steps": 2,
                "probe_steps": 2, "selection": {"density": 0.2}, "train": {"epochs": 1, "batch_size": 8}}
    job = SubnetworkJob(cfg, "test-fingerprint", ("jav", "sun"),
                        subnetworks=from_dict(SubnetworkConfig, settings, "subnetworks"))
    _executor(head).run(job, tmp_path / "model", print)
    model = SubnetworkModel.load(tmp_path / "model")
    assert model.languages == ["jav", "sun"] and model.info["config_digest"] == job_key(job)
    for lang in model.languages:
        assert count_selected(model.masks[lang]) == model.info["k"]
    union = {n: model.masks["jav"][n] | model.masks["sun"][n] for n in model.masks["jav"]}
    assert model.sft.nnz > 0
    inside = sum(d.nnz for n, d in model.sft.diffs.items() if n in union)
    assert inside > 0
    for name, delta in model.sft.diffs.items():
        if name in union:
            assert bool(union[name].reshape(-1)[delta.indices].all()), name


@pytest.mark.parametrize("changes,message", [
    ({"num_workers": 3}, "needs 3 CPUs but the Ray cluster has 2"),
    ({"use_gpu": True}, "cluster has 0 GPUs"),
])
def test_a_config_the_cluster_cannot_host_fails_before_training(head, tiny_model_dir, tmp_path, changes, message):
    from deftx.jobs.ray import ClusterError

    executor = _executor(head, **changes)
    started = time.time()
    with pytest.raises(ClusterError, match=message):
        executor.run(_task_job(tiny_model_dir, tmp_path / "x"), tmp_path / "x-sft", print)
    assert time.time() - started < 30 and not (tmp_path / "x-sft").exists()


def test_unreachable_address_fails_within_seconds_naming_it(tmp_path):
    started = time.time()
    done = subprocess.run([sys.executable, "ray_jobs/pipeline.py", "--address", "127.0.0.1:9", "--output-dir",
                           str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("deftx: error: cannot reach the Ray cluster at 127.0.0.1:9"), done.stderr
    assert "Traceback" not in done.stderr
    assert time.time() - started < 30  # (python + ray import included)
