"""Your own language and task: text files and Hugging Face datasets for language SFTs, labelled
CSV/TSV/JSONL tables (or datasets) for task SFTs and evaluation, and the README's example run as
written."""

from __future__ import annotations

import csv
import gzip
import json
import re
import shlex
from pathlib import Path

import pytest

from deftx.cli import main
from deftx.config import load_pipeline_config
from deftx.core.sft import SparseFineTuning
from deftx.data import load_nusax_mt_text, load_nusax_senti
from deftx.data.tables import Columns, infer_labels, load_table, read_rows
from deftx.data.text import load_language_text
from deftx.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
STARS = {0: "1", 1: "3", 2: "5"}   # NusaX negative / neutral / positive as review stars


def _write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _reviews(lang: str, split: str, n: int) -> list[list[str]]:
    return [[e.text, STARS[e.label]] for e in load_nusax_senti(lang, split)[:n]]


# -- tables ------------------------------------------------------------------------------------


def test_tables_in_every_format_give_the_same_examples(tmp_path):
    rows = _reviews("eng", "train", 30)
    csv_file = _write_csv(tmp_path / "t.csv", ["review", "stars"], rows)
    tsv_file = _write_csv(tmp_path / "t.tsv", ["stars", "review"], [[s, r] for r, s in rows], delimiter="\t")
    jsonl = tmp_path / "t.jsonl.gz"
    jsonl.write_bytes(gzip.compress("\n".join(json.dumps({"review": r, "stars": int(s)}) for r, s in rows).encode()))
    columns = Columns(text="review", label="stars")
    labels = infer_labels(row.label for row in read_rows(str(csv_file), columns))
    assert labels == ("1", "3", "5")
    expected = load_table(str(csv_file), labels, "eng", columns)
    assert [(e.text, e.label) for e in expected] == [(r, labels.index(s)) for r, s in rows]
    assert load_table(str(tsv_file), labels, "eng", columns) == expected
    assert load_table(str(jsonl), labels, "eng", columns) == expected


def test_label_inference_sorts_numbers_as_numbers():
    assert infer_labels(["10", "9", "2", "9"]) == ("2", "9", "10")
    assert infer_labels(["pos", "neg", "neu"]) == ("neg", "neu", "pos")


