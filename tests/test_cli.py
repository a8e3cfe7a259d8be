"""The command line: help everywhere, one-line errors with exit 2, and a tiny end-to-end pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deftx.cli import main

COMMANDS = [[], ["pipeline"], ["train-lang"], ["train-task"], ["evaluate"], ["sft"], ["sft", "inspect"],
            ["sft", "compose"], ["models"], ["models", "fetch"], ["presets"], ["sweep"], ["experiment"],
            ["sweep-subnetworks"], ["train-subnetworks"], ["subnetworks-export"]]


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "deftx")
def test_help_on_every_command(words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(words + ["--help"])
    assert exc.value.code == 0
    assert "usage: deftx" in capsys.readouterr().out


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "deftx", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("deftx ")


@pytest.mark.parametrize("argv,message", [
    (["pipeline", "--set", "language_sft.selection.density=1.5"], r"language_sft.selection.density: must be in (0, 1]"),
    (["pipeline", "--set", "task_sft.selection.rank=0", "--method", "deft_x"], "task_sft.selection.rank: must be a positive"),
    (["pipeline", "--set", "target_languages=[jav,klingon]"], "unknown NusaX language 'klingon'; valid: ace, ban"),
    (["pipeline", "--config", "/no/such/file.yaml"], "config file /no/such/file.yaml does not exist"),
    (["pipeline", "--preset", "nope"], "unknown preset 'nope'"),
    (["pipeline", "--set", "novalue"], "expected key=value"),
    (["train-lang", "--lang", "xx", "--output-dir", "/tmp/x"], "unknown NusaX language 'xx'"),
    (["sft", "inspect", "/no/such/sft"], "/no/such/sft: not a directory"),
    (["evaluate", "--task", "/no/such/sft", "--languages", "jav"], "/no/such/sft: not a directory"),
])
def test_user_errors_are_one_line_with_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("deftx: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["pipeline", "--set", "task_sft.full.epochs=nan"], "task_sft.full.epochs: must be a finite number, got 'nan'"),
    (["pipeline", "--set", "task_sft.full.max_grad_norm=.nan"], "task_sft.full.max_grad_norm: must be a finite"),
    (["pipeline", "--set", "task_sft.full.weight_decay=inf"], "task_sft.full.weight_decay: must be a finite"),
    (["pipeline", "--set", "language_sft.sparse.l1_reg=-.inf"], "language_sft.sparse.l1_reg: must be a finite"),
    (["pipeline", "--set", "task_sft.sparse.learning_rate=.inf"], "task_sft.sparse.learning_rate: must be a finite"),
    (["pipeline", "--set", "language_sft.mlm_probability=nan"], "language_sft.mlm_probability: must be a finite"),
    (["train-task", "--config", "{dir}", "--output-dir", "{dir}/t"], "config file {dir} is a directory, not a YAML file"),
    (["pipeline", "--output-dir", "{file}"], "{file} exists and is a file, not a directory"),
    (["pipeline", "--set", "cluster.storage_path={file}/ray"], "cannot write to {file}/ray: {file} is a file"),
    (["train-lang", "--lang", "jav", "--output-dir", "{file}/sft"], "cannot write to {dir}/file: {file} is a file"),
    (["registry", "get", "x@champion", "--output-dir", "{victim}"], "{victim} already exists (use --overwrite to replace it)"),
    (["sft", "compose", "--task", "t", "--output-dir", "{victim}", "--overwrite"],
     "refusing to replace {victim}: it is not a composed model directory written by deftx"),
    (["registry", "get", "x@champion", "--output-dir", "{victim}", "--overwrite"],
     "refusing to replace {victim}: it is not a composed model directory written by deftx"),
    (["train-lang", "--lang", "jav", "--output-dir", "{victim}", "--overwrite"],
     "refusing to replace {victim}: it is not an SFT directory written by deftx"),
    (["train-task", "--output-dir", ".", "--overwrite"], "refusing to write an SFT directory to {dir}: it is the current"),
    (["sft", "compose", "--task", "t", "--output-dir", "{dir}/..", "--overwrite"], "it is the current directory or one"),
], ids=["epochs-nan", "grad-norm-nan", "decay-inf", "l1-minus-inf", "lr-inf", "mlm-nan", "config-dir", "output-file",
        "storage-under-file", "out-under-file", "get-existing", "compose-foreign", "get-foreign", "train-foreign",
        "out-cwd", "out-parent"])
def test_bad_inputs_fail_before_any_work_with_one_line(argv, message, tmp_path, monkeypatch, capsys):
    """Each fails with one line and exit 2 before a model is loaded or anything is downloaded, and
    leaves what it was pointed at as it was."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("the user's own file")
    (tmp_path / "file").write_text("a file")
    monkeypatch.chdir(tmp_path)
    values = {"dir": str(tmp_path), "file": str(tmp_path / "file"), "victim": str(victim)}
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("deftx: error: ") and message.format(**values) in last, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "victim"]
    assert (victim / "notes.txt").read_text() == "the user's own file"


