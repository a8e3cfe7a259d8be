"""Import of composable-sft SFT files: safe reading (weights_only + a numpy allow-list) and a
conversion that applies bit for bit like composable-sft's own ``SFT.apply``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deftx.cli import main
from deftx.core.sft import SparseFineTuning
from deftx.interop.composable import (
    ALLOWED_GLOBALS,
    ComposableImportError,
    import_composable,
    infer_kind,
    read_composable,
)

LABELS = ["negative", "neutral", "positive"]


# -- composable-sft's format, written from its description -----------------------------------


def encode(dense_diff: torch.Tensor) -> dict:
    """A dense tensor's non-zeros as composable-sft encodes them: column-major flat indices (index =
    sum_i coord_i * prod(size[:i])) sorted and delta-encoded, the first a numpy int64."""
    sparse = dense_diff.to_sparse().coalesce()
    size = list(sparse.size())
    multipliers = np.cumprod([1] + size[:-1], dtype=np.int64)
    flat = multipliers @ sparse.indices().numpy().astype(np.int64)
    order = np.argsort(flat, kind="stable")
    flat = flat[order]
    steps = [] if flat.size == 0 else [flat[0]] + (flat[1:] - flat[:-1]).tolist()
    return {"size": sparse.size(), "index_steps": steps, "values": sparse.values()[torch.from_numpy(order)]}


def random_diffs(model, names: list[str], density: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        shape = params[name].shape
        keep = torch.rand(shape, generator=gen) < density
        out[name] = torch.where(keep, torch.randn(shape, generator=gen) * 1e-2, torch.zeros(shape))
    return out


def reference_apply(model, diffs: dict[str, torch.Tensor], absolute: dict[str, torch.Tensor]) -> None:
    """composable-sft's ``SFT.apply``: ``param += diff`` for each diff, then the absolute values."""
    with torch.no_grad():
        for name, diff in diffs.items():
            param = model.get_parameter(name)
            param += diff.to_sparse().coalesce()
        for name, value in absolute.items():
            model.get_parameter(name).copy_(value)


def write_file(directory: Path, diffs: dict[str, torch.Tensor], absolute: dict[str, torch.Tensor],
               layout: str = "diffs") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "diffs":
        content = {"diffs": {n: encode(d) for n, d in diffs.items()}, "abs": absolute}
    else:  # the older layout: sparse COO tensors under 'body', the head under 'head'
        content = {"body": {n: d.to_sparse().coalesce() for n, d in diffs.items()}, "head": absolute}
    torch.save(content, directory / "pytorch_diff.bin")
    return directory


def _classifier(model_dir):
    from deftx.models import load_classifier

    return load_classifier(str(model_dir), LABELS)


def _mlm(model_dir):
    from deftx.models import load_masked_lm

    return load_masked_lm(str(model_dir))[0]


def _task_file(tmp_path, model_dir, layout="diffs"):
    model = _classifier(model_dir)
    names = [n for n in dict(model.named_parameters()) if n.startswith("roberta.")]
    body = [n for n in names if "layer.0." in n or "embeddings" in n]   # includes LayerNorm and embeddings
    diffs = random_diffs(model, body, 0.05, seed=3)
    gen = torch.Generator().manual_seed(4)
    absolute = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()
                if n.startswith("classifier.")}
    return write_file(tmp_path / "task-sft", diffs, absolute, layout), diffs, absolute


def _all_equal(a, b) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["diffs", "body"])
def test_task_sft_import_applies_bit_for_bit(tmp_path, tiny_xlmr_dir, layout):
    source, diffs, absolute = _task_file(tmp_path, tiny_xlmr_dir, layout)
    content = read_composable(source)
    assert infer_kind(content) == "task"
    assert content.nnz == sum(int((d != 0).sum()) for d in diffs.values()) > 0
    out = tmp_path / "imported"
    code = main(["sft", "import-composable", str(source), "--model", str(tiny_xlmr_dir), "--output-dir", str(out),
                 "--labels", ",".join(LABELS), "--task", "sentiment", "--language", "ind"])
    assert code == 0
    sft = SparseFineTuning.load(out)
    assert sft.metadata.kind == "task" and sft.metadata.label_names == LABELS
    assert sft.metadata.task == "sentiment" and sft.metadata.language == "ind"
    assert sft.metadata.trained_on["imported_from"] == "composable-sft"
    assert sft.nnz == content.nnz and set(sft.head) == set(absolute)
    assert all(not n.startswith("roberta.") for n in sft.diffs)   # body names are relative, as deftx's

    expected, got = _classifier(tiny_xlmr_dir), _classifier(tiny_xlmr_dir)
    reference_apply(expected, diffs, absolute)
    sft.apply(got)
    _all_equal(expected, got)
    sft.revert(got)
    _all_equal(got, _classifier(tiny_xlmr_dir))


