"""Reading parameters' full values and writing some of their entries back, in one process or under
DeepSpeed ZeRO (``deftx.training.distributed.engine.DeepSpeedValueAccess``), for updates confined
to a mask that changes between steps (``deftx.subnetworks.update``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn


class ValueAccess(Protocol):
    def master_values(self, params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Full current values of ``params`` (collective under ZeRO 1-3)."""

    def write_outside(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor],
                      reference: Mapping[str, torch.Tensor]) -> None:
        """Set ``params`` to ``reference`` outside ``masks`` (collective under ZeRO 1-3)."""

    def sum_across_ranks(self, tensors: Sequence[torch.Tensor]) -> None:
        """All-reduce (sum) ``tensors`` in place; a no-op in one process."""


class LocalValueAccess:
    """One process: parameters are plain tensors."""

    @torch.no_grad()
    def master_values(self, params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def write_outside(self, params, masks, reference) -> None:
        for name, p in params.items():
            torch.where(masks[name], p.data, reference[name], out=p.data)

    def sum_across_ranks(self, tensors: Sequence[torch.Tensor]) -> None:
        pass
