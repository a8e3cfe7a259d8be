"""MLflow tracking and the SFT registry against a real sqlite-backed MLflow store (and, in the slow
tests, a real `mlflow server` on 127.0.0.1): versions, tags, the champion alias, lookup, compose,
pyfunc predict, and what happens when the tracking server is down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_sft

from deftx.data import NUSAX_LABELS
from deftx.models import load_classifier, load_masked_lm, load_tokenizer
from deftx.tracking.registry import (
    ModelRef,
    PendingRegistration,
    Registry,
    RegistryError,
    compose_from_registry,
    sync_pending,
)
from deftx.tracking.tracker import Tracker, flatten_params, numeric_metrics

TEXTS = ["Aku seneng banget karo layanan iki", "Pelayanan buruk sekali, saya kecewa", "biasa wae"]


@pytest.fixture()
def sfts(tmp_path, tiny_model_dir):
    """A task SFT (classifier head, NusaX labels) and two language SFTs on the tiny model, saved."""
    classifier = load_classifier(str(tiny_model_dir), NUSAX_LABELS)
    mlm, _ = load_masked_lm(str(tiny_model_dir))
    out = {}
    task = make_sft(classifier, "task", seed=1)
    task.metadata.base_model = str(tiny_model_dir)
    out["task"] = task.save(tmp_path / "task-nusax_senti")
    for i, name in enumerate(("lang-a", "lang-b", "lang-c", "lang-d", "lang-e")):
        lang = make_sft(mlm, "language", seed=10 + i)
        lang.metadata.base_model = str(tiny_model_dir)
        out[name] = lang.save(tmp_path / name)
    return out


def _tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", log=lambda line: None)


def _pending(sfts, lang_key: str, score: float, objective: str = "target_valid_macro_f1") -> PendingRegistration:
    return PendingRegistration(experiment="deftx-test", run_name=f"trial-{lang_key}", task="nusax_senti",
                               language="jav", task_sft=str(sfts["task"]), language_sft=str(sfts[lang_key]),
                               score=score, objective=objective, params={"selection": {"density": 0.01}},
                               metrics={objective: score})


def test_flatten_params_and_metrics():
    flat = flatten_params({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "f": [{"g": 3}], "h": "x" * 7000})
    assert flat["a.b"] == "1" and flat["a.c"] == "1,2" and flat["a.d"] == "null" and flat["a.e"] == "{}"
    assert flat["f.0.g"] == "3" and flat["h"].endswith("...[truncated]") and len(flat["h"]) == 6000
    assert numeric_metrics({"x": {"f1": 0.5, "n": 3, "name": "a"}, "ok": True}) == {"x.f1": 0.5, "x.n": 3.0}


def test_registration_champion_and_lookup(tmp_path, sfts, tiny_model_dir):
    registry = Registry(_tracker(tmp_path))
    first = registry.submit(_pending(sfts, "lang-a", 0.50))
    assert (first.language_version, first.task_version, first.composed_version, first.champion) == ("1", "1", "1", True)
    worse = registry.submit(_pending(sfts, "lang-b", 0.40))
    assert worse.composed_version == "2" and not worse.champion
    assert worse.task_version == "1"          # the same task SFT is not registered twice
    better = registry.submit(_pending(sfts, "lang-c", 0.70))
    assert better.composed_version == "3" and better.champion
    again = registry.submit(_pending(sfts, "lang-c", 0.70))   # e.g. a sync repeating an upload
    assert (again.composed_version, again.language_version) == ("3", "3")

    champion = registry.resolve("deftx-nusax_senti-jav@champion")
    assert champion.version == "3"
    tags = champion.tags
    assert tags["score"] == repr(0.70) and tags["objective"] == "target_valid_macro_f1"
    assert tags["task.method"] and tags["base_fingerprint"].startswith("sha256:")
    assert tags["language_sft_version"] == "3" and tags["task_sft_version"] == "1"
    assert registry.resolve("deftx-lang-jav").version == "3"      # latest
    assert registry.resolve(ModelRef.parse("deftx-task-nusax_senti/1")).tags["kind"] == "task"
    rows = {r["name"]: r for r in registry.listing()}
    assert set(rows) == {"deftx-lang-jav", "deftx-task-nusax_senti", "deftx-nusax_senti-jav"}
    assert rows["deftx-nusax_senti-jav"]["aliases"] == {"champion": "3"}

    with pytest.raises(RegistryError, match=r"has no alias 'best'; it has @champion \(v3\)"):
        registry.resolve("deftx-nusax_senti-jav@best")
    with pytest.raises(RegistryError, match="no registered model 'deftx-nusax_senti-sun'.*registered: deftx-lang-jav"):
        registry.resolve("deftx-nusax_senti-sun@champion")
    with pytest.raises(RegistryError, match="has no version 9; versions: 1, 2, 3"):
        registry.resolve("deftx-nusax_senti-jav/9")

    # another objective is not comparable: the champion stays
    other = registry.submit(_pending(sfts, "lang-b", 0.99, objective="source_valid_macro_f1"))
    assert not other.champion and registry.resolve("deftx-nusax_senti-jav@champion").version == "3"


def test_reconcile_moves_the_alias_to_the_best_version(tmp_path, sfts):
    registry = Registry(_tracker(tmp_path))
    registry.submit(_pending(sfts, "lang-a", 0.6))
    registry.submit(_pending(sfts, "lang-b", 0.8))
    # simulate a lost race: a concurrent trial left the alias on the worse version
    registry.client.set_registered_model_alias("deftx-nusax_senti-jav", "champion", "1")
    assert registry.reconcile_champion("deftx-nusax_senti-jav", "target_valid_macro_f1") == "2"
    assert registry.resolve("deftx-nusax_senti-jav@champion").version == "2"


def test_pyfunc_predicts_labels_and_get_composes_a_standalone_model(tmp_path, sfts, tiny_model_dir, monkeypatch):
    import mlflow.pyfunc
    from transformers import AutoModelForSequenceClassification

    from deftx.core.compose import Composition
    from deftx.core.sft import SparseFineTuning
    from deftx.data.examples import Example
    from deftx.evaluation import predict

    tracker = _tracker(tmp_path)
    registry = Registry(tracker)
    registry.submit(_pending(sfts, "lang-a", 0.5))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)

    # by hand: theta0 + phi_task + phi_lang
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_classifier(str(tiny_model_dir), NUSAX_LABELS)
    comp = Composition(SparseFineTuning.load(sfts["task"]), SparseFineTuning.load(sfts["lang-a"]))
    with comp.applied(model):
        expected = [NUSAX_LABELS[i] for i in predict(model, tok, [Example(t, 0) for t in TEXTS])]
        ids = tok(TEXTS, padding=True, return_tensors="pt")
        logits = model(**ids).logits

    loaded = mlflow.pyfunc.load_model("models:/deftx-nusax_senti-jav@champion")
    got = loaded.predict(TEXTS)
    assert got == expected and set(got) <= set(NUSAX_LABELS)
    import pandas as pd

    assert list(loaded.predict(pd.DataFrame({"text": TEXTS}))) == expected

    out = compose_from_registry(registry, "deftx-nusax_senti-jav@champion", tmp_path / "hf", log=lambda s: None)
    standalone = AutoModelForSequenceClassification.from_pretrained(str(out))
    standalone.eval()
    with torch.no_grad():
        assert torch.allclose(standalone(**ids).logits, logits, atol=1e-5)
    assert standalone.config.id2label[0] == NUSAX_LABELS[0]
    assert json.loads((out / "deftx_composition.json").read_text())["base_fingerprint"].startswith("sha256:")

    # a language SFT alone cannot be composed into a classifier
    with pytest.raises(RegistryError, match="is a language SFT"):
        compose_from_registry(registry, "deftx-lang-jav", tmp_path / "x", log=lambda s: None)


def test_get_refuses_a_different_base_model(tmp_path, sfts, other_base_dir):
    registry = Registry(_tracker(tmp_path))
    registry.submit(_pending(sfts, "lang-a", 0.5))
    with pytest.raises(Exception, match="fingerprint|different base"):
        compose_from_registry(registry, "deftx-nusax_senti-jav@champion", tmp_path / "hf",
                              base_model=str(other_base_dir), log=lambda s: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_keeps_the_registration_for_sync(tmp_path, sfts):
    lines: list[str] = []
    down = Tracker(f"http://127.0.0.1:{_free_port()}", log=lines.append)
    assert down.offline and "does not answer" in lines[0]
    result = Registry(down).submit(_pending(sfts, "lang-a", 0.5), output_dir=tmp_path / "run")
    assert result is None
    pending = list((tmp_path / "run" / "registry-pending").glob("*.json"))
    assert len(pending) == 1 and any("registry sync" in line for line in lines)

    registry = Registry(_tracker(tmp_path))
    assert sync_pending(registry, [tmp_path / "run"], log=lambda s: None) == (1, 0)
    assert not (tmp_path / "run" / "registry-pending").exists()
    assert registry.resolve("deftx-nusax_senti-jav@champion").version == "1"


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real `mlflow server` (sqlite backend, local artifacts) on 127.0.0.1, stopped after the test."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                             str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    from deftx.tracking.tracker import server_reachable

    deadline = time.time() + 90
    while not server_reachable(uri, timeout=1):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not start")
        time.sleep(0.5)
    yield uri, proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
def test_real_server_registration_lookup_and_server_going_down(tmp_path, sfts, mlflow_server):
    uri, proc = mlflow_server
    lines: list[str] = []
    tracker = Tracker(uri, log=lines.append)
    registry = Registry(tracker)
    assert registry.submit(_pending(sfts, "lang-a", 0.5)).champion
    local = registry.download("deftx-nusax_senti-jav@champion", tmp_path / "dl")
    assert (local / "MLmodel").is_file()
    with tracker.run("deftx-test", "during-outage") as run:
        tracker.log_metrics(run, {"loss": 1.0}, step=1)
        proc.terminate()
        proc.wait(timeout=20)
        tracker.log_metrics(run, {"loss": 0.5}, step=2)      # fails: warns once, goes offline
        assert registry.submit(_pending(sfts, "lang-b", 0.9), output_dir=tmp_path / "run") is None
    assert tracker.offline and sum("tracking is off" in line for line in lines) == 1
    assert len(list((tmp_path / "run" / "registry-pending").glob("*.json"))) == 1


def test_concurrent_registrations_lose_no_version(tmp_path, sfts):
    """Four trials registering into one sqlite store at once (separate clients, as in separate
    trial processes): every version is kept and the champion is the best score."""
    import threading

    results, errors = [], []

    def trial(lang_key: str, score: float) -> None:
        try:
            results.append(Registry(_tracker(tmp_path)).submit(_pending(sfts, lang_key, score)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    Registry(_tracker(tmp_path)).submit(_pending(sfts, "lang-a", 0.1))   # create the store first
    scores = {"lang-b": 0.3, "lang-c": 0.9, "lang-d": 0.5, "lang-e": 0.7}
    threads = [threading.Thread(target=trial, args=item) for item in scores.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and all(r is not None for r in results)
    registry = Registry(_tracker(tmp_path))
    versions = registry.client.search_model_versions("name='deftx-nusax_senti-jav'")
    assert sorted(float(v.tags["score"]) for v in versions) == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert float(registry.resolve("deftx-nusax_senti-jav@champion").tags["score"]) == 0.9


# -- what a lookup may run: data only ---------------------------------------------------------------

OLD_LAYOUT_MODEL = '''
import mlflow.models
import mlflow.pyfunc


class ComposedSFTModel(mlflow.pyfunc.PythonModel):
    """The layout earlier deftx releases registered: the model file is code, stored with the model."""

    def load_context(self, context):
        from deftx.mlflow_model import ComposedPredictor

        self.predictor = ComposedPredictor(context.artifacts["task_sft"], context.artifacts["language_sft"])

    def predict(self, context, model_input, params=None):
        return self.predictor.predict(model_input)


mlflow.models.set_model(ComposedSFTModel())
'''


def _stored_dir(registry: Registry, ref: str) -> Path:
    """Where the local store keeps a version's files (its source is a file: URI)."""
    from urllib.parse import urlparse

    return Path(urlparse(registry.resolve(ref).source).path)


