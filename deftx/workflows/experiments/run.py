"""``deftx experiment <dataset>``: run an experiment, write its report under ``benchmarks/results/``
and log everything to MLflow (one run per experiment, the report files as artifacts)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deftx import __version__
from deftx.analysis import change_spectra, density_by_layer, mean_normalised_spectrum
from deftx.core.io import check_output_location
from deftx.core.roles import body_parameters
from deftx.core.sft import SparseFineTuning
from deftx.jobs.spec import Log
from deftx.models import load_classifier, resolve_model_path
from deftx.tasks import spec_of
from deftx.tracking.plots import density_by_layer_figure, spectra_by_type_figure
from deftx.tracking.runs import log_sft
from deftx.tracking.tracker import Tracker
from deftx.training.phase1_store import THETA1_FILE
from deftx.workflows.experiments.config import FULL_FT, ExperimentConfig
from deftx.workflows.experiments.report import (
    f1_figure,
    metric_of,
    per_seed_average,
    select,
    subnetwork_figure,
    system_name,
    write_report,
)
from deftx.workflows.experiments.runner import run_experiment
from deftx.workflows.experiments.state import ExperimentState
from deftx.workflows.pipeline import check_run_outputs


def analysis_figures(state: ExperimentState, log: Log) -> dict[str, Any]:
    """Singular-value spectra of the phase-1 changes per layer type, and mask density per layer of
    each method's language and task SFTs."""
    from safetensors.torch import load_file


    cfg = state.config
    pipe = cfg.pipeline
    model = load_classifier(resolve_model_path(pipe.model.name_or_path, log=lambda line: None),
                            spec_of(pipe).labels,
                            seed=pipe.seed)
    theta0 = {n: p.detach() for n, p in body_parameters(model).items()}
    curves: dict[str, dict[str, Any]] = {}
    first_method = next(iter(cfg.methods), None)
    wanted = [(f"language SFT phase 1 ({pipe.source_language})", f"language-{pipe.source_language}"),
              (f"language SFT phase 1 ({pipe.target_languages[0]})", f"language-{pipe.target_languages[0]}")]
    if first_method is not None:
        key = f"task-{first_method}-seed{cfg.seeds[0]}" if cfg.main == "single_source" else \
            f"multi-{first_method}-fold0-seed{cfg.seeds[0]}"
        wanted.append((f"task SFT phase 1 (seed {cfg.seeds[0]})", key))
    for label, key in wanted:
        directory = state.phase1_dirs.get(key)
        if directory is None or not (Path(directory) / THETA1_FILE).is_file():
            continue
        theta1 = load_file(str(Path(directory) / THETA1_FILE))
        spectra = change_spectra(theta0, theta1)
        curves[label] = {kind: mean_normalised_spectrum(values) for kind, values in spectra.items() if values}
        log(f"[analysis] spectra of {label}: {', '.join(curves[label])}")
    figures: dict[str, Any] = {
        "spectra": spectra_by_type_figure(curves, "phase-1 change: mean normalised singular values per layer type")}
    target = pipe.target_languages[0]
    lang_density = {system_name(m, cfg): density_by_layer(SparseFineTuning.load(dirs[target]))
                    for m, dirs in state.language_sft_dirs.items() if target in dirs}
    figures["density-language"] = density_by_layer_figure(lang_density, f"language SFT ({target}): mask density per layer")
    task_density = {system_name(m, cfg): density_by_layer(SparseFineTuning.load(dirs[cfg.seeds[0]]))
                    for m, dirs in state.task_sft_dirs.items() if cfg.seeds[0] in dirs}
    figures["density-task"] = density_by_layer_figure(task_density, f"task SFT (seed {cfg.seeds[0]}): mask density per layer")
    return figures


