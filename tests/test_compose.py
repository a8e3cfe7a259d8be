"""Exact properties of composing a task SFT with a language SFT (deftx.core.compose) and of the exported
standalone Hugging Face model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deftx.core.compose import Composition, export_hf_model
from deftx.core.roles import maskable_parameters
from deftx.core.sft import SFTMetadata, SparseDelta, SparseFineTuning
from deftx.data.nusax import load_nusax_senti
from deftx.errors import SFTFormatError
from deftx.models import load_classifier, load_masked_lm, load_tokenizer

try:
    from helpers import LABELS, differing_tensors, make_sft, random_delta, snapshot
except ImportError:  # tests/ imported as a package
    from tests.helpers import LABELS, differing_tensors, make_sft, random_delta, snapshot

QUERY = "encoder.layer.0.attention.self.query.weight"


def fresh_classifier(base_dir):
    return load_classifier(str(base_dir), LABELS, seed=0)


@pytest.fixture
def classifier(base_dir):
    return fresh_classifier(base_dir)


@pytest.fixture(scope="module")
def task_sft(base_dir) -> SparseFineTuning:
    return make_sft(fresh_classifier(base_dir), "task", seed=11)


@pytest.fixture(scope="module")
def lang_sft(base_dir, task_sft) -> SparseFineTuning:
    """A language SFT trained on the MLM model of the same base, overlapping the task SFT: on every
    tensor it shares half of its indices with the task SFT."""
    mlm, _ = load_masked_lm(str(base_dir))
    gen = torch.Generator().manual_seed(12)
    diffs = {}
    for name, p in maskable_parameters(mlm).items():
        task_idx = task_sft.diffs[name].indices
        shared = task_idx[torch.randperm(task_idx.numel(), generator=gen)[: max(1, task_idx.numel() // 2)]]
        own = torch.randperm(p.numel(), generator=gen)[: task_idx.numel()]
        diffs[name] = random_delta(tuple(p.shape), 0, gen, indices=torch.unique(torch.cat([shared, own])))
    return make_sft(mlm, "language", seed=13, diffs=diffs)


def test_language_sft_overlaps_task_sft(task_sft, lang_sft):
    for name, delta in lang_sft.diffs.items():
        overlap = set(delta.indices.tolist()) & set(task_sft.diffs[name].indices.tolist())
        assert overlap, name


# ---------------------------------------------------------------------------------------- exactness


def test_composition_equals_applying_by_hand_and_reverts_exactly(base_dir, task_sft, lang_sft, classifier):
    theta0 = snapshot(classifier)
    by_hand = fresh_classifier(base_dir)
    assert differing_tensors(by_hand, theta0) == []
    task_sft.apply(by_hand, with_head=True)
    lang_sft.apply(by_hand, with_head=False)
    expected = snapshot(by_hand)

    comp = Composition(task_sft, lang_sft)
    assert [(sft, head) for sft, head in comp.parts] == [(task_sft, True), (lang_sft, False)]
    assert comp.label_names == LABELS
    comp.apply(classifier)
    assert differing_tensors(classifier, expected) == []
    assert differing_tensors(classifier, theta0)  # it did change the model
    # on an overlapping entry the composed value is theta0 + phi_task + phi_lang (in that order)
    t, l = task_sft.diffs[QUERY], lang_sft.diffs[QUERY]
    shared = sorted(set(t.indices.tolist()) & set(l.indices.tolist()))[0]
    t_val = t.values[(t.indices == shared).nonzero().item()]
    l_val = l.values[(l.indices == shared).nonzero().item()]
    base = theta0[f"bert.{QUERY}"].reshape(-1)[shared]
    assert classifier.state_dict()[f"bert.{QUERY}"].reshape(-1)[shared] == (base + t_val) + l_val
    # the head is the task SFT's
    for name, value in task_sft.head.items():
        assert torch.equal(classifier.state_dict()[name], value)
    comp.revert(classifier)
    assert differing_tensors(classifier, theta0) == []


def test_composition_applied_context_restores_on_error(task_sft, lang_sft, classifier):
    theta0 = snapshot(classifier)
    with pytest.raises(ValueError):
        with Composition(task_sft, lang_sft).applied(classifier):
            assert differing_tensors(classifier, theta0)
            raise ValueError("boom")
    assert differing_tensors(classifier, theta0) == []


def test_task_only_composition(task_sft, classifier):
    theta0 = snapshot(classifier)
    comp = Composition(task_sft)
    assert len(comp.parts) == 1
    with comp.applied(classifier):
        for name, value in task_sft.head.items():
            assert torch.equal(classifier.state_dict()[name], value)
    assert differing_tensors(classifier, theta0) == []


# ------------------------------------------------------------------------------------------ rejection


def _relabel(sft: SparseFineTuning, **changes) -> SparseFineTuning:
    meta = SFTMetadata.from_dict({**sft.metadata.__dict__, **changes})
    return SparseFineTuning(sft.diffs, sft.head, meta, source=sft.source)


@pytest.mark.parametrize("task_slot, lang_slot, fragment", [
    ("language", None, "expected a task SFT, got a language SFT"),
    ("language", "language", "expected a task SFT, got a language SFT"),
    ("language", "task", "expected a task SFT, got a language SFT"),
    ("task", "task", "expected a language SFT, got a task SFT"),
])
def test_composition_rejects_wrong_kinds(task_sft, lang_sft, task_slot, lang_slot, fragment):
    pick = {"task": task_sft, "language": lang_sft, None: None}
    with pytest.raises(SFTFormatError) as err:
        Composition(pick[task_slot], pick[lang_slot])
    message = str(err.value)
    assert "\n" not in message and fragment in message


def test_composition_rejects_different_base_fingerprints(other_base_dir, task_sft, lang_sft):
    from deftx.core.sft import current_base_fingerprint

    other_fp = current_base_fingerprint(fresh_classifier(other_base_dir))
    assert other_fp != task_sft.metadata.base_fingerprint
    foreign_lang = _relabel(lang_sft, base_fingerprint=other_fp)
    with pytest.raises(SFTFormatError) as err:
        Composition(task_sft, foreign_lang)
    assert "different base model" in str(err.value) and "\n" not in str(err.value)
    foreign_task = _relabel(task_sft, base_fingerprint=other_fp)
    with pytest.raises(SFTFormatError):
        Composition(foreign_task, lang_sft)


def test_composition_of_foreign_pair_fails_on_apply_and_leaves_model_untouched(other_base_dir, task_sft,
                                                                                  lang_sft, classifier):
    from deftx.core.sft import current_base_fingerprint

    other_fp = current_base_fingerprint(fresh_classifier(other_base_dir))
    comp = Composition(_relabel(task_sft, base_fingerprint=other_fp), _relabel(lang_sft, base_fingerprint=other_fp))
    theta0 = snapshot(classifier)
    with pytest.raises(SFTFormatError, match="fingerprint"):
        comp.apply(classifier)
    assert differing_tensors(classifier, theta0) == []


def _lang_wrong_shape(lang_sft):
    bad = dict(lang_sft.diffs)
    shape = lang_sft.diffs[QUERY].shape
    bad[QUERY] = random_delta((shape[0] + 1, shape[1]), 4, torch.Generator().manual_seed(0))
    return SparseFineTuning(bad, {}, lang_sft.metadata), QUERY


def _lang_unknown_tensor(lang_sft):
    bad = dict(lang_sft.diffs)
    name = "encoder.layer.5.output.dense.weight"
    bad[name] = SparseDelta((32, 64), torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    return SparseFineTuning(bad, {}, lang_sft.metadata), name


def _lang_wrong_base(lang_sft):
    return _relabel(lang_sft, base_fingerprint="sha256:" + "0" * 64), "fingerprint"


@pytest.mark.parametrize("make", [_lang_wrong_shape, _lang_unknown_tensor, _lang_wrong_base],
                         ids=["shape", "unknown-tensor", "fingerprint"])
def test_failure_of_second_part_rolls_back_the_first(task_sft, lang_sft, classifier, make):
    bad_lang, fragment = make(lang_sft)
    comp = Composition(task_sft, bad_lang) if make is not _lang_wrong_base else None
    if comp is None:  # a different fingerprint is refused by the constructor; force it past
        comp = Composition(task_sft, lang_sft)
        comp.language = bad_lang
    theta0 = snapshot(classifier)
    with pytest.raises(SFTFormatError) as err:
        comp.apply(classifier)
    assert fragment in str(err.value)
    assert differing_tensors(classifier, theta0) == []
    # nothing is left on the applied stack: the task SFT alone applies and reverts cleanly
    with pytest.raises(SFTFormatError):
        task_sft.revert(classifier)
    Composition(task_sft, lang_sft).apply(classifier)
    Composition(task_sft, lang_sft).revert(classifier)
    assert differing_tensors(classifier, theta0) == []


# --------------------------------------------------------------------------------------------- export

_SUBPROCESS_SCRIPT = r"""
import json, sys
sys.modules["deftx"] = None  # importing deftx must be impossible: the export is standalone
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
try:
    import deftx  # noqa: F401
    sys.exit("deftx importable")
