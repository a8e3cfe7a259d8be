"""Exact properties of the SFT artifact (deftx.core.sft): save/load round trip, bit-exact apply/revert,
extraction, compatibility checks, rejection of corrupt directories, atomic writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import (
    LABELS,
    differing_tensors,
    make_sft,
    random_delta,
    read_doc,
    read_weights,
    rewrite_weights,
    snapshot,
    update_checksum,
    write_doc,
)

from deftx.core.card import CARD_FILE
from deftx.core.fingerprint import base_fingerprint
from deftx.core.roles import body_parameters, maskable_parameters, parameter_roles
from deftx.core.sft import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    SFTMetadata,
    SparseDelta,
    SparseFineTuning,
    current_base_fingerprint,
    decode_indices,
    encode_indices,
    read_metadata,
)
from deftx.errors import SFTFormatError
from deftx.models import load_classifier, load_masked_lm

QUERY = "encoder.layer.0.attention.self.query.weight"
WORDS = "embeddings.word_embeddings.weight"


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def classifier(base_dir):
    return load_classifier(str(base_dir), LABELS, seed=0)


@pytest.fixture
def mlm(base_dir):
    model, _ = load_masked_lm(str(base_dir))
    return model


@pytest.fixture(scope="module")
def task_sft(base_dir) -> SparseFineTuning:
    return make_sft(load_classifier(str(base_dir), LABELS, seed=0), "task", seed=1)


@pytest.fixture(scope="module")
def lang_sft(base_dir) -> SparseFineTuning:
    model, _ = load_masked_lm(str(base_dir))
    return make_sft(model, "language", seed=2)


@pytest.fixture(scope="module")
def saved_task_dir(tmp_path_factory, task_sft) -> Path:
    return task_sft.save(tmp_path_factory.mktemp("saved") / "task-sft")


@pytest.fixture(scope="module")
def saved_task_dir_v1(tmp_path_factory, task_sft) -> Path:
    return task_sft.save(tmp_path_factory.mktemp("saved") / "task-sft-v1", format_version=1)


def _private_copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in (WEIGHTS_FILE, METADATA_FILE):
        (target / name).write_bytes((source / name).read_bytes())
    return target


@pytest.fixture
def corrupt_dir_v1(tmp_path, saved_task_dir_v1) -> Path:
    """A private, valid copy of the task SFT saved in format 1 for a test to damage."""
    return _private_copy(saved_task_dir_v1, tmp_path / "sft-v1")


@pytest.fixture
def corrupt_dir(tmp_path, saved_task_dir) -> Path:
    """A private, valid copy of the saved task SFT for a test to damage."""
    return _private_copy(saved_task_dir, tmp_path / "sft")


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"message is not one line: {message!r}"
    return message


# ------------------------------------------------------------------------------ round trip & exactness

FORMAT_1_FILE = Path(__file__).parent / "data" / "sft-format-1"  # written by deftx 0.1.0 (format 1)


def _format_1_content():
    """What the committed format-1 SFT holds (the generator its writer used)."""
    g = torch.Generator().manual_seed(7)
    diffs = {}
    for name, shape in {WORDS: (700, 200), QUERY: (16, 16)}.items():
        numel = shape[0] * shape[1]
        idx = torch.sort(torch.randperm(numel, generator=g)[: numel // 50]).values
        diffs[name] = (shape, idx, torch.randn(idx.numel(), generator=g))
    return diffs, {"classifier.bias": torch.randn(3, generator=g)}


def test_files_of_format_1_still_load_and_convert_to_format_2(tmp_path):
    """An SFT written by deftx 0.1.0 loads unchanged; saved again it is format 2, at about a
    third of the bytes per entry, and loads back to the same indices and values."""
    assert read_doc(FORMAT_1_FILE)["format_version"] == 1
    old = SparseFineTuning.load(FORMAT_1_FILE)
    diffs, head = _format_1_content()
    assert list(old.diffs) == sorted(diffs)
    for name, (shape, idx, values) in diffs.items():
        assert old.diffs[name].shape == shape
        assert torch.equal(old.diffs[name].indices, idx) and torch.equal(old.diffs[name].values, values)
    assert torch.equal(old.head["classifier.bias"], head["classifier.bias"])
    new_dir = old.save(tmp_path / "v2")
    assert read_doc(new_dir)["format_version"] == FORMAT_VERSION == 2
    assert "diff/" + WORDS + "/offsets" in read_weights(new_dir)
    new = SparseFineTuning.load(new_dir)
    for name in diffs:
        assert torch.equal(new.diffs[name].indices, old.diffs[name].indices)
        assert torch.equal(new.diffs[name].values, old.diffs[name].values)
    assert (new_dir / WEIGHTS_FILE).stat().st_size < 0.8 * (FORMAT_1_FILE / WEIGHTS_FILE).stat().st_size
    again = SparseFineTuning.load(new.save(tmp_path / "v1-again", format_version=1))
    assert all(torch.equal(again.diffs[n].indices, old.diffs[n].indices) for n in diffs)
    with pytest.raises(ValueError, match="format_version"):
        new.save(tmp_path / "v3", format_version=3)


@pytest.mark.parametrize("numel", [1, 7, 65_535, 65_536, 65_537, 200_001, 3 * 65_536])
def test_index_encoding_round_trips(numel):
    """Format 2's block/offset encoding is exact for any strictly increasing indices: block
    boundaries, the first and last entry, empty and full tensors."""
    g = torch.Generator().manual_seed(numel)
    cases = [torch.empty(0, dtype=torch.int64), torch.arange(numel), torch.tensor([0]), torch.tensor([numel - 1]),
             torch.sort(torch.randperm(numel, generator=g)[: max(1, numel // 3)]).values]
    edges = torch.tensor([i for i in (65_535, 65_536, 131_071, 131_072) if i < numel], dtype=torch.int64)
    cases.append(edges)
    for idx in cases:
        counts, offsets = encode_indices(idx, numel)
        assert counts.dtype == torch.int32 and offsets.dtype == torch.int16
        assert counts.numel() == -(-numel // 65_536) and int(counts.sum()) == idx.numel()
        assert torch.equal(decode_indices(counts, offsets), idx.to(torch.int64))




def test_save_load_round_trip_preserves_everything(saved_task_dir, task_sft):
    loaded = SparseFineTuning.load(saved_task_dir)
    assert loaded.source == str(saved_task_dir)
    assert list(loaded.diffs) == list(task_sft.diffs)
    for name, delta in task_sft.diffs.items():
        got = loaded.diffs[name]
        assert got.shape == delta.shape
        assert got.indices.dtype == torch.int64 and got.values.dtype == torch.float32
        assert torch.equal(got.indices, delta.indices)
        assert torch.equal(got.values, delta.values)
    assert list(loaded.head) == list(task_sft.head)
    for name, value in task_sft.head.items():
        assert torch.equal(loaded.head[name], value)
    assert loaded.nnz == task_sft.nnz > 0
    m, orig = loaded.metadata, task_sft.metadata
    for field in ("kind", "language", "task", "method", "selection", "base_model", "base_fingerprint",
                  "tokenizer", "label_names", "trained_on", "training", "metrics", "deftx_version"):
        assert getattr(m, field) == getattr(orig, field), field
    assert m.created and m.created == orig.created  # save filled in the creation time
    doc = read_metadata(saved_task_dir)
    assert doc["format"] == FORMAT_NAME and doc["format_version"] == FORMAT_VERSION
    assert doc["nnz"] == task_sft.nnz
    assert doc["tensors"][QUERY] == {"shape": list(task_sft.diffs[QUERY].shape), "nnz": task_sft.diffs[QUERY].nnz}


def test_apply_changes_exactly_the_indexed_entries_and_revert_is_bit_exact(saved_task_dir, classifier):
    sft = SparseFineTuning.load(saved_task_dir)
    theta0 = snapshot(classifier)
    body0 = {n: p.detach().clone() for n, p in body_parameters(classifier).items()}
    sft.apply(classifier)
    body = body_parameters(classifier)
    for name, param in body.items():
        now, before = param.detach().reshape(-1), body0[name].reshape(-1)
        if name not in sft.diffs:
            assert torch.equal(now, before), name
            continue
        delta = sft.diffs[name]
        assert torch.equal(now[delta.indices], before[delta.indices] + delta.values), name
        untouched = torch.ones(now.numel(), dtype=torch.bool)
        untouched[delta.indices] = False
        assert torch.equal(now[untouched], before[untouched]), name
    params = dict(classifier.named_parameters())
    for name, value in sft.head.items():
        assert torch.equal(params[name].detach(), value), name
    assert differing_tensors(classifier, theta0)  # something changed
    sft.revert(classifier)
    assert differing_tensors(classifier, theta0) == []


def test_every_maskable_tensor_is_covered_by_the_test_sft(task_sft, classifier):
    # guards the test above: the random SFT touches every maskable tensor and every head tensor
    assert set(task_sft.diffs) == set(maskable_parameters(classifier))
    assert set(task_sft.head) == set(parameter_roles(classifier, "task").head)


def test_language_sft_from_mlm_applies_to_classifier_body_without_head(lang_sft, classifier):
    theta0 = snapshot(classifier)
    lang_sft.apply(classifier, with_head=False)
    changed = differing_tensors(classifier, theta0)
    assert changed and all(n.startswith("bert.") and "pooler" not in n for n in changed)
    lang_sft.revert(classifier)
    assert differing_tensors(classifier, theta0) == []


# -------------------------------------------------------------------------------------------- extract


def test_extract_drops_small_and_unmasked_entries():
    start = {"a": torch.zeros(2, 5), "b": torch.randn(4, generator=torch.Generator().manual_seed(0))}
    trained = {"a": torch.tensor([[1e-7, -1e-7, 5e-8, 2e-7, 0.5],
                                  [-0.25, 3.0, 0.0, -2e-7, 7.0]]),
               "b": start["b"] + torch.tensor([1.0, -1.0, 0.0, 2.0])}
    masks = {"a": torch.tensor([[True, True, True, True, True],
                                [True, True, True, True, False]]),  # 7.0 is outside the mask
             "b": torch.tensor([False, True, True, True])}
    head = {"classifier.weight": torch.randn(3, 4)}
    meta = SFTMetadata(kind="task", label_names=list(LABELS))
    sft = SparseFineTuning.extract(start, trained, masks, head, meta)
    a, b = sft.diffs["a"], sft.diffs["b"]
    assert a.shape == (2, 5) and b.shape == (4,)
    assert a.indices.tolist() == [3, 4, 5, 6, 8]
    assert a.values.tolist() == trained["a"].reshape(-1)[[3, 4, 5, 6, 8]].tolist()
    assert b.indices.tolist() == [1, 3]
    assert torch.equal(b.values, (trained["b"] - start["b"])[[1, 3]])
    for delta in (a, b):
        assert delta.indices.dtype == torch.int64 and delta.values.dtype == torch.float32
        assert torch.all(delta.indices[1:] > delta.indices[:-1])
    assert torch.equal(sft.head["classifier.weight"], head["classifier.weight"])
    assert sft.head["classifier.weight"].data_ptr() != head["classifier.weight"].data_ptr()  # a copy
    assert sft.nnz == 7


def test_extract_from_masked_entries_equals_extract_from_whole_tensors():
    """What K-sized phase 2 hands over (positions, start and trained values at the mask) gives the
    SFT that ``extract`` gives from the whole tensors, bit for bit: same drops, same values."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"w": (7, 9), "b": (9,), "none": (4, 3)}
    start = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    masks = {n: torch.rand(s, generator=gen) < 0.4 for n, s in shapes.items()}
    masks["none"][:] = False                                  # a tensor without any selected entry
    trained = {n: t + torch.randn(t.shape, generator=gen) * masks[n] for n, t in start.items()}
    trained["w"].view(-1)[masks["w"].view(-1).nonzero()[:3, 0]] = start["w"].view(-1)[
        masks["w"].view(-1).nonzero()[:3, 0]] + 5e-8          # changes at most 1e-7: dropped by both
    entries = {}
    for n, t in start.items():
        index = masks[n].view(-1).nonzero().view(-1)
        entries[n] = (shapes[n], index, t.view(-1)[index], trained[n].view(-1)[index])
    head = {"classifier.weight": torch.randn(3, 4, generator=gen)}
    whole = SparseFineTuning.extract(start, trained, masks, head, SFTMetadata(kind="task"))
    parts = SparseFineTuning.extract_entries(entries, head, SFTMetadata(kind="task"))
    assert list(parts.diffs) == list(whole.diffs) == sorted(shapes)
    for name, delta in whole.diffs.items():
        assert parts.diffs[name].shape == delta.shape
        assert torch.equal(parts.diffs[name].indices, delta.indices), name
        assert torch.equal(parts.diffs[name].values, delta.values), name
    assert whole.diffs["none"].nnz == 0 and whole.diffs["w"].nnz == int(masks["w"].sum()) - 3
    assert torch.equal(parts.head["classifier.weight"], head["classifier.weight"])



