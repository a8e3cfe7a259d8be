"""The results experiment: configuration, budget, leave-fold-out splits, multi-source training,
the report's statistics, and the small preset end to end (tiny model, real NusaX data)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from deftx.config import ConfigError, PipelineConfig
from deftx.workflows.experiments.config import (
    XLMR_BASE_MASKABLE,
    XLMR_LANGUAGE_K,
    XLMR_TASK_K,
    ExperimentConfig,
    load_experiment,
    xlmr_densities,
)
from deftx.workflows.experiments.report import cell, mean_spread, per_seed_average
from deftx.workflows.experiments.state import Record


def test_xlmr_base_maskable_count_recounted_on_a_meta_model():
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    from deftx.core.roles import parameter_roles

    config = XLMRobertaConfig(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, num_labels=3)
    with torch.device("meta"):
        model = XLMRobertaForSequenceClassification(config)
    assert parameter_roles(model, "task").num_maskable == XLMR_BASE_MASKABLE
    d = xlmr_densities()
    assert d["task"] * XLMR_BASE_MASKABLE == pytest.approx(XLMR_TASK_K)
    assert d["language"] * XLMR_BASE_MASKABLE == pytest.approx(XLMR_LANGUAGE_K)
    assert XLMR_TASK_K == 24 * 768 ** 2 and XLMR_LANGUAGE_K == 13 * 768 ** 2


@pytest.mark.parametrize("preset", ["small", "full", "tuned"])
def test_nusax_presets_validate(preset):
    cfg = load_experiment("nusax", preset=preset)
    assert cfg.preset == preset
    assert len(cfg.seeds) >= 2 and cfg.full_ft
    assert {"lt_sft", "deft_x_energy"} <= set(cfg.methods)
    assert preset == "tuned" or "deft_x_rank" in cfg.methods
    if preset == "tuned":   # every system tuned on every target; the spaces contain the fixed settings
        assert set(cfg.tuning.systems) == {"full_ft", *cfg.methods}
        assert cfg.tuning.languages == cfg.pipeline.target_languages
        lr = cfg.tuning.space("full_ft")["learning_rate"].values
        assert lr[0] <= cfg.pipeline.task_sft.full.learning_rate <= lr[1]
        for method in cfg.methods:
            space = cfg.tuning.space(method)
            low, high = space["density"].values
            assert low <= cfg.selection(method, "task").density <= high
            low, high = space["learning_rate"].values
            assert low <= cfg.pipeline.task_sft.sparse.learning_rate <= high
    if preset in ("full", "tuned"):
        assert len(cfg.seeds) >= 3
        assert sorted(cfg.pipeline.target_languages) == sorted(
            ["ace", "ban", "bbc", "bjn", "bug", "eng", "jav", "mad", "min", "nij", "sun"])


@pytest.mark.parametrize("preset", ["small", "full"])
def test_americasnli_presets_validate_leave_fold_out(preset, americasnli_dir):
    cfg = load_experiment("americasnli", preset=preset, overrides=[f"pipeline.data.source={americasnli_dir}"])
    assert cfg.main == "leave_fold_out" and cfg.pipeline.task == "americasnli"
    assert "eng" not in cfg.sft_languages()          # offline: no English text or MultiNLI
    assert sorted(cfg.sft_languages()) == sorted(cfg.pipeline.target_languages)
    for fold in range(cfg.multi_source.folds):
        assert not set(cfg.fold_targets(fold)) & set(cfg.fold_sources(fold))
    if preset == "full":
        assert len(cfg.pipeline.target_languages) == 10 and len(cfg.seeds) == 3


def test_americasnli_english_preset_is_the_english_source_setting(americasnli_dir):
    cfg = load_experiment("americasnli", preset="english", overrides=[f"pipeline.data.source={americasnli_dir}"])
    assert cfg.main == "single_source" and cfg.pipeline.source_language == "eng" and not cfg.multi_source.folds
    assert sorted(cfg.sft_languages()) == sorted(["eng", *cfg.pipeline.target_languages])
    assert len(cfg.pipeline.target_languages) == 10 and len(cfg.seeds) == 3 and cfg.full_ft
    assert {s.method for s in (cfg.selection(m, "task") for m in cfg.methods)} == {"lt_sft", "deft_x"}


def test_americasnli_from_english_runs_offline_on_the_bundled_nli_pairs(americasnli_dir):
    """English is a source language offline: the task SFT trains on the bundled English NLI pairs
    (95%), validates on the other 5%, and the English language SFT reads their sentences."""
    from deftx.tasks import task_spec

    cfg = load_experiment("americasnli", preset="small", overrides=[
        f"pipeline.data.source={americasnli_dir}", "main=single_source", "multi_source.folds=0"])
    assert cfg.pipeline.source_language == "eng" and "eng" in cfg.sft_languages()
    spec = task_spec("americasnli")
    train, valid = spec.train("eng", americasnli_dir), spec.evaluation("eng", "valid", americasnli_dir)
    assert len(train) + len(valid) == 19655 and 0.04 < len(valid) / 19655 < 0.06
    assert not {(e.text, e.text_pair) for e in train} & {(e.text, e.text_pair) for e in valid}
    text = spec.text("eng", americasnli_dir)
    assert len(text) == len(set(text)) and set(text) <= {t for e in train for t in (e.text, e.text_pair)}


def test_americasnli_settings_that_cannot_work_offline_are_refused(americasnli_dir):
    src = f"pipeline.data.source={americasnli_dir}"
    with pytest.raises(ConfigError, match="pipeline.data.source"):
        load_experiment("americasnli", preset="small", overrides=["pipeline.data.source=/no/such/dir"])
    with pytest.raises(ConfigError, match="ablations: implemented for main: single_source"):
        load_experiment("americasnli", preset="small", overrides=[src, "ablations.variants={a: {rank: 4}}",
                                                                  "ablations.base=deft_x_rank"])


def test_method_selection_gets_the_budget_and_exclusive_overrides():
    cfg = load_experiment("nusax", preset="small")
    d = xlmr_densities()
    rank = cfg.selection("deft_x_rank", "task")
    assert rank.method == "deft_x" and rank.rank == 16 and rank.energy is None
    assert rank.density == pytest.approx(d["task"])
    assert cfg.selection("lt_sft", "language").density == pytest.approx(d["language"])
    variant = cfg.ablation_selection("rank_4")
    assert variant.rank == 4 and variant.energy is None and variant.density == pytest.approx(d["task"])
    own = load_experiment("nusax", preset="small", overrides=["budget=config"])
    assert own.selection("lt_sft", "task").density == own.pipeline.task_sft.selection.density


@pytest.mark.parametrize("override, message", [
    ("seeds=[1, 1]", "seeds: a seed is listed twice"),
    ("seeds=[]", "seeds: give at least one seed"),
    ("methods.full_ft={method: lt_sft}", "methods.full_ft: reserved"),
    ("methods.bad={method: nope}", "methods.bad.method: unknown method 'nope'"),
    ("methods.bad={rank: 0, method: deft_x}", "methods.bad.rank: must be a positive integer"),
    ("multi_source.folds=5", "multi_source.folds: must be in [0, 2]"),
    ("multi_source.methods=[nope]", "multi_source.methods: 'nope' is not one of the methods"),
    ("multi_source.candidates=[ind, min]", "multi_source.candidates: min is neither the source nor a target"),
    ("ablations.base=nope", "ablations.base: 'nope' is not one of the methods"),
    ("budget=huge", "budget: unknown budget 'huge'"),
    ("pipeline.target_languages=[jav, xx]", "pipeline.target_languages[1]"),
    ("unknown=1", "unknown: unknown key"),
    ("pipeline.language_sft.held_out=0", "mlm_loss.enabled: needs held-out text; set pipeline.language_sft.held_out"),
    ("mlm_loss.max_lines=0", "mlm_loss.max_lines: must be >= 1, got 0"),
    ("main_table=false", "ablations: re-select the main table's task SFT; they need main_table: true"),
])
def test_bad_experiment_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_experiment("nusax", preset="small", overrides=[override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_zero3_with_multi_source_is_refused_up_front():
    with pytest.raises(ConfigError, match="zero_stage 0-2"):
        load_experiment("nusax", preset="small", overrides=["pipeline.cluster.backend=ray",
                                                             "pipeline.cluster.zero_stage=3",
                                                             "pipeline.language_sft.full.l1_reg=0",
                                                             "pipeline.language_sft.sparse.l1_reg=0"])


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: full, small"):
        load_experiment("nusax", preset="huge")


@pytest.mark.parametrize("folds", [1, 2, 3, 11])
def test_leave_fold_out_never_trains_on_a_held_out_target(folds):
    cfg = load_experiment("nusax", preset="full", overrides=[f"multi_source.folds={folds}"])
    targets = cfg.pipeline.target_languages
    seen: list[str] = []
    for fold in range(folds):
        held_out = cfg.fold_targets(fold)
        sources = cfg.fold_sources(fold)
        assert held_out and not set(held_out) & set(sources)
        assert cfg.pipeline.source_language in sources
        seen += held_out
    assert sorted(seen) == sorted(targets)   # every target evaluated exactly once


def _records(values: dict[tuple[int, str], float]) -> list[Record]:
    return [Record("main", "lt_sft", seed, lang, "test", f1, 0.0, 10) for (seed, lang), f1 in values.items()]


def test_average_rows_are_seed_means_of_language_averages():
    rows = _records({(1, "jav"): 0.6, (1, "sun"): 0.8, (2, "jav"): 0.5, (2, "sun"): 0.5, (3, "jav"): 0.9})
    assert per_seed_average(rows, ["jav", "sun"]) == pytest.approx([0.7, 0.5])   # seed 3 is incomplete
    mean, spread = mean_spread([0.7, 0.5])
    assert mean == pytest.approx(0.6) and spread == pytest.approx(math.sqrt(0.02))
    assert cell([0.7, 0.5]) == "60.0 ± 14.1"
    assert cell([0.7]) == "70.0" and cell([]) == "-"


def test_multi_source_stream_visits_every_batch_of_every_language_once_per_epoch(tiny_model_dir):
    from deftx.data import load_nusax_senti
    from deftx.models import load_tokenizer
    from deftx.training.batches import classification_stream
    from deftx.training.multi_source import LANGUAGE_KEY, MultiSourceStream

    tok = load_tokenizer(str(tiny_model_dir))
    streams = [classification_stream(tok, load_nusax_senti(lang, "train")[:n], batch_size=8, seed=i, max_length=32)
               for i, (lang, n) in enumerate([("ind", 40), ("jav", 24)])]
    stream = MultiSourceStream(streams, seed=5)
    assert stream.steps_per_epoch == 5 + 3
    for epoch in (0, 1):
        plan = stream.plan(epoch)
        assert sorted(plan) == sorted([(0, epoch * 5 + j) for j in range(5)] + [(1, epoch * 3 + j) for j in range(3)])
        for step in range(8):
            batch = stream.batch_at(epoch * 8 + step)
            lang, inner = plan[step]
            assert torch.equal(batch[LANGUAGE_KEY], torch.full_like(batch["labels"], lang))
            assert torch.equal(batch["input_ids"], streams[lang].batch_at(inner)["input_ids"])
    again = MultiSourceStream(streams, seed=5)
    assert torch.equal(again.batch_at(11)["input_ids"], stream.batch_at(11)["input_ids"])


def test_multi_source_loss_equals_the_loss_and_gradient_at_the_applied_language_sft(tiny_model_dir):
    """A batch of language l is computed at theta + phi_l and its gradient reaches theta: equal,
    bit for bit, to applying phi_l in place, taking the gradient, and reverting."""
    from deftx.core.roles import body_parameters
    from deftx.core.sft import SFTMetadata, SparseDelta, SparseFineTuning
    from deftx.data import NUSAX_LABELS, load_nusax_senti
    from deftx.models import load_classifier, load_tokenizer
    from deftx.training.batches import classification_stream
    from deftx.training.multi_source import LANGUAGE_KEY, multi_source_loss
    from deftx.training.objectives import classification_loss

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_classifier(str(tiny_model_dir), NUSAX_LABELS, seed=0)
    model.eval()   # no dropout: both computations see the same network
    body = body_parameters(model)
    g = torch.Generator().manual_seed(0)
    diffs = {}
    for name in list(body)[:6]:
        n = body[name].numel()
        idx = torch.randperm(n, generator=g)[: max(1, n // 10)].sort().values
        diffs[name] = SparseDelta(tuple(body[name].shape), idx, torch.randn(idx.numel(), generator=g) * 0.05)
    sft = SparseFineTuning(diffs, {}, SFTMetadata(kind="language", language="jav"))
    batch = classification_stream(tok, load_nusax_senti("jav", "train")[:8], batch_size=8, seed=0,
                                  max_length=32).batch_at(0)
    loss_fn = multi_source_loss(classification_loss, [None, sft.diffs])

    model.zero_grad()
    shifted = loss_fn(model, {**batch, LANGUAGE_KEY: torch.ones(8, dtype=torch.long)})
    shifted.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    model.zero_grad()
    with sft.applied(model, with_head=False, check_base=False):
        reference = classification_loss(model, batch)
        reference.backward()
    assert torch.equal(shifted.detach(), reference.detach())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])           # nothing stays applied
        if name in grads:
            assert torch.equal(p.grad, grads[name]), name

    model.zero_grad()
    plain = loss_fn(model, {**batch, LANGUAGE_KEY: torch.zeros(8, dtype=torch.long)})
    assert torch.equal(plain.detach(), classification_loss(model, batch).detach())
    with pytest.raises(ValueError, match="mixes languages"):
        loss_fn(model, {**batch, LANGUAGE_KEY: torch.tensor([0, 1] * 4)})


@pytest.mark.slow
def test_small_experiment_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    """`deftx experiment nusax --preset small` (tiny model): every system trained and scored, the
    report written and logged to MLflow; the same command again trains nothing and reproduces
    every score."""
    from deftx.cli import main

    out, results, db = tmp_path / "run", tmp_path / "results", tmp_path / "mlflow.db"
    argv = ["experiment", "nusax", "--preset", "small", "--output-dir", str(out), "--results-dir", str(results),
            "--set", f"pipeline.model.name_or_path={tiny_model_dir}",
            "--set", f"pipeline.tracking.uri=sqlite:///{db}", "--set", "pipeline.max_eval_examples=40"]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    for expected in ("full FT", "LT-SFT", "DeFT-X (rank 16)", "DeFT-X (energy 0.9)", "Multi-source", "ablations",
                     "average of the 2 targets"):
        assert expected in shown
    for name in ("results.md", "scores.csv", "overlap.csv", "provenance.json", "main.png", "spectra.png",
                 "density-language.png", "density-task.png"):
        assert (results / name).is_file(), name
    assert not (results / "subnetworks.png").exists()          # no subnetwork systems, no such plot
    with (results / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    cfg = load_experiment("nusax", preset="small")
    langs = ["ind", "jav", "sun"]
    main_rows = [r for r in rows if r["part"] == "main"]
    # (full FT + 3 methods x {with, without language SFT}) x 2 seeds x 3 languages x 2 splits
    assert len(main_rows) == (1 + 2 * len(cfg.methods)) * len(cfg.seeds) * len(langs) * 2
    assert {r["system"] for r in main_rows} == {"full_ft", *cfg.methods}
    swapped = [r for r in rows if r["part"] == "source_sft"]        # task + ind's SFT, on each target
    assert len(swapped) == len(cfg.methods) * len(cfg.seeds) * 2 * 2 and {r["language"] for r in swapped} == {"jav", "sun"}
    assert all(0.0 <= float(r["macro_f1"]) <= 1.0 for r in rows)
    assert {int(r["n"]) for r in rows} == {40}
    multi = [r for r in rows if r["part"] == "multi_source"]
    assert len(multi) == len(cfg.multi_source.methods) * len(cfg.seeds) * 2 * 2
    for r in multi:   # a held-out target never among its task SFT's sources
        assert r["language"] not in json.loads(r["extra"])["sources"]
    assert {r["system"] for r in rows if r["part"] == "ablation"} == set(cfg.ablations.variants)
    tuned = [r for r in rows if r["part"] == "tuned"]     # each system's champion per tuned target, every seed
    assert {(r["system"], r["language"], r["split"], int(r["seed"])) for r in tuned} == {
        (s, lang, split, seed) for s in cfg.tuning.systems for lang in cfg.tuning.languages
        for split in ("test", "valid") for seed in cfg.seeds}
    assert len([r for r in rows if r["part"] == "tuning"]) == len(cfg.tuning.systems) * cfg.tuning.trials * 2
    for system in cfg.tuning.systems:   # trials on validation at the first seed; champion = best trial there
        trials = cfg.tuning.trials_for(system)
        tuning = [r for r in rows if r["part"] == "tuning" and r["system"] == system]
        assert {(r["split"], int(r["seed"])) for r in tuning} == {("valid", cfg.seeds[0])}
        assert all(json.loads(r["extra"])["settings"] == trials[json.loads(r["extra"])["trial"]] for r in tuning)
        valid = {(json.loads(r["extra"])["trial"], r["language"]): float(r["macro_f1"]) for r in tuning}
        for lang in cfg.tuning.languages:
            best = max(range(len(trials)), key=lambda i: (valid[(i, lang)], -i))
            mine = [r for r in tuned if r["system"] == system and r["language"] == lang]
            assert {json.loads(r["extra"])["trial"] for r in mine} == {best}
            (again,) = [r for r in mine if int(r["seed"]) == cfg.seeds[0] and r["split"] == "valid"]
            assert float(again["macro_f1"]) == valid[(best, lang)]    # the trial's own model, not retrained
    assert "## Tuned on validation" in (results / "results.md").read_text()
    # what each method's language SFTs do to the task head's input (first seed, validation)
    with (results / "head-input-shift.csv").open() as f:
        shifts = list(csv.DictReader(f))
    assert {(r["system"], r["language"], r["composition"]) for r in shifts} == {
        (m, lang, c) for m in cfg.methods for lang in langs for c in ("own", "source")}
    assert all(-1.0 <= float(r["cosine"]) <= 1.0 + 1e-6 and 0.0 <= float(r["agreement"]) <= 1.0 for r in shifts)
    for m in cfg.methods:   # for the source language its own SFT is the source SFT
        own, src = ({k: r[k] for k in ("cosine", "agreement")} for r in shifts
                    if r["system"] == m and r["language"] == "ind")
        assert own == src
    assert "What the language SFTs do to the task head's input" in (results / "results.md").read_text()
    prov = json.loads((results / "provenance.json").read_text())
    assert prov["seeds"] == cfg.seeds and len(prov["commit"]) in (40, 7) or prov["commit"] == "unknown"
    assert prov["units_trained"] > 0 and prov["command"].startswith("deftx experiment nusax")

    # each method's language SFTs share one phase 1 per language; the SFTs differ only by selection
    from deftx.core.sft import read_metadata

    for lang in langs:
        reused = {read_metadata(out / "sfts" / m / f"lang-{lang}")["training"]["phase1_reused_from"]
                  for m in cfg.methods}
        assert reused == {str(out / "phase1" / f"language-{lang}")}

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("deftx-experiment-nusax")
    runs = client.search_runs([exp.experiment_id])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    registrations = [r for r in nested if r.data.tags.get("deftx.registration") == "1"]
    nested = [r for r in nested if r not in registrations]
    assert len(nested) == len(list(out.glob("sfts/**/sft.json")))   # one run per SFT, with its loss curves
    assert all(any(k.startswith("loss.") for k in r.data.metrics) for r in nested)
    # and one per tuned SFT champion (system x target) registered as the target's composed model
    sft_systems = [s for s in cfg.tuning.systems if s != "full_ft"]
    assert sorted(r.info.run_name for r in registrations) == sorted(
        f"tuned-{s}-{lang}" for s in sft_systems for lang in cfg.tuning.languages)
    for lang in cfg.tuning.languages:   # @champion: the best SFT champion on validation
        champion = client.get_model_version_by_alias(f"deftx-nusax_senti-{lang}", "champion")
        system = champion.tags["deftx.tuned_system"]
        trial = int(champion.tags["deftx.trial"]) - 1
        scored = {(r["system"], json.loads(r["extra"])["trial"]): float(r["macro_f1"]) for r in rows
                  if r["part"] == "tuning" and r["language"] == lang}
        assert float(champion.tags["metrics.target_valid_macro_f1"]) == scored[(system, trial)] == max(
            v for (s, _), v in scored.items() if s in sft_systems)
    assert run.info.status == "FINISHED"
    assert "test.avg_macro_f1.lt_sft" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "results")} >= {"results/results.md",
                                                                                    "results/scores.csv"}

    # held-out MLM loss: theta0 and each language's SFT on each language's held-out text, per method
    with (results / "mlm-loss.csv").open() as f:
        losses = list(csv.DictReader(f))
    assert len(losses) == len(cfg.methods) * 2 * (1 + len(langs)) * len(langs)
    assert {r["sft"] for r in losses} == {"theta0", *langs} and all(float(r["loss"]) > 0 for r in losses)
    assert all(int(r["lines"]) == 24 for r in losses)       # 2% of each language's text, sampled to 24
    assert "## Held-out MLM loss" in (results / "results.md").read_text()
    cached = {p.name: p.stat().st_mtime_ns for p in (out / "diagnostics").glob("mlm-loss-*.json")}
    assert len(cached) == len(cfg.methods)

    first = (results / "scores.csv").read_text()
    first_losses = (results / "mlm-loss.csv").read_text()
    assert main(argv) == 0
    capsys.readouterr()
    prov = json.loads((results / "provenance.json").read_text())
    assert prov["units_trained"] == 0 and prov["units_reused"] > 0 and prov["complete"]
    assert (results / "scores.csv").read_text() == first
    assert (results / "mlm-loss.csv").read_text() == first_losses
    assert {p.name: p.stat().st_mtime_ns for p in (out / "diagnostics").glob("mlm-loss-*.json")} == cached

    # --report-only: the same report from the finished units; on an empty output, nothing trained
    assert main([*argv, "--report-only"]) == 0
    assert (results / "scores.csv").read_text() == first
    empty = tmp_path / "empty-results"
    argv_empty = [a if a != str(out) else str(tmp_path / "nothing") for a in argv]
    argv_empty[argv_empty.index(str(results))] = str(empty)
    assert main([*argv_empty, "--report-only"]) == 0
    assert "Not computed yet" in capsys.readouterr().out
    prov = json.loads((empty / "provenance.json").read_text())
    assert not prov["complete"] and prov["missing_units"] and prov["units_trained"] == 0
    assert not (tmp_path / "nothing" / "sfts").exists()

    # tuning.champion=average: one champion per system, the trial best on the tuned targets' mean
    # validation score; the trials are reused (their scores unchanged), only new champions train
    averaged = tmp_path / "averaged"
    argv_avg = [*argv, "--set", "tuning.champion=average", "--set", "pipeline.tracking.enabled=false"]
    argv_avg[argv_avg.index(str(results))] = str(averaged)
    assert main(argv_avg) == 0
    capsys.readouterr()
    with (averaged / "scores.csv").open() as f:
        rows_avg = list(csv.DictReader(f))
    key = ("part", "system", "seed", "language", "split", "macro_f1", "extra")
    assert sorted(tuple(r[k] for k in key) for r in rows_avg if r["part"] == "tuning") == sorted(
        tuple(r[k] for k in key) for r in rows if r["part"] == "tuning")
    for system in cfg.tuning.systems:
        valid = {(json.loads(r["extra"])["trial"], r["language"]): float(r["macro_f1"]) for r in rows
                 if r["part"] == "tuning" and r["system"] == system}
        mean = {i: sum(valid[(i, lang)] for lang in cfg.tuning.languages) / len(cfg.tuning.languages)
                for i in range(cfg.tuning.trials)}
        best = max(mean, key=lambda i: (mean[i], -i))
        mine = [r for r in rows_avg if r["part"] == "tuned" and r["system"] == system]
        assert {r["language"] for r in mine} == set(cfg.tuning.languages)
        assert {json.loads(r["extra"])["trial"] for r in mine} == {best}
    assert "tuning.champion: average" in (averaged / "results.md").read_text()


def test_a_language_sft_only_experiment_says_so(tmp_path, capsys):
    """A preset's tuned table is switched off with `tuning.languages=[]` (its spaces stay unused), and
    with main_table false nothing trains a task model: the banner and the report's header say that
    instead of listing task seeds (checked on an empty output with --report-only: nothing trains)."""
    from deftx.cli import main

    overrides = ["main_table=false", "tuning.languages=[]"]
    cfg = load_experiment("nusax", preset="tuned", overrides=overrides)
    assert not cfg.tuning.enabled and cfg.tuning.systems and not cfg.trains_task_models
    assert load_experiment("nusax", preset="tuned", overrides=["main_table=false"]).trains_task_models
    results = tmp_path / "results"
    argv = ["experiment", "nusax", "--preset", "tuned", "--report-only", "--output-dir", str(tmp_path / "out"),
            "--results-dir", str(results), "--set", "pipeline.tracking.enabled=false",
            *[a for o in overrides for a in ("--set", o)]]
    assert main(argv) == 0
    banner = capsys.readouterr().err.splitlines()[0]
    assert "language SFTs only (lt_sft, deft_x_energy; no task models)" in banner and "seeds" not in banner
    header = (results / "results.md").read_text().split("## ")[0]
    assert "language SFTs only (seed 42)" in header
    assert "task SFT seeds" not in header and "subnetwork systems' training" not in header


def test_scores_and_head_input_shifts_keep_each_finished_language_when_stopped(tmp_path):
    """A run stopped part-way through scoring the languages (here: the scorer fails on the second)
    keeps the first language's results on disk; the next call scores only what is missing."""
    from contextlib import nullcontext

    from deftx.workflows.experiments.evaluator import Evaluator

    class Scorer:
        def __init__(self, fail_on=None):
            self.fail_on, self.calls = fail_on, []

        def score(self, examples):
            self.calls.append(examples[0])
            if examples[0] == self.fail_on:
                raise KeyboardInterrupt
            return {"macro_f1": 0.5, "accuracy": 0.5, "n": 1}

        def head_inputs(self, examples):
            self.calls.append(examples[0])
            if examples[0] == self.fail_on:
                raise KeyboardInterrupt
            return torch.ones(1, 4), ["positive"]

    ev = object.__new__(Evaluator)
    ev.cfg = load_experiment("nusax", preset="small", overrides=["eval_splits=[test]"])
    lines: list[str] = []
    ev.cache_dir, ev.log, ev.report_only = tmp_path, lines.append, False
    ev.examples = {(lang, split): [lang] for lang in ("jav", "sun") for split in ("test", "valid")}
    for call in (lambda: ev.scores("k", ["jav", "sun"], lambda lang: nullcontext()),
                 lambda: ev.head_input_shift("k", ["jav", "sun"], lambda lang: nullcontext(),
                                             {"own": lambda lang: nullcontext()})):
        ev.scorer = Scorer(fail_on="sun")
        with pytest.raises(KeyboardInterrupt):
            call()
        ev.scorer = Scorer()
        call()
        assert set(ev.scorer.calls) == {"sun"}     # jav was kept from the stopped call
    assert json.loads((tmp_path / "k.json").read_text())["jav/test"]["n"] == 1
    assert set(json.loads((tmp_path / "shift-k.json").read_text())) == {"jav", "sun"}
    # the long head-input pass says how far it is, one line per finished language
    shift_lines = [line for line in lines if line.startswith("[head-input shift]")]
    assert [line.split(": ")[1].split(" (")[0] for line in shift_lines] == ["jav", "sun"]
    assert "(2/2, 2 models on 1 valid examples)" in shift_lines[-1]


