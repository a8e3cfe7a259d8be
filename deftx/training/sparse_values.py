"""Phase 2 at the scale of K: each maskable tensor stays frozen at its start value theta_start, and
the K selected entries are one trainable 1-D tensor of their absolute values.

    W_effective = theta_start, with the masked entries replaced by the values

The trainable parameters, their gradients, the AdamW moments and whatever DeepSpeed communicates
for them are K-sized; the frozen base is an ordinary (non-trainable) parameter, so ZeRO-3
partitions it like any other. Holding the *absolute* values (not the change) keeps the optimizer's
semantics those of the dense-masked phase 2 entry for entry: AdamW's decoupled weight decay pulls
W towards 0, the L1 pull is |values - theta_start[mask]|, gradient clipping sees the same
gradients. Entries outside the mask are never written, so they stay bit-identical to theta_start.

How the values enter the forward pass, per module (the encoders' maskable tensors live in these):

* ``nn.Linear`` (weight and bias): its forward is replaced, for the phase, by one that builds the
  effective weights (the same bits as the dense rule's weights) and computes ``x W^T + b``; the
  backward computes the input gradient and the weight gradient only to gather the values' part of
  it (no dense gradient is kept, none reaches the optimizer or the network).
* ``nn.Embedding`` weight: the change of the rows the batch looks up is added to its output,
  built for those rows only (the dense rule's embedding gradient is a 250k x d tensor every step).

All values live in one submodule (:class:`SparseValues`) that the encoder's forward pre-hook calls
once per forward pass, so DeepSpeed sees it as a module with parameters (partitioned and gathered
under ZeRO-3 like any other); the modules read its outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deftx.core.roles import base_model


class UnsupportedModule(ValueError):
    """A maskable tensor lives in a module whose forward pass this parametrisation cannot extend."""


def _key(name: str) -> str:
    return name.replace(".", "__")


class SparseValues(nn.Module):
    """The K trainable values of every maskable tensor (absolute weights at the masked entries,
    row-major order of the mask), with their start values and positions as buffers."""

    def __init__(self, masks: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in sorted(masks):
            mask = masks[name].reshape(-1).bool()
            index = mask.nonzero().reshape(-1)
            if index.numel() == 0:
                continue
            base = start[name].reshape(-1)[index].detach().clone().float()
            key = _key(name)
            self.names.append(name)
            self.shapes[name] = tuple(start[name].shape)
            # a direct parameter of this module (not in a ParameterDict, a child module whose forward
            # never runs): ZeRO-3 gathers a module's own parameters around its forward
            self.register_parameter(f"values__{key}", nn.Parameter(base.clone()))
            self.register_buffer(f"start__{key}", base, persistent=True)
            self.register_buffer(f"index__{key}", index, persistent=True)

    @property
    def values(self) -> dict[str, nn.Parameter]:
        """The trainable values by key (``_key(name)``)."""
        return {_key(name): getattr(self, f"values__{_key(name)}") for name in self.names}

    def index(self, name: str) -> torch.Tensor:
        return getattr(self, f"index__{_key(name)}")

    def start_values(self, name: str) -> torch.Tensor:
        return getattr(self, f"start__{_key(name)}")

    def forward(self) -> dict[str, torch.Tensor]:
        """The values of every tensor's masked entries, as fresh tensors (under ZeRO-3 the
        parameters are released when this returns; the backward of a clone needs no parameter)."""
        return {name: getattr(self, f"values__{_key(name)}").clone() for name in self.names}

    def num_values(self) -> int:
        """K (a ZeRO-3 partitioned parameter reports its full size as ``ds_numel``)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.values.values())

    @torch.no_grad()
    def apply_to(self, base: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of the tensors in ``base`` with the masked entries set to ``values`` (the bank's
        parameters by key, e.g. as read under ZeRO-3): the effective weights."""
        out = {}
        for name, tensor in base.items():
            tensor = tensor.detach().clone()
            if name in self.shapes:
                tensor.view(-1)[self.index(name)] = values[_key(name)].to(tensor.dtype)
            out[name] = tensor
        return out


class _MaskedLinear(torch.autograd.Function):
    """``x @ W^T + b`` with W's (and b's) masked entries replaced by trainable values: the same
    effective weights, bit for bit, as the dense rule's. Only the values get gradients (gathered
    from the weight gradient), the frozen base none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                weight_values: torch.Tensor | None, weight_index: torch.Tensor | None,
                bias_values: torch.Tensor | None, bias_index: torch.Tensor | None) -> torch.Tensor:
        w = weight.detach()
        if weight_values is not None:
            w = w.clone()
            w.view(-1)[weight_index] = weight_values
        b = bias.detach() if bias is not None else None
        if bias_values is not None:
            b = b.clone()
            b[bias_index] = bias_values
        ctx.save_for_backward(x, w, weight_index, bias_index)
        ctx.has_weight_values, ctx.has_bias_values = weight_values is not None, bias_values is not None
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, w, weight_index, bias_index = ctx.saved_tensors
        grad_x = grad.matmul(w) if ctx.needs_input_grad[0] else None
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_wv = grad_bv = None
        if ctx.has_weight_values and ctx.needs_input_grad[3]:
            grad_wv = flat_grad.t().matmul(x.reshape(-1, x.shape[-1])).view(-1)[weight_index]
        if ctx.has_bias_values and ctx.needs_input_grad[5]:
            grad_bv = flat_grad.sum(0)[bias_index]
        return grad_x, None, None, grad_wv, None, grad_bv, None


