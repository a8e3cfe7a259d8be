"""Language-specific subnetworks: mask selection (unstructured and whole heads/neurons),
the per-language update restriction, dynamic re-selection, meta-learning against a hand
computation, and short end-to-end runs of every mode on a tiny BERT classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deftx.core.roles import parameter_roles
from deftx.core.scoring import change_magnitude, make_scorer
from deftx.core.topk import count_selected, global_top_k
from deftx.errors import ConfigError
from deftx.subnetworks.config import SubnetworkConfig
from deftx.subnetworks.masks import select_subnetwork, target_mask, union_masks
from deftx.subnetworks.meta import MetaStream, meta_loss, stack_batches, unstack_batch
from deftx.subnetworks.structure import StructureError, encoder_structure, group_means
from deftx.subnetworks.train import train_subnetworks
from deftx.subnetworks.update import LanguageMaskedUpdate, batch_language
from deftx.training.batches import ClassificationStream
from deftx.training.engine import TorchEngine
from deftx.training.multi_source import LANGUAGE_KEY, MultiSourceStream, multi_source_loss
from deftx.training.objectives import classification_loss
from deftx.training.phase import run_phase

HEADS = 2


def tiny_classifier(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=24,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tiny_stream(languages: int = 2, examples: int = 12, batch_size: int = 4, seed: int = 0) -> MultiSourceStream:
    g = torch.Generator().manual_seed(seed)
    streams = []
    for lang in range(languages):
        seqs = [[2] + torch.randint(5, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                for _ in range(examples)]
        labels = torch.randint(0, 3, (examples,), generator=g).tolist()
        streams.append(ClassificationStream(seqs, batch_size, seed + lang, labels=labels, pad_id=0))
    return MultiSourceStream(streams, seed=seed)


def body_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in parameter_roles(model, "task").maskable.items()}


def random_scores(shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) for n, s in shapes.items()}


# -- selection --------------------------------------------------------------------------------


def test_unstructured_selection_is_the_sft_top_k():
    shapes = body_shapes(tiny_classifier())
    start, moved = random_scores(shapes, 0), random_scores(shapes, 1)
    k = 500
    masks = select_subnetwork(start, moved, k)
    expected = global_top_k({n: change_magnitude(n, start[n], moved[n]) for n in start}, k)
    assert count_selected(masks) == k
    assert all(torch.equal(masks[n], expected[n]) for n in masks)


def test_structure_finds_heads_and_neurons_of_every_layer():
    structure = encoder_structure(body_shapes(tiny_classifier()), HEADS)
    assert [g.layer for g in structure.layers] == ["encoder.layer.0", "encoder.layer.1"]
    assert len(structure.layers[0].head_rows) == 6 and structure.layers[0].head_cols
    means = group_means({n: torch.ones(s) for n, s in body_shapes(tiny_classifier()).items()
                         if n in structure.grouped}, structure)
    assert means["encoder.layer.1.heads"].shape == (HEADS,) and means["encoder.layer.1.neurons"].shape == (24,)


def test_structure_errors_are_clear():
    with pytest.raises(StructureError, match="BERT or XLM-R"):
        encoder_structure({"fc.weight": (4, 4)}, 2)
    with pytest.raises(StructureError, match="does not split into 3"):
        encoder_structure(body_shapes(tiny_classifier()), 3)


def test_structured_selection_keeps_whole_groups_and_exact_k():
    shapes = body_shapes(tiny_classifier())
    structure = encoder_structure(shapes, HEADS)
    start = {n: torch.zeros(s) for n, s in shapes.items()}
    moved = random_scores(shapes, 3)
    # make head 1 of layer 0 clearly the most important group
    for part in ("query", "key", "value"):
        moved[f"encoder.layer.0.attention.self.{part}.weight"][8:] += 10.0
    for k in (300, 1000, 2500):
        masks = select_subnetwork(start, moved, k, structure=structure)
        assert count_selected(masks) == k
        coverage = group_means({n: masks[n] for n in structure.grouped}, structure)
        for values in coverage.values():
            assert bool(((values == 0) | (values == 1)).all())
        # the head has 536 entries: kept whole once it fits, never cut to fit
        assert float(coverage["encoder.layer.0.heads"][1]) == (1.0 if k >= 536 else 0.0)


def test_structured_selection_with_deft_x_scores():
    shapes = body_shapes(tiny_classifier())
    structure = encoder_structure(shapes, HEADS)
    start, moved = random_scores(shapes, 4), random_scores(shapes, 5)
    masks = select_subnetwork(start, moved, 800, make_scorer("deft_x", rank=2), structure)
    assert count_selected(masks) == 800


def test_target_policies():
    a = {"w": torch.tensor([True, False, False])}
    b = {"w": torch.tensor([False, True, False])}
    touched = {"w": torch.tensor([True, True, True])}
    masks = {"ind": a, "jav": b}
    assert torch.equal(target_mask("union", "ind", masks, touched)["w"], a["w"])   # a source: its own
    assert torch.equal(target_mask("union", "sun", masks, touched)["w"], union_masks([a, b])["w"])
    assert torch.equal(target_mask("full", "sun", masks, touched)["w"], touched["w"])
    assert torch.equal(target_mask("related", "sun", masks, touched, {"sun": "jav"})["w"], b["w"])
    with pytest.raises(ValueError, match="no related language"):
        target_mask("related", "sun", masks, touched, {})
    with pytest.raises(ValueError, match="has no subnetwork"):
        target_mask("related", "sun", masks, touched, {"sun": "bug"})


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("changes,message", [
    ({"mode": "sometimes"}, "subnetworks.mode: unknown mode"),
    ({"mode": "dynamic"}, "subnetworks.reselect_every: dynamic masks need an interval"),
    ({"reselect_every": 5}, "only dynamic masks"),
    ({"meta_learning": "maml"}, "subnetworks.meta_learning: unknown algorithm"),
    ({"meta_learning": "reptile", "inner_steps": 0}, "subnetworks.inner_steps"),
    ({"unseen_target": "nearest"}, "subnetworks.unseen_target"),
    ({"probe_steps": 0}, "subnetworks.probe_steps"),
])
def test_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        SubnetworkConfig(**changes).validate()


def test_config_density_and_related_languages():
    cfg = SubnetworkConfig()
    cfg.selection.density = 1.5
    with pytest.raises(ConfigError, match=r"subnetworks.selection.density: must be in \(0, 1\]"):
        cfg.validate()
    cfg = SubnetworkConfig(unseen_target="related", related={"bbc": "bug"}).validate()
    with pytest.raises(ConfigError, match="'bug' is not a source language"):
        cfg.check_languages(["ind", "jav"], ["bbc"])
    with pytest.raises(ConfigError, match="no related language is set for sun"):
        SubnetworkConfig(unseen_target="related").validate().check_languages(["ind"], ["sun"])


# -- the update restriction -------------------------------------------------------------------


def _masks_for(model: nn.Module, languages: int, density: float, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    body = parameter_roles(model, "task").maskable
    return {lang: {n: torch.rand(p.shape, generator=g) < density for n, p in body.items()} for lang in range(languages)}


def _outside_changes(write_back: bool, weight_decay: float) -> tuple[list[int], list[int], list[int]]:
    """Train 12 steps of 3 languages with AdamW; per step: the language, the number of entries
    outside its mask that the step changed, and the number inside it that it changed."""
    model = tiny_classifier()
    roles = parameter_roles(model, "task")
    for p in roles.frozen.values():
        p.requires_grad_(False)
    stream = tiny_stream(languages=3)
    masks = _masks_for(model, 3, 0.3, seed=1)
    update = LanguageMaskedUpdate(roles.maskable, masks)
    update.install()
    engine = TorchEngine(model, list(roles.maskable.values()) + list(roles.head.values()), learning_rate=1e-2,
                         weight_decay=weight_decay, total_steps=12)
    before: dict[str, torch.Tensor] = {}
    langs, outside, inside = [], [], []

    def snapshot_loss(m, batch):
        before.update({n: p.detach().clone() for n, p in roles.maskable.items()})
        langs.append(batch_language(batch))
        return multi_source_loss(classification_loss, [None, None, None])(m, batch)

    def check() -> None:
        mask = masks[langs[-1]]
        changed = {n: p.detach() != before[n] for n, p in roles.maskable.items()}
        outside.append(sum(int(changed[n][~mask[n]].sum()) for n in changed))
        inside.append(sum(int(changed[n][mask[n]].sum()) for n in changed))

    def skip_write_back() -> None:
        update.current = []

    hooks = [update.finish, check] if write_back else [skip_write_back, check]
    run_phase(engine, stream.batch_at, update.loss(snapshot_loss), num_steps=12, name="t", after_step=hooks)
    return langs, outside, inside


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_batch_never_changes_entries_outside_its_language_mask(weight_decay):
    """Every step checked bit for bit, with and without weight decay."""
    langs, outside, inside = _outside_changes(True, weight_decay)
    assert set(langs) == {0, 1, 2}
    assert outside == [0] * 12
    assert all(n > 0 for n in inside)


def test_without_the_write_back_momentum_leaks_outside_the_mask():
    """The control: with the gradient hook alone, AdamW's moments from other languages' batches
    still move entries outside m_l (so the write-back is necessary, even without weight decay)."""
    _, outside, _ = _outside_changes(False, 0.0)
    assert outside[0] == 0          # no moments yet at the first step
    assert max(outside) > 0


# -- dynamic masks ----------------------------------------------------------------------------


def test_dynamic_masks_change_exactly_every_r_steps_and_keep_the_density():
    from deftx.subnetworks.train import DynamicMasks

    model = tiny_classifier()
    roles = parameter_roles(model, "task")
    for p in roles.frozen.values():
        p.requires_grad_(False)
    stream = tiny_stream(languages=2)
    k = 700
    masks = {lang: global_top_k(random_scores(body_shapes(model), lang), k) for lang in range(2)}
    update = LanguageMaskedUpdate(roles.maskable, masks, accumulate=True)
    update.install()
    dynamic = DynamicMasks(update, every=3, k=k, scorer=change_magnitude, structure=None, languages=["a", "b"])
    engine = TorchEngine(model, list(roles.maskable.values()) + list(roles.head.values()), learning_rate=1e-2,
                         weight_decay=0.0, total_steps=10)
    history: list[dict[int, dict[str, torch.Tensor]]] = [{i: dict(m) for i, m in update.masks.items()}]

    def record() -> None:
        history.append({i: {n: t.clone() for n, t in m.items()} for i, m in update.masks.items()})

    run_phase(engine, stream.batch_at, update.loss(multi_source_loss(classification_loss, [None, None])),
              num_steps=10, name="t", after_step=[update.finish, dynamic, record])
    changed_at = sorted({step for step in range(1, 11) for lang in range(2)
                         if any(not torch.equal(history[step][lang][n], history[step - 1][lang][n])
                                for n in history[step][lang])})
    assert changed_at == [3, 6, 9]
    assert all(count_selected(m) == k for h in history for m in h.values())
    assert sorted({h["step"] for h in dynamic.history}) == [3, 6, 9]


# -- meta-learning: one outer step against a hand computation ----------------------------------


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))


def _mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return 0.5 * ((batch["input_ids"] @ model.w - batch["labels"]) ** 2).mean()


def _grad(w: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    x, y = batch["input_ids"].double(), batch["labels"].double()
    return x.T @ (x @ w - y) / x.shape[0]


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_one_meta_learning_outer_step_equals_the_hand_computation(algorithm):
    alpha, beta, inner = 0.1, 0.01, 2
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randn(4, 3, generator=g), "labels": torch.randn(4, generator=g)}
               for _ in range(inner + 1)]
    used = batches if algorithm == "fomaml" else batches[:inner]
    stacked = stack_batches(used, lang=0)
    mask = torch.tensor([True, False, True])

    model = _Linear()
    w0 = model.w.detach().double().clone()
    update = LanguageMaskedUpdate({"w": model.w}, {0: {"w": mask}})
    update.install()
    loss = meta_loss(multi_source_loss(_mse, [None]), {"w": model.w}, algorithm=algorithm, inner_steps=inner,
                     inner_learning_rate=alpha, update=update)
    engine = TorchEngine(model, [model.w], learning_rate=beta, weight_decay=0.0, total_steps=1, max_grad_norm=None)
    result = run_phase(engine, lambda step: stacked, update.loss(loss), num_steps=1, name="meta",
                       after_step=[update.finish])

    # by hand, in float64
    m = mask.double()
    w, losses = w0.clone(), []
    for b in batches[:inner]:
        losses.append(0.5 * float(((b["input_ids"].double() @ w - b["labels"].double()) ** 2).mean()))
        w = w - alpha * _grad(w, b) * m
    if algorithm == "reptile":
        meta = w0 - w
    else:
        q = batches[inner]
        losses.append(0.5 * float(((q["input_ids"].double() @ w - q["labels"].double()) ** 2).mean()))
        meta = _grad(w, q) * m
    adam_first_step = meta / (meta.abs() + 1e-8)       # AdamW's bias-corrected first step: g / (|g| + eps)
    expected = w0 - beta * adam_first_step
    assert torch.allclose(model.w.detach().double(), expected, atol=1e-6)
    assert model.w.detach()[1] == 0.0 + w0[1]           # outside the mask: untouched, bit for bit
    assert float(meta[0]) != 0.0 and float(meta[2]) != 0.0
    assert result.losses[0] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_meta_batches_stack_and_unstack():
    a = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
         "labels": torch.tensor([0, 1])}
    b = {"input_ids": torch.tensor([[7, 8]]), "attention_mask": torch.tensor([[1, 1]]), "labels": torch.tensor([2])}
    stacked = stack_batches([a, b], lang=1, pad_id=9)
    assert stacked["input_ids"].shape == (1, 2, 3)                  # rows cut to the fewest, padded to the longest
    assert stacked["input_ids"][0, 1].tolist() == [7, 8, 9]
    assert stacked["attention_mask"][0, 1].tolist() == [1, 1, 0]
    assert stacked[LANGUAGE_KEY].tolist() == [1]
    parts = unstack_batch(stacked)
    assert len(parts) == 2 and parts[1]["labels"].tolist() == [2]


def test_meta_stream_keeps_one_language_per_outer_step():
    source = tiny_stream(languages=3, examples=16)
    meta = MetaStream(source, per_step=2)
    assert meta.steps_per_epoch == 3 * 2       # 4 batches per language, 2 per outer step
    langs = [int(meta.batch_at(s)[LANGUAGE_KEY][0]) for s in range(meta.steps_per_epoch)]
    assert sorted(langs) == [0, 0, 1, 1, 2, 2]
    assert torch.equal(meta.batch_at(4)["input_ids"], meta.batch_at(4)["input_ids"])


# -- end to end on a tiny model ---------------------------------------------------------------


MODES = [
    {"mode": "none"},
    {"mode": "static"},
    {"mode": "static", "structured": True},
    {"mode": "dynamic", "reselect_every": 2},
    {"mode": "static", "meta_learning": "reptile", "inner_steps": 2},
    {"mode": "dynamic", "reselect_every": 2, "meta_learning": "fomaml", "inner_steps": 1},
]


@pytest.mark.parametrize("settings", MODES, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_mode_trains_end_to_end(settings):
    from deftx.config import PhaseConfig, SelectionConfig

    cfg = SubnetworkConfig(**settings, probe_steps=2, selection=SelectionConfig(method="lt_sft", density=0.2),
                           train=PhaseConfig(epochs=2, learning_rate=1e-3, weight_decay=0.01)).validate()
    stream = tiny_stream(languages=2, examples=12)
    result = train_subnetworks(tiny_classifier(), languages=["ind", "jav"], stream=stream,
                               loss_fn=multi_source_loss(classification_loss, [None, None]), cfg=cfg, seed=1,
                               log=lambda message: None)
    assert result.final is not None and result.head is not None
    assert all(r.final_loss == r.final_loss for r in result.phases)   # finite
    changed = {n: result.final[n] != result.start[n] for n in result.start}
    assert sum(int(c.sum()) for c in changed.values()) > 0
    assert all(not bool((c & ~result.touched[n]).any()) for n, c in changed.items())
    if settings["mode"] == "none":
        return
    for lang in ("ind", "jav"):
        if settings.get("structured"):   # whole heads (536 entries) and neurons: at most k, short by < a head
            assert result.k - 536 < count_selected(result.masks[lang]) <= result.k
        else:
            assert count_selected(result.masks[lang]) == result.k
        if settings["mode"] == "static":
            assert all(torch.equal(result.masks[lang][n], result.initial_masks[lang][n]) for n in result.masks[lang])
        assert not any("embeddings" in n for n in result.masks[lang])    # cover: encoder
    if settings["mode"] == "dynamic":
        assert result.reselections and {h["step"] % 2 for h in result.reselections} == {0}
    else:
        union = union_masks(list(result.masks.values()))
        assert all(torch.equal(result.touched[n], union[n]) for n in union)
        assert all(bool(result.touched[n].all()) for n in result.touched if n not in union)   # shared tensors


@pytest.mark.parametrize("meta", ["none", "reptile"])
def test_dynamic_masks_that_would_never_be_reselected_are_refused_before_any_work(meta):
    """reselect_every above the phase's optimizer steps (outer steps under meta-learning, which
    take several batches each) would silently train a static system labelled dynamic."""
    from deftx.config import PhaseConfig
    from deftx.subnetworks.train import steps_for_sizes, training_schedule

    stream = tiny_stream(languages=2, examples=12)

    def config(every: int) -> SubnetworkConfig:
        return SubnetworkConfig(mode="dynamic", reselect_every=every, meta_learning=meta, inner_steps=2,
                                probe_steps=1, train=PhaseConfig(epochs=2, learning_rate=1e-3, batch_size=4)).validate()

    batches, steps = training_schedule(config(1), stream)
    assert isinstance(batches, MetaStream) == (meta != "none")
    assert steps == 2 * batches.steps_per_epoch                               # 2 epochs
    assert (steps < 2 * stream.steps_per_epoch) == (meta != "none")          # an outer step takes 2 batches
    assert steps_for_sizes(config(1), [12, 12]) == steps                     # the experiment's up-front count
    assert steps_for_sizes(config(1), [12, 24]) > steps                      # more data, more steps
    built = []

    def builder():
        built.append(True)
        return tiny_classifier()

    def run(every: int):
        cfg = config(every)
        assert cfg.batches_per_step == (1 if meta == "none" else 2)
        return train_subnetworks(builder, languages=["ind", "jav"], stream=stream, cfg=cfg, seed=1,
                                 loss_fn=multi_source_loss(classification_loss, [None, None]), log=lambda m: None)

    with pytest.raises(ConfigError, match=f"reselect_every={steps + 1}, but training has only {steps} optimizer steps"):
        run(steps + 1)
    assert built == []                   # refused before the model was built or any probe ran
    result = run(steps)                  # once, after the last step: the final (exported) masks change
    assert {h["step"] for h in result.reselections} == {steps}


# -- the job and the saved model ---------------------------------------------------------------


def test_subnetwork_job_saves_a_model_whose_target_sfts_follow_the_policy(tiny_model_dir, tmp_path):
    from deftx.config import ModelConfig, PipelineConfig, SFTConfig, from_dict
    from deftx.core.compose import Composition
    from deftx.jobs.cache import job_key
    from deftx.jobs.run import run_job
    from deftx.jobs.spec import SubnetworkJob
    from deftx.models import load_classifier
    from deftx.subnetworks.artifact import SubnetworkModel
    from deftx.subnetworks.config import SubnetworkConfig
    from deftx.tasks import task_spec

    cfg = PipelineConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)), task_sft=SFTConfig(max_train_examples=24))
    settings = {"mode": "static", "structured": True, "probe_steps": 2, "selection": {"density": 0.1},
                "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
                "unseen_target": "related", "related": {"ind": "jav"}}
    job = SubnetworkJob(cfg, "test-fingerprint", ("jav", "sun"),
                        subnetworks=from_dict(SubnetworkConfig, settings, "subnetworks"))
    assert job.name == "task-subnetworks-jav-sun"
    output = run_job(job, log=lambda message: None)
    assert output is not None and output.model is not None
    output.save(tmp_path / "model")
    model = SubnetworkModel.load(tmp_path / "model")
    assert model.languages == ["jav", "sun"] and model.info["config_digest"] == job_key(job)
    for lang in ("jav", "sun"):
        assert all(torch.equal(model.masks[lang][n], output.model.masks[lang][n]) for n in model.masks[lang])

    def support(sft):
        return {n: set(d.indices.tolist()) for n, d in sft.diffs.items()}

    def inside(sft, masks) -> bool:   # embeddings are outside the subnetworks (cover: encoder): shared
        assert not any("embeddings" in n for n in masks) and any("embeddings" in n and d.nnz for n, d in sft.diffs.items())
        return all(bool(masks[n].reshape(-1)[d.indices].all()) for n, d in sft.diffs.items() if n in masks)

    jav, ind = model.sft_for("jav"), model.sft_for("ind")         # ind: unseen, related to jav
    assert inside(jav, model.masks["jav"]) and support(jav) == support(ind)
    union = model.sft_for("ind", policy="union")
    assert inside(union, union_masks([model.masks["jav"], model.masks["sun"]])) and union.nnz >= jav.nnz
    assert model.sft_for("ind", policy="full").nnz == model.sft.nnz
    assert 0 < jav.nnz < model.sft.nnz
    assert ind.metadata.trained_on["subnetwork"] == {"target": "ind", "mask": "related", "related": "jav"}
    classifier = load_classifier(str(tiny_model_dir), task_spec(cfg.task).labels, seed=0)
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    with Composition(ind, None).applied(classifier):
        moved = sum(int((p.detach() != before[n]).sum()) for n, p in classifier.named_parameters())
    assert moved > 0


# -- sweeps of a subnetwork system -------------------------------------------------------------


def _space(tmp_path, **data):
    import yaml

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"system": "dynamic", "searcher": "random",
                                    "dimensions": {"selection.density": {"loguniform": [0.1, 0.5]},
                                                   "reselect_every": {"choice": [1, 2]}}, **data}))
    return path


def test_subnetwork_space_is_checked_against_the_experiment_before_any_work(tmp_path):
    from deftx.workflows.experiments.config import load_experiment
    from deftx.workflows.sweeps.subnetworks import load_subnetwork_space, trial_config

    cfg = load_experiment("nusax", preset="subnetworks-small")
    space = load_subnetwork_space(_space(tmp_path), cfg)
    assert set(space.dimensions) == {"selection.density", "reselect_every"}
    for bad, message in [({"system": "nope"}, "system: 'nope' is not a subnetwork system"),
                         ({"searcher": "grid"}, "searcher: unknown 'grid'"),
                         ({"seed": 7}, "seed: 7 is not one of the experiment's seeds"),
                         ({"dimensions": {"selection.density": {"uniform": [0.5, 1.5]}}},
                          r"selection.density = 1.5 gives an invalid system: selection.density: must be in \(0, 1\]"),
                         ({"dimensions": {"reselect_evry": {"choice": [5]}}}, "reselect_evry: unknown key"),
                         ({"dimensions": {"reselect_every": {"randint": [0.5, 3]}}}, "bounds must be integers"),
                         ({"colour": "red"}, "unknown key 'colour'")]:
        with pytest.raises(ConfigError, match=message):
            load_subnetwork_space(_space(tmp_path, **bad), cfg)
    trial = trial_config(cfg, space, {"selection.density": 0.2, "reselect_every": 1}, "/shared", str(tmp_path / "t"))
    assert list(trial.subnetworks.systems) == ["trial"] and trial.seeds == [1] and trial.eval_splits == ["valid"]
    system = trial.subnetworks.system("trial")
    assert system.selection.density == 0.2 and system.reselect_every == 1 and system.mode == "dynamic"
    assert trial.reuse_from == "/shared"


@pytest.mark.parametrize("preset", ["subnetworks-small", "subnetworks-full"])
def test_subnetwork_sweep_configs_validate_for_every_subnetwork_preset(tmp_path, preset):
    """The sweep's shared work (no systems) and a trial validate, with or without a main table
    (subnetworks-full has main_table: false: the shared work is then the language SFTs only)."""
    from deftx.workflows.experiments.config import load_experiment
    from deftx.workflows.sweeps.subnetworks import load_subnetwork_space, shared_config, trial_config

    cfg = load_experiment("nusax", preset=preset)
    space = load_subnetwork_space(_space(tmp_path, dimensions={"selection.density": {"choice": [0.2, 0.4]}}), cfg)
    shared = shared_config(cfg, space)
    assert shared.subnetworks.systems == {} and shared.seeds == [cfg.seeds[0]] and shared.main_table == cfg.main_table
    assert not shared.pipeline.tracking.enabled and cfg.subnetworks.systems   # the caller's config is untouched
    trial = trial_config(cfg, space, {"selection.density": 0.2}, "/shared", str(tmp_path / "t"))
    assert trial.main_table == cfg.main_table and list(trial.subnetworks.systems) == ["trial"]


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_subnetwork_sweep_runs_trials_on_the_validation_objective(tiny_model_dir, tmp_path):
    """A real Tune sweep (random search, 2 trials) of the dynamic system on a tiny model: shared
    work once, every trial scored on the held-out targets' validation split and logged to MLflow."""
    import json
    import os
    import subprocess
    import sys

    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "deftx", "sweep-subnetworks", "nusax", "--preset", "subnetworks-small",
           "--space", str(_space(tmp_path)), "--num-samples", "2", "--output-dir", str(tmp_path / "out"),
           "--set", f"pipeline.model.name_or_path={tiny_model_dir}", "--set", "pipeline.max_eval_examples=20",
           "--set", f"pipeline.tracking.uri=sqlite:///{db}"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    (result_file,) = (tmp_path / "out" / "sweeps").glob("*/result.json")
    result = json.loads(result_file.read_text())
    assert len(result["trials"]) == 2 and all(t["error"] is None for t in result["trials"])
    assert all(0.0 <= t["score"] <= 1.0 for t in result["trials"])
    assert result["best"]["score"] == max(t["score"] for t in result["trials"])
    assert result["objective"] == "valid_macro_f1"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("deftx-subnetworks-sweep-nusax")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name.startswith("sweep-")]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2 and all("valid_macro_f1" in r.data.metrics for r in trials)
    assert "best_valid_macro_f1" in parent.data.metrics