@pytest.mark.parametrize("splits", [["test"], ["test", "valid"]])
def test_head_input_table_shows_the_shifts_with_validation_scores_only_when_they_were_scored(splits):
    """The head-input shifts are measured on validation even when an experiment scores only test;
    the table then shows the shifts alone instead of columns of dashes."""
    from deftx.workflows.experiments.report import head_input_table
    from deftx.workflows.experiments.state import ExperimentState

    cfg = load_experiment("nusax", preset="small", overrides=[f"eval_splits=[{','.join(splits)}]"])
    method = next(iter(cfg.methods))
    state = ExperimentState(cfg, records=[Record("main", method, cfg.seeds[0], "jav", "valid", 0.5, 0.5, 10, False)])
    for lang, cosine in (("ind", 0.97), ("jav", 0.8)):
        for composition in ("own", "source"):
            state.head_input_shift.append({"system": method, "seed": cfg.seeds[0], "language": lang,
                                           "composition": composition, "cosine": cosine, "agreement": 0.9})
    lines = head_input_table(state).splitlines()
    columns = 9 if "valid" in splits else 6
    assert all(line.count("|") == columns + 1 for line in lines)
    assert len(lines) == 4 and "(source) | 0.970 | 0.970 | 90% | 90% |" in lines[2]
    assert lines[3].endswith("| 50.0 | - | - |") == ("valid" in splits)


