"""Shared helpers for the SFT / composition tests: tiny models, random sparse SFTs, weight snapshots
and tools to craft corrupt SFT directories. Plain functions (fixtures live in the test modules)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from deftx.core.io import sha256_file
from deftx.core.roles import body_parameters, maskable_parameters, parameter_roles
from deftx.core.sft import (
    METADATA_FILE,
    WEIGHTS_FILE,
    SFTMetadata,
    SparseDelta,
    SparseFineTuning,
    current_base_fingerprint,
)
from deftx.data.nusax import load_nusax_mt_text
from deftx.models import create_tiny_model

LABELS = ["negative", "neutral", "positive"]


def tiny_texts(lines: int = 300) -> list[str]:
    """Real NusaX text (Indonesian, Javanese, Sundanese) for training the tiny tokenizer."""
    texts: list[str] = []
    for lang in ("ind", "jav", "sun"):
        texts.extend(load_nusax_mt_text(lang)[: lines // 3])
    return texts


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    return create_tiny_model(directory, tiny_texts(), seed=seed)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def differing_tensors(model: nn.Module, reference: dict[str, torch.Tensor]) -> list[str]:
    """Names of state_dict tensors that are not bit-identical (torch.equal) to ``reference``."""
    current = model.state_dict()
    assert set(current) == set(reference)
    return sorted(k for k in reference if not torch.equal(current[k], reference[k]))


def random_delta(shape: tuple[int, ...], nnz: int, gen: torch.Generator,
                 indices: torch.Tensor | None = None) -> SparseDelta:
    numel = 1
    for s in shape:
        numel *= s
    if indices is None:
        indices = torch.randperm(numel, generator=gen)[: min(nnz, numel)]
    indices = torch.sort(indices.to(torch.int64)).values
    values = torch.randn(indices.numel(), generator=gen, dtype=torch.float32) * 0.1
    return SparseDelta(tuple(shape), indices, values)


def random_diffs(model: nn.Module, seed: int, density: float = 0.05,
                 names: list[str] | None = None) -> dict[str, SparseDelta]:
    """Random sparse diffs over the maskable body tensors of ``model`` (body-relative names)."""
    gen = torch.Generator().manual_seed(seed)
    params = maskable_parameters(model)
    names = sorted(params) if names is None else names
    out = {}
    for name in names:
        shape = tuple(params[name].shape)
        numel = params[name].numel()
        out[name] = random_delta(shape, max(3, int(numel * density)), gen)
    return out


def random_head(model: nn.Module, kind: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(tuple(p.shape), generator=gen, dtype=torch.float32)
            for n, p in parameter_roles(model, kind).head.items()}


def make_sft(model: nn.Module, kind: str, seed: int, *, head_model: nn.Module | None = None,
             fingerprint: str | None = None, density: float = 0.05,
             diffs: dict[str, SparseDelta] | None = None) -> SparseFineTuning:
    """A hand-built SFT over ``model``'s body. The head is taken from ``head_model`` (default: ``model``)."""
    head_model = model if head_model is None else head_model
    meta = SFTMetadata(
        kind=kind,
        language="jav" if kind == "language" else None,
        task="nusax_senti" if kind == "task" else None,
        base_model="tiny-test-model",
        base_fingerprint=current_base_fingerprint(model) if fingerprint is None else fingerprint,
        tokenizer="tiny-test-model",
        label_names=list(LABELS) if kind == "task" else None,
        selection={"kind": "lt_sft", "k": 123},
        trained_on={"language_sft": "/somewhere/lang-ind"},
        training={"steps": 7, "lr": 5e-05},
        metrics={"dev_f1": 0.5},
    )
    return SparseFineTuning(random_diffs(model, seed, density) if diffs is None else diffs,
                            random_head(head_model, kind, seed + 1000), meta)


# -- distributed workers -------------------------------------------------------------------------


