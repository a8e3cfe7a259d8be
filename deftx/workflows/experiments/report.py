"""Tables, CSVs, plots and provenance of a results experiment (``benchmarks/results/<name>/``).

Means and spreads are over seeds: a language's cell is the mean of its per-seed scores +- their
sample standard deviation; an average row first averages the targets within each seed, then gives
the mean +- standard deviation of those per-seed averages (so the spread is seed variance, not
language variance).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deftx.data.text import NUSAX_MT_TRAIN, resolve_sources, text_sources
from deftx.held_out_mlm import VARIANTS, language_signal
from deftx.tasks import spec_of
from deftx.tracking.plots import close, grouped_bars
from deftx.workflows.experiments.config import FULL_FT, SOURCE_SFT_PART, ExperimentConfig, xlmr_densities
from deftx.workflows.experiments.state import ExperimentState, Record

SYSTEM_NAMES = {FULL_FT: "full FT", "lt_sft": "LT-SFT", "deft_x_rank": "DeFT-X (fixed rank)",
                "deft_x_energy": "DeFT-X (energy)"}


def system_name(system: str, cfg: ExperimentConfig | None = None) -> str:
    name = SYSTEM_NAMES.get(system, system)
    if cfg is not None and system in cfg.methods:
        sel = cfg.selection(system, "task")
        if sel.method == "deft_x":
            rule = f"rank {sel.rank}" if sel.rank is not None else f"energy {sel.energy}"
            name = f"{name.split(' (')[0]} ({rule})"
    return name


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: Sequence[float]) -> str:
    mean, spread = mean_spread(values)
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f} ± {100 * spread:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def select(records: Iterable[Record], **where: Any) -> list[Record]:
    return [r for r in records if all(getattr(r, k) == v for k, v in where.items())]


def per_seed_average(records: Sequence[Record], languages: Sequence[str], metric: str = "macro_f1") -> list[float]:
    """The average over ``languages`` within each seed (seeds missing a language are skipped)."""
    out = []
    for seed in sorted({r.seed for r in records}):
        values = {r.language: getattr(r, metric) for r in records if r.seed == seed}
        if all(lang in values for lang in languages) and languages:
            out.append(statistics.fmean(values[lang] for lang in languages))
    return out


def metric_of(cfg: ExperimentConfig) -> tuple[str, str]:
    """The headline metric of the experiment's task: (record field, label)."""
    metric = spec_of(cfg.pipeline).metric
    return metric, {"macro_f1": "macro-F1", "accuracy": "accuracy"}[metric]


def dataset_title(cfg: ExperimentConfig) -> str:
    return {"nusax": "NusaX-senti", "americasnli": "AmericasNLI"}.get(cfg.dataset) or spec_of(cfg.pipeline).name


def _language(lang: str, cfg: ExperimentConfig) -> str:
    name = spec_of(cfg.pipeline).language_name(lang)
    return lang if name == lang else f"{lang} ({name})"


def main_table(state: ExperimentState, split: str = "test") -> str:
    cfg = state.config
    metric, _ = metric_of(cfg)
    pipe = cfg.pipeline
    systems = ([FULL_FT] if cfg.full_ft else []) + list(cfg.methods)
    header = "| language | " + " | ".join(system_name(s, cfg) for s in systems) + " |"
    lines = [header, "|---" * (len(systems) + 1) + "|"]

    def rows_of(system: str) -> list[Record]:
        with_lang = system != FULL_FT
        return select(state.records, part="main", system=system, split=split, with_language_sft=with_lang)

    targets = list(pipe.target_languages)
    for lang in [pipe.source_language] + targets:
        if not any(r.language == lang for s in systems for r in rows_of(s)):
            continue
        label = _language(lang, cfg) + (" (source)" if lang == pipe.source_language else "")
        cells = [cell([getattr(r, metric) for r in rows_of(s) if r.language == lang]) for s in systems]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    avg = [cell(per_seed_average(rows_of(s), targets, metric)) for s in systems]
    lines.append(f"| **average of the {len(targets)} targets** | " + " | ".join(f"**{c}**" for c in avg) + " |")
    return "\n".join(lines)


