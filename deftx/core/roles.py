"""Which parameters an SFT may change: the roles of a model's parameters.

Pure functions over modules; no Ray, no DeepSpeed (matching cambridgeltl/composable-sft):

* **body** = every parameter of the model's base encoder (``model.base_model``) except its pooler,
  named relative to the base model (``embeddings.word_embeddings.weight``,
  ``encoder.layer.0.attention.self.query.weight``). Relative names make a language SFT trained
  on a masked-LM model apply unchanged to a sequence-classification model of the same base.
* **maskable** = body minus LayerNorm parameters (found by module type, not by name, so a tied
  or re-registered parameter cannot hide from the filter).
* **head** = trainable parameters outside the body (classifier, pooler, MLM transform/bias),
  trained densely and stored as absolute values under their full model names.
* **frozen** = LayerNorm parameters of the body and the untied MLM decoder matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

SFTKind = Literal["language", "task"]
SFT_KINDS: tuple[str, ...] = ("language", "task")


# -- parameter roles -------------------------------------------------------------------------


def _is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "layernorm" in type(module).__name__.lower()


def base_model(model: nn.Module) -> nn.Module:
    """The encoder inside a task model (``model.base_model`` for Hugging Face models)."""
    return getattr(model, "base_model", model)


def body_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Encoder parameters (pooler excluded), keyed by names relative to the base model."""
    base = base_model(model)
    out: dict[str, nn.Parameter] = {}
    for name, param in base.named_parameters():
        if name.startswith("pooler."):
            continue
        out[name] = param
    return out


def layer_norm_parameter_ids(module: nn.Module) -> set[int]:
    """ids of all parameters that belong to LayerNorm modules below ``module``."""
    ids: set[int] = set()
    for sub in module.modules():
        if _is_layer_norm(sub):
            ids.update(id(p) for p in sub.parameters(recurse=False))
    return ids


def embedding_parameter_names(model: nn.Module) -> set[str]:
    """Body-relative names of parameters owned by ``nn.Embedding`` modules (word, position, type)."""
    base = base_model(model)
    ids = {id(p) for m in base.modules() if isinstance(m, nn.Embedding) for p in m.parameters(False)}
    return {n for n, p in body_parameters(model).items() if id(p) in ids}


def maskable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Body parameters an SFT may change: the encoder minus LayerNorm (same for both SFT kinds)."""
    ln = layer_norm_parameter_ids(base_model(model))
    return {n: p for n, p in body_parameters(model).items() if id(p) not in ln}


def mlm_decoder(model: nn.Module) -> nn.Module | None:
    """The output projection of a masked-LM head, or None when the model has no MLM head."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def untie_and_freeze_decoder(model: nn.Module) -> None:
    """Give the MLM decoder its own frozen copy of the word embeddings (composable-sft's
    ``--freeze_decoder``): body changes to the input embeddings then do not leak into the output
    projection, and the decoder is never part of an SFT."""
    decoder = mlm_decoder(model)
    if decoder is None:
        return
    weight = decoder.weight
    decoder.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False


@dataclass(frozen=True)
class ParameterRoles:
    """The partition of a model's parameters for one SFT kind (see module docstring)."""

    maskable: dict[str, nn.Parameter]  # body-relative names
    head: dict[str, nn.Parameter]  # full model names
    frozen: dict[str, nn.Parameter]  # full model names

    @property
    def num_maskable(self) -> int:
        return sum(p.numel() for p in self.maskable.values())


def parameter_roles(model: nn.Module, kind: SFTKind) -> ParameterRoles:
    """Split ``model``'s parameters into maskable body, dense head and frozen parameters.

    For ``kind="language"`` the MLM decoder must already be untied (``untie_and_freeze_decoder``);
    a decoder still tied to the word embeddings is rejected because training the head would then
    silently train the embedding matrix densely.
    """
    if kind not in SFT_KINDS:
        raise ValueError(f"unknown SFT kind {kind!r}; valid: {', '.join(SFT_KINDS)}")
    body = body_parameters(model)
    body_ids = {id(p) for p in body.values()}
    maskable = maskable_parameters(model)
    decoder = mlm_decoder(model) if kind == "language" else None
    if decoder is not None and id(decoder.weight) in body_ids:
        raise ValueError("the MLM decoder is tied to the word embeddings; call untie_and_freeze_decoder first")
    decoder_id = id(decoder.weight) if decoder is not None else None
    head: dict[str, nn.Parameter] = {}
    frozen: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if id(param) in body_ids:
            continue
        if id(param) == decoder_id:
            frozen[name] = param
        else:
            head[name] = param
    base = base_model(model)
    prefix = base_prefix(model)
    maskable_ids = {id(p) for p in maskable.values()}
    for name, param in base.named_parameters():
        if id(param) in body_ids and id(param) not in maskable_ids:
            frozen[prefix + name] = param
    return ParameterRoles(maskable=maskable, head=head, frozen=frozen)


def head_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the parameters an SFT's dense head may set on ``model``: trainable parameters
    outside the body (classifier, pooler, MLM transform and bias), never a body weight (embeddings,
    encoder, LayerNorm) and never the MLM decoder matrix."""
    body_ids = {id(p) for p in body_parameters(model).values()}
    decoder = mlm_decoder(model)
    decoder_id = id(decoder.weight) if decoder is not None and getattr(decoder, "weight", None) is not None else None
    return {name for name, param in model.named_parameters() if id(param) not in body_ids and id(param) != decoder_id}


def base_prefix(model: nn.Module) -> str:
    """The name of the base encoder inside ``model`` plus a dot (``roberta.``), or "" for a bare encoder."""
    base = base_model(model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name + "."
    return ""
