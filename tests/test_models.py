"""Base-model resolution: local directories, hub ids (offline here), clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deftx.errors import ModelError
from deftx.models import load_classifier, load_masked_lm, load_tokenizer, resolve_model_path


def test_local_directory_resolves_and_loads(tiny_xlmr_dir):
    path = resolve_model_path(str(tiny_xlmr_dir))
    assert path == str(tiny_xlmr_dir)
    tok = load_tokenizer(path)
    assert tok.mask_token_id is not None and tok.pad_token_id == 1
    model, has_head = load_masked_lm(path)
    assert type(model).__name__ == "XLMRobertaForMaskedLM" and not has_head
    clf = load_classifier(path, ["a", "b"], seed=3)
    assert clf.config.id2label == {0: "a", 1: "b"}
    again = load_classifier(path, ["a", "b"], seed=3)  # the fresh head is seeded: identical loads
    assert all((p == q).all() for p, q in zip(clf.parameters(), again.parameters()))


@pytest.mark.parametrize("name,message", [
    ("/no/such/model", "model directory /no/such/model does not exist"),
    ("./missing-model", "does not exist"),
    ("offline:nothing", "unknown offline model 'offline:nothing'; available: offline:multilingual-e5-small"),
])
def test_bad_model_names(name, message):
    with pytest.raises(ModelError, match=message):
        resolve_model_path(name)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        resolve_model_path(str(tmp_path))


def test_hub_id_is_passed_to_from_pretrained_and_fails_cleanly_offline(monkeypatch):
    """The hub path is kept for users: a hub id passes through when the hub answers (here a local
    stand-in at HF_ENDPOINT) or when HF_HUB_OFFLINE is set; an unreachable hub is one clear error at
    once, not a minute of download retries. (The load runs in a subprocess, so that HF_HUB_OFFLINE
    is set before huggingface_hub reads it at import.)"""
    import socket
    import time

    with socket.socket() as stand_in:
        stand_in.bind(("127.0.0.1", 0))
        stand_in.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{stand_in.getsockname()[1]}")
        assert resolve_model_path("xlm-roberta-base") == "xlm-roberta-base"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")        # nothing listens there
    started = time.time()
    with pytest.raises(ModelError, match=r"cannot reach the Hugging Face hub at http://127.0.0.1:9 to download "
                                         r"'xlm-roberta-base'"):
        resolve_model_path("xlm-roberta-base")
    assert time.time() - started < 30
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("xlm-roberta-base") == "xlm-roberta-base"
    code = ("from deftx.errors import ModelError\n"
            "from deftx.models import load_tokenizer\n"
            "try:\n    load_tokenizer('xlm-roberta-base')\nexcept ModelError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cannot load tokenizer 'xlm-roberta-base'"), out.stdout + out.stderr

@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_xlmr_dir"])
def test_head_inputs_are_what_the_classification_head_reads(fixture, request, nusax_texts):
    """BERT's head reads the pooler's output; XLM-R's head reads the first token's final state:
    the captured inputs fed to the head give back the model's logits, in example order."""
    import torch

    from deftx.data.examples import Example
    from deftx.evaluation import head_inputs, predict
    from deftx.models import load_classifier, load_tokenizer

    path = str(request.getfixturevalue(fixture))
    model, tokenizer = load_classifier(path, ["a", "b", "c"], seed=3), load_tokenizer(path)
    examples = [Example(text, 0) for text in nusax_texts[:7]]
    inputs, preds = head_inputs(model, tokenizer, examples, batch_size=3, max_length=32)
    assert inputs.shape == (7, model.config.hidden_size)
    assert preds == predict(model, tokenizer, examples, batch_size=3, max_length=32)
    model.eval()
    with torch.no_grad():
        if fixture == "tiny_model_dir":
            logits = model.classifier(inputs)
        else:   # the RoBERTa head takes the sequence and reads its first position
            logits = model.classifier(inputs[:, None, :])
        for i, example in enumerate(examples):   # one at a time, unpadded
            ids = tokenizer(example.text, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
            torch.testing.assert_close(logits[i], model(input_ids=ids).logits[0], atol=1e-5, rtol=1e-4)
