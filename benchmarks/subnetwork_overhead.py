"""What a language-specific subnetwork costs per optimizer step, in one run, on the same
model (offline multilingual-e5-small classifier), the same NusaX batches of 3 languages and the same
thread count:

    plain        multi-source training, every batch updates everything (mode none)
    static       each step confined to its language's mask (30% of the encoder entries): gradient
                 hook + read before / write back after the step outside the mask
    static-all   the same with the embeddings restricted too (cover: all)
    reptile      static masks, one outer step = 3 inner masked SGD steps + the meta-gradient step

    python benchmarks/subnetwork_overhead.py [--steps 10] [--quick]

Reports steps/s after 2 warm-up steps and each variant's time per step against plain (ratio). A
Reptile outer step consumes 3 batches, so its per-batch ratio is shown too. No timing assertions;
run it on an idle machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import benchmark_model_path, load_note, machine_info, table

WARMUP = 2
LANGS = ("ind", "jav", "sun")


def measure(model_path: str, variant: str, steps: int) -> float:
    """Seconds per optimizer step of ``variant`` (after the warm-up)."""
    from deftx.core.roles import embedding_parameter_names, parameter_roles
    from deftx.core.topk import global_top_k
    from deftx.data import NUSAX_LABELS, load_nusax_senti
    from deftx.models import load_classifier, load_tokenizer
    from deftx.subnetworks.meta import MetaStream, meta_loss
    from deftx.subnetworks.update import LanguageMaskedUpdate
    from deftx.training.batches import classification_stream
    from deftx.training.engine import TorchEngine
    from deftx.training.multi_source import MultiSourceStream, multi_source_loss
    from deftx.training.objectives import classification_loss
    from deftx.training.phase import run_phase

    torch.manual_seed(0)
    tok = load_tokenizer(model_path)
    model = load_classifier(model_path, NUSAX_LABELS, seed=0)
    roles = parameter_roles(model, "task")
    for p in roles.frozen.values():
        p.requires_grad_(False)
    stream = MultiSourceStream([classification_stream(tok, load_nusax_senti(lang, "train"), batch_size=16, seed=i,
                                                      max_length=128) for i, lang in enumerate(LANGS)], seed=0)
    base_loss = multi_source_loss(classification_loss, [None] * len(LANGS))
    params = list(roles.maskable.values()) + list(roles.head.values())
    stamps: list[float] = []
    hooks = []
    loss = base_loss
    batches = stream
    if variant != "plain":
        embeddings = embedding_parameter_names(model)
        covered = {n: p for n, p in roles.maskable.items() if variant == "static-all" or n not in embeddings}
        g = torch.Generator().manual_seed(1)
        k = int(0.3 * sum(p.numel() for p in covered.values()))
        masks = {i: global_top_k({n: torch.rand(p.shape, generator=g) for n, p in covered.items()}, k)
                 for i in range(len(LANGS))}
        update = LanguageMaskedUpdate(covered, masks)
        update.install()
        hooks = [update.finish]
        if variant == "reptile":
            batches = MetaStream(stream, 3)
            loss = update.loss(meta_loss(base_loss, {**roles.maskable, **roles.head}, algorithm="reptile",
                                         inner_steps=3, inner_learning_rate=1e-3, update=update))
        else:
            loss = update.loss(base_loss)
    engine = TorchEngine(model, params, learning_rate=5e-5, weight_decay=0.0, total_steps=steps)
    run_phase(engine, batches.batch_at, loss, num_steps=steps, name=variant, after_step=hooks,
              on_step=lambda step, value: stamps.append(time.perf_counter()), log=lambda s: None)
    return (stamps[-1] - stamps[WARMUP - 1]) / (steps - WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a small random model instead of e5-small")
    parser.add_argument("--variants", default="plain,static,static-all,reptile")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(machine_info())
    print(load_note("start"))
    path = benchmark_model_path(args.quick)
    seconds = {v: measure(path, v, args.steps) for v in args.variants.split(",")}
    base = seconds.get("plain")
    rows = []
    for variant, s in seconds.items():
        per_batch = s / 3 if variant == "reptile" else s
        rows.append([variant, f"{1 / s:.2f}", f"{s:.3f}", f"{s / base:.2f}x" if base else "-",
                     f"{per_batch / base:.2f}x" if base else "-"])
    print(table(["variant", "steps/s", "s/step", "vs plain (step)", "vs plain (batch)"], rows))
    print(load_note("end"))


if __name__ == "__main__":
    main()
