"""Held-out masked-LM loss: does a language SFT model its language?

A language SFT is worth composing only if it carries its language: on held-out text of language X
(lines kept out of every training phase, ``language_sft.held_out``), theta0 + phi_X should predict
masked words clearly better than theta0, and better than theta0 + phi_Y for another language Y.
This module measures that, in the same process and on the same model for every row:

* :func:`held_out_set` fixes what is predicted: the masked positions of each batch are drawn once
  from a seeded generator and every predicted position shows the mask token (no 80/10/10
  corruption), so all models are scored on exactly the same predictions;
* :func:`held_out_loss` is the mean cross-entropy over those positions (nats per masked token);
* :func:`loss_matrix` scores theta0 and theta0 + each SFT on every language's set;
* :func:`language_signal` reads the matrix per language: its own SFT's drop against the other
  languages' SFTs' drops.

Never fed NusaX valid/test text: the held-out slice comes from the adaptation text itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deftx.core.sft import SparseFineTuning
from deftx.errors import DataError
from deftx.training.batches import IGNORE_INDEX, choose_mlm_positions, pad_batch, tokenize_texts
from deftx.training.objectives import masked_lm_loss

THETA0 = "theta0"
VARIANTS = ("sft", "body")   # with each SFT's own MLM head; its body entries alone over the model's head


@dataclass(frozen=True)
class HeldOutSet:
    """One language's held-out lines as fixed masked batches."""

    language: str
    batches: tuple[dict[str, torch.Tensor], ...]
    lines: int
    predicted: int   # masked positions scored


def _sample_order(line: str) -> bytes:
    return hashlib.blake2b(line.encode("utf-8"), digest_size=8, person=b"deftx-mlm-eval").digest()


def sample_lines(lines: Sequence[str], max_lines: int | None) -> list[str]:
    """At most ``max_lines`` of ``lines``, chosen by a hash of each line (independent of the hash
    that split them off), so the sample mixes all sources and does not depend on their order."""
    ordered = sorted(dict.fromkeys(lines), key=_sample_order)
    return ordered if max_lines is None else ordered[:max_lines]


def held_out_set(tokenizer, language: str, lines: Sequence[str], *, max_length: int, probability: float = 0.15,
                 batch_size: int = 32, seed: int = 0, max_lines: int | None = None) -> HeldOutSet:
    """``language``'s held-out ``lines`` (sampled down to ``max_lines``) as batches with fixed
    masks: ``probability`` of the non-special tokens of each line are predicted, each shown as the
    mask token."""
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; held-out MLM loss needs one")
    chosen = sample_lines(lines, max_lines)
    if not chosen:
        raise DataError(f"{language}: no held-out text (set language_sft.held_out above 0)")
    sequences = sorted(tokenize_texts(tokenizer, chosen, max_length), key=len)
    special = frozenset(tokenizer.all_special_ids)
    batches = []
    for number, start in enumerate(range(0, len(sequences), batch_size)):
        ids, attn = pad_batch(sequences[start:start + batch_size], tokenizer.pad_token_id)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + number)
        where = choose_mlm_positions(ids, attn, generator, special_ids=special, probability=probability)
        labels = torch.where(where, ids, torch.full_like(ids, IGNORE_INDEX))
        inputs = torch.where(where, torch.full_like(ids, tokenizer.mask_token_id), ids)
        batches.append({"input_ids": inputs, "attention_mask": attn, "labels": labels})
    predicted = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    return HeldOutSet(language, tuple(batches), len(chosen), predicted)


def held_out_loss(model: nn.Module, data: HeldOutSet) -> float:
    """Mean cross-entropy (nats) of ``model``'s masked-LM predictions over ``data``'s masked positions."""
    total = 0.0
    with torch.no_grad():
        for batch in data.batches:
            total += float(masked_lm_loss(model, batch, reduction="sum"))
    return total / data.predicted


def loss_matrix(model: nn.Module, sets: Mapping[str, HeldOutSet], sfts: Mapping[str, SparseFineTuning], *,
                with_head: bool = True, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """``{row: {language: loss}}``: the row ``theta0`` is ``model`` as given, each other row is
    ``model`` + that SFT (its MLM head too when ``with_head``; otherwise only its body entries,
    over ``model``'s head). ``model`` is left as it was."""
    model.eval()
    rows = {THETA0: {lang: held_out_loss(model, data) for lang, data in sets.items()}}
    log("[mlm-loss] theta0: " + _row_text(rows[THETA0]))
    for name, sft in sfts.items():
        with sft.applied(model, with_head=with_head):
            rows[name] = {lang: held_out_loss(model, data) for lang, data in sets.items()}
        log(f"[mlm-loss] + {name}{'' if with_head else ' (body)'}: " + _row_text(rows[name]))
    return rows


def _row_text(row: Mapping[str, float]) -> str:
    return " ".join(f"{lang} {loss:.3f}" for lang, loss in row.items())


@dataclass(frozen=True)
class LanguageSignal:
    """How much language ``language``'s own SFT lowers the loss on its held-out text, against the
    other languages' SFTs (drops are theta0's loss minus the SFT's; positive is better)."""

    language: str
    theta0: float
    own: float
    own_drop: float
    others_mean_drop: float
    best_other: str | None
    best_other_drop: float

    @property
    def margin(self) -> float:
        """Own drop minus the other SFTs' mean drop: > 0 when the SFT carries its language."""
        return self.own_drop - self.others_mean_drop

    @property
    def beats_every_other(self) -> bool:
        return self.best_other is None or self.own_drop > self.best_other_drop


def language_signal(matrix: Mapping[str, Mapping[str, float]]) -> list[LanguageSignal]:
    """One :class:`LanguageSignal` per evaluated language that has its own SFT row in ``matrix``
    (rows named by language, as :func:`loss_matrix` makes them)."""
    base = matrix[THETA0]
    out = []
    for lang, theta0 in base.items():
        if lang not in matrix:
            continue
        own = matrix[lang][lang]
        others = {row: theta0 - values[lang] for row, values in matrix.items() if row not in (THETA0, lang)}
        best = max(others, key=others.__getitem__) if others else None
        out.append(LanguageSignal(lang, theta0, own, theta0 - own,
                                  sum(others.values()) / len(others) if others else 0.0,
                                  best, others[best] if best else 0.0))
    return out