def test_extract_then_apply_reproduces_trained_weights_on_masked_entries(classifier):
    params = maskable_parameters(classifier)
    start = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.1 for n, p in params.items()}
    trained = {n: start[n] + torch.randn(start[n].shape, generator=gen) * masks[n] for n in params}
    sft = SparseFineTuning.extract(start, trained, masks, {}, SFTMetadata(kind="language"))
    for name, delta in sft.diffs.items():
        assert torch.equal(delta.indices, torch.nonzero(masks[name].reshape(-1) & (trained[name] != start[name]).reshape(-1)).flatten())
    sft.apply(classifier)
    for name, p in params.items():
        assert torch.allclose(p.detach(), trained[name], atol=1e-6), name


# ----------------------------------------------------------------------------- stacking apply / revert


def test_two_sfts_revert_out_of_order_raises_and_in_order_restores(task_sft, lang_sft, classifier):
    theta0 = snapshot(classifier)
    task_sft.apply(classifier)
    after_task = snapshot(classifier)
    lang_sft.apply(classifier, with_head=False)
    after_both = snapshot(classifier)
    with pytest.raises(SFTFormatError) as err:
        task_sft.revert(classifier)
    assert "out of order" in _one_line(err)
    assert differing_tensors(classifier, after_both) == []  # the failed revert changed nothing
    lang_sft.revert(classifier)
    assert differing_tensors(classifier, after_task) == []
    task_sft.revert(classifier)
    assert differing_tensors(classifier, theta0) == []
    with pytest.raises(SFTFormatError) as err:  # nothing left to revert
        task_sft.revert(classifier)
    assert "not applied" in _one_line(err)


