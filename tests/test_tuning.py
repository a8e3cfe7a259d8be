"""The tuned table of a results experiment (deftx.workflows.experiments.tuning): the trials drawn,
the champions chosen, the settings refused, and the stage end to end on a tiny model."""

from __future__ import annotations

import csv
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


def test_each_language_gets_its_best_trial_and_the_earlier_one_on_a_tie():
    scores = {0: {"jav": 0.50, "sun": 0.70}, 1: {"jav": 0.60, "sun": 0.70}, 2: {"jav": 0.55, "sun": 0.65}}
    assert champions(scores, ["jav", "sun"]) == {"jav": 1, "sun": 0}
    assert champions({0: {"jav": 0.5}}, ["jav", "sun"]) == {"jav": 0}      # no score, no champion
    assert champions({}, ["jav"]) == {}


def test_a_trial_selection_is_the_method_selection_with_the_sampled_keys():
    base = SelectionConfig(method="deft_x", density=0.05, energy=0.9)
    chosen = trial_selection(base, {"density": 0.01, "rank_rule": "fixed", "rank": 8, "learning_rate": 1e-4})
    assert (chosen.method, chosen.density, chosen.rank, chosen.energy) == ("deft_x", 0.01, 8, None)
    assert trial_selection(base, {"learning_rate": 1e-4}) == base


def _experiment(**tuning):
    sets = [f"tuning={json.dumps(tuning)}"]
    return load_experiment("nusax", preset="small", overrides=sets)


def test_a_valid_tuning_section_is_accepted():
    cfg = _experiment(languages=["jav"], trials=2,
                      systems={"full_ft": {"learning_rate": {"choice": [5e-5, 1e-4]}},
                               "deft_x_energy": {"energy": {"uniform": [0.5, 0.95]}, "residual_keep": {"choice": [0.0, 0.1]}}})
    assert cfg.tuning.enabled and cfg.tuning.trials_for("deft_x_energy")[0]["residual_keep"] in (0.0, 0.1)


