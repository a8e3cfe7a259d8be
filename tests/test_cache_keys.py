"""The cache's key of every kind of job (deftx.jobs.cache.job_key) changes exactly when a field that
changes the job's result changes.

Every leaf of every job (its pipeline config, subnetwork settings, languages, input artifacts,
fingerprint, phase-1 and probe settings) is changed one at a time; the key must change if and only
if the field is listed as relevant for that kind of job below. A config field added later falls
under the rule of its section and is checked the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import shutil
from pathlib import Path

import pytest
import torch

from deftx.config import PipelineConfig
from deftx.core.sft import SFTMetadata, SparseDelta, SparseFineTuning
from deftx.jobs.cache import job_key, phase1_key, result_fields
from deftx.jobs.head import save_head
from deftx.jobs.spec import (
    HeadJob,
    LanguageJob,
    MultiSourceJob,
    Phase1,
    Probe,
    SubnetworkJob,
    TaskJob,
    job_from_dict,
    job_to_dict,
)
from deftx.subnetworks.config import SubnetworkConfig

BASE = ["fingerprint", "config.model.*", "config.data.*", "config.task", "config.seed"]
RELEVANT = {
    "head": BASE + ["config.source_language", "config.target_languages", "config.language_sft.head_warmup_steps",
                    "config.language_sft.head_warmup_learning_rate", "config.language_sft.max_train_examples",
                    "config.language_sft.full.batch_size", "config.language_sft.mlm_probability",
                    "config.language_sft.text", "config.language_sft.held_out",
                    "config.language_sft.head_bias_init"],
    "language": BASE + ["language", "head", "config.language_sft.*"],
    "language-phase1": BASE + ["language", "head", "config.language_sft.*"],
    "task": BASE + ["language", "language_sft", "config.task_sft.*"],
    "multi_source": BASE + ["sources", "language_sfts", "config.task_sft.*"],
    "subnetworks": BASE + ["sources", "language_sfts", "subnetworks.*", "config.task_sft.max_train_examples"],
}
NOT_IN_PHASE1 = ["config.language_sft.selection.*", "config.language_sft.sparse.*",
                 "config.language_sft.sparse_update"]
# Without a head warm-up (task SFTs by default) the head's starting bias changes nothing.
NO_WARMUP = ["config.task_sft.head_bias_init"]
IGNORED = {"language-phase1": NOT_IN_PHASE1, "task": NO_WARMUP, "multi_source": NO_WARMUP}


def _sft(directory: Path, value: float) -> str:
    delta = SparseDelta((4, 4), torch.tensor([1, 5]), torch.tensor([value, -value]))
    SparseFineTuning({"w": delta}, {}, SFTMetadata(kind="language", language="jav")).save(directory)
    return str(directory)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    a = _sft(root / "a", 1.0)
    b = _sft(root / "b", 2.0)
    a_copy = str(root / "a-copy")
    shutil.copytree(a, a_copy)
    save_head(root / "head", {"h": torch.ones(3)}, {"digest": "k", "steps": 1})
    save_head(root / "head2", {"h": torch.zeros(3)}, {"digest": "k", "steps": 1})
    shutil.copytree(root / "head", root / "head-copy")
    return {"a": a, "b": b, "a-copy": a_copy, "head": str(root / "head"), "head2": str(root / "head2"),
            "head-copy": str(root / "head-copy")}


def _jobs(artifacts) -> dict[str, object]:
    cfg = PipelineConfig()
    sub = SubnetworkConfig(mode="static")
    return {
        "head": HeadJob(cfg, "fp"),
        "language": LanguageJob(cfg, "fp", "jav", head=artifacts["head"], phase1=Phase1("/p1"),
                                probe=Probe(2, artifacts["b"], "jav", "target_valid", "/r.jsonl")),
        "language-phase1": LanguageJob(cfg, "fp", "jav", head=artifacts["head"], phase1=Phase1("/p1", only=True)),
        "task": TaskJob(cfg, "fp", "ind", language_sft=artifacts["a"], phase1=Phase1("/p1")),
        "multi_source": MultiSourceJob(cfg, "fp", ("jav", "sun"), {"jav": artifacts["a"]}, phase1=Phase1("/p1")),
        "subnetworks": SubnetworkJob(cfg, "fp", ("jav", "sun"), {"jav": artifacts["a"]}, sub, masks_cache="/m"),
    }


def _changed(value):
    """Another value of the same kind (the key only reads values, so it need not be a valid setting)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.25
    if isinstance(value, str):
        return value + "-changed"
    if value is None:
        return 3
    if isinstance(value, (list, tuple)):
        return type(value)([*value, "zz"])
    if isinstance(value, dict):
        return {**value, "zz": "x"}
    raise TypeError(f"no change rule for {value!r}")


def _leaves(obj, prefix: str):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def _with(obj, path: list[str], new):
    """A copy of ``obj`` with the leaf at ``path`` set to ``new`` (no validation, frozen or not)."""
    out = copy.copy(obj)
    value = new if len(path) == 1 else _with(getattr(obj, path[0]), path[1:], new)
    object.__setattr__(out, path[0], value)
    return out


def _get(obj, path: list[str]):
    for part in path:
        obj = getattr(obj, part)
    return obj


