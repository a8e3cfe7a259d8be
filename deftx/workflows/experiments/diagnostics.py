"""An experiment's held-out MLM-loss diagnostics (:mod:`deftx.held_out_mlm`): per method, theta0
(with the shared MLM head) and theta0 + each language's SFT scored on every language's held-out
adaptation text, twice: with each SFT's own MLM head (the SFT as trained) and with its body
entries alone over the shared head (what a composition with a task SFT keeps of it). Cached on
disk under a key of the head, the SFTs and the settings."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from deftx.core.io import replace_json
from deftx.core.sft import SparseFineTuning
from deftx.held_out_mlm import VARIANTS, held_out_set, loss_matrix
from deftx.jobs.cache import digest, input_key
from deftx.jobs.head import load_head
from deftx.jobs.recipes import set_mlm_head
from deftx.jobs.spec import Log
from deftx.models import load_masked_lm, load_tokenizer, resolve_model_path
from deftx.tasks import spec_of
from deftx.workflows.experiments.config import ExperimentConfig
from deftx.workflows.experiments.state import MissingUnit


class MLMDiagnostics:
    """Loads the masked-LM model and the held-out sets once; :meth:`method` scores one method's
    language SFTs (or reads them from the cache)."""

    def __init__(self, cfg: ExperimentConfig, head_dir: str | None, cache_dir: Path, log: Log,
                 report_only: bool = False) -> None:
        self.cfg, self.head_dir, self.cache_dir, self.log, self.report_only = cfg, head_dir, cache_dir, log, report_only
        self._model = None
        self._sets: dict[str, Any] | None = None

    def _settings(self) -> dict[str, Any]:
        pipe, settings = self.cfg.pipeline, self.cfg.mlm_loss
        return {"max_lines": settings.max_lines, "batch_size": settings.batch_size, "seed": settings.seed,
                "held_out": pipe.language_sft.held_out, "text": pipe.language_sft.text,
                "mlm_probability": pipe.language_sft.mlm_probability, "max_length": pipe.model.max_length,
                "model": pipe.model.name_or_path, "data": pipe.data.source}

    def _prepare(self, languages: list[str]) -> None:
        if self._model is not None:
            return
        pipe, settings = self.cfg.pipeline, self.cfg.mlm_loss
        path = resolve_model_path(pipe.model.name_or_path, log=lambda line: None)
        tokenizer = load_tokenizer(path)
        model, _ = load_masked_lm(path, seed=pipe.seed)
        if self.head_dir is not None:
            set_mlm_head(model, load_head(self.head_dir))
        spec = spec_of(pipe)
        self._sets = {}
        for lang in languages:
            lines = spec.adaptation_text(lang, pipe.data.source, pipe.language_sft, "held_out")
            if not lines:
                self.log(f"[mlm-loss] {lang}: no held-out line at held_out {pipe.language_sft.held_out}; not scored")
                continue
            self._sets[lang] = held_out_set(tokenizer, lang, lines, max_length=pipe.model.max_length,
                                            probability=pipe.language_sft.mlm_probability,
                                            batch_size=settings.batch_size, seed=settings.seed,
                                            max_lines=settings.max_lines)
        self._model = model

    def method(self, method: str, sft_dirs: dict[str, str]) -> dict[str, Any]:
        """``{"lines", "predicted", "sft", "body", "seconds"}`` for ``method``'s language SFTs
        (``sft_dirs``: language -> directory), each matrix ``{row: {language: loss}}``."""
        languages = list(sft_dirs)
        key = digest({"head": input_key(self.head_dir), "sfts": {lang: input_key(d) for lang, d in sft_dirs.items()},
                      "settings": self._settings()})
        path = self.cache_dir / f"mlm-loss-{method}.json"
        if path.is_file():
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                return cached
        if self.report_only:
            raise MissingUnit(f"held-out MLM loss ({method})")
        started = time.perf_counter()
        self._prepare(languages)
        assert self._sets is not None
        sfts = {lang: SparseFineTuning.load(d) for lang, d in sft_dirs.items()}
        self.log(f"== held-out MLM loss, {method}: {len(sfts)} language SFTs x {len(self._sets)} languages "
                 f"({', '.join(f'{lang} {s.lines}' for lang, s in self._sets.items())} lines) ==")
        result: dict[str, Any] = {"key": key, "lines": {lang: s.lines for lang, s in self._sets.items()},
                                  "predicted": {lang: s.predicted for lang, s in self._sets.items()}}
        for variant in VARIANTS:
            result[variant] = loss_matrix(self._model, self._sets, sfts, with_head=variant == "sft", log=self.log)
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        replace_json(path, result)
        return result