@pytest.mark.parametrize("tuning, message", [
    ({"languages": ["ace"], "systems": {"full_ft": {"epochs": 2}}}, "tuning.languages: 'ace' is not a target"),
    ({"languages": ["jav", "jav"], "systems": {"full_ft": {"epochs": 2}}}, "listed twice"),
    ({"languages": ["jav"], "systems": {}}, "tuning.systems: give at least one system"),
    ({"languages": [], "systems": {"full_ft": {"epochs": 2}}}, "tuning.languages: name the targets"),
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


def test_tuning_needs_the_single_source_layout(americasnli_dir):
    with pytest.raises(ConfigError, match="tuning: implemented for main: single_source"):
        load_experiment("americasnli", preset="small", overrides=[
            f"pipeline.data.source={americasnli_dir}",
            'tuning={"languages": ["aym"], "systems": {"full_ft": {"epochs": 2}}}'])


@pytest.mark.slow
def test_tuned_table_end_to_end_champions_chosen_on_validation_and_reused(tiny_model_dir, tmp_path, capsys):
    """Trials at the first seed scored on validation only; each language's champion is its best
    trial there; the champions' first-seed units are the trials' own (nothing retrained), the
    second seed trains them anew; a re-run trains nothing."""
    from deftx.cli import main

    out, results, db = tmp_path / "run", tmp_path / "results", tmp_path / "mlflow.db"
    config = tmp_path / "experiment.yaml"
    config.write_text(f"""pipeline:
  model: {{name_or_path: {tiny_model_dir}, max_length: 64}}
  source_language: ind
  target_languages: [jav, sun]
  max_eval_examples: 40
  tracking: {{uri: "sqlite:///{db}"}}
  cluster: {{backend: local}}
  language_sft:
    head_warmup_steps: 4
    max_train_examples: 48
    full: {{epochs: 1, max_steps: 4, batch_size: 16, learning_rate: 1.0e-4}}
    sparse: {{epochs: 1, max_steps: 4, batch_size: 16, learning_rate: 2.0e-4}}
  task_sft:
    max_train_examples: 48
    full: {{epochs: 1, batch_size: 16, learning_rate: 1.0e-4}}
    sparse: {{epochs: 1, batch_size: 16, learning_rate: 2.0e-4}}
seeds: [1, 2]
methods:
  lt_sft: {{method: lt_sft}}
full_ft: true
analysis: false
tuning:
  languages: [jav, sun]
  trials: 3
  systems:
    full_ft: {{learning_rate: {{loguniform: [1.0e-4, 1.0e-1]}}}}
    lt_sft: {{density: {{loguniform: [0.005, 0.5]}}, learning_rate: {{loguniform: [1.0e-4, 1.0e-1]}}}}
""", encoding="utf-8")
    argv = ["experiment", "nusax", "--config", str(config), "--output-dir", str(out), "--results-dir", str(results)]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "## Tuned on validation (3 trials per system)" in shown
    with (results / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    cfg = load_experiment("nusax", config_file=str(config))
    for system in ("full_ft", "lt_sft"):
        trials = cfg.tuning.trials_for(system)
        tuning = [r for r in rows if r["part"] == "tuning" and r["system"] == system]
        assert {(r["language"], r["split"], r["seed"]) for r in tuning} == {
            (lang, "valid", "1") for lang in ("jav", "sun")}                      # validation only, first seed
        assert len(tuning) == 3 * 2
        valid = {(json.loads(r["extra"])["trial"], r["language"]): float(r["macro_f1"]) for r in tuning}
        for r in tuning:
            assert json.loads(r["extra"])["settings"] == trials[json.loads(r["extra"])["trial"]]
        tuned = [r for r in rows if r["part"] == "tuned" and r["system"] == system]
        assert {(r["language"], r["split"], r["seed"]) for r in tuned} == {
            (lang, split, seed) for lang in ("jav", "sun") for split in ("test", "valid") for seed in ("1", "2")}
        for lang in ("jav", "sun"):
            best = max(range(3), key=lambda i: (valid[(i, lang)], -i))
            chosen = {json.loads(r["extra"])["trial"] for r in tuned if r["language"] == lang}
            assert chosen == {best}
            # the champion at the trials' seed is the trial's own model: the same validation score
            (again,) = [r for r in tuned if r["language"] == lang and r["seed"] == "1" and r["split"] == "valid"]
            assert float(again["macro_f1"]) == valid[(best, lang)]
    text = (results / "results.md").read_text()
    assert "Champions (validation score" in text and "average of the 2 tuned targets" in text
    assert len(list(out.glob("sfts/seed1/tune-lt_sft-*"))) == 3        # one task SFT per trial at seed 1

    # the SFT champions are in the registry: @champion of each language's composed model is the
    # champion trial's task SFT with the language's SFT, scored on validation
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    lt_valid = {(json.loads(r["extra"])["trial"], r["language"]): float(r["macro_f1"])
                for r in rows if r["part"] == "tuning" and r["system"] == "lt_sft"}
    for lang in ("jav", "sun"):
        best = max(range(3), key=lambda i: (lt_valid[(i, lang)], -i))
        version = client.get_model_version_by_alias(f"deftx-nusax_senti-{lang}", "champion")
        assert version.tags["deftx.tuned_system"] == "lt_sft" and version.tags["deftx.trial"] == str(best + 1)
        assert float(version.tags["metrics.target_valid_macro_f1"]) == lt_valid[(best, lang)]
        assert version.tags["language.language"] == lang

    first = (results / "scores.csv").read_text()
    assert main(argv) == 0
    capsys.readouterr()
    prov = json.loads((results / "provenance.json").read_text())
    assert prov["units_trained"] == 0 and (results / "scores.csv").read_text() == first
