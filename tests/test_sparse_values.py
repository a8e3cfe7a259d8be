"""Phase 2 on K trainable values over a frozen base (deftx.training.sparse_values): the same forward
pass and gradients as the dense weights it stands for, K-sized trainable state, and the same SFT as
the dense-masked phase 2 up to float rounding."""

from __future__ import annotations

import pytest
import torch
from test_training import _train_task

from deftx.core.roles import parameter_roles
from deftx.data import NUSAX_LABELS, load_nusax_senti
from deftx.models import load_classifier, load_tokenizer
from deftx.training.batches import classification_stream
from deftx.training.engine import TorchEngine
from deftx.training.objectives import classification_loss
from deftx.training.sparse_values import SparsePhase, can_parametrise

TOLERANCE = 1e-6   # the two phase-2 rules after 6 AdamW steps: the same effective weights, gradients
                   # summed in another order (measured: at most 2.2e-8 on values of up to 0.016)


def _random_masks(params, density: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) < density for n, p in params.items()}


def _batch(path, n: int = 8):
    tok = load_tokenizer(str(path))
    rows = load_nusax_senti("ind", "train")[:n]
    return classification_stream(tok, rows, batch_size=n, seed=0, max_length=32).batch_at(0)


def test_forward_and_gradients_equal_the_dense_weights(tiny_model_dir):
    """Values set away from theta_start: the parametrised model's logits equal those of a model whose
    weights hold the same values densely, and the values' gradients equal the dense gradients at the
    masked entries (word, position and token-type embeddings, Linear weights and biases)."""
    batch = _batch(tiny_model_dir)
    model = load_classifier(str(tiny_model_dir), NUSAX_LABELS, seed=0)
    dense = load_classifier(str(tiny_model_dir), NUSAX_LABELS, seed=0)
    params = parameter_roles(model, "task").maskable
    assert can_parametrise(model, list(params))
    masks = _random_masks(params, 0.05, seed=1)
    start = {n: p.detach().clone() for n, p in params.items()}
    phase = SparsePhase(model, params, masks, start)
    phase.install()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for value in phase.trainable():
            value.add_(torch.randn(value.shape, generator=gen) * 0.05)
    dense_params = parameter_roles(dense, "task").maskable
    with torch.no_grad():
        trained = {k: v.detach() for k, v in phase.value_params().items()}
        for name, tensor in phase.bank.apply_to(start, trained).items():
            dense_params[name].copy_(tensor)
    loss = classification_loss(model, batch)
    reference = classification_loss(dense, batch)
    assert torch.allclose(loss, reference, atol=1e-6, rtol=1e-6)
    loss.backward()
    reference.backward()
    for key, value in phase.value_params().items():
        name = next(n for n in phase.bank.names if n.replace(".", "__") == key)
        expected = dense_params[name].grad.reshape(-1)[phase.bank.index(name)]
        assert torch.allclose(value.grad, expected, atol=1e-6, rtol=1e-4), name
    for name, param in params.items():
        assert param.grad is None and not param.requires_grad, name    # the base is frozen
    phase.remove()
    assert all(p.requires_grad for p in params.values()) and not hasattr(model, SparsePhase.ATTRIBUTE)


def test_trainable_state_is_k_sized(tiny_model_dir):
    """The optimizer sees only the K values (and the head): parameters, gradients and both AdamW
    moments hold K entries, while the model has many more maskable entries."""
    batch = _batch(tiny_model_dir)
    model = load_classifier(str(tiny_model_dir), NUSAX_LABELS, seed=0)
    roles = parameter_roles(model, "task")
    masks = _random_masks(roles.maskable, 0.01, seed=3)
    k = sum(int(m.sum()) for m in masks.values())
    phase = SparsePhase(model, roles.maskable, masks, {n: p.detach().clone() for n, p in roles.maskable.items()})
    phase.install()
    engine = TorchEngine(model, phase.trainable(), learning_rate=1e-3, weight_decay=0.01, total_steps=2)
    engine.backward(classification_loss(model, batch))
    assert sum(p.grad.numel() for p in phase.trainable()) == k
    engine.step()
    state = engine.optimizer.state
    assert sum(state[p]["exp_avg"].numel() + state[p]["exp_avg_sq"].numel() for p in phase.trainable()) == 2 * k
    assert phase.bank.num_values() == k < roles.num_maskable // 50


@pytest.mark.parametrize("method", ["lt_sft", "deft_x"])
def test_values_phase_2_gives_the_sft_of_the_dense_phase_2(tiny_model_dir, method):
    """Weight decay and the L1 pull on: the same mask, the same stored entries, values within
    TOLERANCE, the same head up to rounding, and in both the model ends at theta_start + phi with
    every entry outside the mask bit-identical to theta_start."""
    runs = {}
    for rule in ("values", "dense"):
        model, start, result = _train_task(tiny_model_dir, method, weight_decay=0.1, l1=1.0, sparse_update=rule)
        runs[rule] = (model, start, result)
    (model, start, values), (_, _, dense) = runs["values"], runs["dense"]
    assert values.masks.keys() == dense.masks.keys()
    for name in dense.masks:
        assert torch.equal(values.masks[name], dense.masks[name]), name
    assert values.sft.nnz > 0 and set(values.sft.diffs) == set(dense.sft.diffs)
    for name, delta in dense.sft.diffs.items():
        other = values.sft.diffs[name]
        assert torch.equal(delta.indices, other.indices), name
        assert torch.allclose(delta.values, other.values, atol=TOLERANCE, rtol=0), \
            f"{name}: max difference {float((delta.values - other.values).abs().max())}"
    for name, tensor in dense.sft.head.items():
        assert torch.allclose(tensor, values.sft.head[name], atol=TOLERANCE, rtol=0), name
    for name, param in parameter_roles(model, "task").maskable.items():
        outside = ~values.masks[name].reshape(-1)
        assert torch.equal(param.detach().reshape(-1)[outside], start["bert." + name].reshape(-1)[outside]), name