def test_language_sft_import_with_a_diff_on_the_head(tmp_path, tiny_xlmr_dir):
    model = _mlm(tiny_xlmr_dir)
    params = dict(model.named_parameters())
    body = [n for n in params if n.startswith("roberta.encoder.layer.1.")]
    diffs = random_diffs(model, body + ["lm_head.bias"], 0.1, seed=5)   # a sparse diff on a head tensor
    gen = torch.Generator().manual_seed(6)
    absolute = {n: torch.randn(params[n].shape, generator=gen) for n in ("lm_head.dense.weight", "lm_head.dense.bias")}
    source = write_file(tmp_path / "lang", diffs, absolute)
    assert infer_kind(read_composable(source)) == "language"
    sft = import_composable(source, str(tiny_xlmr_dir), tmp_path / "out", language="quy", log=lambda _: None)
    assert sft.metadata.kind == "language" and sft.metadata.language == "quy"
    assert "lm_head.bias" in sft.head and "lm_head.bias" not in sft.diffs

    expected = _mlm(tiny_xlmr_dir)
    reference_apply(expected, diffs, absolute)
    got = _mlm(tiny_xlmr_dir)
    SparseFineTuning.load(tmp_path / "out").apply(got)
    _all_equal(expected, got)


class _Payload:
    """Unpickling this runs ``_touch`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path: str) -> None:
    Path(path).write_text("ran")


def test_a_file_with_any_other_global_is_refused_before_unpickling(tmp_path, tiny_xlmr_dir, capsys):
    source, diffs, absolute = _task_file(tmp_path, tiny_xlmr_dir)
    content = torch.load(source / "pytorch_diff.bin", weights_only=False)
    marker = tmp_path / "code-ran"
    content["abs"]["classifier.note"] = _Payload(marker)
    torch.save(content, source / "pytorch_diff.bin")
    with pytest.raises(ComposableImportError, match=r"refusing to load: it references .*_touch") as info:
        read_composable(source)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    code = main(["sft", "import-composable", str(source), "--model", str(tiny_xlmr_dir), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and not marker.exists() and not (tmp_path / "o").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deftx: error: ") and "_touch" in err[0]


def test_the_allow_list_is_only_numpy_scalars_and_dtypes():
    assert all(name.startswith("numpy.") for name in ALLOWED_GLOBALS)
    assert {"numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"} <= set(ALLOWED_GLOBALS)


def test_malformed_files_are_refused_with_one_line(tmp_path, tiny_xlmr_dir):
    def refused(content, match, name):
        d = tmp_path / name
        d.mkdir()
        torch.save(content, d / "pytorch_diff.bin")
        with pytest.raises(ComposableImportError, match=match) as info:
            read_composable(d)
        assert "\n" not in str(info.value)

    values = torch.ones(2)
    refused({"diffs": {"w": {"size": torch.Size([2, 2]), "index_steps": [np.int64(1), 3], "values": values}}},
            "out of bounds", "bounds")
    refused({"diffs": {"w": {"size": torch.Size([2, 2]), "index_steps": [np.int64(1), 0], "values": values}}},
            "not strictly increasing", "order")
    refused({"diffs": {"w": {"size": torch.Size([2, 2]), "index_steps": [np.int64(1)], "values": values}}},
            "1 indices but 2 values", "count")
    refused({"weights": {}}, "not a composable-sft SFT", "keys")
    refused({"diffs": {}, "abs": {}}, "empty", "empty")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "pytorch_diff.bin").write_bytes(pickle.dumps({"diffs": {}}))
    with pytest.raises(ComposableImportError, match="zip format"):
        read_composable(tmp_path / "plain")
    with pytest.raises(ComposableImportError, match="file not found"):
        read_composable(tmp_path / "missing")


def test_a_tensor_the_model_does_not_have_is_refused(tmp_path, tiny_xlmr_dir, tiny_model_dir):
    source, _, _ = _task_file(tmp_path, tiny_xlmr_dir)
    with pytest.raises(ComposableImportError, match="not a body or head parameter of the model"):
        import_composable(source, str(tiny_model_dir), tmp_path / "out", log=lambda _: None)   # a BERT base
    assert not (tmp_path / "out").exists()


def test_import_from_a_hub_repository_in_the_cache(tmp_path, tiny_xlmr_dir, monkeypatch):
    """``import-composable ORG/NAME``: the file comes through the Hub cache (laid out as
    huggingface_hub stores it; offline, as every test)."""
    from helpers import cache_repo
    from huggingface_hub import constants

    source, diffs, absolute = _task_file(tmp_path, tiny_xlmr_dir)
    cache = tmp_path / "hub-cache"
    cache_repo(cache, "cambridgeltl/xlmr-task-sft-test", source)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "imported"
    assert main(["sft", "import-composable", "cambridgeltl/xlmr-task-sft-test", "--model", str(tiny_xlmr_dir),
                 "--output-dir", str(out)]) == 0
    expected, got = _classifier(tiny_xlmr_dir), _classifier(tiny_xlmr_dir)
    reference_apply(expected, diffs, absolute)
    sft = SparseFineTuning.load(out)
    assert sft.metadata.label_names == ["LABEL_0", "LABEL_1", "LABEL_2"]   # 3 classes from the classifier's shape
    sft.apply(got)
    _all_equal(expected, got)