@contextmanager
def loopback_group(rank: int, world: int, store: str) -> Iterator[None]:
    """A spawned rank's gloo group for the block, which must be the rank's last work.

    On success the ranks meet at a barrier, destroy the group and the rank leaves at once with
    ``os._exit(0)``: its results are on disk, and the interpreter's teardown of native gloo and
    DeepSpeed objects can abort a rank under load ("terminate called without an active exception"
    with no Python frame, twice in CI runs of test_subnetworks_deepspeed), an exit race in those
    libraries rather than anything under test. On failure the group is destroyed at once (a
    barrier would wait for the failed peer) and the exception reaches ``mp.spawn`` as usual."""
    import os
    import sys

    import torch.distributed as dist

    join_loopback_group(rank, world, store)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def join_loopback_group(rank: int, world: int, store: str) -> None:
    """Join a gloo group bound to loopback, with a file-store rendezvous (no TCP listener)."""
    import faulthandler
    import os

    import torch.distributed as dist

    faulthandler.enable(all_threads=True)   # a native crash in a spawned rank prints its Python stacks
    os.environ.update(GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


# -- crafting corrupt SFT directories ------------------------------------------------------------


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(str(directory / WEIGHTS_FILE)))


def read_doc(directory: Path) -> dict:
    return json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))


def write_doc(directory: Path, doc: dict) -> None:
    (directory / METADATA_FILE).write_text(json.dumps(doc, indent=2), encoding="utf-8")


def rewrite_weights(directory: Path, tensors: dict[str, torch.Tensor], doc: dict | None = None) -> None:
    """Replace sft.safetensors with ``tensors`` and update ``weights_sha256`` (and the rest of ``doc``)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE))
    doc = read_doc(directory) if doc is None else doc
    doc["weights_sha256"] = sha256_file(directory / WEIGHTS_FILE)
    write_doc(directory, doc)


def update_checksum(directory: Path) -> None:
    doc = read_doc(directory)
    doc["weights_sha256"] = sha256_file(directory / WEIGHTS_FILE)
    write_doc(directory, doc)


__all__ = [
    "LABELS",
    "body_parameters",
    "build_tiny_model",
    "differing_tensors",
    "join_loopback_group",
    "make_sft",
    "random_delta",
    "random_diffs",
    "random_head",
    "read_doc",
    "read_weights",
    "rewrite_weights",
    "snapshot",
    "tiny_texts",
    "update_checksum",
    "write_doc",
]


def assert_same_sft(a: SparseFineTuning, b: SparseFineTuning) -> None:
    """Bit-for-bit equality of two SFTs: tensors, indices, values and head."""
    assert set(a.diffs) == set(b.diffs) and set(a.head) == set(b.head)
    for name in a.diffs:
        assert torch.equal(a.diffs[name].indices, b.diffs[name].indices), name
        assert torch.equal(a.diffs[name].values, b.diffs[name].values), name
    for name in a.head:
        assert torch.equal(a.head[name], b.head[name]), name


def tiny_bert_classifier(dropout: bool = True):
    """A 2-layer BERT classifier built from a config (seeded: the same weights in every process) and
    its parameter roles, the frozen ones frozen. ``dropout=False`` for runs compared across ranks."""
    from transformers import BertConfig, BertForSequenceClassification

    from deftx.core.roles import parameter_roles

    torch.manual_seed(0)
    extra = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, **extra))
    roles = parameter_roles(model, "task")
    for p in roles.frozen.values():
        p.requires_grad_(False)
    return model, roles


def release_data(name: str) -> Path | None:
    """A copy of a dataset's original release (``nusax``, ``americasnli`` laid out as
    deftx/data/americasnli.py describes) under the directory named by ``DEFTX_TEST_DATA``; None when
    unset. Tests that compare the bundled files with the releases, or need the AmericasNLP text
    (not bundled: no licence covers it), skip without one."""
    root = os.environ.get("DEFTX_TEST_DATA")
    return Path(root) / name if root else None


def cache_repo(cache: Path, repo_id: str, files: Path, commit: str = "0123456789abcdef0123456789abcdef01234567", refs: tuple[str, ...] = ("main",)) -> None:
    """``files``' content as huggingface_hub caches a model repository: blobs by content hash,
    ``snapshots/<commit>/`` symlinks to them, ``refs/<branch>`` holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