def test_revert_of_never_applied_sft_raises(task_sft, lang_sft, classifier):
    with pytest.raises(SFTFormatError) as err:
        task_sft.revert(classifier)
    assert "not applied" in _one_line(err)
    lang_sft.apply(classifier, with_head=False)
    applied = snapshot(classifier)
    with pytest.raises(SFTFormatError):
        task_sft.revert(classifier)
    assert differing_tensors(classifier, applied) == []
    lang_sft.revert(classifier)


def test_applying_the_same_sft_twice_stacks_and_reverts(lang_sft, classifier):
    theta0 = snapshot(classifier)
    lang_sft.apply(classifier, with_head=False)
    once = snapshot(classifier)
    lang_sft.apply(classifier, with_head=False)
    lang_sft.revert(classifier)
    assert differing_tensors(classifier, once) == []
    lang_sft.revert(classifier)
    assert differing_tensors(classifier, theta0) == []


def test_applied_context_manager_restores_when_body_raises(task_sft, classifier):
    theta0 = snapshot(classifier)
    with pytest.raises(KeyError, match="inside"):
        with task_sft.applied(classifier) as model:
            assert model is classifier
            assert differing_tensors(classifier, theta0)
            raise KeyError("inside")
    assert differing_tensors(classifier, theta0) == []
    with task_sft.applied(classifier):  # the stack is clean: it can be applied again
        pass
    assert differing_tensors(classifier, theta0) == []


