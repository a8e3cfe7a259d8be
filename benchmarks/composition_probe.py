"""What a language SFT does to zero-shot transfer, part by part: a trained NusaX run's task SFT
composed with parts of its language SFTs, scored on validation (model selection data, never test).

    python benchmarks/composition_probe.py RUN_DIR [--method lt_sft] [--seed 1] [--source ind]
                                           [--langs jav sun bbc ind] [--split valid]
                                           [--layers 4 8 11] [--scales 0.5]

``RUN_DIR`` is an experiment's ``pipeline.output_dir`` (its SFTs under ``sfts/<method>/lang-<lang>``
and ``sfts/seed<seed>/<method>``). For each language, the task SFT (with its head) is composed with:

* ``none``: no language SFT (theta0 + task);
* ``source``: the source language's SFT, which the task SFT was trained on top of;
* ``target``: the language's own SFT (the LT-SFT recipe's zero-shot composition);
* ``target xS``: the language SFT's differences multiplied by ``S`` (``--scales``);
* ``no emb``: the language SFT without its embedding entries;
* ``layers <L``: only its embedding entries and its entries in encoder layers below ``L``.

Printed per language and variant: macro-F1, the share of predictions equal to ``none``'s, and the
mean cosine similarity of the classifier's input (the pooled representation) to ``none``'s, so a
drop in score can be traced to how far, and from which layers, the composition moves the features
the task head reads.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from _common import machine_info, table

from deftx.core.sft import SparseDelta, SparseFineTuning
from deftx.data.nusax import NUSAX_LABELS, load_nusax_senti
from deftx.evaluation import ClassifierScorer, scores
from deftx.models import resolve_model_path

LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def layer_of(name: str) -> int:
    """Encoder layer of a body tensor, -1 for the embeddings."""
    match = LAYER.match(name)
    return int(match.group(1)) if match else -1


def part(sft: SparseFineTuning, keep=lambda name: True, scale: float = 1.0) -> SparseFineTuning:
    diffs = {name: SparseDelta(d.shape, d.indices, d.values * scale) for name, d in sft.diffs.items() if keep(name)}
    return SparseFineTuning(diffs, sft.head, sft.metadata, sft.source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default="lt_sft")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--source", default="ind")
    parser.add_argument("--langs", nargs="+", default=["jav", "sun", "bbc", "ind"])
    parser.add_argument("--split", default="valid", choices=["train", "valid"])
    parser.add_argument("--layers", nargs="*", type=int, default=[4, 8, 11])
    parser.add_argument("--scales", nargs="*", type=float, default=[0.5])
    parser.add_argument("--model", default="offline:multilingual-e5-small")
    args = parser.parse_args()
    print(machine_info())

    sfts = args.run_dir / "sfts"
    task = SparseFineTuning.load(sfts / f"seed{args.seed}" / args.method)
    langs = {lang: SparseFineTuning.load(sfts / args.method / f"lang-{lang}")
             for lang in dict.fromkeys([args.source, *args.langs])}
    scorer = ClassifierScorer(resolve_model_path(args.model, log=lambda line: None), NUSAX_LABELS, seed=args.seed)

    def variants(lang: str) -> dict[str, SparseFineTuning | None]:
        own = langs[lang]
        out = {"none": None, "source": langs[args.source], "target": own}
        out.update({f"target x{s:g}": part(own, scale=s) for s in args.scales})
        out["no emb"] = part(own, lambda name: layer_of(name) >= 0)
        out.update({f"layers <{k}": part(own, lambda name, k=k: layer_of(name) < k) for k in args.layers})
        return out

    rows = []
    for lang in args.langs:
        examples = load_nusax_senti(lang, args.split)
        labels = [e.label for e in examples]
        reference = None
        for name, language_sft in variants(lang).items():
            started = time.perf_counter()
            with scorer.composed(task, language_sft):
                pooled, preds = scorer.head_inputs(examples)
            f1 = scores(labels, preds, len(NUSAX_LABELS))["macro_f1"]
            if reference is None:
                reference = (pooled, preds)
            agree = sum(a == b for a, b in zip(preds, reference[1])) / len(preds)
            cosine = float(torch.nn.functional.cosine_similarity(pooled, reference[0], dim=-1).mean())
            rows.append([lang, name, f"{100 * f1:.1f}", f"{100 * agree:.0f}%", f"{cosine:.3f}",
                         f"{time.perf_counter() - started:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(f"{args.method}, task seed {args.seed}, {args.split} split ({len(examples)} examples per language); "
          f"agreement and cosine against 'none'")
    print(table(["language", "composition", "macro-F1", "same prediction", "pooled cosine", "s"], rows))


if __name__ == "__main__":
    main()
