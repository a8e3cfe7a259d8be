"""Search-space files: the shipped ones load, bad ones fail with one line naming the key, and a
sampled point becomes the SelectionConfig a trial trains with."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from deftx.config import SelectionConfig
from deftx.errors import ConfigError
from deftx.workflows.sweeps.space import load_space, selection_from_sample, space_from_dict

ROOT = Path(__file__).resolve().parents[1]


def _space(**changes):
    data = {"dataset": "nusax", "default": {"method": {"choice": ["lt_sft", "deft_x"]},
                                            "density": {"loguniform": [0.001, 0.05]},
                                            "rank_rule": {"choice": ["fixed", "energy"]},
                                            "rank": {"choice": [4, 8]}, "energy": {"uniform": [0.5, 0.9]}}}
    data.update(changes)
    return space_from_dict(data)


@pytest.mark.parametrize("name", ["nusax", "americasnli"])
def test_shipped_spaces_load_and_every_language_resolves(name):
    space = load_space(ROOT / "tune_spaces" / f"{name}.yaml")
    assert space.objective.key.startswith("target_valid_")
    langs = ["jav", "sun", "min", "ace"] if name == "nusax" else ["quy", "gn", "aym"]
    for lang in langs:
        dims = space.for_language(lang)
        assert {"method", "density"} <= set(dims)
    if name == "nusax":
        assert space.for_language("jav")["density"].values == (0.005, 0.05)
        assert space.for_language("min")["density"].values == (0.002, 0.05)


@pytest.mark.parametrize("change,message", [
    ({"dataset": "xnli"}, "dataset: unknown dataset 'xnli'"),
    ({"sft": "both"}, "sft: unknown value 'both'"),
    ({"objective": {"split": "target_test"}}, "objective.split: unknown value 'target_test'"),
    ({"objective": {"metrc": "f1"}}, "objective.metrc: unknown key"),
    ({"scheduler": {"kind": "pbt"}}, "scheduler.kind: unknown value 'pbt'"),
    ({"eval_every": -1}, "eval_every: must be an integer >= 0"),
    ({"default": {}}, "default: the shared space is empty"),
    ({"default": {"density": {"loguniform": [0, 0.1]}}}, r"density.loguniform: bounds must be > 0"),
    ({"default": {"density": {"uniform": [0.01, 1.5]}}}, r"density.uniform: must be in \(0, 1\], got 1.5"),
    ({"default": {"density": {"uniform": [0.05, 0.01]}}}, "low must be below high"),
    ({"default": {"density": [0.01, 0.02]}}, r"write a list of options as \{choice"),
    ({"default": {"rank": {"uniform": [2, 8]}}}, "a rank is an integer"),
    ({"default": {"rank": {"choice": [0, 8]}}}, "a rank must be a positive integer, got 0"),
    ({"default": {"method": {"choice": ["lt_sft", "magic"]}}}, "unknown method 'magic'"),
    ({"default": {"method": {"uniform": [0, 1]}}}, "method takes {choice"),
    ({"default": {"learning_rate": 0.1}}, "'learning_rate' is not tunable"),
    ({"default": {"density": {"normal": [0, 1]}}}, "expected one of"),
    ({"default": {"rank": {"choice": [4]}, "energy": 0.9}}, "tunes both rank and energy; add rank_rule"),
    ({"languages": {"xyz": {"density": 0.01}}}, "languages.xyz: unknown NusaX language 'xyz'"),
    ({"default": {"svd_target": "weights"}}, "unknown SVD target 'weights'"),
])
def test_bad_spaces_fail_with_one_line_naming_the_key(change, message):
    data = {"dataset": "nusax", "default": {"density": 0.01}}
    data.update(change)
    with pytest.raises(ConfigError, match=message) as err:
        space_from_dict(data)
    assert "\n" not in str(err.value)


def test_unknown_top_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="spaces: unknown key"):
        space_from_dict({"dataset": "nusax", "spaces": {}, "default": {"density": 0.01}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dataset": "nusax", "default": {"density": 2}}))
    with pytest.raises(ConfigError, match=rf"{bad}\.default\.density: must be in \(0, 1\]"):
        load_space(bad)


def test_unknown_language_lookup_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown NusaX language 'xx'"):
        _space().for_language("xx")


def test_samples_stay_inside_their_dimensions():
    rng = random.Random(0)
    dims = _space().for_language("jav")
    for _ in range(200):
        d = dims["density"].sample(rng)
        assert 0.001 <= d <= 0.05
        assert dims["rank"].sample(rng) in (4, 8)
        assert 0.5 <= dims["energy"].sample(rng) <= 0.9
    logs = sorted(dims["density"].sample(rng) for _ in range(2000))
    assert 0.005 < logs[1000] < 0.01   # log-uniform: the median is near sqrt(0.001 * 0.05) = 0.0071


def test_selection_from_sample_applies_the_rank_rule():
    base = SelectionConfig(method="lt_sft", density=0.01, energy=0.9)
    fixed = selection_from_sample(base, {"method": "deft_x", "density": 0.02, "rank_rule": "fixed", "rank": 16,
                                         "energy": 0.7})
    assert (fixed.method, fixed.density, fixed.rank, fixed.energy) == ("deft_x", 0.02, 16, None)
    energy = selection_from_sample(base, {"method": "deft_x", "rank_rule": "energy", "rank": 16, "energy": 0.7})
    assert (energy.rank, energy.energy) == (None, 0.7)
    lt = selection_from_sample(base, {"method": "lt_sft", "density": 0.03, "rank_rule": "fixed", "rank": 4})
    assert lt.hyperparameters() == {"method": "lt_sft", "density": 0.03, "k": None}
    counted = selection_from_sample(SelectionConfig(density=None, k=100), {"density": 0.5})
    assert (counted.density, counted.k) == (0.5, None)
    assert base.method == "lt_sft" and base.rank is None   # the base is not modified
    with pytest.raises(ConfigError, match="'lr' is not tunable"):
        selection_from_sample(base, {"lr": 1.0})
