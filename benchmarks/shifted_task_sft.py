"""Does a task SFT that has seen language-SFT shifts read a target through its own SFT? A pilot on
a trained NusaX run: the Indonesian training examples are split into equal parts, one per language
SFT (``--langs``), and a task SFT is trained on them as a multi-source task SFT (each batch at
theta + its part's language SFT, ``deftx.training.multi_source``); no target label is used. It is
then composed with nothing, the source SFT, or each language's own SFT and scored on validation.

    python benchmarks/shifted_task_sft.py RUN_DIR CONFIG [--langs ind jav sun bbc] [--method lt_sft]
                                          [--seed 1] [--split-seed 0] [--out DIR]

``RUN_DIR``: the run's ``pipeline.output_dir`` (language SFTs under ``sfts/<method>/lang-<lang>``);
``CONFIG``: its experiment YAML (task phases, budget). Compare with the same run's single-source
task SFT (``composition_probe.py``), which saw only the Indonesian SFT.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from _common import machine_info, table

import deftx.jobs.recipes as recipes
from deftx.core.sft import SparseFineTuning
from deftx.data.nusax import NUSAX_LABELS, load_nusax_senti
from deftx.evaluation import ClassifierScorer
from deftx.models import load_tokenizer, resolve_model_path
from deftx.workflows.experiments.config import load_experiment


class _SplitSource:
    """The NusaX task with the source's training examples dealt round robin (after a seeded shuffle)
    to the languages, so that every language's batches are source-language examples."""

    def __init__(self, spec, source: str, langs: list[str], seed: int) -> None:
        self._spec = spec
        examples = spec.train(source, "bundled")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        self.parts = {lang: [examples[j] for j in order[i:: len(langs)]] for i, lang in enumerate(langs)}

    def __getattr__(self, name):
        return getattr(self._spec, name)

    def train(self, lang: str, source) -> list:
        return self.parts[lang]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("config")
    parser.add_argument("--langs", nargs="+", default=["ind", "jav", "sun", "bbc"])
    parser.add_argument("--method", default="lt_sft")
    parser.add_argument("--seed", type=int, default=1, help="the task SFT's seed")
    parser.add_argument("--split-seed", type=int, default=0, help="the shuffle that deals examples to languages")
    parser.add_argument("--out", type=Path, default=None, help="where to save the task SFT (default: not saved)")
    args = parser.parse_args()
    print(machine_info())
    cfg = load_experiment("nusax", config_file=args.config)
    pipe = cfg.pipeline
    source = pipe.source_language
    task_cfg = dataclasses.replace(pipe.task_sft, selection=cfg.selection(args.method, "task"))
    sfts = {lang: SparseFineTuning.load(args.run_dir / "sfts" / args.method / f"lang-{lang}")
            for lang in dict.fromkeys([source, *args.langs])}
    split = _SplitSource(recipes.task_spec(pipe.task), source, args.langs, args.split_seed)
    original = recipes.task_spec
    recipes.task_spec = lambda task: split   # the multi-source trainer reads its data through task_spec
    try:
        path = resolve_model_path(pipe.model.name_or_path, log=lambda line: None)
        started = time.perf_counter()
        task = recipes.train_multi_source_task_sft(path, load_tokenizer(path), args.langs, sfts, task_cfg,
                                                   model_id=pipe.model.name_or_path, data_source="bundled",
                                                   max_length=pipe.model.max_length, seed=args.seed, log=print)
    finally:
        recipes.task_spec = original
    print(f"task SFT trained in {time.perf_counter() - started:.0f} s")
    if args.out:
        task.save(args.out)
    scorer = ClassifierScorer(path, NUSAX_LABELS, seed=args.seed)
    rows = []
    for lang in [*[l for l in args.langs if l != source], source]:
        examples = load_nusax_senti(lang, "valid")
        cells = []
        for language_sft in (None, sfts[source], sfts[lang]):
            with scorer.composed(task, language_sft):
                cells.append(f"{100 * scorer.score(examples)['macro_f1']:.1f}")
        rows.append([lang, *cells])
    print(table(["language", "task SFT alone", f"+ {source} SFT", "+ own SFT"], rows))


if __name__ == "__main__":
    main()
