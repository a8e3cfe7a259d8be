"""Deterministic, resumable batch streams for masked-LM and classification training.

A stream maps a global step number to a batch: the example order of epoch e is a permutation
drawn from a generator seeded with (seed, e), and MLM masking of step s uses a generator seeded
with (seed, s). So a run restarted at step s sees exactly the batches an uninterrupted run saw,
and two runs with the same seed are identical. Texts are tokenized once; batches are padded to
their longest sequence (NusaX sentences are short, padding to max_length would waste most work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deftx.data.examples import Example

IGNORE_INDEX = -100


def _generator(*seeds: int) -> torch.Generator:
    g = torch.Generator()
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + int(s)) % (2**63 - 1)
    g.manual_seed(value)
    return g


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int,
                   pairs: Sequence[str | None] | None = None) -> list[list[int]]:
    """Token ids (with special tokens, truncated to ``max_length``) for each text (or text pair)."""
    if pairs is not None and any(p is not None for p in pairs):
        enc = tokenizer(list(texts), [p or "" for p in pairs], truncation=True, max_length=max_length)
    else:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]


def pad_batch(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn


GROUP_SPAN = 32  # length grouping sorts windows of GROUP_SPAN batches


@dataclass
class BatchStream:
    """Batches of ``batch_size`` examples in a seeded per-epoch order (the last partial batch of
    an epoch is kept).

    With ``group_by_length`` (default) each epoch's shuffled order is cut into windows of
    ``GROUP_SPAN`` batches, each window is sorted by length and cut into batches, and the batches
    are shuffled again: batches hold sentences of similar length, so little compute is spent on
    padding (about 1.5-2x faster on NusaX), while each epoch still visits every example once.
    """

    sequences: list[list[int]]
    batch_size: int
    seed: int
    group_by_length: bool = True

    def __post_init__(self) -> None:
        if not self.sequences:
            raise ValueError("no training examples")
        self._plan: tuple[int, list[list[int]]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.sequences) // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        g = _generator(self.seed, epoch)
        order = torch.randperm(len(self.sequences), generator=g).tolist()
        bs = self.batch_size
        if not self.group_by_length:
            batches = [order[i: i + bs] for i in range(0, len(order), bs)]
        else:
            batches = []
            span = bs * GROUP_SPAN
            for w in range(0, len(order), span):
                window = sorted(order[w: w + span], key=lambda i: len(self.sequences[i]))
                batches.extend(window[i: i + bs] for i in range(0, len(window), bs))
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._plan = (epoch, batches)
        return batches

    def indices_at(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        return self.epoch_batches(epoch)[offset]

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass
class ClassificationStream(BatchStream):
    labels: list[int] | None = None
    pad_id: int = 0

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        idx = self.indices_at(step)
        ids, attn = pad_batch([self.sequences[i] for i in idx], self.pad_id)
        assert self.labels is not None
        return {"input_ids": ids, "attention_mask": attn,
                "labels": torch.tensor([self.labels[i] for i in idx], dtype=torch.long)}


@dataclass
class MaskedLMStream(BatchStream):
    """BERT-style dynamic masking: ``mlm_probability`` of the non-special tokens are predicted;
    of those 80% become the mask token, 10% a random token, 10% stay. Labels are -100 elsewhere."""

    pad_id: int = 0
    mask_id: int = 0
    vocab_size: int = 0
    special_ids: frozenset[int] = frozenset()
    mlm_probability: float = 0.15

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        idx = self.indices_at(step)
        ids, attn = pad_batch([self.sequences[i] for i in idx], self.pad_id)
        return mask_tokens(ids, attn, _generator(self.seed, 7919, step), mask_id=self.mask_id,
                           vocab_size=self.vocab_size, special_ids=self.special_ids,
                           probability=self.mlm_probability)


def choose_mlm_positions(ids: torch.Tensor, attn: torch.Tensor, generator: torch.Generator, *,
                         special_ids: frozenset[int], probability: float) -> torch.Tensor:
    """The positions to predict: each non-special, non-padding token with ``probability`` (at
    least one per batch when there is any candidate)."""
    candidates = attn.bool()
    for sid in special_ids:
        candidates &= ids != sid
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & candidates
    if not bool(chosen.any()) and bool(candidates.any()):
        first = torch.nonzero(candidates)[0]
        chosen[first[0], first[1]] = True
    return chosen


def mask_tokens(ids: torch.Tensor, attn: torch.Tensor, generator: torch.Generator, *, mask_id: int,
                vocab_size: int, special_ids: frozenset[int], probability: float) -> dict[str, torch.Tensor]:
    """Apply BERT masking to a padded batch; at least one position per batch is predicted."""
    chosen = choose_mlm_positions(ids, attn, generator, special_ids=special_ids, probability=probability)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_ids[swap]
    return {"input_ids": inputs, "attention_mask": attn, "labels": labels}


def classification_stream(tokenizer, examples: Sequence[Example], *, batch_size: int, seed: int,
                          max_length: int) -> ClassificationStream:
    seqs = tokenize_texts(tokenizer, [e.text for e in examples], max_length, [e.text_pair for e in examples])
    return ClassificationStream(seqs, batch_size, seed, labels=[e.label for e in examples],
                                pad_id=tokenizer.pad_token_id)


def masked_lm_stream(tokenizer, texts: Sequence[str], *, batch_size: int, seed: int, max_length: int,
                     mlm_probability: float) -> MaskedLMStream:
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; it cannot be used for masked-LM training")
    seqs = tokenize_texts(tokenizer, texts, max_length)
    return MaskedLMStream(seqs, batch_size, seed, pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id,
                          vocab_size=len(tokenizer), special_ids=frozenset(tokenizer.all_special_ids),
                          mlm_probability=mlm_probability)