def tuned_table(state: ExperimentState, split: str = "test") -> str:
    """Per tuned language and system: the fixed-settings score beside the tuned champion's."""
    cfg = state.config
    metric, _ = metric_of(cfg)
    systems = list(cfg.tuning.systems)
    header = "| language | " + " | ".join(f"{system_name(s, cfg)} fixed | tuned" for s in systems) + " |"
    lines = [header, "|---" * (2 * len(systems) + 1) + "|"]

    def rows_of(part: str, system: str) -> list[Record]:
        return select(state.records, part=part, system=system, split=split, with_language_sft=system != FULL_FT)

    langs = list(cfg.tuning.languages)
    for lang in langs:
        cells = []
        for s in systems:
            for part in ("main", "tuned"):
                cells.append(cell([getattr(r, metric) for r in rows_of(part, s) if r.language == lang]))
        lines.append(f"| {_language(lang, cfg)} | " + " | ".join(cells) + " |")
    avg = [cell(per_seed_average(rows_of(part, s), langs, metric)) for s in systems for part in ("main", "tuned")]
    lines.append(f"| **average of the {len(langs)} tuned targets** | " + " | ".join(f"**{c}**" for c in avg) + " |")
    return "\n".join(lines)


def tuned_settings_table(state: ExperimentState) -> str:
    """Per tuned language and system: the champion trial, its settings and validation score."""
    from deftx.workflows.experiments.tuning import describe

    cfg = state.config
    lines = ["| language | system | champion | settings | validation (trial seed) |", "|---|---|---|---|---|"]
    for lang in cfg.tuning.languages:
        for system, found in state.tuning.items():
            i = found["champions"].get(lang)
            if i is None:
                continue
            lines.append(f"| {_language(lang, cfg)} | {system_name(system, cfg)} | trial {i + 1} of "
                         f"{len(found['trials'])} | {describe(found['trials'][i])} | "
                         f"{100 * found['valid'][i][lang]:.1f} |")
    return "\n".join(lines)