def test_experiment_config_defaults_validate():
    cfg = ExperimentConfig(pipeline=PipelineConfig(), methods={"lt_sft": {"method": "lt_sft"}})
    assert cfg.validate() is cfg


@pytest.mark.slow
def test_americasnli_small_experiment_leave_fold_out_end_to_end(tiny_model_dir, americasnli_dir, tmp_path, capsys):
    """`deftx experiment americasnli --preset small` (tiny model, real AmericasNLI files, one seed):
    every system trained per fold on the other languages' dev sets and scored by accuracy on the
    held-out language's test set only."""
    from deftx.cli import main

    out, results = tmp_path / "run", tmp_path / "results"
    argv = ["experiment", "americasnli", "--preset", "small", "--output-dir", str(out), "--results-dir", str(results),
            "--set", f"pipeline.model.name_or_path={tiny_model_dir}", "--set", f"pipeline.data.source={americasnli_dir}",
            "--set", "pipeline.tracking.enabled=false", "--set", "seeds=[1]", "--set", "pipeline.max_eval_examples=30"]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "AmericasNLI zero-shot transfer" in shown and "Test accuracy (%)" in shown
    with (results / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    cfg = load_experiment("americasnli", preset="small", overrides=[f"pipeline.data.source={americasnli_dir}"])
    assert {r["language"] for r in rows} == set(cfg.pipeline.target_languages)
    # per fold: full FT (once) + 3 methods x {with, without language SFT}; one held-out language per fold
    assert len(rows) == (1 + 2 * len(cfg.methods)) * 3 * 2
    from deftx.core.sft import read_metadata

    for fold, lang in enumerate(cfg.pipeline.target_languages):
        meta = read_metadata(out / "sfts" / "seed1" / f"multi-lt_sft-fold{fold}")
        assert lang not in meta["trained_on"]["multi_source"]
        assert sorted(meta["trained_on"]["multi_source"]) == sorted(set(cfg.pipeline.target_languages) - {lang})
        assert meta["task"] == "americasnli" and meta["label_names"] == ["entailment", "neutral", "contradiction"]


@pytest.mark.slow
def test_americasnli_full_fine_tuning_from_english_on_bundled_data_alone(tiny_model_dir, tmp_path, capsys):
    """No AmericasNLI directory: English NLI pairs and AmericasNLI dev/test as bundled. With no SFT
    method the experiment trains neither an MLM head nor a language SFT (the AmericasNLP text they
    would need is not bundled) and scores full fine-tuning on every target's test and dev set."""
    from deftx.cli import main

    out, results = tmp_path / "run", tmp_path / "results"
    config = tmp_path / "experiment.yaml"
    config.write_text(f"""main: single_source
pipeline:
  model: {{name_or_path: {tiny_model_dir}, max_length: 64}}
  data: {{source: bundled}}
  source_language: eng
  target_languages: [aym, nah]
  max_eval_examples: 30
  tracking: {{enabled: false}}
  cluster: {{backend: local}}
  task_sft:
    max_train_examples: 48
    full: {{epochs: 1, batch_size: 16, learning_rate: 1.0e-4}}
seeds: [1]
methods: {{}}
full_ft: true
analysis: false
""", encoding="utf-8")
    argv = ["experiment", "americasnli", "--config", str(config), "--output-dir", str(out), "--results-dir", str(results)]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "Test accuracy (%): full fine-tuning" in shown
    assert "What the language SFT adds" not in shown and "Mask overlap" not in shown
    assert not (out / "mlm-head").exists() and not list(out.glob("sfts/**/lang-*"))
    with (results / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["system"], r["language"], r["split"]) for r in rows} == {
        ("full_ft", lang, split) for lang in ("eng", "aym", "nah") for split in ("test", "valid")}
    assert all(int(r["n"]) == 30 for r in rows)


