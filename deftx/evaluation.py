"""Zero-shot evaluation of (composed) classification models: macro-F1 and accuracy per language."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from deftx.core.compose import Composition
from deftx.core.roles import parameter_roles
from deftx.data.examples import Example
from deftx.models import load_classifier, load_tokenizer
from deftx.training.batches import pad_batch, tokenize_texts
from deftx.training.progress import Progress
from deftx.training.runtime import load_values

EVAL_QUIET_S = 15.0   # an evaluation shorter than this prints no progress


@torch.no_grad()
def predict(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 64,
            max_length: int = 128, log: Callable[[str], None] | None = None, label: str = "eval") -> list[int]:
    """Predicted label indices, batches sorted by length to keep padding small. With ``log``, an
    evaluation that lasts more than a few seconds shows its progress (``[label] batch i/n``)."""
    model.eval()
    seqs = tokenize_texts(tokenizer, [e.text for e in examples], max_length, [e.text_pair for e in examples])
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    preds = [0] * len(seqs)
    batches = -(-len(order) // batch_size)
    progress = Progress(label, batches, sink=log, min_interval=10.0, quiet_for=EVAL_QUIET_S, unit="batch") \
        if log is not None else None
    for number, start in enumerate(range(0, len(order), batch_size), 1):
        chunk = order[start: start + batch_size]
        ids, attn = pad_batch([seqs[i] for i in chunk], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn).logits
        for i, p in zip(chunk, logits.argmax(-1).tolist()):
            preds[i] = p
        if progress is not None:
            progress.update(number)
    return preds


@torch.no_grad()
def head_inputs(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 64,
                max_length: int = 128) -> tuple[torch.Tensor, list[int]]:
    """What the classification head reads for each example (the input of ``model.classifier``: the
    pooled vector of a BERT classifier, the first token's state of an XLM-R one), in example order,
    and the predicted labels."""
    model.eval()
    captured: list[torch.Tensor] = []

    def keep(module, args, output) -> None:
        features = args[0].detach()
        captured.append(features[:, 0] if features.dim() == 3 else features)

    hook = model.classifier.register_forward_hook(keep)
    try:
        seqs = tokenize_texts(tokenizer, [e.text for e in examples], max_length, [e.text_pair for e in examples])
        inputs, preds = [], []
        for start in range(0, len(seqs), batch_size):
            ids, attn = pad_batch(seqs[start: start + batch_size], tokenizer.pad_token_id)
            preds += model(input_ids=ids, attention_mask=attn).logits.argmax(-1).tolist()
            inputs.append(captured.pop())
    finally:
        hook.remove()
    return torch.cat(inputs), preds


def scores(labels: Sequence[int], preds: Sequence[int], num_labels: int) -> dict[str, float]:
    """Macro-F1 (over all ``num_labels`` classes, as sklearn's ``average='macro'``) and accuracy."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)),
                                       zero_division=0)),
            "accuracy": float(accuracy_score(labels, preds)), "n": len(labels)}


def evaluate(model: nn.Module, tokenizer, examples: Sequence[Example], num_labels: int, *,
             batch_size: int = 64, max_length: int = 128, log: Callable[[str], None] | None = None,
             label: str = "eval") -> dict[str, float]:
    preds = predict(model, tokenizer, examples, batch_size=batch_size, max_length=max_length, log=log, label=label)
    return scores([e.label for e in examples], preds, num_labels)


class ClassifierScorer:
    """One classifier at theta0 in this process, with the settings every score uses (batch size,
    length). What is scored is put in place around a score and restored exactly afterwards: an SFT
    composition (:meth:`composed`) or whole weights (:meth:`weights`, e.g. a fully fine-tuned model
    or a phase-2 snapshot). The pipeline, the sweeps, phase-2 probes and the experiments all score
    through it."""

    def __init__(self, model_path: str, labels: Sequence[str], *, seed: int, batch_size: int = 64,
                 max_length: int = 128, tokenizer=None, log: Callable[[str], None] | None = None) -> None:
        self.log = log   # where the progress of long evaluations goes (None: silent)

        self.model = load_classifier(model_path, list(labels), seed=seed)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        self.num_labels = len(labels)
        self.batch_size, self.max_length = batch_size, max_length

    def head_inputs(self, examples: Sequence[Example]) -> tuple[torch.Tensor, list[int]]:
        """:func:`head_inputs` of the model as it is now."""
        return head_inputs(self.model, self.tokenizer, examples, batch_size=self.batch_size,
                           max_length=self.max_length)

    def score(self, examples: Sequence[Example], label: str = "eval") -> dict[str, float]:
        """Macro-F1, accuracy and n of the model as it is now (progress as ``[label]``)."""
        return evaluate(self.model, self.tokenizer, examples, self.num_labels, batch_size=self.batch_size,
                        max_length=self.max_length, log=self.log, label=label)

    @contextlib.contextmanager
    def composed(self, task, language=None, *, check_base: bool = True) -> Iterator[nn.Module]:
        """theta + ``task`` (with its head) + ``language`` (body only) for the block.
        ``check_base=False`` (one task SFT only) allows weights that are no longer theta0 (see
        :meth:`weights`)."""
        if check_base:
            with Composition(task, language).applied(self.model):
                yield self.model
            return
        if language is not None:
            raise ValueError("check_base=False applies a task SFT alone")
        with task.applied(self.model, with_head=True, check_base=False):
            yield self.model

    @contextlib.contextmanager
    def weights(self, values: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
        """The trainable tensors named in ``values`` (maskable body and head names, as
        ``deftx.core.roles.parameter_roles(model, "task")``) replaced for the block."""

        roles = parameter_roles(self.model, "task")
        params = {**roles.maskable, **roles.head}
        saved = {n: params[n].detach().clone() for n in values if n in params}
        load_values(self.model, "task", values)
        try:
            yield self.model
        finally:
            load_values(self.model, "task", saved)