def _register_old_layout(registry: Registry, sfts, tmp_path: Path) -> str:
    """A composed model registered as earlier deftx releases did (models-from-code)."""
    import mlflow.pyfunc

    from deftx.tracking.registry import sft_tags

    code = tmp_path / "deftx_composed_model.py"
    code.write_text(OLD_LAYOUT_MODEL)
    local = tmp_path / "old-model"
    mlflow.pyfunc.save_model(str(local), python_model=str(code), pip_requirements=["deftx"],
                             artifacts={"task_sft": str(sfts["task"]), "language_sft": str(sfts["lang-a"])})
    client = registry.client
    name = "deftx-nusax_senti-sun"
    client.create_registered_model(name)
    with registry.tracker.run("deftx-test", "old-layout") as run:
        client.log_artifacts(run.run_id, str(local), "composed-model")
        tags = {"task.weights_sha256": sft_tags(sfts["task"])["weights_sha256"],
                "language.weights_sha256": sft_tags(sfts["lang-a"])["weights_sha256"]}
        version = client.create_model_version(name, source=f"{run.artifact_uri}/composed-model", run_id=run.run_id,
                                              tags=tags)
    return f"{name}/{version.version}"


def _predict(uri: str, ref: str, capsys) -> tuple[int, str, str]:
    from deftx.cli import main

    code = main(["predict", ref, *TEXTS, "--tracking-uri", uri])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_registered_models_store_no_code_and_predict_runs_none(tmp_path, sfts, monkeypatch, capsys):
    """A composed model's files are data (MLmodel names the installed deftx.mlflow_model by
    module); `deftx predict` builds the model from the two verified SFTs whatever code the store
    holds: code appended to the model file of an old-layout version, or an MLmodel rewritten to
    ship its own 'deftx' package, never runs. mlflow.pyfunc.load_model, by design, does run the
    tampered file (the control that shows the tampering is real)."""
    import mlflow.pyfunc
    import yaml

    tracker = _tracker(tmp_path)
    registry = Registry(tracker)
    registry.submit(_pending(sfts, "lang-a", 0.5))
    new_dir = _stored_dir(registry, "deftx-nusax_senti-jav@champion")
    assert sorted(p.name for p in new_dir.rglob("*.py")) == []
    mlmodel = yaml.safe_load((new_dir / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "deftx.mlflow_model"
    assert (new_dir / "data" / "sfts" / "task_sft" / "sft.safetensors").is_file()
    code, expected, err = _predict(tracker.uri, "deftx-nusax_senti-jav@champion", capsys)
    assert code == 0, err

    marker = tmp_path / "code-ran"
    payload = f"\nopen({str(marker)!r}, 'w').write('ran')\n"
    # the new layout: ship a 'deftx' package with the model and point MLmodel at it
    shipped = new_dir / "code" / "deftx"
    shipped.mkdir(parents=True)
    (shipped / "__init__.py").write_text(payload)
    (shipped / "mlflow_model.py").write_text(payload + "def _load_pyfunc(path):\n    raise SystemExit(3)\n")
    mlmodel["flavors"]["python_function"]["code"] = "code"
    (new_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    assert _predict(tracker.uri, "deftx-nusax_senti-jav@champion", capsys)[:2] == (0, expected)
    assert not marker.exists()

    # the old layout: the model file itself is code
    old_ref = _register_old_layout(registry, sfts, tmp_path)
    old_file = next(_stored_dir(registry, old_ref).glob("*.py"))
    with old_file.open("a") as f:
        f.write(payload)
    assert _predict(tracker.uri, old_ref, capsys)[:2] == (0, expected)
    assert not marker.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)   # set_tracking_uri exports it: restore it after
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    mlflow.pyfunc.load_model(f"models:/{old_ref}")
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("tamper,message", [
    (lambda d: (d / "sft.safetensors").write_bytes(b"\0" * 64), "checksum mismatch"),
    ("swap", "is not the one registered"),
    ("escape", "leaves the model directory"),
])
def test_predict_verifies_what_it_downloads(tmp_path, sfts, capsys, tamper, message):
    import yaml

    tracker = _tracker(tmp_path)
    registry = Registry(tracker)
    registry.submit(_pending(sfts, "lang-a", 0.5))
    model_dir = _stored_dir(registry, "deftx-nusax_senti-jav@champion")
    language = model_dir / "data" / "sfts" / "language_sft"
    if tamper == "swap":       # a valid SFT, but not the registered one
        for name in ("sft.safetensors", "sft.json"):
            (language / name).write_bytes((sfts["lang-b"] / name).read_bytes())
    elif tamper == "escape":
        doc = yaml.safe_load((model_dir / "MLmodel").read_text())
        doc["flavors"]["python_function"]["data"] = "../../../../outside"
        (model_dir / "MLmodel").write_text(yaml.safe_dump(doc))
    else:
        tamper(language)
    code, out, err = _predict(tracker.uri, "deftx-nusax_senti-jav@champion", capsys)
    assert code == 2 and out == ""
    assert err.startswith("deftx: error: ") and message in err and err.count("\n") == 1


def test_sync_handles_each_record_on_its_own(tmp_path, sfts):
    """A malformed record, and one whose SFT is gone, are reported with their own problem and left
    in place; the records around them are registered; nothing speaks of training."""
    lines: list[str] = []
    down = Tracker(f"http://127.0.0.1:{_free_port()}", log=lambda line: None)
    run_dir = tmp_path / "run"
    first = Registry(down).submit(_pending(sfts, "lang-a", 0.5), output_dir=run_dir)
    assert first is None
    pending = run_dir / "registry-pending"
    (pending / "0-garbage.json").write_text("{not json")
    (pending / "1-wrong-type.json").write_text(json.dumps({"experiment": "x", "run_name": 5}))
    gone = _pending(sfts, "lang-b", 0.6)
    gone.language_sft = str(tmp_path / "deleted-sft")
    gone.save(run_dir)
    Registry(down).submit(_pending(sfts, "lang-c", 0.7), output_dir=run_dir)
    assert len(list(pending.glob("*.json"))) == 5

    registry = Registry(_tracker(tmp_path))
    assert sync_pending(registry, [run_dir], log=lines.append) == (2, 3)
    text = "\n".join(lines)
    assert "0-garbage.json: unreadable registration record" in text
    assert "1-wrong-type.json: 'run_name' has the wrong type" in text
    assert "deleted-sft: not a directory" in text
    registered = [line for line in lines if line.startswith("registered")]
    assert len(registered) == 2 and all("garbage" not in line and "deleted" not in line for line in registered)
    assert "Training goes on" not in text and "tracking is off" not in text
    assert len(list(pending.glob("*.json"))) == 3
    assert registry.resolve("deftx-nusax_senti-jav@champion").tags["score"] == repr(0.7)


def test_the_champion_never_switches_to_another_base_model(tmp_path, sfts, other_base_dir):
    """A better-scoring composed model of the same task and language, trained on another base
    model, is registered as a version but does not take @champion, by promotion or reconciliation."""
    registry = Registry(_tracker(tmp_path))
    assert registry.submit(_pending(sfts, "lang-a", 0.5)).champion
    classifier = load_classifier(str(other_base_dir), NUSAX_LABELS)
    mlm, _ = load_masked_lm(str(other_base_dir))
    task = make_sft(classifier, "task", seed=3)
    task.metadata.base_model = str(other_base_dir)
    lang = make_sft(mlm, "language", seed=4)
    lang.metadata.base_model = str(other_base_dir)
    other = {"task": task.save(tmp_path / "other-task"), "lang-x": lang.save(tmp_path / "other-lang")}
    moved = registry.submit(_pending(other, "lang-x", 0.9))
    assert moved.composed_version == "2" and not moved.champion
    champion = registry.resolve("deftx-nusax_senti-jav@champion")
    assert champion.version == "1"
    assert registry.resolve("deftx-nusax_senti-jav/2").tags["base_fingerprint"] != champion.tags["base_fingerprint"]
    assert registry.reconcile_champion("deftx-nusax_senti-jav", "target_valid_macro_f1") == "1"
    assert registry.submit(_pending(sfts, "lang-b", 0.6)).champion   # the same base still competes
