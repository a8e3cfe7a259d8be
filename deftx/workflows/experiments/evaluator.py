"""Scoring in an experiment: one classifier in this process, compositions applied and reverted
exactly around each score, scores cached on disk under keys of the models scored."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deftx.core.io import replace_json
from deftx.core.sft import SparseFineTuning
from deftx.evaluation import ClassifierScorer
from deftx.jobs.spec import Log
from deftx.models import resolve_model_path
from deftx.tasks import spec_of
from deftx.training.phase1_store import Phase1Store
from deftx.workflows.experiments.config import ExperimentConfig
from deftx.workflows.experiments.state import MissingUnit


class Evaluator:
    """One classifier in this process; compositions applied and reverted exactly around each score.
    Scores are cached on disk by the digests of the SFTs involved."""

    def __init__(self, cfg: ExperimentConfig, cache_dir: Path, log: Log, report_only: bool = False) -> None:
        pipe = cfg.pipeline
        self.cfg, self.cache_dir, self.log, self.report_only = cfg, cache_dir, log, report_only
        self.spec = spec_of(pipe)
        self.scorer = ClassifierScorer(resolve_model_path(pipe.model.name_or_path, log=lambda line: None),
                                       self.spec.labels, seed=pipe.seed, batch_size=pipe.eval_batch_size,
                                       max_length=pipe.model.max_length)
        self.examples: dict[tuple[str, str], list] = {}
        self._fully_tuned: tuple[tuple[Path, str], Any] | None = None
        cache_dir.mkdir(parents=True, exist_ok=True)

    def _data(self, lang: str, split: str) -> list:
        key = (lang, split)
        if key not in self.examples:
            rows = self.spec.evaluation(lang, split, self.cfg.pipeline.data.source)
            self.examples[key] = rows if self.cfg.pipeline.max_eval_examples is None else \
                rows[: self.cfg.pipeline.max_eval_examples]
        return self.examples[key]

    def _score(self, lang: str, split: str) -> dict[str, float]:
        return self.scorer.score(self._data(lang, split))

    def scores(self, key: str, languages: list[str], apply_for,
               splits: list[str] | None = None) -> dict[tuple[str, str], dict[str, float]]:
        """(language, split) -> scores of the model ``apply_for(language)`` sets up (a context
        manager) on ``splits`` (default: the experiment's), cached under ``key``."""
        splits = list(splits or self.cfg.eval_splits)
        path = self.cache_dir / f"{key}.json"
        want = [f"{lang}/{split}" for lang in languages for split in splits]
        cached: dict[str, Any] = {}
        if path.is_file():
            cached = json.loads(path.read_text(encoding="utf-8"))
        if all(w in cached for w in want):
            return {tuple(w.split("/")): cached[w] for w in want}  # type: ignore[misc]
        if self.report_only:
            raise MissingUnit(f"scores {key}")
        started = time.perf_counter()
        for lang in languages:
            if all(f"{lang}/{split}" in cached for split in splits):
                continue
            with apply_for(lang):
                for split in splits:
                    cached[f"{lang}/{split}"] = self._score(lang, split)
            replace_json(path, cached)   # per language: a stopped run keeps the languages it finished
        self.log(f"[eval] {key.split('-')[0]}: {len(languages)} language(s) x {len(splits)} split(s) in "
                 f"{time.perf_counter() - started:.0f} s")
        return {tuple(w.split("/")): cached[w] for w in want}  # type: ignore[misc]

    def head_input_shift(self, key: str, languages: list[str], reference, others: dict[str, Any],
                         split: str = "valid") -> dict[str, dict[str, dict[str, float]]]:
        """How far each model of ``others`` (name -> ``apply_for``) moves what the classification
        head reads, against the model ``reference(language)`` sets up, on each language's ``split``:
        language -> name -> mean cosine similarity of the head inputs and the share of equal
        predictions. Cached under ``key``."""
        import torch

        path = self.cache_dir / f"shift-{key}.json"
        cached: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if all(name in cached.get(lang, {}) for lang in languages for name in others):
            return {lang: cached[lang] for lang in languages}
        if self.report_only:
            raise MissingUnit(f"head-input shift {key}")
        started = time.perf_counter()
        for i, lang in enumerate(languages, 1):
            if all(name in cached.get(lang, {}) for name in others):
                continue
            examples = self._data(lang, split)
            with reference(lang):
                base, base_preds = self.scorer.head_inputs(examples)
            row = {}
            for name, apply_for in others.items():
                with apply_for(lang):
                    inputs, preds = self.scorer.head_inputs(examples)
                row[name] = {"cosine": float(torch.nn.functional.cosine_similarity(inputs, base, dim=-1).mean()),
                             "agreement": sum(a == b for a, b in zip(preds, base_preds)) / max(len(preds), 1)}
            cached[lang] = row
            replace_json(path, cached)   # per language: a stopped run keeps the languages it finished
            self.log(f"[head-input shift] {key.split('-')[0]}: {lang} ({i}/{len(languages)}, "
                     f"{len(others) + 1} models on {len(examples)} {split} examples) after "
                     f"{time.perf_counter() - started:.0f} s")
        return {lang: cached[lang] for lang in languages}

    @contextmanager
    def composed(self, task: SparseFineTuning, lang: SparseFineTuning | None) -> Iterator[None]:
        with self.scorer.composed(task, lang):
            yield

    @contextmanager
    def fully_fine_tuned(self, store: Phase1Store) -> Iterator[None]:
        """theta1 and the head after phase 1 of ``store`` in place of the classifier's weights (the
        store is read once, not once per language)."""
        if self._fully_tuned is None or self._fully_tuned[0] != (store.directory, store.digest):
            self._fully_tuned = ((store.directory, store.digest), store.load())
        state = self._fully_tuned[1]
        if state is None or not state.head_end:
            raise RuntimeError(f"{store.directory}: no full fine-tuning result (phase 1 with its head) stored")
        with self.scorer.weights({**state.theta1, **state.head_end}):
            yield