@pytest.mark.slow
def test_subnetwork_experiment_end_to_end_and_reuse(tiny_model_dir, tmp_path, capsys):
    """`deftx experiment nusax --preset subnetworks-small` (tiny model): every subnetwork system
    trained leave-fold-out and scored, with its table; a second experiment with ``reuse_from``
    adopts the first one's MLM head, language SFTs and multi-source SFTs instead of training them."""
    from deftx.cli import main

    out, results, db = tmp_path / "run", tmp_path / "results", tmp_path / "mlflow.db"
    common = ["--set", f"pipeline.model.name_or_path={tiny_model_dir}", "--set", f"pipeline.tracking.uri=sqlite:///{db}",
              "--set", "pipeline.max_eval_examples=30"]
    argv = ["experiment", "nusax", "--preset", "subnetworks-small", "--output-dir", str(out), "--results-dir",
            str(results), *common]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "Language-specific subnetworks (Choenni-style)" in shown and "pairwise Jaccard" in shown
    assert (results / "subnetworks.png").stat().st_size > 0
    assert "![subnetworks.png](subnetworks.png)" in (results / "results.md").read_text()
    cfg = load_experiment("nusax", preset="subnetworks-small")
    with (results / "scores.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["part"] == "subnetworks"]
    targets = cfg.pipeline.target_languages
    assert len(rows) == len(cfg.subnetworks.systems) * len(cfg.seeds) * len(targets) * 2   # x 2 splits
    assert {r["system"] for r in rows} == set(cfg.subnetworks.systems)
    assert {r["language"] for r in rows} == set(targets)
    for r in rows:
        assert r["language"] not in json.loads(r["extra"])["sources"]
    with (results / "subnetworks.csv").open() as f:
        stats = list(csv.DictReader(f))
    assert len(stats) == len(cfg.subnetworks.systems) * len(cfg.seeds) * cfg.multi_source.folds
    plain = [s for s in stats if s["system"] == "plain"]
    assert all(float(s["density"]) == 1.0 and float(s["mean_pairwise_jaccard"]) == 1.0 for s in plain)
    static = [s for s in stats if s["system"] == "static"]
    assert all(float(s["density"]) == pytest.approx(0.3, abs=1e-3) and float(s["mean_pairwise_jaccard"]) < 1.0
               for s in static)
    assert all(int(float(s["reselections"])) > 0 for s in stats if s["system"].startswith("dynamic"))

    again = tmp_path / "again"
    import yaml

    from deftx.workflows.experiments.config import _preset_text

    data = yaml.safe_load(_preset_text("nusax", "subnetworks-small"))
    data["subnetworks"]["systems"] = {"plain": {"mode": "none"}}
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(data))
    argv2 = ["experiment", "nusax", "--config", str(tmp_path / "again.yaml"), "--output-dir", str(again),
             "--results-dir", str(tmp_path / "results2"), "--set", f"reuse_from={out}", *common]
    assert main(argv2) == 0
    captured = capsys.readouterr()
    assert "adopted" in captured.out + captured.err
    assert (again / "sfts" / "lt_sft" / "lang-jav" / "sft.json").is_file()
    assert not list((again / "phase1").glob("language-*"))          # no language SFT trained
    assert not list((again / "phase1").glob("multi-lt_sft-*"))      # nor a multi-source task SFT
    with (tmp_path / "results2" / "scores.csv").open() as f:
        rows2 = [r for r in csv.DictReader(f) if r["part"] == "main"]
    with (results / "scores.csv").open() as f:
        first = {(r["system"], r["language"], r["split"], r["with_language_sft"]): r["macro_f1"]
                 for r in csv.DictReader(f) if r["part"] == "main" and r["seed"] == "1"}
    assert rows2 and all(first[(r["system"], r["language"], r["split"], r["with_language_sft"])] == r["macro_f1"]
                         for r in rows2)

    # main_table: false: the subnetwork systems alone; no multi-source task SFT is trained or adopted
    only = tmp_path / "only"
    argv3 = ["experiment", "nusax", "--config", str(tmp_path / "again.yaml"), "--output-dir", str(only),
             "--results-dir", str(tmp_path / "results3"), "--set", f"reuse_from={out}", "--set", "main_table=false",
             "--set", "hyperparameters=chosen on validation in a pilot", *common]
    assert main(argv3) == 0
    capsys.readouterr()
    assert not list((only / "sfts").glob("seed*")) and not list((only / "phase1").glob("multi-*"))
    with (tmp_path / "results3" / "scores.csv").open() as f:
        rows3 = list(csv.DictReader(f))
    assert rows3 and {r["part"] for r in rows3} == {"subnetworks"} and {r["system"] for r in rows3} == {"plain"}
    report = (tmp_path / "results3" / "results.md").read_text()
    assert "- hyperparameters: chosen on validation in a pilot" in report
    assert "## Test" not in report and "Language-specific subnetworks (Choenni-style)" in report
    assert not (tmp_path / "results3" / "main.png").exists()


