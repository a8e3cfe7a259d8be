"""Sweeps: validation before any work, the trial job a sample becomes, phase-2 evaluations for early
stopping, and (slow) a real Tune sweep on a tiny model that resumes after its driver is killed. What a
sweep registers (versions, the champion alias, predicting from the registry, nested runs and plots)
is checked on the MLflow server of tests/test_ray.py, where the sweep runs as a Ray job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from deftx.config import ClusterConfig, load_pipeline_config
from deftx.errors import ConfigError
from deftx.workflows.sweeps.shared import SharedWork, check_sweep, trial_job
from deftx.workflows.sweeps.space import Dimension, space_from_dict

SPACE = {"dataset": "nusax", "objective": {"metric": "macro_f1", "split": "target_valid"}, "searcher": "optuna",
         "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}, "eval_every": 2,
         "default": {"method": {"choice": ["lt_sft", "deft_x"]}, "density": {"loguniform": [0.01, 0.1]},
                     "rank_rule": "fixed", "rank": {"choice": [2, 4]}}}
TINY = ["--set", "target_languages=[jav]", "--set", "language_sft.head_warmup_steps=2",
        "--set", "language_sft.full.max_steps=3", "--set", "language_sft.sparse.max_steps=4",
        "--set", "task_sft.full.max_steps=3", "--set", "task_sft.sparse.max_steps=3",
        "--set", "language_sft.max_train_examples=64"]


def test_check_sweep_rejects_bad_requests_before_any_work():
    cfg = load_pipeline_config()
    space = space_from_dict(SPACE)
    assert check_sweep(cfg, space, ["JAV", "sun"], 2) == ["jav", "sun"]
    for langs, n, message in [(["xx"], 2, "--languages: unknown NusaX language 'xx'"),
                              (["ind"], 2, "ind is the source language"),
                              (["jav", "jav"], 2, "jav is listed twice"),
                              ([], 2, "at least one target language"),
                              (["jav"], 0, "--num-samples: must be >= 1")]:
        with pytest.raises(ConfigError, match=message):
            check_sweep(cfg, space, langs, n)
    anli = space_from_dict({**SPACE, "dataset": "americasnli", "languages": {}})
    with pytest.raises(ConfigError, match="americasnli search space, but the pipeline trains on nusax.*deftx experiment americasnli"):
        check_sweep(cfg, anli, ["quy"], 2)


def test_tune_distributions_and_trial_cpus():
    from ray import tune

    from deftx.workflows.sweeps.tune import TRIAL_CPU, sweep_cluster, tune_distribution

    assert tune_distribution(Dimension("rank", "constant", (8,))) == 8
    randint = tune_distribution(Dimension("rank", "randint", (2, 4)))
    assert isinstance(randint, tune.search.sample.Integer) and (randint.lower, randint.upper) == (2, 5)
    log = tune_distribution(Dimension("density", "loguniform", (0.001, 0.1)))
    assert (log.lower, log.upper) == (0.001, 0.1) and type(log.sampler).__name__ == "_LogUniform"
    fitted = sweep_cluster(ClusterConfig(num_workers=2, cpus_per_worker=1.0), total_cpus=2.0)
    assert fitted.cpus_per_worker == 0.99 and 2 * fitted.cpus_per_worker + TRIAL_CPU <= 2.0
    roomy = ClusterConfig(num_workers=2, cpus_per_worker=1.0)
    assert sweep_cluster(roomy, total_cpus=8.0) is roomy


def test_trial_job_samples_only_the_swept_selection(tmp_path):
    cfg = load_pipeline_config(overrides=[f"output_dir={tmp_path}"])
    from deftx.jobs.cache import job_key, phase1_key
    from deftx.jobs.spec import LanguageJob, Phase1, TaskJob

    shared = SharedWork(config=asdict(cfg), fingerprint="f", sft="language", task_sft="/t", source_sft="/s",
                        head_dir=None, phase1={"jav": "/p1/jav"})
    job, selection = trial_job(shared, "jav", {"method": "deft_x", "density": 0.02, "rank_rule": "fixed", "rank": 4})
    assert isinstance(job, LanguageJob)
    assert (job.language, job.phase1, job.head) == ("jav", Phase1("/p1/jav"), None)
    assert job.config.language_sft.selection.rank == 4 and selection.energy is None
    assert job.config.task_sft == cfg.task_sft          # only the swept SFT changes
    other, _ = trial_job(shared, "jav", {"method": "deft_x", "density": 0.03, "rank_rule": "fixed", "rank": 4})
    assert job_key(other) != job_key(job) and phase1_key(other) == phase1_key(job)   # one phase 1 for all trials
    task_shared = SharedWork(config=asdict(cfg), fingerprint="f", sft="task", task_sft=None, source_sft="/s",
                             language_sfts={"jav": "/l"}, phase1={"task": "/p1/task"})
    task_job, _ = trial_job(task_shared, "jav", {"density": 0.05})
    assert isinstance(task_job, TaskJob)
    assert (task_job.language, task_job.language_sft, task_job.phase1) == ("ind", "/s", Phase1("/p1/task"))
    assert task_job.config.task_sft.selection.density == 0.05


def test_phase2_evaluations_score_the_composition_being_trained(tiny_model_dir, tmp_path):
    """A language SFT trained with a probe every 2 phase-2 steps reports at steps 2 and 4; the last
    report scores the same composition as the finished SFT."""
    from deftx.jobs.run import run_job
    from deftx.jobs.spec import LanguageJob, Probe, TaskJob
    from deftx.training.probe import read_reports
    from deftx.workflows.pipeline import absolute_paths
    from deftx.workflows.sweeps.shared import score_composition

    cfg = absolute_paths(load_pipeline_config(overrides=[
        f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", "cluster.backend=local",
        "language_sft.head_warmup_steps=0", "language_sft.full.max_steps=3", "language_sft.sparse.max_steps=4",
        "language_sft.max_train_examples=64", "task_sft.full.max_steps=2", "task_sft.sparse.max_steps=2",
        "task_sft.max_train_examples=32"]))
    run_job(TaskJob(cfg, "f", "ind"), log=lambda s: None).save(tmp_path / "task")
    reports = tmp_path / "reports.jsonl"
    job = LanguageJob(cfg, "f", "jav", probe=Probe(every=2, task_sft=str(tmp_path / "task"), language="jav",
                                                   split="target_valid", report_path=str(reports)))
    run_job(job, log=lambda s: None).save(tmp_path / "lang")
    lines = read_reports(reports)
    assert [r["step"] for r in lines] == [2, 4]
    final = score_composition(cfg, str(tmp_path / "task"), str(tmp_path / "lang"), "jav", "target_valid")
    assert lines[-1]["target_valid_macro_f1"] == pytest.approx(final["target_valid_macro_f1"], abs=1e-12)
    assert lines[-1]["target_valid_accuracy"] == pytest.approx(final["target_valid_accuracy"], abs=1e-12)
    assert final["target_valid_n"] == 100


def _sweep_cmd(model_dir: Path, space: Path, out: Path, samples: int) -> list[str]:
    return [sys.executable, "-m", "deftx", "sweep", "--space", str(space), "--languages", "jav", "--num-samples",
            str(samples), "--local", "--set", f"model.name_or_path={model_dir}", *TINY, "--output-dir", str(out)]


def _space_file(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "space.json"
    path.write_text(json.dumps({**SPACE, **changes}))
    return path


def _terminated_trials(experiment: Path) -> int:
    for state in experiment.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        return sum(1 for entry in data.get("trial_data", [])
                   if any(isinstance(part, str) and '"status": "TERMINATED"' in part for part in entry))
    return 0


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_killed_sweep_resumes_without_rerunning_finished_trials(tiny_model_dir, tmp_path):
    space = _space_file(tmp_path, scheduler={"kind": "none"}, eval_every=0)
    cmd = _sweep_cmd(tiny_model_dir, space, tmp_path / "out", 3) + ["--set", "language_sft.sparse.max_steps=150"]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    experiment = tmp_path / "out" / "tune" / "out-sweep-jav"
    deadline = time.time() + 400
    while _terminated_trials(experiment) < 1:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)   # the driver and everything it started
    proc.wait(timeout=60)
    trial_root = tmp_path / "out" / "sweeps" / "out-sweep" / "jav"
    finished_before = {d.name for d in trial_root.iterdir() if (d / "sft" / "sft.json").is_file()}
    assert 1 <= len(finished_before) < 3   # killed in the middle of the sweep
    logs_before = {name: (trial_root / name / "trial.log").read_text() for name in finished_before}

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the experiment" in again.stderr
    result = json.loads((tmp_path / "out" / "sweeps" / "out-sweep" / "result.json").read_text())
    assert result["languages"][0]["trials"] == 3
    for name, text in logs_before.items():   # finished trials were not trained again
        assert (trial_root / name / "trial.log").read_text() == text