def _embedding_delta(ids: torch.Tensor, values: torch.Tensor, start: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor, dim: int, padding_idx: int | None = None) -> torch.Tensor:
    """The change (values - theta_start) of the rows ``ids`` looks up: (ids.shape..., dim), built
    from the entries of those rows only (``rows`` is sorted: the mask's row-major order, so a row's
    entries are one contiguous run found by binary search). As in ``nn.Embedding``, the padding
    row's entries get no gradient."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    lo = torch.searchsorted(rows, unique)
    counts = torch.searchsorted(rows, unique, right=True) - lo
    slot = torch.repeat_interleave(torch.arange(unique.numel()), counts)
    first = torch.repeat_interleave(lo - (torch.cumsum(counts, 0) - counts), counts)
    position = first + torch.arange(slot.numel())
    change = values[position] - start[position]
    if padding_idx is not None:
        change = torch.where(rows[position] == padding_idx, change.detach(), change)
    table = change.new_zeros(unique.numel(), dim).index_put((slot, cols[position]), change)
    return table[inverse]


class SparsePhase:
    """Installs the parametrisation on ``model`` for phase 2 and takes it off again.

    ``params``: the maskable parameters by name (frozen while installed), ``masks`` and ``start``
    (theta_start; by default the parameters' own values) by the same names. Only the masked entries
    of ``start`` are kept. After :meth:`install` the trainable tensors are
    ``self.bank.parameters()``; :meth:`entries` gives the masked entries' start and trained values
    from the bank's values."""

    ATTRIBUTE = "deftx_sparse_values"

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor],
                 start: Mapping[str, torch.Tensor] | None = None) -> None:
        missing = set(params) - set(masks)
        if missing:
            raise ValueError(f"no mask for {sorted(missing)[0]}")
        self.model = model
        self.params = dict(params)
        start = start if start is not None else {n: p.detach() for n, p in params.items()}
        self.shapes = {n: tuple(start[n].shape) for n in params}   # ZeRO-3 later empties the parameters
        self.owners = {name: _owner(model, name) for name in params}
        for name, (module, attr) in self.owners.items():
            _check_supported(module, attr, name)
        self.bank = SparseValues(masks, start)
        self._handles: list[Any] = []
        self._replaced: list[nn.Module] = []
        self._deltas: dict[str, torch.Tensor] = {}   # the bank's output of the current forward pass
        self._requires_grad: dict[str, bool] = {}

    def install(self) -> None:
        self.model.add_module(self.ATTRIBUTE, self.bank)
        for name, param in self.params.items():
            self._requires_grad[name] = param.requires_grad
            param.requires_grad_(False)
        # on the encoder, not the task model: a loss may call the encoder directly (masked LM)
        self._handles.append(base_model(self.model).register_forward_pre_hook(self._compute_deltas))
        linears: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        for name in self.bank.names:
            module, attr = self.owners[name]
            if isinstance(module, nn.Embedding):
                hook = self._embedding_hook(name, module.embedding_dim)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            else:
                linears.setdefault(id(module), (module, {}))[1][attr] = name
        for module, names in linears.values():
            module.forward = self._linear_forward(module, names)   # an instance attribute: undone by remove
            self._replaced.append(module)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._replaced:
            del module.forward
        self._replaced.clear()
        self._deltas = {}
        if getattr(self.model, self.ATTRIBUTE, None) is self.bank:
            delattr(self.model, self.ATTRIBUTE)
        for name, state in self._requires_grad.items():
            self.params[name].requires_grad_(state)
        self._requires_grad.clear()

    def trainable(self) -> list[nn.Parameter]:
        return list(self.bank.values.values())

    def l1_distance(self) -> torch.Tensor:
        """sum |W - theta_start| over every tensor (the L1 pull's distance; zero outside the mask),
        from the values of the last forward pass (under ZeRO-3 the parameters are gathered only
        then)."""
        values = self._deltas or self.bank()
        return sum(((v - self.bank.start_values(n)).abs().sum() for n, v in values.items()), torch.zeros(()))

    def entries(self, values: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.Tensor,
                                                                              torch.Tensor, torch.Tensor]]:
        """Per maskable tensor: (shape, masked flat positions, theta_start there, trained values
        there) given the bank's ``values`` (by bank key, e.g. from a gathered read); what
        ``SparseFineTuning.extract_entries`` takes. Tensors without masked entries have none."""
        out = {}
        for name in sorted(self.params):
            if name in self.bank.shapes:
                out[name] = (self.bank.shapes[name], self.bank.index(name), self.bank.start_values(name),
                             values[_key(name)].detach())
            else:
                empty = torch.zeros(0)
                out[name] = (self.shapes[name], torch.zeros(0, dtype=torch.int64), empty, empty)
        return out

    @torch.no_grad()
    def write_back(self) -> None:
        """Write the trained values into the (whole, unpartitioned) parameters, so that the model
        itself ends at theta_start + phi (the single-process trainer's contract)."""
        for name in self.bank.names:
            self.params[name].data.view(-1)[self.bank.index(name)] = self.bank.values[_key(name)].detach()

    def value_params(self) -> dict[str, nn.Parameter]:
        """The bank's parameters by key (what a runtime reads at the end of the phase)."""
        return self.bank.values

    # -- hooks ---------------------------------------------------------------------------------

    def _compute_deltas(self, module: nn.Module, args: Any) -> None:
        self._deltas = self.bank()

    def _embedding_hook(self, name: str, dim: int):
        index = self.bank.index(name)
        rows, cols = index // dim, index % dim      # computed once for the phase

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            ids = args[0] if args else kwargs["input"]
            return output + _embedding_delta(ids, self._deltas[name], self.bank.start_values(name), rows, cols,
                                             mod.embedding_dim, mod.padding_idx)

        return hook

    def _linear_forward(self, module: nn.Linear, names: dict[str, str]):
        """A replacement for ``module.forward`` that uses the effective weights."""
        weight, bias = names.get("weight"), names.get("bias")

        def forward(x: torch.Tensor) -> torch.Tensor:
            return _MaskedLinear.apply(
                x, module.weight, module.bias,
                self._deltas[weight] if weight else None, self.bank.index(weight) if weight else None,
                self._deltas[bias] if bias else None, self.bank.index(bias) if bias else None)

        return forward


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the maskable tensor ``name`` (named as in ``parameter_roles``: relative to
    the encoder, e.g. ``encoder.layer.0.attention.self.query.weight``) and its attribute."""
    root = base_model(model)
    prefix, _, attr = name.rpartition(".")
    return (root.get_submodule(prefix) if prefix else root), attr


def _check_supported(module: nn.Module, attr: str, name: str) -> None:
    if isinstance(module, nn.Embedding):
        if attr != "weight" or module.max_norm is not None or module.scale_grad_by_freq:
            raise UnsupportedModule(f"{name}: an embedding with max_norm or scale_grad_by_freq, or not its weight")
        return
    if isinstance(module, nn.Linear) and attr in ("weight", "bias"):
        return
    raise UnsupportedModule(f"{name}: a {type(module).__name__}.{attr} (K-sized phase 2 supports the weights "
                            f"and biases of Linear and the weights of Embedding)")


def can_parametrise(model: nn.Module, names: list[str]) -> bool:
    """True if every tensor in ``names`` lives where :class:`SparsePhase` can extend the forward pass."""
    try:
        for name in names:
            module, attr = _owner(model, name)
            _check_supported(module, attr, name)
    except (UnsupportedModule, AttributeError):
        return False
    return True