def test_time_ledger_is_written_after_every_unit_so_a_killed_run_keeps_its_time(tmp_path, monkeypatch):
    """The ledger (compute per stage over all invocations) is flushed when each unit ends, not only
    when the stage does: a run killed outright between units has already recorded their seconds;
    a resumed run adds to them, and a failing stage still records what it spent."""
    from deftx.workflows.experiments import runner

    clock = iter([100.0, 103.0, 110.0, 111.5, 200.0, 204.0])
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    exp = runner.Experiment(ExperimentConfig(pipeline=PipelineConfig(), methods={"lt_sft": {"method": "lt_sft"}}))
    exp.out = tmp_path
    ledger = tmp_path / "time-ledger.json"

    with exp._timed("stage A"):                          # starts at 100
        with exp._unit("first"):
            pass                                         # flushed at 103
        assert json.loads(ledger.read_text()) == {"stage A": 3.0}
        with exp._unit("second"):
            pass                                         # flushed at 110
        assert json.loads(ledger.read_text()) == {"stage A": 10.0}
    assert json.loads(ledger.read_text()) == {"stage A": 11.5}     # the stage's tail, at 111.5
    assert exp.state.stage_seconds == {"stage A": 111.5 - 100.0}

    # a resumed run, failing mid-unit: the stage starts at 200, its finally flushes at 204
    with pytest.raises(RuntimeError), exp._timed("stage A"), exp._unit("third"):
        raise RuntimeError("worker lost")
    assert json.loads(ledger.read_text()) == {"stage A": 15.5}
    with exp._unit("outside any stage"):                 # nothing to charge: no clock read
        pass
    assert json.loads(ledger.read_text()) == {"stage A": 15.5}