def task_only_table(state: ExperimentState, split: str = "test") -> str:
    """Per method, averages over the targets: the task SFT with the target's language SFT, with the
    source language's SFT (single-source layout), and alone; then the differences."""
    cfg = state.config
    metric, _ = metric_of(cfg)
    targets = list(cfg.pipeline.target_languages)
    with_source = any(r.part == SOURCE_SFT_PART for r in state.records)
    head = ["method", "task + target SFT", *(["task + source SFT"] if with_source else []), "task SFT only",
            "target - only", *(["target - source", "source - only"] if with_source else [])]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for system in cfg.methods:
        def average(part: str, with_lang: bool, system=system) -> list[float]:
            return per_seed_average(select(state.records, part=part, system=system, split=split,
                                           with_language_sft=with_lang), targets, metric)

        both, alone = average("main", True), average("main", False)
        cells = [cell(both)]
        if with_source:
            source = average(SOURCE_SFT_PART, True)
            cells.append(cell(source))
        cells += [cell(alone), cell([a - b for a, b in zip(both, alone)])]
        if with_source:
            cells += [cell([a - b for a, b in zip(both, source)]), cell([a - b for a, b in zip(source, alone)])]
        lines.append(f"| {system_name(system, cfg)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def head_input_table(state: ExperimentState) -> str:
    """Per method and language (first seed, validation): how far the language's own SFT and the
    source language's SFT move what the task head reads (mean cosine to the task SFT alone, share
    of equal predictions), beside the validation scores of the three compositions when the
    experiment scores its validation splits (the shifts are measured on them either way)."""
    cfg = state.config
    metric, _ = metric_of(cfg)
    seed = cfg.seeds[0]
    source = cfg.pipeline.source_language
    with_scores = "valid" in cfg.eval_splits
    header = "| method | language | cosine: + own SFT | + source SFT | same prediction: own | source |"
    lines = [header + (" valid: alone | + own SFT | + source SFT |" if with_scores else ""),
             "|---" * (9 if with_scores else 6) + "|"]

    def score(part: str, system: str, lang: str, with_lang: bool) -> str:
        rows = select(state.records, part=part, system=system, seed=seed, language=lang, split="valid",
                      with_language_sft=with_lang)
        return f"{100 * getattr(rows[0], metric):.1f}" if rows else "-"

    for system in cfg.methods:
        rows = {(r["language"], r["composition"]): r for r in state.head_input_shift if r["system"] == system}
        for lang in [source, *cfg.pipeline.target_languages]:
            if (lang, "own") not in rows:
                continue
            own, src = rows[(lang, "own")], rows[(lang, "source")]
            line = (f"| {system_name(system, cfg)} | {_language(lang, cfg)}{' (source)' if lang == source else ''} "
                    f"| {own['cosine']:.3f} | {src['cosine']:.3f} | {100 * own['agreement']:.0f}% | "
                    f"{100 * src['agreement']:.0f}% |")
            if with_scores:
                swapped = score("main" if lang == source else SOURCE_SFT_PART, system, lang, True)
                line += f" {score('main', system, lang, False)} | {score('main', system, lang, True)} | {swapped} |"
            lines.append(line)
    return "\n".join(lines)


def multi_source_table(state: ExperimentState, split: str = "test") -> str:
    cfg = state.config
    metric, _ = metric_of(cfg)
    ms = cfg.multi_source
    targets = list(cfg.pipeline.target_languages)
    methods = ms.methods
    lines = ["| language | fold (trained on) | " + " | ".join(f"{system_name(m, cfg)} multi-source" for m in methods)
             + " | " + " | ".join(f"{system_name(m, cfg)} single-source" for m in methods) + " |",
             "|---" * (2 + 2 * len(methods)) + "|"]
    for fold in range(ms.folds):
        for lang in cfg.fold_targets(fold):
            multi = [cell([getattr(r, metric) for r in select(state.records, part="multi_source", system=m, split=split,
                                                      language=lang)]) for m in methods]
            single = [cell([getattr(r, metric) for r in select(state.records, part="main", system=m, split=split, language=lang,
                                                       with_language_sft=True)]) for m in methods]
            lines.append(f"| {_language(lang, cfg)} | {fold} ({', '.join(cfg.fold_sources(fold))}) | "
                         + " | ".join(multi + single) + " |")
    avg_multi = [cell(per_seed_average(select(state.records, part="multi_source", system=m, split=split), targets,
                                       metric)) for m in methods]
    avg_single = [cell(per_seed_average(select(state.records, part="main", system=m, split=split,
                                               with_language_sft=True), targets, metric)) for m in methods]
    lines.append("| **average** | | " + " | ".join(f"**{c}**" for c in avg_multi + avg_single) + " |")
    return "\n".join(lines)


def subnetwork_table(state: ExperimentState, split: str = "test") -> str:
    """Targets x subnetwork systems (leave-fold-out), mean ± spread over seeds, plus the average."""
    cfg = state.config
    metric, _ = metric_of(cfg)
    systems = list(cfg.subnetworks.systems)
    targets = list(cfg.pipeline.target_languages)
    lines = ["| language | fold | " + " | ".join(systems) + " |", "|---" * (len(systems) + 2) + "|"]
    for fold in range(cfg.multi_source.folds):
        for lang in cfg.fold_targets(fold):
            cells = [cell([getattr(r, metric) for r in select(state.records, part="subnetworks", system=s, split=split,
                                                              language=lang)]) for s in systems]
            lines.append(f"| {_language(lang, cfg)} | {fold} | " + " | ".join(cells) + " |")
    avg = [cell(per_seed_average(select(state.records, part="subnetworks", system=s, split=split), targets, metric))
           for s in systems]
    lines.append(f"| **average of the {len(targets)} targets** | | " + " | ".join(f"**{c}**" for c in avg) + " |")
    return "\n".join(lines)


def subnetwork_settings_table(state: ExperimentState) -> str:
    """Each system's settings and its masks: density, sharing between sources, what a target uses."""
    cfg = state.config
    lines = [("| system | settings | mask density | pairwise Jaccard of source masks | target's share of the change | "
             "initial-final mask overlap | re-selections |"), "|---" * 7 + "|"]
    for name in cfg.subnetworks.systems:
        summary = cfg.subnetworks.system(name).summary()
        shown = ", ".join(f"{k}={v}" for k, v in summary.items() if k not in ("unseen_target",))
        rows = [r for r in state.subnetwork_stats if r["system"] == name]

        def mean(key: str, rows=rows) -> str:
            values = [r[key] for r in rows if r[key] == r[key]]
            return f"{statistics.fmean(values):.3f}" if values else "-"

        lines.append(f"| {name} | {shown}; unseen targets: {summary['unseen_target']} | {mean('density')} | "
                     f"{mean('mean_pairwise_jaccard')} | {mean('target_share_of_change')} | "
                     f"{mean('initial_vs_final_overlap')} | {mean('reselections')} |")
    return "\n".join(lines)


def _overlap_summary(state: ExperimentState, part: str, system: str) -> tuple[str, str]:
    rows = [o for o in state.overlaps if o["part"] == part and o["system"] == system]
    if not rows:
        return "-", "-"
    frac = statistics.fmean(o["frac_of_b"] for o in rows)
    ratios = [o["ratio_to_random"] for o in rows if o["ratio_to_random"] == o["ratio_to_random"]]
    return f"{100 * frac:.2f}%", (f"{statistics.fmean(ratios):.2f}x" if ratios else "-")


def overlap_table(state: ExperimentState) -> str:
    cfg = state.config
    lines = ["| method | language-SFT entries also in the task SFT | vs. independent random placement |",
             "|---|---|---|"]
    for system in cfg.methods:
        frac, ratio = _overlap_summary(state, "main", system)
        lines.append(f"| {system_name(system, cfg)} | {frac} | {ratio} |")
    return "\n".join(lines)


def ablation_table(state: ExperimentState) -> str:
    cfg = state.config
    metric, label = metric_of(cfg)
    targets = list(cfg.pipeline.target_languages)
    lines = [(f"| variant | task-SFT selection | valid {label} (avg) | test {label} (avg) | overlap with language SFTs "
             "| vs. random |"), "|---|---|---|---|---|---|"]
    for variant in cfg.ablations.variants:
        rows = select(state.records, part="ablation", system=variant)
        if not rows:
            continue
        sel = rows[0].extra.get("selection", {})
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sel.items()
                          if k not in ("k", "svd_solver", "denoise_embeddings") and v is not None)
        valid = per_seed_average([r for r in rows if r.split == "valid"], targets, metric)
        test = per_seed_average([r for r in rows if r.split == "test"], targets, metric)
        frac, ratio = _overlap_summary(state, "ablation", variant)
        lines.append(f"| {variant} | {shown} | {cell(valid)} | {cell(test)} | {frac} | {ratio} |")
    return "\n".join(lines)