def test_output_cut_short_by_the_reader_ends_quietly(tmp_path):
    """`deftx sft inspect DIR | head -1`: the reader goes away; no BrokenPipeError traceback."""
    from helpers import make_sft

    from deftx.models import load_classifier

    sft = make_sft(load_classifier(str(_tiny_base(tmp_path)), ["a", "b"]), "task", seed=1)
    sft.save(tmp_path / "sft")
    proc = subprocess.Popen([sys.executable, "-m", "deftx", "sft", "inspect", str(tmp_path / "sft")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                     # like `| head` that has read what it wanted
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def _tiny_base(tmp_path):
    from helpers import build_tiny_model

    return build_tiny_model(tmp_path / "base")


def test_a_cluster_address_that_is_not_ray_fails_fast(tmp_path):
    """--address pointing at another service (an HTTP server here, as a dashboard or MLflow port
    would be): one line naming the address, not minutes of GCS connection retries."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        done = subprocess.run([sys.executable, "-m", "deftx", "train-task", "--address", f"127.0.0.1:{port}",
                               "--output-dir", str(tmp_path / "t"), "--set", f"output_dir={tmp_path / 'run'}"],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.kill()
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"deftx: error: 127.0.0.1:{port} answers, but not as a Ray cluster"), done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr


def test_sft_inspect_bad_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "sft.json").write_text("{not json")
    assert main(["sft", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sft.json: invalid JSON" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lt_sft", "deft_x"])
def test_tiny_pipeline_end_to_end_via_cli(tiny_model_dir, tmp_path, method, capsys):
    """Language SFTs (ind, jav), task SFT on ind over its language SFT, composition, evaluation,
    inspect, compose export and a re-run that reuses every SFT; on real NusaX rows."""
    out = tmp_path / "run"
    argv = ["pipeline", "--method", method, "--output-dir", str(out),
            "--set", f"model.name_or_path={tiny_model_dir}", "--set", "target_languages=[jav]",
            "--set", "language_sft.head_warmup_steps=2", "--set", "language_sft.full.max_steps=3",
            "--set", "language_sft.sparse.max_steps=3", "--set", "task_sft.full.max_steps=4",
            "--set", "task_sft.sparse.max_steps=4", "--set", "task_sft.full.learning_rate=1e-3",
            "--set", "max_eval_examples=40", "--set", "language_sft.max_train_examples=64",
            "--set", "cluster.backend=local"]
    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    if method == "deft_x":
        argv += ["--set", "language_sft.selection.rank=4", "--set", "task_sft.selection.energy=0.8"]
        # the tracking server is down for the whole run: training completes, registrations wait on disk
        argv += ["--set", f"tracking.uri=http://127.0.0.1:{_closed_port()}"]
    else:
        argv += ["--set", f"tracking.uri={store}"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    if method == "deft_x":
        assert "WARNING: MLflow tracking is off" in captured.err and "registry sync" in captured.err
        assert len(list((out / "registry-pending").glob("*.json"))) == 1
        assert main(["registry", "sync", str(out), "--tracking-uri", store]) == 0
        assert "registered 1; still pending 0" in capsys.readouterr().out
    _check_tracked_pipeline(store, out)
    assert "| jav (Javanese) | target |" in captured.out and "average of targets" in captured.out
    assert "[lang jav phase 2/2 (sparse)]" in captured.err  # progress is shown
    assert "[mlm head warm-up]" in captured.err and "[lang jav head warm-up]" not in captured.err
    results = json.loads((out / "results.json").read_text())
    assert [r["language"] for r in results["rows"]] == ["ind", "jav"]
    assert all(0.0 <= r["macro_f1"] <= 1.0 and r["n"] == 40 for r in results["rows"])
    for name in ("lang-ind", "lang-jav", "task-nusax_senti"):
        meta = json.loads((out / "sfts" / name / "sft.json").read_text())
        assert meta["method"] == method and meta["selection"]["method"] == method
        assert meta["nnz"] > 0 and meta["base_fingerprint"].startswith("sha256:")
        if name.startswith("lang-"):
            assert meta["training"]["mlm_head"] == "shared warm-up"
    task_meta = json.loads((out / "sfts" / "task-nusax_senti" / "sft.json").read_text())
    assert task_meta["trained_on"]["language_sft"] == "ind" and task_meta["label_names"][0] == "negative"

    assert main(["sft", "inspect", str(out / "sfts" / "lang-jav")]) == 0
    assert "language SFT, language jav" in capsys.readouterr().out
    assert main(["sft", "compose", "--task", str(out / "sfts" / "task-nusax_senti"), "--lang-sft",
                 str(out / "sfts" / "lang-jav"), "--output-dir", str(tmp_path / "hf"), "--model", str(tiny_model_dir)]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and "wrote " in capsys.readouterr().out
    assert main(["evaluate", "--task", str(out / "sfts" / "task-nusax_senti"), "--lang-sft", str(out / "sfts" / "lang-jav"),
                 "--languages", "jav", "--model", str(tiny_model_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["language"] == "jav" and rows[0]["n"] == 400

    assert main(argv) == 0  # a re-run with the same settings trains nothing
    err = capsys.readouterr().err
    assert err.count("reusing ") == 4 and "phase 1/2" not in err and "warm-up] step" not in err  # head + 3 SFTs

    if method == "lt_sft":   # a corrupt cached MLM head is verified like an SFT: retrained, not a traceback
        head = out / "mlm-head" / "head.safetensors"
        data = bytearray(head.read_bytes())
        data[-1] ^= 0xFF
        head.write_bytes(bytes(data))
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "mlm-head: unusable (head.safetensors does not match its checksum" in err and "Traceback" not in err
        assert "[mlm head warm-up]" in err and err.count("reusing ") == 3


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_tracked_pipeline(store: str, out) -> None:
    """The run is in MLflow (parent + one nested run per SFT, with loss curves and plots) unless the
    server was down, and the composed model of each target is registered as champion."""
    from deftx.tracking.registry import open_registry

    registry = open_registry(store)
    champion = registry.resolve("deftx-nusax_senti-jav@champion")
    assert champion.tags["objective"] == "target_valid_macro_f1" and 0 <= float(champion.tags["score"]) <= 1
    assert {r["name"] for r in registry.listing()} == {"deftx-lang-jav", "deftx-task-nusax_senti",
                                                        "deftx-nusax_senti-jav"}
    client = registry.client
    experiment = registry.tracker.experiment_id("deftx-nusax_senti-pipeline-run")
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    if "pipeline-run" not in runs:   # the server was down during the run: only the synced registration
        (name,) = [n for n in runs if n.startswith("register-run-jav")]
        assert {"sfts", "composed-model"} <= {a.path for a in client.list_artifacts(runs[name].info.run_id)}
        return
    parent = runs["pipeline-run"]
    assert parent.data.params["source_language"] == "ind" and "test.jav.macro_f1" in parent.data.metrics
    for name in ("lang-ind", "lang-jav", "task-nusax_senti"):
        child = runs[name]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        history = client.get_metric_history(child.info.run_id, "loss.phase2_sparse")
        assert [m.step for m in history] == list(range(1, len(history) + 1)) and history
    assert [a.path for a in client.list_artifacts(runs["lang-jav"].info.run_id, "plots")] == [
        "plots/mask-density-per-layer.png"]
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/f1-per-language.png"]
    assert {"config.json", "results.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_train_subnetworks_then_export_and_evaluate_a_target(tiny_model_dir, tmp_path, capsys):
    """`deftx train-subnetworks` (dynamic, tiny model, local), then the task SFT an unseen target
    uses (related language), evaluated with `deftx evaluate`; user errors are one line, exit 2."""
    model = tmp_path / "model"
    db = tmp_path / "mlflow.db"
    common = ["--local", "--set", f"model.name_or_path={tiny_model_dir}", "--set", "task_sft.max_train_examples=24",
              "--set", f"tracking.uri=sqlite:///{db}"]
    argv = ["train-subnetworks", "--sources", "jav,sun", "--output-dir", str(model), *common,
            "--subnet", "mode=dynamic", "--subnet", "reselect_every=2", "--subnet", "probe_steps=2",
            "--subnet", "selection.density=0.2", "--subnet", "train.epochs=1"]
    assert main(argv) == 0
    assert "saved subnetwork model" in capsys.readouterr().out
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("deftx-nusax_senti-subnetworks").experiment_id])
    assert run.data.params["kind"] == "task" and run.data.params["subnetworks.mode"] == "dynamic"
    assert any(k.startswith("loss.") for k in run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/subnetworks.json"]
    out = tmp_path / "bbc-task"
    assert main(["subnetworks-export", str(model), "--target", "bbc", "--policy", "related", "--related", "bbc=sun",
                 "--output-dir", str(out)]) == 0
    assert "related mask" in capsys.readouterr().out
    assert main(["evaluate", "--task", str(out), "--languages", "bbc", "--json", "--model", str(tiny_model_dir)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["language"] == "bbc" and 0.0 <= row["macro_f1"] <= 1.0 and row["n"] > 0
    for bad, message in [(["--subnet", "mode=sometimes"], "subnetworks.mode: unknown mode"),
                         (["--lang-sft", "ind=/nowhere"], "ind is not one of the sources"),
                         (["--subnet", "colour=red"], "subnetworks.colour: unknown key")]:
        assert main([*argv, "--overwrite", *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["subnetworks-export", str(model), "--target", "bbc", "--policy", "related", "--output-dir",
                 str(tmp_path / "x")]) == 2
    assert "no related language for 'bbc'" in capsys.readouterr().err


def test_sigterm_unwinds_like_ctrl_c_and_restores_the_callers_handler(monkeypatch, capsys):
    """`kill` / `ray job stop` send SIGTERM: the command unwinds (its finally blocks run: MLflow runs
    end as KILLED, the experiment ledger is flushed), exits 143 with the resume hint, and the
    caller's own SIGTERM handler is back afterwards."""
    import os
    import signal
    import time

    from deftx import cli

    unwound = []

    def long_command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)                    # interrupted by the handler long before this ends
            return 0
        finally:
            unwound.append(True)

    monkeypatch.setattr(cli, "cmd_presets", long_command)

    def callers_handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        assert main(["presets"]) == 143       # not 0: the sleep never finished
        assert unwound == [True]
        assert "deftx: terminated (finished SFTs are kept" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