def test_subnetworks_full_preset_reselects_every_dynamic_system_on_the_real_fold_sizes():
    """The preset's dynamic systems re-select their masks at least twice on the real NusaX fold
    sizes (a first run had Reptile's R above its 18-21 outer steps: a 'dynamic' system that was
    static), and the experiment's up-front check accepts the preset."""
    from deftx.data import load_nusax_senti
    from deftx.subnetworks.train import steps_for_sizes
    from deftx.workflows.experiments.runner import check_subnetwork_schedules

    cfg = load_experiment("nusax", preset="subnetworks-full")
    assert len(cfg.seeds) >= 3 and cfg.subnetworks.system("plain").mode == "none"
    check_subnetwork_schedules(cfg)
    cap = cfg.multi_source.max_examples_per_language
    for fold in range(cfg.multi_source.folds):
        sizes = [min(len(load_nusax_senti(lang, "train")), cap) for lang in cfg.fold_sources(fold)]
        for name in cfg.subnetworks.systems:
            sub = cfg.subnetworks.system(name)
            if sub.mode == "dynamic":
                assert steps_for_sizes(sub, sizes) // sub.reselect_every >= 2, (name, fold)


def test_a_dynamic_system_that_would_never_reselect_is_refused_before_the_experiment_starts(tmp_path):
    """R above a fold's step count is a ConfigError naming the system and fold, raised before the
    run starts (no output directory, no executor call), not hours later when that unit begins."""
    from deftx.workflows.experiments.runner import run_experiment

    class NoWork:
        def run(self, *args, **kwargs):
            raise AssertionError("the experiment started work")

    cfg = load_experiment("nusax", preset="subnetworks-small")
    name = next(n for n in cfg.subnetworks.systems if cfg.subnetworks.system(n).mode == "dynamic")
    cfg.subnetworks.systems[name] = {**cfg.subnetworks.systems[name], "reselect_every": 10**6}
    cfg.pipeline.output_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"subnetworks.systems.{name} \(fold 0\): reselect_every=1000000, but "
                                          r"training has only \d+ optimizer steps"):
        run_experiment(cfg, log=lambda line: None, executor=NoWork())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("dataset", "overrides", "claimed"), [
    ("nusax", [], True),                                                      # NusaX-MT train (the default)
    ("nusax", ["pipeline.language_sft.text=[all]"], True),                    # every bundled source
    ("nusax", ['pipeline.language_sft.text=[nusax_mt_train, "DIR/more.{lang}.txt"]'], False),   # the user's file
    ("nusax", ["pipeline.data.source=DIR"], False),                           # the user's copy of NusaX
    ("americasnli", None, False),                                             # AmericasNLP text is the user's
])
def test_the_report_says_held_out_text_is_never_an_evaluation_sentence_only_of_bundled_nusax_text(
        dataset, overrides, claimed, tmp_path):
    from deftx.workflows.experiments.report import _bundled_nusax_text

    for lang in ("ind", "jav", "sun"):
        (tmp_path / f"more.{lang}.txt").write_text("a line\n", encoding="utf-8")
    cfg = (ExperimentConfig(dataset=dataset) if overrides is None else
           load_experiment(dataset, preset="small", overrides=[
               "pipeline.target_languages=[jav,sun]", *(o.replace("DIR", str(tmp_path)) for o in overrides)]))
    assert _bundled_nusax_text(cfg) is claimed
