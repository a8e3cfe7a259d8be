"""The tuned table of a results experiment (deftx.workflows.experiments.tuning): the trials drawn,
the champions chosen, the settings refused, and the stage end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from deftx.config import ConfigError, SelectionConfig
from deftx.workflows.experiments.config import load_experiment
from deftx.workflows.experiments.tuning import (
    TuningConfig,
    champions,
    draw_trials,
    sample_tag,
    trial_selection,
)


def _tuning(**systems) -> TuningConfig:
    return TuningConfig(languages=["jav", "sun"], trials=6, seed=3, systems=systems)


def test_trials_are_drawn_the_same_on_every_call_and_inside_their_space():
    tuning = _tuning(full_ft={"learning_rate": {"loguniform": [1e-5, 1e-4]}, "epochs": {"choice": [2, 3]}},
                     lt_sft={"density": {"loguniform": [0.005, 0.05]}, "learning_rate": 2e-4})
    first = tuning.trials_for("full_ft")
    assert first == tuning.trials_for("full_ft") == draw_trials(tuning.space("full_ft"), 6, "3:full_ft")
    assert len(first) == 6 and len({json.dumps(t, sort_keys=True) for t in first}) > 1
    assert all(1e-5 <= t["learning_rate"] <= 1e-4 and t["epochs"] in (2, 3) for t in first)
    sft = tuning.trials_for("lt_sft")
    assert all(0.005 <= t["density"] <= 0.05 and t["learning_rate"] == 2e-4 for t in sft)
    assert all(t["density"] == float(f"{t['density']:.3g}") for t in sft)          # 3 significant digits
    # another seed or system draws other settings; the tag names the settings, not their order
    assert TuningConfig(languages=["jav"], trials=6, seed=4, systems=tuning.systems).trials_for("full_ft") != first
    assert sample_tag({"a": 1, "b": 2.0}) == sample_tag({"b": 2.0, "a": 1}) != sample_tag({"a": 1, "b": 3.0})


def test_a_trial_keeps_only_the_rank_rule_value_it_uses():
    tuning = _tuning(deft_x_energy={"rank_rule": {"choice": ["fixed", "energy"]}, "rank": {"choice": [4, 16]},
                                    "energy": {"uniform": [0.5, 0.9]}})
    trials = tuning.trials_for("deft_x_energy")
    assert {t["rank_rule"] for t in trials} == {"fixed", "energy"}     # both rules drawn in 6 trials (seed 3)
    for t in trials:
        assert set(t) == {"rank_rule", "rank" if t["rank_rule"] == "fixed" else "energy"}


def test_each_language_gets_its_best_trial_and_the_earlier_one_on_a_tie():
    scores = {0: {"jav": 0.50, "sun": 0.70}, 1: {"jav": 0.60, "sun": 0.70}, 2: {"jav": 0.55, "sun": 0.65}}
    assert champions(scores, ["jav", "sun"]) == {"jav": 1, "sun": 0}
    assert champions({0: {"jav": 0.5}}, ["jav", "sun"]) == {"jav": 0}      # no score, no champion
    assert champions({}, ["jav"]) == {}


def test_the_average_rule_gives_every_language_the_trial_best_on_their_mean():
    # per language, trial 2 wins jav and trial 0 sun; on the mean (0.60, 0.625, 0.61) trial 1 wins both
    scores = {0: {"jav": 0.45, "sun": 0.75}, 1: {"jav": 0.55, "sun": 0.70}, 2: {"jav": 0.62, "sun": 0.60}}
    assert champions(scores, ["jav", "sun"]) == {"jav": 2, "sun": 0}
    assert champions(scores, ["jav", "sun"], "average") == {"jav": 1, "sun": 1}
    tie = {0: {"jav": 0.5, "sun": 0.7}, 1: {"jav": 0.7, "sun": 0.5}}
    assert champions(tie, ["jav", "sun"], "average") == {"jav": 0, "sun": 0}       # the earlier trial
    part = {0: {"jav": 0.9}, 1: {"jav": 0.5, "sun": 0.5}}    # trial 0 was not scored on sun
    assert champions(part, ["jav", "sun"], "average") == {"jav": 1, "sun": 1}
    assert champions({0: {"jav": 0.9}}, ["jav", "sun"], "average") == {}
    with pytest.raises(ValueError, match="unknown champion rule 'best'"):
        champions(scores, ["jav"], "best")


def test_a_trial_selection_is_the_method_selection_with_the_sampled_keys():
    base = SelectionConfig(method="deft_x", density=0.05, energy=0.9)
    chosen = trial_selection(base, {"density": 0.01, "rank_rule": "fixed", "rank": 8, "learning_rate": 1e-4})
    assert (chosen.method, chosen.density, chosen.rank, chosen.energy) == ("deft_x", 0.01, 8, None)
    assert trial_selection(base, {"learning_rate": 1e-4}) == base


def _experiment(**tuning):
    sets = ["tuning=null", f"tuning={json.dumps(tuning)}"]     # in place of the small preset's own
    return load_experiment("nusax", preset="small", overrides=sets)


def test_a_valid_tuning_section_is_accepted():
    cfg = _experiment(languages=["jav"], trials=2,
                      systems={"full_ft": {"learning_rate": {"choice": [5e-5, 1e-4]}},
                               "deft_x_energy": {"energy": {"uniform": [0.5, 0.95]}, "residual_keep": {"choice": [0.0, 0.1]}}})
    assert cfg.tuning.enabled and cfg.tuning.trials_for("deft_x_energy")[0]["residual_keep"] in (0.0, 0.1)


def test_no_tuned_languages_switch_the_tuned_table_off_whatever_the_spaces():
    """`--set 'tuning.languages=[]'` on a preset with spaces: no tuned table, nothing else to unset."""
    cfg = _experiment(languages=[], systems={"full_ft": {"epochs": 2}})
    assert not cfg.tuning.enabled and cfg.tuning.systems


@pytest.mark.parametrize("tuning, message", [
    ({"languages": ["ace"], "systems": {"full_ft": {"epochs": 2}}}, "tuning.languages: 'ace' is not a target"),
    ({"languages": ["jav", "jav"], "systems": {"full_ft": {"epochs": 2}}}, "listed twice"),
    ({"languages": ["jav"], "systems": {}}, "tuning.systems: give at least one system"),
    ({"languages": ["jav"], "systems": {"full_ft": {"epochs": 2}}, "champion": "best"},
     "tuning.champion: unknown rule 'best'; valid: per_language, average"),
    ({"languages": ["jav"], "systems": {"mad_x": {"density": 0.1}}}, "tuning.systems.mad_x: neither full_ft"),
    ({"languages": ["jav"], "systems": {"full_ft": {"density": 0.1}}}, "tuning.systems.full_ft.density: not tunable"),
    ({"languages": ["jav"], "systems": {"lt_sft": {"epochs": 2}}}, "tuning.systems.lt_sft.epochs: not tunable"),
    ({"languages": ["jav"], "systems": {"full_ft": {"epochs": {"uniform": [1, 3]}}}}, "epochs are whole numbers"),
    ({"languages": ["jav"], "systems": {"full_ft": {"epochs": {"choice": [0, 2]}}}}, "integers >= 1"),
    ({"languages": ["jav"], "systems": {"full_ft": {"learning_rate": -1e-4}}}, "must be > 0"),
    ({"languages": ["jav"], "systems": {"lt_sft": {"density": {"loguniform": [0, 0.1]}}}}, "bounds must be > 0"),
    ({"languages": ["jav"], "systems": {"deft_x_rank": {"rank": {"choice": [4]}, "energy": 0.5}}}, "add rank_rule"),
    ({"languages": ["jav"], "trials": 0, "systems": {"full_ft": {"epochs": 2}}}, "tuning.trials: must be an integer"),
    ({"languages": ["jav"], "systems": {"full_ft": []}}, "expected a non-empty mapping"),
])
def test_bad_tuning_settings_are_one_line_errors_naming_the_key(tuning, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        _experiment(**tuning)
    assert "\n" not in str(err.value)


def test_two_kinds_for_one_setting_say_how_they_came_together():
    with pytest.raises(ConfigError, match="one kind per setting, got loguniform and choice"):
        load_experiment("nusax", preset="small", overrides=["tuning.systems.full_ft.learning_rate={choice: [1e-4]}"])


def test_tuning_needs_the_single_source_layout(americasnli_dir):
    with pytest.raises(ConfigError, match="tuning: implemented for main: single_source"):
        load_experiment("americasnli", preset="small", overrides=[
            f"pipeline.data.source={americasnli_dir}", "tuning=null",
            'tuning={"languages": ["aym"], "systems": {"full_ft": {"epochs": 2}}}'])


# The stage end to end (trials on validation, champions per target, the seed-1 champion reused,
# registry champions, the report) runs in tests/test_experiments.py with the small preset.