def mlm_loss_markdown(results: dict[str, dict[str, Any]], language_name=lambda lang: lang,
                      disjoint_from: str | None = None) -> str:
    """The report section: per method, each language's held-out loss under theta0 and its own SFT,
    the own SFT's drop against the other languages' SFTs' (mean and best), for the SFT as trained
    and for its body alone; the goal is a positive margin for every language. ``disjoint_from``
    names evaluation data the held-out text is known to share no line with (stated only when
    given: a check of the bundled NusaX text; other datasets' text is the user's)."""
    never = f"; never {disjoint_from}" if disjoint_from else ""
    parts = [("Mean cross-entropy (nats per masked token) on each language's held-out adaptation text (lines kept "
              f"out of the head warm-up and of every language SFT{never}). A drop is theta0's loss "
              "minus the loss with an SFT applied. *margin* = own SFT's drop minus the mean drop of the other "
              "languages' SFTs on the same text: positive when the SFT learned its own language rather than "
              "something every SFT learns. *SFT*: the language SFT as trained (body entries and its MLM head); "
              "*body*: its body entries over the shared warm-up head, which is what a composition with a task SFT "
              "keeps."), ""]
    for method, result in results.items():
        sft, body = (language_signal(result[v]) for v in VARIANTS)
        body_of = {s.language: s for s in body}
        parts += [f"**{method}**", "",
                  "| language | lines | theta0 | own SFT | own drop | others' mean drop | best other (drop) "
                  "| margin | body: own drop | body: margin |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in sft:
            b = body_of[s.language]
            best = f"{s.best_other} ({s.best_other_drop:+.3f})" if s.best_other else "-"
            parts.append(f"| {language_name(s.language)} | {result['lines'][s.language]} | {s.theta0:.3f} | "
                         f"{s.own:.3f} | {s.own_drop:+.3f} | {s.others_mean_drop:+.3f} | {best} | "
                         f"**{s.margin:+.3f}** | {b.own_drop:+.3f} | {b.margin:+.3f} |")
        positive = sum(s.margin > 0 for s in sft)
        beats = sum(s.beats_every_other for s in sft)
        parts += ["", f"Margin positive for {positive}/{len(sft)} languages (body alone: "
                  f"{sum(b.margin > 0 for b in body)}/{len(body)}); own SFT's drop the largest of all SFTs for "
                  f"{beats}/{len(sft)}.", ""]
    return "\n".join(parts)


def _bundled_nusax_text(cfg: ExperimentConfig) -> bool:
    """True when every language SFT of a NusaX experiment read only text deftx bundles (NusaX-MT
    train and the bundled files, whose lines tests/test_text_data.py checks against NusaX valid and
    test), so the report may say the held-out lines are never an evaluation sentence."""
    pipe = cfg.pipeline
    if cfg.dataset != "nusax" or pipe.data.source != "bundled":
        return False
    sources = [NUSAX_MT_TRAIN] if pipe.language_sft.text is None else pipe.language_sft.text   # as deftx.tasks reads it
    return all(set(resolve_sources(lang, sources)) <= set(text_sources(lang)) for lang in cfg.sft_languages())


def mlm_loss_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every held-out MLM loss of the experiment, one row per (method, variant, SFT, language)."""
    return [{"method": method, "variant": variant, "sft": row, "language": lang, "loss": loss,
             "lines": result["lines"][lang]}
            for method, result in results.items() for variant in VARIANTS
            for row, values in result[variant].items() for lang, loss in values.items()]


def git_commit(cwd: Path | None = None) -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False).stdout.strip()

    commit = run("rev-parse", "HEAD")
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit or "unknown", "dirty": dirty}


def provenance(state: ExperimentState, command: str, seconds: float) -> dict[str, Any]:
    from deftx import __version__

    cfg = state.config
    return {"command": command, **git_commit(Path(__file__).resolve().parent), "deftx": __version__,
            "seeds": cfg.seeds, "language_sft_seed": cfg.pipeline.seed, "wall_seconds": round(seconds, 1),
            "stage_seconds": {k: round(v, 1) for k, v in state.stage_seconds.items()},
            "compute_seconds_all_invocations": round(sum(state.ledger.values()), 1),
            "ledger_seconds": dict(state.ledger),
            "units_trained": state.trained, "units_reused": state.reused,
            "complete": not state.missing, "missing_units": list(state.missing),
            "model": cfg.pipeline.model.name_or_path, "budget": cfg.budget, "densities": cfg.densities(),
            "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}


def budget_text(cfg: ExperimentConfig) -> str:
    d = cfg.densities()
    if cfg.budget == "xlmr-base":
        ref = xlmr_densities()
        return (f"K: task density {100 * ref['task']:.3f}%, language density {100 * ref['language']:.3f}% of the maskable "
                "entries: composable-sft's XLM-R base budgets (14,155,776 task and 7,667,712 language entries of "
                "XLM-R base's 277,414,656 maskable parameters) as densities")
    return f"K: task density {d['task']}, language density {d['language']} (from the configuration)"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})


def write_report(state: ExperimentState, directory: Path, *, command: str, seconds: float,
                 figures: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``results.md``, ``scores.csv``, ``overlap.csv``, ``provenance.json`` and the figures."""
    directory.mkdir(parents=True, exist_ok=True)
    prov = provenance(state, command, seconds)
    (directory / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")
    write_csv(directory / "scores.csv", [asdict(r) for r in state.records])
    write_csv(directory / "overlap.csv", state.overlaps)
    if state.subnetwork_stats:
        write_csv(directory / "subnetworks.csv", state.subnetwork_stats)
    if state.mlm_loss:
        write_csv(directory / "mlm-loss.csv", mlm_loss_rows(state.mlm_loss))
    if state.head_input_shift:
        write_csv(directory / "head-input-shift.csv", state.head_input_shift)
    written = {"provenance": directory / "provenance.json", "scores": directory / "scores.csv"}
    for name, fig in (figures or {}).items():
        if fig is not None:
            fig.savefig(directory / f"{name}.png", dpi=110)
            close(fig)
            written[name] = directory / f"{name}.png"
    (directory / "results.md").write_text(results_markdown(state, prov, sorted(p.name for p in written.values()
                                                                               if p.suffix == ".png")),
                                          encoding="utf-8")
    written["results"] = directory / "results.md"
    return written


DEFAULT_HYPERPARAMETERS = ("fixed in the preset before any test score was seen (learning rates chosen on the "
                           "Indonesian NusaX validation split for the demo, see the preset); no model selection on "
                           "test data")


TABLE_HYPERPARAMETERS = "as given in the experiment's config (say how they were chosen with `hyperparameters:`)"


def results_markdown(state: ExperimentState, prov: dict[str, Any], pngs: Sequence[str]) -> str:
    cfg = state.config
    pipe = cfg.pipeline
    n_seeds = len(cfg.seeds)
    spread = f"mean ± sample standard deviation over {n_seeds} seeds ({', '.join(map(str, cfg.seeds))})" \
        if n_seeds > 1 else f"one seed ({cfg.seeds[0]})"
    _, label = metric_of(cfg)
    if cfg.main == "single_source":
        layout = (f"task SFT on the source language `{pipe.source_language}` (on its language SFT) + target "
                  "language SFT")
    else:
        layout = (f"leave-fold-out multi-source: the targets are split into {cfg.multi_source.folds} folds; a fold's "
                  "targets are scored with task models trained only on the labelled data of the languages outside the "
                  f"fold ({_train_data_text(cfg)}, at most {cfg.multi_source.max_examples_per_language or 'all'} "
                  "examples each), each batch at theta + its language's SFT"
                  + ("; full fine-tuning trains on the same data on theta0" if cfg.full_ft and cfg.main_table else "")
                  + ". A target's labelled data never trains a model it is evaluated on")
    parts = [
        f"# {dataset_title(cfg)} zero-shot transfer: `{cfg.preset}` preset"
        + (" (partial: the experiment has not finished)" if state.missing else ""),
        "",
        f"- command: `{prov['command']}`",
        f"- commit: `{prov['commit']}`" + (" (with uncommitted changes)" if prov["dirty"] else ""),
        (f"- wall time: {prov['wall_seconds'] / 60:.1f} min for this invocation on {prov['cpus']} CPUs; "
        f"{prov['compute_seconds_all_invocations'] / 60:.1f} min of training and evaluation over all invocations "
        f"(a resumed experiment reuses finished units; per stage in provenance.json)"),
        f"- model: `{pipe.model.name_or_path}`; backend `{pipe.cluster.backend}`; data "
        f"`{pipe.data.source if cfg.dataset != 'table' else 'your tables (pipeline.data.table)'}`",
        f"- layout: {layout}",
        (f"- task SFT seeds: {', '.join(map(str, cfg.seeds))}; language SFTs trained once (seed {pipe.seed}) and shared "
        "by the seeds, so the spread is that of the task training (classifier head initialisation, data order, dropout)"
         if cfg.trains_task_models else
         f"- language SFTs only (seed {pipe.seed}): no main table, subnetwork systems or tuned table, so no task model"),
        f"- {budget_text(cfg)}",
        (f"- phases: language SFT {_phase_text(pipe.language_sft)}"
         + (f"; task SFT {_phase_text(pipe.task_sft)}; full fine-tuning = the task SFT's phase 1 on theta0 (same "
            "steps, learning rate and seed), evaluated directly" if cfg.main_table else
            "; no main-table task models (main_table: false)"
            + ("; the subnetwork systems' training is below" if cfg.subnetworks.systems else ""))),
        f"- hyperparameters: {cfg.hyperparameters or (DEFAULT_HYPERPARAMETERS if cfg.dataset != 'table' else TABLE_HYPERPARAMETERS)}",
    ]
    if cfg.main_table:
        parts += [
            "",
            f"## Test {label} (%): {'task SFT + target language SFT' if cfg.methods else 'full fine-tuning'}; {spread}",
            "",
            main_table(state, "test"),
            "",
            *([f"## Validation {label} (%) (the split any choice should be made on)", "", main_table(state, "valid"),
               ""] if "valid" in cfg.eval_splits else []),
        ]
    if cfg.main_table and cfg.methods:   # sections about SFTs: none without a method
        parts += [
            f"## What the language SFT adds (test {label}, average of the targets, %)",
            "",
            ("*task + source SFT*: the task SFT composed with the source language's SFT (the body it was trained "
             "on) instead of the target's. *target - source* is the effect of swapping in the target's SFT; "
             "*source - only* that of the adapted body."),
            "",
            task_only_table(state, "test"),
            "",
        ]
        if state.head_input_shift:   # measured on the validation splits even when only test is scored
            parts += [
                f"### What the language SFTs do to the task head's input (validation, seed {cfg.seeds[0]})",
                "",
                ("Mean cosine similarity between what the classification head reads (BERT: the pooled vector; XLM-R: "
                 "the first token's state) under the "
                 "task SFT alone and under the task SFT composed with the language's own SFT, or with the source "
                 "language's SFT it was trained on; and the share of unchanged predictions. The recipe assumes a "
                 "target SFT brings target text to where the task head expects it; a low cosine with a lower score "
                 "says it moved it elsewhere. `head-input-shift.csv` has every value."
                 + ("" if "valid" in cfg.eval_splits else " This experiment scores no validation split, so the "
                    "table has no scores beside the shifts.")),
                "",
                head_input_table(state),
                "",
            ]
        parts += [
            "## Mask overlap between the task SFT and the target language SFTs",
            "",
            ("Fraction of a target language SFT's entries that the task SFT also changes, averaged over targets and "
             "seeds, and its ratio to the overlap expected if each SFT's entries were placed at random within each "
             "tensor."),
            "",
            overlap_table(state),
        ]
    if state.mlm_loss:
        parts += ["", "## Held-out MLM loss: do the language SFTs model their languages?", "",
                  mlm_loss_markdown(state.mlm_loss, lambda lang: _language(lang, cfg),
                                    "NusaX valid/test" if _bundled_nusax_text(cfg) else None),
                  "", "Every loss (each SFT on each language) is in `mlm-loss.csv`."]
    if cfg.multi_source.folds and cfg.main == "single_source":
        parts += ["", f"## Multi-source task SFTs, leave-fold-out (test {label}, %; {spread})", "",
                  (f"The targets are split into {cfg.multi_source.folds} folds; each fold's targets are evaluated "
                  "with a task SFT trained on the labelled data of the languages outside the fold only (at most "
                  f"{cfg.multi_source.max_examples_per_language or 'all'} examples each), each batch at theta + the "
                  "language SFT of its language. A target's labelled data never trains the model it is evaluated on."),
                  "", multi_source_table(state, "test")]
    if cfg.subnetworks.systems:
        method = cfg.subnetworks.language_sfts
        parts += ["", f"## Language-specific subnetworks (Choenni-style), leave-fold-out (test {label}, %; {spread})", "",
                  ("Multi-source task models trained leave-fold-out (layout above); a batch of language l only "
                   "updates l's subnetwork (static: chosen before training by a short per-language probe fine-tune; "
                   "dynamic: re-selected during training from l's accumulated gradient), optionally with first-order "
                   "meta-learning across the source languages. `none` is the same trainer without subnetworks (plain "
                   "multi-source fine-tuning). A held-out target uses the part of the change its policy selects"
                   + (f", composed with its `{method}` language SFT (each training batch shifted by its language's)."
                      if method else ", without language SFTs.")),
                  "", subnetwork_table(state, "test"), ""]
        if "valid" in cfg.eval_splits:
            parts += [f"Validation {label} (%):", "", subnetwork_table(state, "valid"), ""]
        parts += ["Settings and masks (means over seeds and folds):", "", subnetwork_settings_table(state)]
    if cfg.ablations.variants:
        parts += ["", f"## DeFT-X ablations of the task SFT (seed {cfg.seeds[0]})", "",
                  (f"Every variant re-selects the task SFT from the same phase 1 (the `{cfg.ablations.base}` method's, "
                  f"seed {cfg.seeds[0]}) at the same K unless stated, trains phase 2 and is composed with the "
                  f"`{cfg.ablations.base}` language SFTs. Averages over the targets."), "", ablation_table(state)]
    if cfg.tuning.enabled:
        t = cfg.tuning
        spaces = "; ".join(f"{system_name(name, cfg)}: {t.describe(name)}" for name in t.systems)
        parts += ["", f"## Tuned on validation ({t.trials} trials per system)", "",
                  (f"For each system, {t.trials} settings drawn at random (seed {t.seed}) from its space ({spaces}) "
                   f"were trained at seed {cfg.seeds[0]} on the source language and scored on the validation split "
                   "of every tuned target; "
                   + ("a target's champion is its best trial there" if t.champion == "per_language" else
                      "a system's champion, the same for every target, is its best trial on the targets' average "
                      "(tuning.champion: average)")
                   + ". The champions were trained with every seed and scored once on test. The fixed columns "
                   "repeat the main table. SFT methods tune the task SFT (its selection and phase-2 learning rate) "
                   "over the method's language SFTs."),
                  "", f"Test {label} (%), {spread}:", "", tuned_table(state, "test"), ""]
        if "valid" in cfg.eval_splits:
            parts += [f"Validation {label} (%; the first seed's tuned cells are the champions' own trials):", "",
                      tuned_table(state, "valid"), ""]
        parts += ["Champions (validation score of the trial at the first seed):", "", tuned_settings_table(state)]
    if state.missing:
        parts += ["", f"## Not computed yet ({len(state.missing)} unit{'' if len(state.missing) == 1 else 's'})", "",
                  ("This report was written with `--report-only` from the units finished so far; cells and averages "
                  "above cover only the seeds and languages present (an average row needs every target of a seed). "
                  "Re-running the experiment's command continues where it stopped."), ""]
        parts += [f"- {m.split(':')[0]}" for m in state.missing]
    if pngs:
        parts += ["", "## Figures", ""] + [f"![{p}]({p})" for p in pngs]
    return "\n".join(parts) + "\n"


def _train_data_text(cfg: ExperimentConfig) -> str:
    if cfg.dataset == "americasnli":
        return "offline: the other languages' AmericasNLI dev sets, labelled as such; not MultiNLI"
    if cfg.dataset == "table":
        table = cfg.pipeline.data.table
        return "your tables: " + ", ".join(f"{lang} {path}" for lang, path in table.train.items())
    return "the NusaX-senti train splits"


def _phase_text(sft_cfg) -> str:
    def phase(p) -> str:
        steps = f", at most {p.max_steps} steps" if p.max_steps is not None else ""
        return f"{p.epochs:g} epoch(s){steps}, lr {p.learning_rate:g}, batch {p.batch_size}"

    cap = f", at most {sft_cfg.max_train_examples} examples" if sft_cfg.max_train_examples else ""
    return f"phase 1 {phase(sft_cfg.full)} / phase 2 {phase(sft_cfg.sparse)}{cap}"


def _bars_figure(series: dict[str, list[Record]], cfg: ExperimentConfig, split: str, title: str):
    """Grouped bars: the headline metric per target language (and the average) for each series of
    records, error bars = standard deviation over seeds."""
    metric, label = metric_of(cfg)
    targets = list(cfg.pipeline.target_languages)
    langs = targets + ["avg"]
    bars = {}
    for name, rows in series.items():
        means, errs = [], []
        for lang in langs:
            values = per_seed_average(rows, targets, metric) if lang == "avg" else \
                [getattr(r, metric) for r in rows if r.language == lang]
            m, s = mean_spread(values)
            means.append(100 * m)
            errs.append(100 * s)
        bars[name] = (means, errs)
    return grouped_bars(langs, bars, f"{split} {label} (%)", title)


def f1_figure(state: ExperimentState, split: str = "test"):
    """The main table as grouped bars per target language and system."""
    cfg = state.config
    if not state.records:
        return None
    systems = ([FULL_FT] if cfg.full_ft else []) + list(cfg.methods)
    series = {system_name(s, cfg): select(state.records, part="main", system=s, split=split,
                                          with_language_sft=s != FULL_FT) for s in systems}
    source = cfg.pipeline.source_language if cfg.main == "single_source" else "other languages (leave-fold-out)"
    return _bars_figure(series, cfg, split,
                        f"{dataset_title(cfg)} zero-shot from {source} ({len(cfg.seeds)} seed(s))")


def subnetwork_figure(state: ExperimentState, split: str = "test"):
    """The subnetwork table as grouped bars per held-out target and system (None without one)."""
    cfg = state.config
    if not select(state.records, part="subnetworks"):
        return None
    series = {s: select(state.records, part="subnetworks", system=s, split=split) for s in cfg.subnetworks.systems}
    return _bars_figure(series, cfg, split, f"{dataset_title(cfg)} multi-source, leave-fold-out: subnetworks "
                                            f"({len(cfg.seeds)} seed(s))")