def test_fingerprint_is_shared_by_mlm_and_classifier_and_restored_after_revert(task_sft, classifier, mlm):
    fp = current_base_fingerprint(classifier)
    assert fp == current_base_fingerprint(mlm) == base_fingerprint(classifier) == task_sft.metadata.base_fingerprint
    task_sft.apply(classifier)
    assert current_base_fingerprint(classifier) == fp  # the base, not the current weights
    assert base_fingerprint(classifier) != fp
    task_sft.revert(classifier)
    assert current_base_fingerprint(classifier) == fp == base_fingerprint(classifier)


# ------------------------------------------------------------------------------ compatibility checks


def test_base_fingerprint_mismatch_is_rejected(other_base_dir, task_sft, classifier):
    other = load_classifier(str(other_base_dir), LABELS, seed=0)
    assert {n: p.shape for n, p in other.named_parameters()} == {n: p.shape for n, p in classifier.named_parameters()}
    foreign = SparseFineTuning(task_sft.diffs, task_sft.head, SFTMetadata(
        kind="task", base_model="other", base_fingerprint=current_base_fingerprint(other), label_names=LABELS))
    theta0 = snapshot(classifier)
    with pytest.raises(SFTFormatError) as err:
        foreign.apply(classifier)
    assert "fingerprint" in _one_line(err)
    assert differing_tensors(classifier, theta0) == []
    foreign.apply(classifier, check_base=False)  # explicitly skipping the check works
    foreign.revert(classifier)
    assert differing_tensors(classifier, theta0) == []


def _wrong_shape(model):
    shape = tuple(body_parameters(model)[QUERY].shape)
    return {QUERY: random_delta((shape[0], shape[1] + 1), 5, torch.Generator().manual_seed(0))}, {}, QUERY


def _unknown_tensor(model):
    name = "encoder.layer.7.attention.self.query.weight"
    return {name: random_delta((32, 32), 5, torch.Generator().manual_seed(0))}, {}, name


def _wrong_head_shape(model):
    return {}, {"classifier.weight": torch.zeros(2, 32), "classifier.bias": torch.zeros(2)}, "classifier.bias"


def _head_not_in_model(model):
    return {}, {"cls.predictions.bias": torch.zeros(10)}, "cls.predictions.bias"


@pytest.mark.parametrize("make, fragment", [
    (_wrong_shape, "shape"),
    (_unknown_tensor, "does not exist"),
    (_wrong_head_shape, "shape"),
    (_head_not_in_model, "does not exist"),
], ids=["body-shape", "unknown-body-tensor", "head-shape", "head-missing"])
def test_incompatible_sft_is_rejected_naming_the_tensor(classifier, make, fragment):
    diffs, head, culprit = make(classifier)
    sft = SparseFineTuning(diffs, head, SFTMetadata(kind="task", base_fingerprint=current_base_fingerprint(classifier)))
    theta0 = snapshot(classifier)
    with pytest.raises(SFTFormatError) as err:
        sft.apply(classifier)
    message = _one_line(err)
    assert f"'{culprit}'" in message and fragment in message
    assert differing_tensors(classifier, theta0) == []


