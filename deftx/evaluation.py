"""Zero-shot evaluation of (composed) classification models: macro-F1 and accuracy per language."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deftx.data.examples import Example
from deftx.training.batches import pad_batch, tokenize_texts


@torch.no_grad()
def predict(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 64,
            max_length: int = 128) -> list[int]:
    """Predicted label indices, batches sorted by length to keep padding small."""
    model.eval()
    seqs = tokenize_texts(tokenizer, [e.text for e in examples], max_length, [e.text_pair for e in examples])
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    preds = [0] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        ids, attn = pad_batch([seqs[i] for i in chunk], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn).logits
        for i, p in zip(chunk, logits.argmax(-1).tolist()):
            preds[i] = p
    return preds


def scores(labels: Sequence[int], preds: Sequence[int], num_labels: int) -> dict[str, float]:
    """Macro-F1 (over all ``num_labels`` classes, as sklearn's ``average='macro'``) and accuracy."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)),
                                       zero_division=0)),
            "accuracy": float(accuracy_score(labels, preds)), "n": len(labels)}


def evaluate(model: nn.Module, tokenizer, examples: Sequence[Example], num_labels: int, *,
             batch_size: int = 64, max_length: int = 128) -> dict[str, float]:
    preds = predict(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    return scores([e.label for e in examples], preds, num_labels)
