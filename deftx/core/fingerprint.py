"""Fingerprint of a base model's encoder weights, stored in every SFT and checked on apply.

The fingerprint covers the body parameters (``deftx.core.roles.body_parameters``: the encoder without
its pooler, body-relative names), so a masked-LM model and a sequence-classification model loaded
from the same checkpoint share it. It is the SHA-256 of every body tensor's name, dtype, shape
and bytes in name order.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from deftx.core.roles import body_parameters

PREFIX = "sha256:"


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        data = t.contiguous().cpu()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        if data.numel():
            h.update(data.reshape(-1).numpy())
    return PREFIX + h.hexdigest()


def base_fingerprint(model: nn.Module) -> str:
    """Fingerprint of ``model``'s current body weights."""
    return tensors_fingerprint({n: p for n, p in body_parameters(model).items()})