def test_task_sft_head_on_mlm_model_is_rejected(task_sft, mlm):
    theta0 = snapshot(mlm)
    with pytest.raises(SFTFormatError) as err:
        task_sft.apply(mlm)  # with_head=True: the classifier head does not exist in an MLM model
    message = _one_line(err)
    assert any(f"'{name}'" in message for name in task_sft.head) and "does not exist" in message
    assert differing_tensors(mlm, theta0) == []
    task_sft.apply(mlm, with_head=False)  # the body part alone is fine
    task_sft.revert(mlm)
    assert differing_tensors(mlm, theta0) == []


@pytest.mark.parametrize("body_name", [f"bert.{WORDS}", "bert.embeddings.LayerNorm.weight",
                                       f"bert.{QUERY}"])
def test_a_head_may_not_set_a_body_weight(task_sft, classifier, body_name):
    """Built in memory (so the load-time check is bypassed): apply still refuses a head tensor that
    names a body weight, and the model is untouched; the base fingerprint alone would not notice."""
    params = dict(classifier.named_parameters())
    head = {**task_sft.head, body_name: torch.zeros_like(params[body_name])}
    sft = SparseFineTuning(task_sft.diffs, head, task_sft.metadata)
    theta0 = snapshot(classifier)
    with pytest.raises(SFTFormatError) as err:
        sft.apply(classifier)
    message = _one_line(err)
    assert f"head tensor '{body_name}' names a body or frozen weight" in message
    assert differing_tensors(classifier, theta0) == []


def test_language_sft_with_head_on_classifier_is_rejected(lang_sft, classifier):
    theta0 = snapshot(classifier)
    with pytest.raises(SFTFormatError) as err:
        lang_sft.apply(classifier, with_head=True)
    message = _one_line(err)
    assert "'cls.predictions." in message and "with_head=False" in message
    assert differing_tensors(classifier, theta0) == []


# ---------------------------------------------------------------------------------- corrupt directories


def _remove_dir(d: Path):
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    return d, "not a directory"


def _remove_json(d: Path):
    (d / METADATA_FILE).unlink()
    return d / METADATA_FILE, "missing"


def _json_garbage(d: Path):
    (d / METADATA_FILE).write_text('{"format": "deftx-sft", ', encoding="utf-8")
    return d / METADATA_FILE, "invalid JSON"


def _wrong_format(d: Path):
    doc = read_doc(d)
    doc["format"] = "composable-sft"
    write_doc(d, doc)
    return d / METADATA_FILE, "not a deftx SFT"


def _json_not_object(d: Path):
    (d / METADATA_FILE).write_text("[1, 2]", encoding="utf-8")
    return d / METADATA_FILE, "not a deftx SFT"


def _future_version(d: Path):
    doc = read_doc(d)
    doc["format_version"] = FORMAT_VERSION + 1
    write_doc(d, doc)
    return d / METADATA_FILE, "unsupported format_version"


def _bad_kind(d: Path):
    doc = read_doc(d)
    doc["kind"] = "adapter"
    write_doc(d, doc)
    return d / METADATA_FILE, "kind"


def _remove_weights(d: Path):
    (d / WEIGHTS_FILE).unlink()
    return d / WEIGHTS_FILE, "missing"


def _truncate_weights(d: Path):
    data = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    return d / WEIGHTS_FILE, "checksum mismatch"


def _garbage_weights(d: Path):
    (d / WEIGHTS_FILE).write_bytes(b"\x00garbage, not safetensors\n" * 10)
    update_checksum(d)
    return d / WEIGHTS_FILE, "not a readable safetensors file"


def _huge_header_weights(d: Path):
    (d / WEIGHTS_FILE).write_bytes((10**12).to_bytes(8, "little") + b"{}")
    update_checksum(d)
    return d / WEIGHTS_FILE, "not a readable safetensors file"


def _doc_edit(key, value, fragment):
    """A case that sets ``key`` of sft.json (``tensors.<first>.nnz`` reaches into the table)."""
    def corrupt(d: Path):
        doc = read_doc(d)
        if key == "tensors.nnz":
            doc["tensors"][next(iter(doc["tensors"]))]["nnz"] = value
        elif value is _DELETE:
            del doc[key]
        else:
            doc[key] = value
        write_doc(d, doc)
        return d / METADATA_FILE, fragment
    corrupt.__name__ = f"_{key.replace('.', '_')}_{'deleted' if value is _DELETE else type(value).__name__}"
    return corrupt