def _job_level_changes(name: str, job, artifacts) -> dict[str, list[tuple[object, bool]]]:
    """Changes of the fields that hold paths or languages: (new value, whether the key must change)."""
    out: dict[str, list[tuple[object, bool]]] = {}
    if hasattr(job, "head"):
        out["head"] = [(artifacts["head-copy"], False), (artifacts["head2"], True), (None, True)]
    if hasattr(job, "language_sft"):
        out["language_sft"] = [(artifacts["a-copy"], False), (artifacts["b"], True), (None, True)]
    if hasattr(job, "language_sfts"):
        out["language_sfts"] = [({"jav": artifacts["a-copy"]}, False), ({"jav": artifacts["b"]}, True),
                                ({"sun": artifacts["a"]}, True), ({}, True)]
    if hasattr(job, "sources"):
        out["sources"] = [(("jav", "min"), True), (("sun", "jav"), True)]
    if hasattr(job, "language"):
        out["language"] = [("sun", True)]
    if hasattr(job, "phase1") and job.phase1 is not None:
        out["phase1"] = [(Phase1("/elsewhere", job.phase1.only), False)]
    if hasattr(job, "probe"):
        out["probe"] = [(None, False), (Probe(5, artifacts["a"], "sun", "source_valid", "/x"), False)]
    if hasattr(job, "masks_cache"):
        out["masks_cache"] = [(None, False), ("/other", False)]
    return out


@pytest.mark.parametrize("name", list(RELEVANT))
def test_the_key_changes_exactly_with_the_fields_that_change_the_result(name, artifacts):
    job = _jobs(artifacts)[name]
    key = job_key(job)
    relevant = RELEVANT[name]
    ignored = IGNORED.get(name, [])
    wrong = []
    checked = 0
    special = _job_level_changes(name, job, artifacts)
    for leaf in _leaves(job, ""):
        top = leaf.split(".")[0]
        if top in special:
            continue
        path = leaf.split(".")
        changed = job_key(_with(job, path, _changed(_get(job, path))))
        expect = any(fnmatch.fnmatch(leaf, p) for p in relevant) and not any(fnmatch.fnmatch(leaf, p) for p in ignored)
        checked += 1
        if (changed != key) != expect:
            wrong.append(f"{leaf}: key {'changed' if changed != key else 'unchanged'}, expected "
                         f"{'a change' if expect else 'none'}")
    for field, cases in special.items():
        for value, expect in cases:
            changed = job_key(_with(job, [field], value))
            checked += 1
            if (changed != key) != expect:
                wrong.append(f"{field}={value!r}: key {'changed' if changed != key else 'unchanged'}")
    assert not wrong, "\n".join(wrong)
    assert checked > 40


def test_phase1_keys_ignore_the_selection_and_phase_2_only(artifacts):
    job = _jobs(artifacts)["language"]
    lt = _with(job, ["config", "language_sft", "selection", "method"], "deft_x")
    assert phase1_key(lt) == phase1_key(job) and job_key(lt) != job_key(job)
    longer = _with(job, ["config", "language_sft", "full", "max_steps"], 9)
    assert phase1_key(longer) != phase1_key(job)
    marker = dataclasses.replace(job, phase1=Phase1("/p1", only=True), probe=None)
    assert job_key(marker) == phase1_key(job) != job_key(job)


def test_head_keys_from_before_the_bias_option_stay_valid(artifacts):
    """``zero`` is what every run did before ``head_bias_init`` existed: its keys are unchanged."""
    job = _jobs(artifacts)["head"]
    zero = _with(job, ["config", "language_sft", "head_bias_init"], "zero")
    assert "bias_init" not in str(result_fields(zero)) and "bias_init" in str(result_fields(job))
    assert job_key(zero) != job_key(job)


def test_a_job_survives_the_process_boundary_and_is_validated_there(artifacts):
    for job in _jobs(artifacts).values():
        data = job_to_dict(job)
        assert job_from_dict(data) == job and job_key(job_from_dict(data)) == job_key(job)
    data = job_to_dict(_jobs(artifacts)["task"])
    data["config"]["task_sft"]["selection"]["density"] = float("nan")
    with pytest.raises(Exception, match="density"):
        job_from_dict(data)
    with pytest.raises(Exception, match="unknown job kind"):
        job_from_dict({**data, "kind": "nope"})
    with pytest.raises(Exception, match="not sources"):
        MultiSourceJob(PipelineConfig(), "fp", ("jav",), {"sun": artifacts["a"]})


def test_keys_without_own_tables_are_unchanged_and_a_table_is_keyed_by_its_content(artifacts, tmp_path):
    """``data.table`` (added later) is left out of the key when unset, so keys of every earlier run stay
    valid; a table is keyed by its content, so an edited file is trained again."""
    from deftx.config.schema import TableConfig

    job = _jobs(artifacts)["task"]
    assert "table" not in result_fields(job)["data"]
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,x\nb,y\n")
    table = TableConfig(name="mine", train={"ind": str(train)})
    own = _with(_with(job, ["config", "data", "table"], table), ["config", "data", "dataset"], "table")
    before = job_key(own)
    assert result_fields(own)["data"]["table"]["train_sha256"]["ind"]
    train.write_text("text,label\na,x\nb,x\n")
    assert job_key(own) != before != job_key(job)
