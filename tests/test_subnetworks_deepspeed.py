"""Subnetworks under DeepSpeed ZeRO with two real ranks (gloo over loopback).

1. Every step of a batch of language l leaves every entry outside m_l bit-identical, in the fp32
   master and in the forward weights, at ZeRO stages 0-3 (AdamW with weight decay, so both the
   moments of other languages' steps and the decay would move them without the write-back).
2. ``train_subnetworks`` under ``DeepSpeedRuntime`` (dynamic masks and Reptile at ZeRO-2): both
   ranks select the same masks, and training changes nothing outside the entries they allowed.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import loopback_group, tiny_bert_classifier

STEPS = 6
LANGUAGES = 3


def _tiny():
    return tiny_bert_classifier(dropout=False)


def _full_values(roles, access, stage):
    """(fp32 master, forward weights) of every maskable tensor, on every rank (collective)."""
    import deepspeed

    master = access.master_values(roles.maskable)
    forward = {}
    for name in sorted(roles.maskable):
        p = roles.maskable[name]
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                forward[name] = p.data.detach().clone()
        else:
            forward[name] = p.data.detach().clone()
    return master, forward


def _restriction_worker(rank: int, world: int, store: str, stages: list[int], out: str) -> None:
    with loopback_group(rank, world, store):
        from deftx.subnetworks.update import LanguageMaskedUpdate
        from deftx.training.distributed.engine import DeepSpeedEngine, DeepSpeedValueAccess

        records: dict[int, list[dict]] = {}
        for stage in stages:   # one process pair for every stage: spawning costs more than a stage
            model, roles = _tiny()
            g = torch.Generator().manual_seed(1)
            masks = {lang: {n: torch.rand(p.shape, generator=g) < 0.2 for n, p in sorted(roles.maskable.items())}
                     for lang in range(LANGUAGES)}
            access = DeepSpeedValueAccess(stage)
            update = LanguageMaskedUpdate(roles.maskable, masks, access=access)
            update.install()   # before deepspeed.initialize
            engine = DeepSpeedEngine(model, list(roles.maskable.values()) + list(roles.head.values()),
                                     learning_rate=1e-2, weight_decay=0.1, total_steps=STEPS, zero_stage=stage,
                                     micro_batch_size=4)
            records[stage] = []
            for step in range(STEPS):
                lang = step % LANGUAGES
                before_master, before_forward = _full_values(roles, access, stage)
                update.begin([lang])
                ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(step * 10 + rank))
                engine.backward(engine.module(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss)
                engine.step()
                update.finish()
                master, forward = _full_values(roles, access, stage)
                outside_master = outside_forward = inside = 0
                for name in master:
                    out_mask = ~masks[lang][name]
                    outside_master += int((master[name] != before_master[name])[out_mask].sum())
                    outside_forward += int((forward[name] != before_forward[name])[out_mask].sum())
                    inside += int((forward[name] != before_forward[name])[~out_mask].sum())
                records[stage].append({"lang": lang, "outside_master": outside_master,
                                       "outside_forward": outside_forward, "inside": inside})
            update.remove()
            destroy = getattr(engine.engine, "destroy", None)
            if callable(destroy):
                destroy()
        torch.save(records, f"{out}.rank{rank}")


@pytest.mark.slow
def test_language_steps_never_change_entries_outside_the_mask_under_zero(tmp_path):
    """ZeRO stages 0, 1, 2 and 3, every step checked."""
    out = str(tmp_path / "records")
    stages = [0, 1, 2, 3]
    mp.spawn(_restriction_worker, args=(2, str(tmp_path / "store"), stages, out), nprocs=2, join=True)
    per_rank = [torch.load(f"{out}.rank{rank}") for rank in range(2)]
    assert per_rank[0] == per_rank[1]                    # both ranks hold the same weights
    for stage in stages:
        for record in per_rank[0][stage]:
            assert record["outside_master"] == 0, (stage, record)
            assert record["outside_forward"] == 0, (stage, record)
            assert record["inside"] > 0, (stage, record)     # the step did train the subnetwork
        assert {r["lang"] for r in per_rank[0][stage]} == set(range(LANGUAGES))


def _training_worker(rank: int, world: int, store: str, out: str, stage: int, meta: str) -> None:
    with loopback_group(rank, world, store):
        from test_subnetworks import tiny_classifier, tiny_stream

        from deftx.config import PhaseConfig, SelectionConfig
        from deftx.subnetworks.config import SubnetworkConfig
        from deftx.subnetworks.train import train_subnetworks
        from deftx.training.distributed.runtime import DeepSpeedRuntime
        from deftx.training.multi_source import multi_source_loss
        from deftx.training.objectives import classification_loss

        cfg = SubnetworkConfig(mode="dynamic", reselect_every=2, meta_learning=meta, inner_steps=2,
                               probe_steps=2, selection=SelectionConfig(method="lt_sft", density=0.2),
                               train=PhaseConfig(epochs=2, learning_rate=1e-3, weight_decay=0.01)).validate()
        result = train_subnetworks(lambda: tiny_classifier(), languages=["ind", "jav"], stream=tiny_stream(2, 16),
                                   loss_fn=multi_source_loss(classification_loss, [None, None]), cfg=cfg, seed=1,
                                   runtime=DeepSpeedRuntime(zero_stage=stage), log=lambda message: None)
        torch.save({"masks": result.masks, "touched": result.touched, "start": result.start,
                    "final": result.final, "reselections": result.reselections}, f"{out}.rank{rank}")


@pytest.mark.slow
@pytest.mark.parametrize("stage,meta", [(2, "reptile"), (0, "fomaml")])
def test_train_subnetworks_under_deepspeed_ranks_agree(tmp_path, stage, meta):
    """ZeRO-0 (the default) leaves the word embedding's gradients sparse when no mask hook is on
    it; the meta-learning losses take their gradients with ``torch.autograd.grad``."""
    out = str(tmp_path / "result")
    mp.spawn(_training_worker, args=(2, str(tmp_path / "store"), out, stage, meta), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.rank{rank}") for rank in range(2))
    assert r0["reselections"] and r0["reselections"] == r1["reselections"]
    for lang in ("ind", "jav"):
        assert all(torch.equal(r0["masks"][lang][n], r1["masks"][lang][n]) for n in r0["masks"][lang])
    assert r1["final"] is None and r0["final"] is not None        # read on rank 0 only
    changed = {n: r0["final"][n] != r0["start"][n] for n in r0["start"]}
    assert sum(int(c.sum()) for c in changed.values()) > 0
    assert all(not bool((c & ~r0["touched"][n]).any()) for n, c in changed.items())