_DELETE = object()
SCHEMA_CASES = [
    _doc_edit("base_fingerprint", 12345, "'base_fingerprint' must be a string"),
    _doc_edit("label_names", 3, "'label_names' must be a list or null"),
    _doc_edit("label_names", "pos", "'label_names' must be a list or null"),
    _doc_edit("label_names", ["pos", "pos"], "distinct non-empty strings"),
    _doc_edit("label_names", ["pos", 3], "distinct non-empty strings"),
    _doc_edit("tensors.nnz", "55", "needs an integer 'nnz'"),
    _doc_edit("tensors.nnz", True, "needs an integer 'nnz'"),
    _doc_edit("nnz", "55", "'nnz' must be an integer"),
    _doc_edit("weights_sha256", _DELETE, "no 'weights_sha256'"),
    _doc_edit("weights_sha256", 7, "'weights_sha256' must be 64 lowercase hex digits"),
    _doc_edit("weights_file", "../elsewhere.safetensors", "'weights_file' must be 'sft.safetensors'"),
    _doc_edit("selection", ["lt_sft"], "'selection' must be an object"),
    _doc_edit("language", 5, "'language' must be a string or null"),
    _doc_edit("metrics", "good", "'metrics' must be an object"),
]

FILE_CASES = [_remove_dir, _remove_json, _json_garbage, _wrong_format, _json_not_object, _future_version,
              _bad_kind, _remove_weights, _truncate_weights, _garbage_weights, _huge_header_weights, *SCHEMA_CASES]


@pytest.mark.parametrize("corrupt", FILE_CASES, ids=[f.__name__.strip("_") for f in FILE_CASES])
def test_corrupt_files_are_rejected(corrupt_dir, corrupt):
    path, fragment = corrupt(corrupt_dir)
    with pytest.raises(SFTFormatError) as err:
        SparseFineTuning.load(corrupt_dir)
    message = _one_line(err)
    assert str(path) in message and fragment in message


# crafted safetensors: (tensors, doc, diff name T, head name H) -> expected message fragment


def _idx(t, n):
    return t[f"diff/{n}/indices"]


def _c_out_of_bounds(t, doc, T, H):
    _idx(t, T)[-1] = math.prod(doc["tensors"][T]["shape"])
    return "index out of bounds"


def _c_negative(t, doc, T, H):
    _idx(t, T)[0] = -1
    return "index out of bounds"


def _repeat_first(key: str, name: str):
    """A corruption that repeats the first stored index (format 1 ``indices``, format 2 ``offsets``)."""
    def corrupt(t, doc, T, H):
        stored = t[f"diff/{T}/{key}"]
        stored[1] = stored[0]
        return "duplicate indices"
    corrupt.__name__ = name
    return corrupt


def _swap_first_two(key: str, name: str):
    """A corruption that swaps the first two stored indices."""
    def corrupt(t, doc, T, H):
        stored = t[f"diff/{T}/{key}"]
        stored[0], stored[1] = stored[1].clone(), stored[0].clone()
        return "unsorted indices"
    corrupt.__name__ = name
    return corrupt


_c_duplicate = _repeat_first("indices", "_c_duplicate")
_c_unsorted = _swap_first_two("indices", "_c_unsorted")


def _retyped(key: str, dtype: torch.dtype, fragment: str, name: str):
    """A corruption that stores one of the index tensors with another dtype."""
    def corrupt(t, doc, T, H):
        t[f"diff/{T}/{key}"] = t[f"diff/{T}/{key}"].to(dtype)
        return fragment
    corrupt.__name__ = name
    return corrupt


_c_int32 = _retyped("indices", torch.int32, "int64", "_c_int32")


def _c_2d_indices(t, doc, T, H):
    t[f"diff/{T}/indices"] = _idx(t, T)[:2].reshape(1, 2)
    doc["tensors"][T]["nnz"] = 2
    t[f"diff/{T}/values"] = t[f"diff/{T}/values"][:2]
    return "1-D int64"


def _c_float64(t, doc, T, H):
    t[f"diff/{T}/values"] = t[f"diff/{T}/values"].double()
    return "float32"


def _c_length_mismatch(t, doc, T, H):
    t[f"diff/{T}/values"] = t[f"diff/{T}/values"][:-1]
    return "indices but"


def _c_nnz_mismatch(t, doc, T, H):
    doc["tensors"][T]["nnz"] += 1
    return f"{METADATA_FILE} says"


def _c_head_shape(t, doc, T, H):
    t[f"head/{H}"] = torch.zeros(t[f"head/{H}"].numel() + 1)
    return "has shape"


def _c_head_float64(t, doc, T, H):
    t[f"head/{H}"] = t[f"head/{H}"].double()
    return "float32"


def _c_missing_values(t, doc, T, H):
    del t[f"diff/{T}/values"]
    return "missing its indices or values"


def _c_missing_indices(t, doc, T, H):
    del t[f"diff/{T}/indices"]
    return "missing its indices or values"


def _c_missing_head(t, doc, T, H):
    del t[f"head/{H}"]
    return "is missing"


def _c_extra_tensor(t, doc, T, H):
    t["diff/encoder.layer.9.output.dense.weight/indices"] = torch.tensor([0, 1], dtype=torch.int64)
    return "unexpected tensor 'diff/encoder.layer.9.output.dense.weight/indices'"


def _c_nan(t, doc, T, H):
    t[f"diff/{T}/values"][1] = float("nan")
    return "non-finite"


