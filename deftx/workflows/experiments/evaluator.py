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

    def _fill(self, path: Path, languages: list[str], done, compute, missing: str,
              progress=None) -> tuple[dict[str, Any], int]:
        """The JSON cache at ``path`` with every language of ``languages`` present: ``compute(lang)``
        (a dict merged into the cache) for each language ``done(cache, lang)`` is false, the cache
        written after each one so that a stopped run keeps the languages it finished.
        ``progress(i, lang, seconds)`` after each computed language. Returns the cache and how many
        languages were computed. Report-only: ``MissingUnit`` (``missing``) instead of computing."""
        cached: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        todo = [(i, lang) for i, lang in enumerate(languages, 1) if not done(cached, lang)]
        if todo and self.report_only:
            raise MissingUnit(missing)
        started = time.perf_counter()
        for i, lang in todo:
            cached.update(compute(lang))
            replace_json(path, cached)
            if progress is not None:
                progress(i, lang, time.perf_counter() - started)
        return cached, len(todo)

    def scores(self, key: str, languages: list[str], apply_for,
               splits: list[str] | None = None) -> dict[tuple[str, str], dict[str, float]]:
        """(language, split) -> scores of the model ``apply_for(language)`` sets up (a context
        manager) on ``splits`` (default: the experiment's), cached under ``key``."""
        splits = list(splits or self.cfg.eval_splits)

        def compute(lang: str) -> dict[str, Any]:
            with apply_for(lang):
                return {f"{lang}/{split}": self._score(lang, split) for split in splits}

        started = time.perf_counter()
        cached, computed = self._fill(self.cache_dir / f"{key}.json", languages,
                                      lambda c, lang: all(f"{lang}/{split}" in c for split in splits), compute,
                                      f"scores {key}")
        if computed:
            self.log(f"[eval] {key.split('-')[0]}: {len(languages)} language(s) x {len(splits)} split(s) in "
                     f"{time.perf_counter() - started:.0f} s")
        return {(lang, split): cached[f"{lang}/{split}"] for lang in languages for split in splits}

    def head_input_shift(self, key: str, languages: list[str], reference, others: dict[str, Any],
                         split: str = "valid") -> dict[str, dict[str, dict[str, float]]]:
        """How far each model of ``others`` (name -> ``apply_for``) moves what the classification
        head reads, against the model ``reference(language)`` sets up, on each language's ``split``:
        language -> name -> mean cosine similarity of the head inputs and the share of equal
        predictions. Cached under ``key``."""
        import torch

        def compute(lang: str) -> dict[str, Any]:
            examples = self._data(lang, split)
            with reference(lang):
                base, base_preds = self.scorer.head_inputs(examples)
            row = {}
            for name, apply_for in others.items():
                with apply_for(lang):
                    inputs, preds = self.scorer.head_inputs(examples)
                row[name] = {"cosine": float(torch.nn.functional.cosine_similarity(inputs, base, dim=-1).mean()),
                             "agreement": sum(a == b for a, b in zip(preds, base_preds)) / max(len(preds), 1)}
            return {lang: row}

        def progress(i: int, lang: str, seconds: float) -> None:
            self.log(f"[head-input shift] {key.split('-')[0]}: {lang} ({i}/{len(languages)}, {len(others) + 1} "
                     f"models on {len(self._data(lang, split))} {split} examples) after {seconds:.0f} s")

        cached, _ = self._fill(self.cache_dir / f"shift-{key}.json", languages,
                               lambda c, lang: all(name in c.get(lang, {}) for name in others), compute,
                               f"head-input shift {key}", progress)
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
