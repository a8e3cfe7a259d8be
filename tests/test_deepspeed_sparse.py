"""Sparse phase under DeepSpeed ZeRO 0/2/3 with two real ranks (gloo over loopback): with weight
decay on, entries outside the mask stay bit-identical to the reference in the fp32 master and in
the forward weights, and masked entries do move."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import loopback_group, tiny_bert_classifier

STEPS = 3


def _tiny_task_model():
    return tiny_bert_classifier()


def _worker(rank: int, world: int, store: str, stage: int, out: str, weight_decay: float = 0.1) -> None:
    with loopback_group(rank, world, store):
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        from deftx.training.distributed.engine import DeepSpeedEngine, project_outside_mask
        from deftx.training.sparse import SparseUpdate

        model, roles = _tiny_task_model()
        reference = {n: p.detach().clone() for n, p in roles.maskable.items()}
        g = torch.Generator().manual_seed(1)
        masks = {n: torch.rand(p.shape, generator=g) < 0.1 for n, p in roles.maskable.items()}
        sparse = SparseUpdate(roles.maskable, masks, reference)
        sparse.install()  # grad hooks before deepspeed.initialize
        engine = DeepSpeedEngine(model, sparse.trainable() + list(roles.head.values()), learning_rate=1e-2,
                                 weight_decay=weight_decay, total_steps=STEPS, zero_stage=stage, micro_batch_size=4)
        partial = {n: roles.maskable[n] for n in sparse.partial}
        for step in range(STEPS):
            ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(step * 10 + rank))
            loss = engine.module(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss
            engine.backward(loss)
            engine.step()
            if weight_decay > 0:  # without decay the gradient hook alone keeps them (DeepSpeedRuntime)
                project_outside_mask(partial, masks, reference, stage)
        result = {}
        for name, p in sorted(roles.maskable.items()):
            master = p.data if stage == 0 else safe_get_full_fp32_param(p)
            if stage == 3:
                with deepspeed.zero.GatheredParameters([p]):
                    forward = p.data.clone()
            else:
                forward = p.data.clone()
            if master is None:  # a fully frozen tensor has no optimizer state
                master = forward
            result[name] = (master.reshape(reference[name].shape).clone(), forward.reshape(reference[name].shape))
        torch.save({"result": result, "reference": reference, "masks": masks}, f"{out}.rank{rank}")


@pytest.mark.slow
@pytest.mark.parametrize("stage,weight_decay", [(0, 0.1), (2, 0.1), (3, 0.1), (2, 0.0), (3, 0.0)])
def test_sparse_phase_keeps_entries_outside_mask_bit_identical(tmp_path, stage, weight_decay):
    """With weight decay the post-step projection is needed; without it the hook alone suffices."""
    out = str(tmp_path / "state")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), stage, out, weight_decay), nprocs=2, join=True)
    moved = []
    for rank in range(2):
        saved = torch.load(f"{out}.rank{rank}")
        moved_here = 0
        for name, (master, forward) in saved["result"].items():
            ref, mask = saved["reference"][name], saved["masks"][name]
            assert torch.equal(master[~mask], ref[~mask]), f"stage {stage}: fp32 master moved outside the mask ({name})"
            assert torch.equal(forward[~mask], ref[~mask]), f"stage {stage}: forward weight moved outside the mask ({name})"
            moved_here += int((forward[mask] != ref[mask]).sum())
        moved.append(moved_here)
    assert moved[0] == moved[1] > 0  # training happened, identically on both ranks


def _selection_worker(rank: int, world: int, store: str, stage: int, method: str, out: str) -> None:
    with loopback_group(rank, world, store):

        from deftx.core.roles import embedding_parameter_names
        from deftx.core.scoring import denoised_tensors, is_elementwise, make_scorer
        from deftx.training.distributed.engine import DeepSpeedEngine, gather_owned
        from deftx.training.distributed.selection import distributed_select_masks, local_part, plan_shards

        model, roles = _tiny_task_model()
        theta0 = {n: p.detach().clone() for n, p in roles.maskable.items()}
        shapes = {n: tuple(p.shape) for n, p in roles.maskable.items()}
        scorer = make_scorer(method, rank=2 if method == "deft_x" else None,
                             embedding_names=frozenset(embedding_parameter_names(model)))
        plan = plan_shards(shapes, world, denoised=denoised_tensors(scorer, shapes),
                           elementwise={n: is_elementwise(scorer, n, s) for n, s in shapes.items()},
                           split_min_numel=64)  # tiny model: split every element-wise tensor of 64+ entries
        if world > 1:
            assert any(p.span is not None for p in plan.pieces)
        engine = DeepSpeedEngine(model, list(roles.maskable.values()) + list(roles.head.values()),
                                 learning_rate=1e-2, weight_decay=0.0, total_steps=STEPS, zero_stage=stage,
                                 micro_batch_size=4)
        for step in range(STEPS):  # phase 1 (full)
            ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(step * 10 + rank))
            engine.backward(engine.module(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss)
            engine.step()
        needed = plan.needed(rank)
        mine = gather_owned(roles.maskable, needed, stage)
        assert set(mine) == set(plan.owned(rank))
        masks, report = distributed_select_masks(plan, {n: local_part(theta0[n], r) for n, r in needed.items()},
                                                 mine, 100, scorer)
        everything = gather_owned(roles.maskable, dict.fromkeys(shapes), stage)  # reference only
        torch.save({"masks": masks, "theta0": theta0, "theta1": everything}, f"{out}.rank{rank}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("method", ["lt_sft", "deft_x"])
def test_distributed_selection_under_zero_equals_single_process(tmp_path, stage, method):
    """Each rank scores only the matrices it owns (gathered from ZeRO partitions one at a time);
    the all-gathered masks equal the single-process selection on the same phase-1 weights."""
    from deftx.core.scoring import make_scorer, select_masks

    out = str(tmp_path / "sel")
    mp.spawn(_selection_worker, args=(2, str(tmp_path / "store"), stage, method, out), nprocs=2, join=True)
    saved = [torch.load(f"{out}.rank{r}") for r in range(2)]
    theta1 = saved[0]["theta1"]
    assert all(torch.equal(theta1[n], saved[1]["theta1"][n]) for n in theta1)  # ranks agree on theta1
    embeddings = frozenset(n for n in theta1 if "embeddings" in n and n.endswith("embeddings.weight"))
    want, _ = select_masks(saved[0]["theta0"], theta1, 100, make_scorer(
        method, rank=2 if method == "deft_x" else None, embedding_names=embeddings))
    for r in range(2):
        assert set(saved[r]["masks"]) == set(want)
        for name in want:
            assert torch.equal(saved[r]["masks"][name], want[name]), (r, name)


def _values_model():
    """Without dropout: the ranks' steps must match one process's exactly."""
    return tiny_bert_classifier(dropout=False)


def _values_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(step * 10 + rank))
    return ids, torch.tensor([0, 1, 2, 0])


def _values_setup():
    from deftx.training.sparse_values import SparsePhase

    model, roles = _values_model()
    start = {n: p.detach().clone() for n, p in roles.maskable.items()}
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) < 0.1 for n, p in roles.maskable.items()}
    phase = SparsePhase(model, roles.maskable, masks, start)
    phase.install()
    return model, roles, phase


def _values_worker(rank: int, world: int, store: str, stage: int, out: str) -> None:
    with loopback_group(rank, world, store):
        import deepspeed

        from deftx.training.distributed.engine import DeepSpeedEngine

        model, roles, phase = _values_setup()
        engine = DeepSpeedEngine(model, phase.trainable() + list(roles.head.values()), learning_rate=1e-2,
                                 weight_decay=0.1, total_steps=STEPS, zero_stage=stage, micro_batch_size=4)
        owned = sum(int(getattr(p, "ds_tensor", p).numel()) for p in phase.trainable())
        for step in range(STEPS):
            ids, labels = _values_batch(step, rank)
            engine.backward(engine.module(input_ids=ids, labels=labels).loss)
            engine.step()
        values = {}
        for key, p in sorted(phase.value_params().items()):
            if stage == 3:
                with deepspeed.zero.GatheredParameters([p]):
                    values[key] = p.data.clone()
            else:
                values[key] = p.data.clone()
        base = {}
        for name, p in sorted(roles.maskable.items()):
            if stage == 3:
                with deepspeed.zero.GatheredParameters([p]):
                    base[name] = p.data.clone()
            else:
                base[name] = p.data.clone()
        torch.save({"values": values, "base": base, "owned": owned, "k": phase.bank.num_values()},
                   f"{out}.rank{rank}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_values_phase_under_zero_equals_one_process(tmp_path, stage):
    """Phase 2 on K values under ZeRO 0/2/3 with two ranks (each its own half of every batch) ends
    with the values of one process training on the whole batches (to float rounding); the frozen
    base never moves; under ZeRO-3 each rank holds about half of the values."""
    from deftx.training.engine import TorchEngine

    out = str(tmp_path / "values")
    mp.spawn(_values_worker, args=(2, str(tmp_path / "store"), stage, out), nprocs=2, join=True)
    saved = [torch.load(f"{out}.rank{r}") for r in range(2)]

    model, roles, phase = _values_setup()
    start = {n: p.detach().clone() for n, p in roles.maskable.items()}
    engine = TorchEngine(model, phase.trainable() + list(roles.head.values()), learning_rate=1e-2,
                         weight_decay=0.1, total_steps=STEPS)
    for step in range(STEPS):
        batches = [_values_batch(step, r) for r in range(2)]
        losses = [model(input_ids=ids, labels=labels).loss for ids, labels in batches]
        engine.backward(sum(losses) / 2)    # DeepSpeed averages the ranks' gradients
        engine.step()
    k = phase.bank.num_values()
    for r in range(2):
        assert saved[r]["k"] == k
        for key, value in phase.value_params().items():
            assert torch.allclose(saved[r]["values"][key], value.detach(), atol=1e-5, rtol=0), (stage, key)
            assert not torch.equal(value.detach(), phase.bank.start_values(
                next(n for n in phase.bank.names if n.replace(".", "__") == key))), key   # they trained
        for name, tensor in saved[r]["base"].items():
            assert torch.equal(tensor, start[name]), (stage, name)
    if stage == 3:
        assert max(s["owned"] for s in saved) <= k // 2 + len(phase.bank.names)
    else:
        assert saved[0]["owned"] == k


def _norm_worker(rank: int, world: int, store: str, stage: int, out: str) -> None:
    with loopback_group(rank, world, store):
        from deftx.training.distributed.engine import DeepSpeedEngine

        model, roles = tiny_bert_classifier(dropout=False)
        params = list(roles.maskable.values()) + list(roles.head.values())
        engine = DeepSpeedEngine(model, params, learning_rate=1e-3, weight_decay=0.0, total_steps=2,
                                 zero_stage=stage, micro_batch_size=2)
        ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(3))[2 * rank: 2 * rank + 2]
        engine.backward(engine.module(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])[2 * rank: 2 * rank + 2]).loss)
        engine.step()
        assert engine.optimizer.get_grad_norm_direct.__name__ == "direct_norm"  # deftx's rule is in use
        torch.save(float(engine.engine.get_global_grad_norm()), f"{out}.rank{rank}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_clipping_norm_matches_the_single_process_rule(tmp_path, stage):
    """ZeRO-1/2 compute the clipping norm by deftx's replacement of DeepSpeed's float64-copy norm
    (per-tensor float32 norms, as ``clip_grad_norm_``); over two ranks it equals the norm of the
    gradient one process averages over the whole batch."""
    out = str(tmp_path / "norm")
    mp.spawn(_norm_worker, args=(2, str(tmp_path / "store"), stage, out), nprocs=2, join=True)
    model, roles = tiny_bert_classifier(dropout=False)
    ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 0])
    halves = [model(input_ids=ids[:2], labels=labels[:2]).loss, model(input_ids=ids[2:], labels=labels[2:]).loss]
    ((halves[0] + halves[1]) / 2).backward()  # the gradient averaged over the two ranks
    params = list(roles.maskable.values()) + list(roles.head.values())
    want = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    for rank in range(2):
        got = torch.load(f"{out}.rank{rank}")
        assert got == pytest.approx(want, rel=1e-5), (rank, got, want)


def _embedding_worker(rank: int, world: int, store: str, sparse: bool, out: str) -> None:
    with loopback_group(rank, world, store):
        from deftx.training.distributed.engine import DeepSpeedEngine
        from deftx.training.sparse import L1Penalty

        model, roles = tiny_bert_classifier(dropout=False)
        start = {n: p.detach().clone() for n, p in roles.maskable.items()}
        params = list(roles.maskable.values()) + list(roles.head.values())
        engine = DeepSpeedEngine(model, params, learning_rate=1e-2, weight_decay=0.1, total_steps=STEPS,
                                 zero_stage=0, micro_batch_size=2, sparse_embedding=sparse)
        emb = model.get_input_embeddings()
        assert engine.reduced_apart == ((emb.weight,) if sparse else ())
        # the L1 pull (composable-sft's, normalised by the parameter count) whose dense gradient on
        # the embedding is added after the sparse reduction
        l1 = L1Penalty(roles.maskable, start, 50.0, 1000, apart=engine.reduced_apart)
        if sparse:
            engine.after_reduction(l1.add_apart_gradients)
        grads_were_sparse = []
        emb.weight.register_post_accumulate_grad_hook(lambda w: grads_were_sparse.append(w.grad.is_sparse))
        for step in range(STEPS):
            ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(step))[2 * rank: 2 * rank + 2]
            labels = torch.tensor([0, 1, 2, 0])[2 * rank: 2 * rank + 2]
            engine.backward(engine.module(input_ids=ids, labels=labels).loss + l1())
            assert not emb.weight.grad.is_sparse  # dense again before clipping and AdamW
            engine.step()
        engine.close()
        assert not emb.sparse
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"state": state, "sparse_grads": grads_were_sparse}, f"{out}.rank{rank}")


@pytest.mark.slow
def test_zero0_sparse_embedding_gradients_equal_dense_ones(tmp_path):
    """Under ZeRO-0 the word embedding's gradient travels as the rows a batch touched (sparse) and
    is made dense after the reduction, where the L1 pull's dense part is added: three AdamW steps
    with an L1 pull, clipping and weight decay on two ranks give the weights of the dense-gradient
    run with the L1 term in the loss (to float rounding), on both ranks."""
    results = {}
    for sparse in (True, False):
        out = str(tmp_path / f"run-{sparse}")
        mp.spawn(_embedding_worker, args=(2, str(tmp_path / f"store-{sparse}"), sparse, out), nprocs=2, join=True)
        results[sparse] = [torch.load(f"{out}.rank{r}") for r in range(2)]
    assert all(all(r["sparse_grads"]) and r["sparse_grads"] for r in results[True])
    assert not any(any(r["sparse_grads"]) for r in results[False])
    words = "bert.embeddings.word_embeddings.weight"
    for rank in range(2):
        got, want = results[True][rank]["state"], results[False][rank]["state"]
        assert set(got) == set(want) and words in got
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name
        assert not torch.equal(got[words], tiny_bert_classifier(dropout=False)[0].state_dict()[words])  # it trained