def _c_inf(t, doc, T, H):
    t[f"diff/{T}/values"][-1] = float("-inf")
    return "non-finite"


def _c_bad_shape_entry(t, doc, T, H):
    doc["tensors"][T]["shape"] = [32, -1]
    return "invalid shape"


def _c_total_nnz(t, doc, T, H):
    doc["nnz"] += 1
    return f"{METADATA_FILE} says"


def _c_head_is_word_embeddings(t, doc, T, H):
    """A head tensor named after a body weight would overwrite it on apply."""
    name = f"bert.{WORDS}"
    t[f"head/{name}"] = torch.zeros(4, 2)
    doc["head"][name] = {"shape": [4, 2]}
    return f"head tensor '{name}' names a body weight"


def _c_head_is_a_layer_norm(t, doc, T, H):
    name = "bert.embeddings.LayerNorm.weight"
    t[f"head/{name}"] = torch.zeros(2)
    doc["head"][name] = {"shape": [2]}
    return f"head tensor '{name}' names a body weight"


CRAFTED = [_c_out_of_bounds, _c_negative, _c_duplicate, _c_unsorted, _c_int32, _c_2d_indices, _c_float64,
           _c_length_mismatch, _c_nnz_mismatch, _c_head_shape, _c_head_float64, _c_missing_values,
           _c_missing_indices, _c_missing_head, _c_extra_tensor, _c_nan, _c_inf, _c_bad_shape_entry, _c_total_nnz,
           _c_head_is_word_embeddings, _c_head_is_a_layer_norm]


def _check_crafted(directory: Path, corrupt, index_key: str) -> None:
    tensors, doc = read_weights(directory), read_doc(directory)
    # sanity: the untouched copy loads
    SparseFineTuning.load(directory)
    T, H = QUERY, "classifier.bias"
    assert f"diff/{T}/{index_key}" in tensors and f"head/{H}" in tensors and doc["tensors"][T]["nnz"] >= 3
    fragment = corrupt(tensors, doc, T, H)
    rewrite_weights(directory, tensors, doc)
    with pytest.raises(SFTFormatError) as err:
        SparseFineTuning.load(directory)
    message = _one_line(err)
    assert str(directory / WEIGHTS_FILE) in message
    assert fragment in message
    names_other = (_c_extra_tensor, _c_total_nnz, _c_head_is_word_embeddings, _c_head_is_a_layer_norm,
                   _v2_stray_v1_indices)
    if corrupt not in names_other:
        assert f"'{H}'" in message if "head" in corrupt.__name__ else f"'{T}'" in message


@pytest.mark.parametrize("corrupt", CRAFTED, ids=[f.__name__[3:] for f in CRAFTED])
def test_crafted_weights_are_rejected_format_1(corrupt_dir_v1, corrupt):
    _check_crafted(corrupt_dir_v1, corrupt, "indices")


# format 2: indices are (entries per 65,536-block as int32, offset in the block - 32768 as int16)


def _off(t, n):
    return t[f"diff/{n}/offsets"]


def _v2_out_of_bounds(t, doc, T, H):
    numel = math.prod(doc["tensors"][T]["shape"])
    assert numel < 1 << 16  # one block: an offset >= numel is past the end
    _off(t, T)[-1] = numel - (1 << 15)
    return "index out of bounds"


_v2_duplicate = _repeat_first("offsets", "_v2_duplicate")
_v2_unsorted = _swap_first_two("offsets", "_v2_unsorted")


_v2_offsets_int32 = _retyped("offsets", torch.int32, "1-D int16", "_v2_offsets_int32")
_v2_blocks_int64 = _retyped("blocks", torch.int64, "int32 counts", "_v2_blocks_int64")


def _v2_blocks_length(t, doc, T, H):
    t[f"diff/{T}/blocks"] = torch.cat([t[f"diff/{T}/blocks"], torch.zeros(1, dtype=torch.int32)])
    return "int32 counts"


def _v2_negative_count(t, doc, T, H):
    b = t[f"diff/{T}/blocks"]
    b[0] = -b[0]
    return "negative block count"


def _v2_count_mismatch(t, doc, T, H):
    t[f"diff/{T}/blocks"][0] += 1
    return "count"


def _v2_missing_offsets(t, doc, T, H):
    del t[f"diff/{T}/offsets"]
    return "missing its indices or values"


def _v2_stray_v1_indices(t, doc, T, H):
    t[f"diff/{T}/indices"] = torch.tensor([0, 1], dtype=torch.int64)
    return f"unexpected tensor 'diff/{T}/indices'"


CRAFTED_V2 = [_v2_out_of_bounds, _v2_duplicate, _v2_unsorted, _v2_offsets_int32, _v2_blocks_int64,
              _v2_blocks_length, _v2_negative_count, _v2_count_mismatch, _v2_missing_offsets, _v2_stray_v1_indices,
              _c_float64, _c_length_mismatch, _c_nnz_mismatch, _c_head_shape, _c_head_float64, _c_missing_values,
              _c_missing_head, _c_extra_tensor, _c_nan, _c_inf, _c_bad_shape_entry, _c_total_nnz,
              _c_head_is_word_embeddings, _c_head_is_a_layer_norm]