def test_a_local_hf_dataset_is_read_through_datasets(tmp_path):
    """``hf:DATASET[:CONFIG][:SPLIT]`` with a local data directory read by ``datasets.load_dataset``
    (no network): labelled rows per split, and a text column for language SFTs."""
    (tmp_path / "raw").mkdir()
    _write_csv(tmp_path / "raw" / "train.csv", ["sentence", "label"], [["a good one", "good"], ["a bad one", "bad"]])
    _write_csv(tmp_path / "raw" / "test.csv", ["sentence", "label"], [["fine", "good"]])
    source = f"hf:{tmp_path / 'raw'}"
    rows = read_rows(source, Columns(text="sentence"))
    assert [(r.text, r.label) for r in rows] == [("a good one", "good"), ("a bad one", "bad")]
    assert [r.label for r in read_rows(f"{source}::test", Columns(text="sentence"))] == ["good"]
    assert load_language_text("xyz", [f"{source}::train:sentence"]) == ["a good one", "a bad one"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_language_text("xyz", [source])


@pytest.mark.parametrize("content, columns, message", [
    ("text,label\nhello,pos\n,neg\n", Columns(), r"line 3: column 'text' is empty"),
    ("words,label\nhello,pos\n", Columns(), r"missing column 'text' \(header: words, label\)"),
    ("text,label\nhello,pos,extra\n", Columns(), r"line 2: expected 2 fields, got 3"),
    ("text,label\nhello,\n", Columns(), r"line 2: empty label"),
])
def test_table_errors_are_one_line_with_the_line(tmp_path, content, columns, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_rows(str(path), columns)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unknown_labels_and_formats_are_refused(tmp_path):
    path = _write_csv(tmp_path / "t.csv", ["text", "label"], [["x", "maybe"]])
    with pytest.raises(DataError, match=r"t.csv: line 2: unknown label 'maybe'; expected one of no, yes"):
        load_table(str(path), ("no", "yes"), "xyz")
    with pytest.raises(DataError, match="unknown table format"):
        read_rows(str(tmp_path / "t.xlsx"))
    with pytest.raises(DataError, match="missing data file"):
        read_rows(str(tmp_path / "none.csv"))


def test_table_configs_are_validated_before_any_work(tmp_path):
    train = _write_csv(tmp_path / "train.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    base = ["data.dataset=table", "task=table", "source_language=eng", "target_languages=[gos]",
            f"data.table.train={{eng: {train}}}", f"data.table.test={{gos: {train}}}", "language_sft.text=[t.txt]"]
    cfg = load_pipeline_config(overrides=base)
    assert cfg.data.table.train == {"eng": str(train)} and cfg.source_language == "eng"
    for extra, message in [
        (["source_language=fra"], "data.table.train: no training table for the source language 'fra'"),
        (["data.table.metric=f1"], "data.table.metric: unknown metric 'f1'"),
        (["data.table.name=My Task"], "data.table.name: use lower-case letters"),
        ([f"data.table.test={{gos: {tmp_path / 'none.csv'}}}"], "data.table.test.gos: .*none.csv does not exist"),
        (["target_languages=[Gos!]"], "target_languages\\[0\\]: 'Gos!' is not a language code"),
        (["data.table.labels=[x]"], "data.table.labels: give at least two distinct labels"),
        (["task=nusax_senti"], "task: the table dataset's task is 'table'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_pipeline_config(overrides=base + extra)
    with pytest.raises(ConfigError, match="data.table: dataset 'table' needs the tables"):
        load_pipeline_config(overrides=["data.dataset=table", "task=table"])
    with pytest.raises(ConfigError, match="data.table: only for dataset 'table'"):
        load_pipeline_config(overrides=[f"data.table.train={{ind: {train}}}"])


# -- the README's example ----------------------------------------------------------------------


def _readme_commands() -> list[list[str]]:
    """The deftx command lines of the README's "Your own language and task" block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own language and task", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line)[1:] for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _example_files(directory: Path) -> None:
    """The files the README's example names, made from NusaX rows (Javanese standing in for
    Gronings, English reviews with NusaX sentiment as stars)."""
    directory.mkdir(parents=True, exist_ok=True)
    jav, eng = load_nusax_mt_text("jav"), load_nusax_mt_text("eng")
    (directory / "gos-news.txt").write_text("\n".join(jav[:150]) + "\n", encoding="utf-8")
    (directory / "gos-web.txt.gz").write_bytes(gzip.compress("\n".join(jav[150:300]).encode()))
    (directory / "eng-news.txt").write_text("\n".join(eng[:300]) + "\n", encoding="utf-8")
    _write_csv(directory / "reviews-train.csv", ["review", "stars"], _reviews("eng", "train", 64))
    _write_csv(directory / "reviews-valid.csv", ["review", "stars"], _reviews("eng", "valid", 32))
    _write_csv(directory / "reviews-test-gos.csv", ["review", "stars"], _reviews("jav", "test", 40))


TINY = ["--local", "--set", "language_sft.head_warmup_steps=2", "--set", "language_sft.full.max_steps=3",
        "--set", "language_sft.sparse.max_steps=3", "--set", "task_sft.full.max_steps=4",
        "--set", "task_sft.sparse.max_steps=4", "--set", "task_sft.full.learning_rate=1e-3",
        "--set", "tracking.enabled=false"]


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Each command of the README block, as written, in a directory holding its files. The only
    difference from a user's run is the configuration every command starts from: the tiny model and
    tiny phases (given the way a user gives them, as --set options)."""
    import deftx.cli as cli

    commands = _readme_commands()
    assert [c[0] for c in commands] == ["train-lang", "train-lang", "train-task", "evaluate"]
    _example_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    tiny = [*TINY, "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"output_dir={tmp_path / 'run'}"]
    real_load = cli._load_config

    def load_tiny(args, extra=None):
        args.local = True
        args.overrides = [*tiny[1:][1::2], *args.overrides]   # the --set values of TINY, before the user's own
        return real_load(args, extra)

    monkeypatch.setattr(cli, "_load_config", load_tiny)
    for argv in commands[:2]:
        assert main(argv) == 0, argv
    out = capsys.readouterr()
    assert "saved language SFT for gos" in out.out and "held-out MLM loss of gos" in out.out
    gos = SparseFineTuning.load(tmp_path / "sfts" / "lang-gos")
    assert gos.metadata.language == "gos" and gos.metadata.kind == "language" and gos.nnz > 0
    mlm = gos.metadata.metrics["held_out_mlm"]
    assert mlm["lines"] >= 1 and mlm["theta0"] > 0 and mlm["sft"] > 0

    assert main(commands[2]) == 0
    out = capsys.readouterr().out
    task = SparseFineTuning.load(tmp_path / "sfts" / "task-reviews")
    assert task.metadata.task == "reviews" and task.metadata.label_names == ["1", "3", "5"]
    assert task.metadata.language == "eng" and task.metadata.trained_on["language_sft"] == "eng"
    assert task.metadata.metrics["source_valid"]["n"] == 32 and "eng validation accuracy" in out

    assert main([*commands[3], "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["language"] == "gos" and row["data"] == "reviews-test-gos.csv" and row["n"] == 40
    assert 0.0 <= row["accuracy"] <= 1.0


@pytest.mark.slow
def test_pipeline_on_your_own_tables(tiny_model_dir, tmp_path, capsys):
    """`deftx pipeline` with data.dataset table: language SFTs from text files, the task SFT from a
    CSV, every target scored on its test table."""
    _example_files(tmp_path)
    config = tmp_path / "own.yaml"
    config.write_text(json.dumps({
        "data": {"dataset": "table", "table": {
            "name": "reviews", "text_column": "review", "label_column": "stars",
            "train": {"eng": str(tmp_path / "reviews-train.csv")}, "valid": {"eng": str(tmp_path / "reviews-valid.csv")},
            "test": {"gos": str(tmp_path / "reviews-test-gos.csv")}}},
        "task": "table", "source_language": "eng", "target_languages": ["gos"],
        "language_sft": {"text": [str(tmp_path / "{lang}-news.txt")]},
        "output_dir": str(tmp_path / "run")}))
    argv = ["pipeline", "--config", str(config), "--set", f"model.name_or_path={tiny_model_dir}", *TINY]
    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["language"] for r in results["rows"]] == ["gos"] and results["rows"][0]["n"] == 40
    assert "[eval eng] no test data: not evaluated" in capsys.readouterr().err
    task = SparseFineTuning.load(tmp_path / "run" / "sfts" / "task-reviews")
    assert task.metadata.label_names == ["1", "3", "5"]


@pytest.mark.slow
def test_an_experiment_on_your_own_tables(tiny_model_dir, tmp_path, capsys):
    """`deftx experiment table --config`: full fine-tuning and LT-SFT on your tables, one seed,
    targets = every language with evaluation data; the report names your task and tables."""
    _example_files(tmp_path)
    _write_csv(tmp_path / "reviews-valid-gos.csv", ["review", "stars"], _reviews("jav", "valid", 24))
    _write_csv(tmp_path / "reviews-test.csv", ["review", "stars"], _reviews("eng", "test", 24))
    config = tmp_path / "experiment.yaml"
    settings = {
        "dataset": "table", "seeds": [1], "methods": {"lt_sft": {"method": "lt_sft"}}, "full_ft": True,
        "analysis": False, "eval_splits": ["test", "valid"], "results_dir": str(tmp_path / "reports"),
        "pipeline": {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"dataset": "table", "table": {
                "name": "reviews", "text_column": "review", "label_column": "stars",
                "train": {"eng": str(tmp_path / "reviews-train.csv")},
                "valid": {"eng": str(tmp_path / "reviews-valid.csv"), "gos": str(tmp_path / "reviews-valid-gos.csv")},
                "test": {"eng": str(tmp_path / "reviews-test.csv"), "gos": str(tmp_path / "reviews-test-gos.csv")}}},
            "task": "table", "source_language": "eng", "target_languages": "all",
            "language_sft": {"text": [str(tmp_path / "{lang}-news.txt")], "head_warmup_steps": 2,
                             "full": {"max_steps": 2}, "sparse": {"max_steps": 2}},
            "task_sft": {"full": {"max_steps": 3}, "sparse": {"max_steps": 3}},
            "cluster": {"backend": "local"}, "tracking": {"enabled": False},
            "output_dir": str(tmp_path / "run")}}
    tests = settings["pipeline"]["data"]["table"]["test"]
    config.write_text(json.dumps({**settings, "pipeline": {**settings["pipeline"], "data": {
        "dataset": "table", "table": {**settings["pipeline"]["data"]["table"], "test": {"gos": tests["gos"]}}}}}))
    assert main(["experiment", "table", "--config", str(config)]) == 2   # eng has no test table
    assert "pipeline.data.table.test: no table for 'eng'" in capsys.readouterr().err
    config.write_text(json.dumps(settings))
    assert main(["experiment", "table", "--config", str(config)]) == 0
    report = (tmp_path / "reports" / "table-custom" / "results.md").read_text()
    assert report.startswith("# reviews zero-shot transfer") and "your tables (pipeline.data.table)" in report
    assert "| eng (source) |" in report and "| gos |" in report and "| **average of the 1 targets** |" in report