except ImportError:
    pass
directory, texts = sys.argv[1], json.loads(sys.argv[2])
model, info = AutoModelForSequenceClassification.from_pretrained(directory, output_loading_info=True)
model.eval()
tok = AutoTokenizer.from_pretrained(directory)
batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({"logits": logits.tolist(), "id2label": {str(k): v for k, v in model.config.id2label.items()},
                  "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
                  "deftx_loaded": any(m.startswith("deftx.") for m in sys.modules)}))
"""


def test_export_loads_without_deftx_and_reproduces_composed_logits(base_dir, task_sft, lang_sft, classifier,
                                                                     tmp_path):
    tokenizer = load_tokenizer(str(base_dir))
    comp = Composition(task_sft, lang_sft)
    texts = [e.text for e in load_nusax_senti("jav", "test")[:4]]
    theta0 = snapshot(classifier)
    target = tmp_path / "export" / "composed"
    assert not target.exists()
    assert export_hf_model(comp, classifier, tokenizer, target) == target
    assert differing_tensors(classifier, theta0) == []  # export reverted the composition
    assert (target / "config.json").is_file() and (target / "deftx_composition.json").is_file()
    assert sorted(p for p in os.listdir(target.parent)) == ["composed"]  # no temp directories left
    config = json.loads((target / "config.json").read_text())
    assert {int(k): v for k, v in config["id2label"].items()} == dict(enumerate(LABELS))
    provenance = json.loads((target / "deftx_composition.json").read_text())
    assert provenance["base_fingerprint"] == task_sft.metadata.base_fingerprint
    card = (target / "README.md").read_text()   # the model card the Hub shows
    assert card.startswith("---\nlibrary_name: deftx\n") and "# Composed model (deftx)" in card
    assert f"+ phi_language ({lang_sft.metadata.language})" in card and ", ".join(LABELS) in card

    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with comp.applied(classifier), torch.no_grad():
        expected = classifier(**batch).logits
    with torch.no_grad():
        base_logits = classifier(**batch).logits

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_SCRIPT, str(target), json.dumps(texts)],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["missing"] == [] and out["unexpected"] == [] and out["deftx_loaded"] is False
    assert {int(k): v for k, v in out["id2label"].items()} == dict(enumerate(LABELS))
    got = torch.tensor(out["logits"])
    assert got.shape == (len(texts), len(LABELS))
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the SFTs did matter

    # atomic and non-clobbering: a second export without overwrite fails and leaves the first intact
    before = (target / "model.safetensors").read_bytes() if (target / "model.safetensors").exists() else None
    with pytest.raises(FileExistsError):
        export_hf_model(comp, classifier, tokenizer, target)
    assert differing_tensors(classifier, theta0) == []
    if before is not None:
        assert (target / "model.safetensors").read_bytes() == before
    export_hf_model(Composition(task_sft), classifier, tokenizer, target, overwrite=True)
    assert json.loads((target / "deftx_composition.json").read_text())["composition"].get("language") is None
    assert sorted(os.listdir(target.parent)) == ["composed"]
    assert differing_tensors(classifier, theta0) == []


def test_failed_export_leaves_no_directory(base_dir, task_sft, lang_sft, classifier, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(str(base_dir))
    theta0 = snapshot(classifier)

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    target = tmp_path / "composed"
    with pytest.raises(OSError, match="disk full"):
        export_hf_model(Composition(task_sft, lang_sft), classifier, tokenizer, target)
    assert not target.exists() and os.listdir(tmp_path) == []
    assert differing_tensors(classifier, theta0) == []
