"""A trained subnetwork task model on disk, and the task SFT each evaluation language uses.

Layout of a directory::

    model/                  the change training made, as a task SFT (every entry some step could
                            change, with the classifier head): ``deftx.core.sft`` format
    masks.safetensors       each source language's final mask, bit-packed (uint8) per tensor, with
                            the shapes in the file's metadata
    subnetworks.json        languages, settings, mask sizes, re-selection history

``sft_for(target)`` restricts the change to the mask the target uses (its own for a source
language; for an unseen one ``related`` / ``union`` / ``full`` as configured) and returns an
ordinary task SFT, so it composes with the target's language SFT like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deftx.core.io import OutputKind, atomic_directory, read_json, write_json
from deftx.core.sft import SFTMetadata, SparseDelta, SparseFineTuning
from deftx.errors import DeftxError
from deftx.subnetworks.masks import target_mask

Masks = dict[str, torch.Tensor]
MODEL_DIR, MASKS_FILE, INFO_FILE = "model", "masks.safetensors", "subnetworks.json"
FORMAT_NAME = "deftx-subnetworks"
SUBNETWORK_OUTPUT = OutputKind("a subnetwork model directory", INFO_FILE,
                               lambda doc: doc.get("format") == FORMAT_NAME or {"languages", "mask_sizes"} <= set(doc))
_SEP = "::"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed.numpy(), count=numel)
    return torch.from_numpy(bits.astype(bool)).view(shape)


def restrict(sft: SparseFineTuning, masks: Mapping[str, torch.Tensor], metadata: SFTMetadata) -> SparseFineTuning:
    """``sft``'s body change on the entries of ``masks`` only; tensors ``masks`` does not cover
    (shared by every language, e.g. the embeddings) and the head are kept whole."""
    diffs: dict[str, SparseDelta] = {}
    for name, delta in sft.diffs.items():
        mask = masks.get(name)
        if mask is None:
            diffs[name] = SparseDelta(delta.shape, delta.indices.clone(), delta.values.clone())
            continue
        keep = mask.reshape(-1)[delta.indices]
        diffs[name] = SparseDelta(delta.shape, delta.indices[keep].clone(), delta.values[keep].clone())
    return SparseFineTuning(diffs, {n: t.clone() for n, t in sft.head.items()}, metadata)


def save_masks(path: str | Path, masks: Mapping[str, Masks]) -> None:
    """Per-language masks, bit-packed, with their shapes (atomically: a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    packed = {f"{lang}{_SEP}{name}": pack_mask(m) for lang, ms in masks.items() for name, m in ms.items()}
    shapes = {f"{lang}{_SEP}{name}": ",".join(map(str, m.shape)) for lang, ms in masks.items() for name, m in ms.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(packed, str(tmp), metadata=shapes)
    tmp.replace(path)


def load_masks(path: str | Path) -> dict[str, Masks]:
    from safetensors import safe_open

    out: dict[str, Masks] = {}
    with safe_open(str(path), framework="pt") as f:
        shapes = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 - a safetensors file, not a dict
            lang, _, name = key.partition(_SEP)
            shape = tuple(int(x) for x in shapes[key].split(",")) if shapes.get(key) else ()
            out.setdefault(lang, {})[name] = unpack_mask(f.get_tensor(key), shape)
    return out


@dataclass
class SubnetworkModel:
    sft: SparseFineTuning
    masks: dict[str, Masks]                  # source language -> name -> bool mask
    info: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @property
    def languages(self) -> list[str]:
        return list(self.masks)

    def sft_for(self, target: str, policy: str | None = None, related: Mapping[str, str] | None = None) -> SparseFineTuning:
        """The task SFT ``target`` is evaluated with (see the module docstring)."""
        policy = policy or self.info.get("unseen_target", "union")
        related = related if related is not None else self.info.get("related", {})
        covered = set(next(iter(self.masks.values()))) if self.masks else set()
        touched = {n: _support(d) for n, d in self.sft.diffs.items() if n in covered}
        mask = target_mask(policy, target, self.masks, touched, related)
        used = "own" if target in self.masks else policy
        meta = SFTMetadata.from_dict({**_metadata_dict(self.sft.metadata),
                                      "trained_on": {**self.sft.metadata.trained_on,
                                                     "subnetwork": {"target": target, "mask": used,
                                                                    "related": (related or {}).get(target)}}})
        out = restrict(self.sft, mask, meta)
        out.source = f"{self.source or 'subnetwork model'} [{target}: {used}]"
        return out

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        directory = Path(directory)
        with atomic_directory(directory, overwrite=overwrite, kind=SUBNETWORK_OUTPUT) as tmp:
            self.sft.save(tmp / MODEL_DIR)
            save_masks(tmp / MASKS_FILE, self.masks)
            sizes = {lang: int(sum(int(m.sum()) for m in ms.values())) for lang, ms in self.masks.items()}
            write_json(tmp / INFO_FILE, {"format": FORMAT_NAME, **self.info, "languages": self.languages,
                                         "mask_sizes": sizes})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SubnetworkModel:
        directory = Path(directory)
        if not (directory / INFO_FILE).is_file():
            raise DeftxError(f"{directory} is not a subnetwork model (no {INFO_FILE})")
        info = read_json(directory / INFO_FILE)
        try:
            masks = load_masks(directory / MASKS_FILE)
        except (OSError, ValueError, KeyError) as exc:
            raise DeftxError(f"{directory / MASKS_FILE}: unreadable ({exc})") from None
        languages = list(info.get("languages", []))
        if sorted(masks) != sorted(languages):
            raise DeftxError(f"{directory / MASKS_FILE}: masks of {sorted(masks)}, the model lists {languages}")
        sft = SparseFineTuning.load(directory / MODEL_DIR)
        return cls(sft=sft, masks={lang: masks[lang] for lang in languages}, info=info, source=str(directory))


def _support(delta: SparseDelta) -> torch.Tensor:
    mask = torch.zeros(delta.numel, dtype=torch.bool)
    mask[delta.indices] = True
    return mask.view(delta.shape)


def _metadata_dict(meta: SFTMetadata) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(meta)


def subnetwork_model(result, metadata: SFTMetadata, settings: Mapping[str, Any]) -> SubnetworkModel:
    """The model of a finished ``train_subnetworks`` run (rank 0: ``result.final`` is set)."""
    if result.final is None or result.head is None:
        raise ValueError("only the rank that read the trained weights (rank 0) can build the model")
    sft = SparseFineTuning.extract(result.start, result.final, result.touched, result.head, metadata)
    info = {**settings, "k": result.k, "reselections": result.reselections,
            "initial_vs_final_overlap": _overlaps(result.initial_masks, result.masks)}
    return SubnetworkModel(sft=sft, masks={lang: dict(m) for lang, m in result.masks.items()}, info=info)


def _overlaps(initial: Mapping[str, Masks], final: Mapping[str, Masks]) -> dict[str, float]:
    """Per language, the fraction of its final mask already in its initial mask (1.0 for static)."""
    out = {}
    for lang, masks in final.items():
        size = sum(int(m.sum()) for m in masks.values())
        common = sum(int((m & initial[lang][n]).sum()) for n, m in masks.items())
        out[lang] = common / size if size else 1.0
    return out