@pytest.mark.parametrize("corrupt", CRAFTED_V2, ids=[f.__name__.split("_", 2)[2] for f in CRAFTED_V2])
def test_crafted_weights_are_rejected_format_2(corrupt_dir, corrupt):
    _check_crafted(corrupt_dir, corrupt, "offsets")


# ---------------------------------------------------------------------------------------- atomic writes


def test_failed_save_leaves_no_directory_and_no_temp(tmp_path, task_sft, monkeypatch):
    import safetensors.torch

    calls = []

    def broken_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    parent = tmp_path / "out"
    parent.mkdir()
    target = parent / "sft"
    with pytest.raises(OSError, match="disk full"):
        task_sft.save(target)
    assert calls, "deftx.core.sft.save did not go through safetensors.torch.save_file"
    assert not target.exists()
    assert sorted(os.listdir(parent)) == []


def test_failed_overwrite_keeps_the_old_sft(tmp_path, task_sft, lang_sft, monkeypatch):
    import safetensors.torch

    target = tmp_path / "sft"
    lang_sft.save(target)
    before = {f: (target / f).read_bytes() for f in (WEIGHTS_FILE, METADATA_FILE)}

    def broken_save_file(tensors, filename, metadata=None):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(RuntimeError):
        task_sft.save(target, overwrite=True)
    assert {f: (target / f).read_bytes() for f in (WEIGHTS_FILE, METADATA_FILE)} == before
    assert sorted(os.listdir(tmp_path)) == ["sft"]


def test_save_refuses_to_overwrite_unless_asked(tmp_path, task_sft, lang_sft):
    target = tmp_path / "sft"
    assert lang_sft.save(target) == target
    with pytest.raises(FileExistsError):
        task_sft.save(target)
    assert SparseFineTuning.load(target).metadata.kind == "language"
    task_sft.save(target, overwrite=True)
    loaded = SparseFineTuning.load(target)
    assert loaded.metadata.kind == "task" and loaded.nnz == task_sft.nnz
    assert sorted(os.listdir(tmp_path)) == ["sft"]  # no .tmp-/.old- leftovers
    assert sorted(os.listdir(target)) == sorted([WEIGHTS_FILE, METADATA_FILE, CARD_FILE])
    assert json.loads((target / METADATA_FILE).read_text())["kind"] == "task"
    assert "# Task SFT:" in (target / CARD_FILE).read_text()   # the card is replaced with the SFT


# ------------------------------------------------------------------------- fingerprint cache


def test_fingerprint_cache_is_not_stale_after_unchecked_apply(task_sft, classifier):
    fp_theta0 = current_base_fingerprint(classifier)
    with torch.no_grad():
        body_parameters(classifier)[QUERY].data[0, 0] += 1.0  # the base weights change (e.g. training)
    task_sft.apply(classifier, check_base=False)
    task_sft.revert(classifier)
    assert base_fingerprint(classifier) != fp_theta0
    assert current_base_fingerprint(classifier) == base_fingerprint(classifier)


def test_checked_apply_after_unchecked_apply(task_sft, lang_sft, classifier):
    theta0 = snapshot(classifier)
    unchecked = SparseFineTuning(lang_sft.diffs, {}, SFTMetadata(kind="language"))
    unchecked.apply(classifier, with_head=False, check_base=False)
    task_sft.apply(classifier)  # same base: must succeed
    task_sft.revert(classifier)
    unchecked.revert(classifier)
    assert differing_tensors(classifier, theta0) == []


@pytest.mark.parametrize("version", [1, 2])
def test_empty_tensors_between_others_round_trip(tmp_path, version):
    """A tensor with no entries at all (shape with a 0) among others: format 2's per-tensor block
    counts line up, and both formats load back what was saved."""
    g = torch.Generator().manual_seed(4)
    diffs = {}
    for name, shape in {"a.empty": (0, 4), "b.weight": (300, 400), "c.empty": (0,), "d.weight": (70_000,)}.items():
        numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
        idx = torch.sort(torch.randperm(numel, generator=g)[: numel // 7]).values
        diffs[name] = SparseDelta(shape, idx, torch.randn(idx.numel(), generator=g))
    sft = SparseFineTuning(diffs, {}, SFTMetadata(kind="language", language="xyz"))
    loaded = SparseFineTuning.load(sft.save(tmp_path / "sft", format_version=version))
    for name, delta in diffs.items():
        assert loaded.diffs[name].shape == delta.shape
        assert torch.equal(loaded.diffs[name].indices, delta.indices)
        assert torch.equal(loaded.diffs[name].values, delta.values)