def test_masks_round_trip_bit_packed(tmp_path):
    from deftx.subnetworks.artifact import load_masks, save_masks

    g = torch.Generator().manual_seed(0)
    masks = {"jav": {"a.weight": torch.rand(3, 5, generator=g) < 0.5, "a.bias": torch.rand(7, generator=g) < 0.5},
             "sun": {"a.weight": torch.rand(3, 5, generator=g) < 0.5, "a.bias": torch.zeros(7, dtype=torch.bool)}}
    save_masks(tmp_path / "m.safetensors", masks)
    back = load_masks(tmp_path / "m.safetensors")
    assert sorted(back) == ["jav", "sun"]
    assert all(torch.equal(back[lang][n], masks[lang][n]) for lang in masks for n in masks[lang])


def test_systems_with_the_same_probes_share_their_masks(tiny_model_dir, tmp_path):
    """The probe masks are cached by digest: a second system with the same probe settings (here
    dynamic vs static) starts from identical masks without probing again."""
    from deftx.config import ModelConfig, PipelineConfig, SFTConfig, from_dict
    from deftx.jobs.run import run_job
    from deftx.jobs.spec import SubnetworkJob
    from deftx.subnetworks.config import SubnetworkConfig

    cfg = PipelineConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)), task_sft=SFTConfig(max_train_examples=24))
    base = {"probe_steps": 2, "selection": {"density": 0.1}, "train": {"epochs": 1, "batch_size": 8}}
    lines: list[str] = []
    outputs = {}
    for mode, extra in (("static", {}), ("dynamic", {"reselect_every": 2})):
        sub = from_dict(SubnetworkConfig, {**base, "mode": mode, **extra}, "subnetworks")
        job = SubnetworkJob(cfg, "test-fingerprint", ("jav", "sun"), subnetworks=sub,
                            masks_cache=str(tmp_path / "probes"))
        outputs[mode] = run_job(job, log=lines.append).model
    from deftx.subnetworks.artifact import load_masks

    (cached,) = (tmp_path / "probes").glob("*.safetensors")
    assert sum("initial subnetworks reused" in line for line in lines) == 1     # the dynamic run probed nothing
    static, dynamic = outputs["static"], outputs["dynamic"]
    shared = load_masks(cached)
    assert all(torch.equal(shared[lang][n], static.masks[lang][n]) for lang in ("jav", "sun") for n in shared[lang])
    assert dynamic.info["reselections"] and static.info["initial_vs_final_overlap"] == {"jav": 1.0, "sun": 1.0}