def register_tuned_champions(tracker: Tracker, experiment: str, parent, state: ExperimentState, output_dir: Path,
                             log: Log) -> dict[str, dict[str, str | None]]:
    """Register each SFT system's champion for each tuned language (its trial's task SFT at the
    first seed + the system's language SFT) as a composed model scored on the language's
    validation split, and make it the ``champion`` of ``deftx-<task>-<lang>`` if it beats the one
    there on the same objective. system -> language -> the champion version (None: not registered)."""
    from deftx.tracking.registry import PendingRegistration, Registry, composed_model_name

    cfg = state.config
    metric, _ = metric_of(cfg)
    objective = f"target_valid_{metric}"
    registry = Registry(tracker)
    out: dict[str, dict[str, str | None]] = {}
    for system, found in state.tuning.items():
        if system == FULL_FT:
            continue   # no SFT to register
        for lang, i in found["champions"].items():
            settings = found["trials"][i]
            pending = PendingRegistration(
                experiment=experiment, run_name=f"tuned-{system}-{lang}", task=cfg.pipeline.task, language=lang,
                task_sft=found["task_sft_dirs"][i], language_sft=state.language_sft_dirs[system][lang],
                score=found["valid"][i][lang], objective=objective, params={"system": system, **settings},
                metrics={objective: found["valid"][i][lang]},
                tags={"deftx.experiment": f"{cfg.dataset}-{cfg.preset}", "deftx.tuned_system": system,
                      "deftx.trial": str(i + 1)})
            registry.submit(pending, output_dir=output_dir, parent=parent)
            name = composed_model_name(cfg.pipeline.task, lang)
            champion = tracker.call("checking the champion", lambda name=name: registry.reconcile_champion(name, objective))
            out.setdefault(system, {})[lang] = champion
            where = f"@champion is v{champion}" if champion else f"no version scored on {objective} is @champion"
            log(f"[registry] {name}: tuned {system} champion (trial {i + 1}) registered; {where}")
    return out


def run_and_report(cfg: ExperimentConfig, *, command: str, results_dir: str | Path | None = None,
                   log: Log = print, report_only: bool = False) -> tuple[ExperimentState, Path]:
    """Run the experiment (or, ``report_only``, collect what is finished), write the report and log
    it to MLflow."""

    started = time.perf_counter()
    directory = Path(results_dir or Path(cfg.results_dir) / f"{cfg.dataset}-{cfg.preset}")
    check_run_outputs(cfg.pipeline)        # before hours of training, not when the report is written
    check_output_location(directory)
    tracker = Tracker(cfg.pipeline.tracking.uri, enabled=cfg.pipeline.tracking.enabled, log=log)
    experiment = cfg.pipeline.tracking.experiment or f"deftx-experiment-{cfg.dataset}"
    run = tracker.start_run(experiment, f"{cfg.dataset}-{cfg.preset}", params=asdict(cfg),
                            tags={"deftx.version": __version__, "deftx.command": command})
    try:
        state = run_experiment(cfg, log=log, report_only=report_only)
        figures = {"main": f1_figure(state) if cfg.main_table else None, "subnetworks": subnetwork_figure(state)}
        if cfg.analysis:
            figures.update(analysis_figures(state, log))
        written = write_report(state, directory, command=command, seconds=time.perf_counter() - started,
                               figures=figures)
        targets = list(state.config.pipeline.target_languages)
        metric, _ = metric_of(cfg)
        metrics: dict[str, float] = {"wall_seconds": time.perf_counter() - started}
        for part, prefix, languages in (("main", "", targets), ("subnetworks", "subnetworks.", targets),
                                        ("tuned", "tuned.", list(cfg.tuning.languages))):
            for system in {r.system for r in state.records if r.part == part}:
                for split in ("test", "valid"):
                    rows = select(state.records, part=part, system=system, split=split,
                                  **({"with_language_sft": system != FULL_FT} if part == "main" else {}))
                    values = per_seed_average(rows, languages, metric)
                    if values:
                        metrics[f"{split}.avg_{metric}.{prefix}{system}"] = sum(values) / len(values)
        tracker.log_metrics(run, metrics)
        tracker.log_artifacts(run, directory, "results")
        if tracker.enabled and not tracker.offline and cfg.pipeline.tracking.register and state.tuning \
                and not report_only:
            register_tuned_champions(tracker, experiment, run, state, Path(cfg.pipeline.output_dir), log)
        if tracker.enabled:
            for name, sft_dir in state.sft_dirs.items():   # nested runs: loss curves, density, sft.json
                log_sft(tracker, experiment, run, sft_dir, name.replace("/", "-"))
        log(f"results: {written['results']}")
    except BaseException as exc:
        tracker.end_run(run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end_run(run)
    return state, directory
