"""``deftx`` command line. Every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deftx import __version__
from deftx.errors import DeftxError

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, what a command killed by a closed pipe reports


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `ray job stop`, a scheduler's preemption), handled like Ctrl-C: MLflow runs
    end as KILLED, an experiment's time ledger keeps the stage's seconds, finished SFTs stay."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


DEPRECATED_UNTIL = "0.4"


class _Deprecated(argparse.Action):
    """An old spelling of an option: sets the new option's value and says once what to use instead."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _log(f"deftx: warning: {option_string} is deprecated for `{parser.prog}`; use {self.new} "
             f"(the old spelling is accepted until deftx {DEPRECATED_UNTIL})")
        setattr(namespace, self.dest, values)


def _option(p: argparse.ArgumentParser, new: str, old: str, *, dest: str, required: bool = False,
            **kwargs: Any) -> None:
    """``new`` with ``old`` kept as a deprecated spelling. A required option is checked after
    parsing (argparse would otherwise demand ``new`` even when ``old`` was given)."""
    p.add_argument(new, dest=dest, **kwargs)
    p.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS,
                   **{k: v for k, v in kwargs.items() if k in ("type", "metavar")})
    if required:
        p.set_defaults(_required=[*(p.get_default("_required") or []), (dest, new)], _parser=p)


def _check_required(args: argparse.Namespace) -> None:
    missing = [flag for dest, flag in getattr(args, "_required", None) or [] if getattr(args, dest, None) is None]
    if missing:
        args._parser.error(f"the following arguments are required: {', '.join(missing)}")


def _output_dir(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """``--output-dir`` (where a command writes; ``--out`` is its deprecated spelling)."""
    _option(p, "--output-dir", "--out", dest="out", required=required, metavar="DIR", help=help)


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (applied in this order)")
    g.add_argument("--preset", help="a built-in preset, e.g. demo; 'deftx presets' lists them")
    g.add_argument("--config", metavar="FILE", help="a YAML config file")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set language_sft.selection.rank=8 (repeatable)")
    g.add_argument("--method", choices=["lt_sft", "deft_x"], help="mask selection for every SFT")
    g.add_argument("--address", help="join this Ray cluster (GCS HOST:6379 or ray://HOST:10001) instead of starting "
                                     "an embedded one; under `ray job submit` the cluster is joined by itself")
    g.add_argument("--local", action="store_true",
                   help="train in this process without Ray or DeepSpeed (the single-process reference)")
    _verbose_arg(g)


def _verbose_arg(p) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's, DeepSpeed's and MLflow's own messages here (default: Ray workers' go to "
                        "<output dir>/logs/, MLflow's INFO lines are dropped)")


def _load_config(args: argparse.Namespace, extra: list[str] | None = None):
    from deftx.config import load_pipeline_config

    cluster = [f"cluster.address={args.address}"] if args.address else []
    cluster += ["cluster.backend=local"] if args.local else []
    return load_pipeline_config(preset=args.preset, config=args.config,
                                overrides=list(args.overrides) + (extra or []) + cluster, method=args.method)


# -- commands ---------------------------------------------------------------------------------


def cmd_pipeline(args: argparse.Namespace) -> int:
    from deftx.workflows.pipeline import run_pipeline

    extra = [f"output_dir={args.output_dir}"] if args.output_dir else []
    cfg = _load_config(args, extra)
    _log(f"deftx {__version__}: pipeline, method {cfg.task_sft.selection.method}, model {cfg.model.name_or_path}, "
         f"source {cfg.source_language}, targets {', '.join(cfg.target_languages)}, output {cfg.output_dir}")
    result = run_pipeline(cfg, log=_log)
    print(result.table())
    print(f"\nwall time {result.seconds / 60:.1f} min")
    print(result.where())
    return 0


def cmd_train_lang(args: argparse.Namespace) -> int:
    from deftx.data import check_language
    from deftx.workflows.single import train_language, with_own_text

    cfg = _load_config(args)
    if args.text:
        lang = args.lang.strip()
        cfg = with_own_text(cfg, lang, args.text, args.held_out)
    else:
        if cfg.data.dataset == "table":
            from deftx.config.schema import check_language_code

            lang = check_language_code(args.lang.strip(), "--lang")
        else:
            lang = check_language(args.lang, cfg.data.dataset)
        if args.held_out is not None:
            cfg.language_sft.held_out = args.held_out
            cfg.language_sft.validate("language_sft")
    out = _fresh_output(args.out, args.overwrite, _sft_kind())
    sft = train_language(cfg, lang, out, log=_log)
    print(f"saved language SFT for {lang} to {out} ({sft.nnz:,} entries)")
    report = sft.metadata.metrics.get("held_out_mlm")
    if report:
        print(f"held-out MLM loss of {lang} ({report['lines']:.0f} lines): theta0 {report['theta0']:.3f}, "
              f"theta0 + SFT {report['sft']:.3f} nats per masked token")
    return 0


def cmd_train_task(args: argparse.Namespace) -> int:
    from deftx.data import check_language
    from deftx.workflows.single import train_task, with_own_table

    cfg = _load_config(args)
    if args.data:
        source = (args.source_lang or cfg.source_language).strip()
        cfg = with_own_table(cfg, source, args.data, args.eval_data, text_column=args.text_column,
                             pair_column=args.pair_column, label_column=args.label_column,
                             labels=_labels(args.labels), metric=args.metric, name=args.task_name)
    elif args.eval_data or args.labels:
        raise DeftxError("--eval-data and --labels go with --data (your own labelled training table)")
    elif cfg.data.dataset == "table":
        source = args.source_lang or cfg.source_language
    else:
        source = check_language(args.source_lang or cfg.source_language, cfg.data.dataset)
    out = _fresh_output(args.out, args.overwrite, _sft_kind())
    sft = train_task(cfg, source, out, language_sft=args.lang_sft, log=_log)
    valid = sft.metadata.metrics.get("source_valid")
    scores = (f"{source} validation accuracy {100 * valid['accuracy']:.1f}, macro-F1 {100 * valid['macro_f1']:.1f}"
              if valid else "no validation data")
    print(f"saved task SFT ({sft.metadata.task}; labels {', '.join(sft.metadata.label_names or [])}) to {out} "
          f"({sft.nnz:,} entries; {scores})")
    return 0


def _labels(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _table_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your own labelled data (.csv, .tsv, .jsonl, optionally .gz, or hf:DATASET[:CONFIG][:SPLIT])")
    g.add_argument("--text-column", default="text", help="the text column (default text)")
    g.add_argument("--pair-column", help="a second text column, for text-pair tasks such as NLI (default: none)")
    g.add_argument("--label-column", default="label", help="the label column (default label)")


def _subnetwork_config(items: list[str]):
    from deftx.config import apply_overrides, from_dict, to_dict
    from deftx.subnetworks.config import SubnetworkConfig

    data = apply_overrides(to_dict(SubnetworkConfig()), items)
    return from_dict(SubnetworkConfig, data, "subnetworks").validate()


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DeftxError(f"{option} {item!r}: expected LANG=VALUE")
        out[key.strip()] = value.strip()
    return out


def cmd_train_subnetworks(args: argparse.Namespace) -> int:
    from deftx.data import check_language
    from deftx.subnetworks.artifact import SUBNETWORK_OUTPUT
    from deftx.workflows.single import mask_sizes, train_subnetworks

    cfg = _load_config(args)
    sources = [check_language(c.strip(), cfg.data.dataset) for c in args.sources.split(",") if c.strip()]
    sub = _subnetwork_config(args.subnet)
    lang_sfts = _pairs(args.lang_sft, "--lang-sft")
    out = _fresh_output(args.out, args.overwrite, SUBNETWORK_OUTPUT)
    model = train_subnetworks(cfg, sources, sub, out, lang_sfts, log=_log)
    shown = ", ".join(f"{lang} {n:,}" for lang, n in mask_sizes(model).items())
    print(f"saved subnetwork model to {out} ({sub.mode}, {model.sft.nnz:,} changed entries; mask sizes: {shown})")
    return 0


def cmd_subnetworks_export(args: argparse.Namespace) -> int:
    from deftx.subnetworks.artifact import SubnetworkModel

    model = SubnetworkModel.load(args.model)
    related = _pairs(args.related, "--related") or None
    out = _fresh_output(args.out, args.overwrite, _sft_kind())
    try:
        sft = model.sft_for(args.target, policy=args.policy, related=related)
    except ValueError as exc:
        raise DeftxError(f"{args.model}: {exc}") from None
    sft.save(out, overwrite=args.overwrite)
    used = sft.metadata.trained_on["subnetwork"]["mask"]
    print(f"saved the task SFT of {args.target} ({used} mask; {sft.nnz:,} of {model.sft.nnz:,} changed entries) to {out}")
    return 0


def _sft_kind():
    from deftx.core.sft import SFT_OUTPUT

    return SFT_OUTPUT


def _fresh_output(out: str, overwrite: bool, kind) -> Path:
    """``--output-dir``, checked before any work: new, or (``--overwrite``) a directory of ``kind`` that
    deftx wrote, in a writable folder."""
    from deftx.core.io import check_output_dir

    return check_output_dir(out, overwrite, kind)


def _composition_and_model(task_dir: str, lang_dir: str | None, model: str | None):
    from deftx.core.compose import Composition
    from deftx.core.sft import SparseFineTuning
    from deftx.models import load_classifier, load_tokenizer, resolve_model_path

    task = SparseFineTuning.load(task_dir)
    lang = SparseFineTuning.load(lang_dir) if lang_dir else None
    composition = Composition(task, lang)
    labels = task.metadata.label_names
    if not labels:
        raise DeftxError(f"{task_dir}: the task SFT records no label names")
    model_id = model or task.metadata.base_model
    if not model_id:
        raise DeftxError(f"{task_dir}: the SFT records no base model; pass --model")
    path = resolve_model_path(model_id, log=_log)
    return composition, load_classifier(path, labels), load_tokenizer(path)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from deftx.evaluation import evaluate

    tables, source = [], args.data_source
    for item in args.data or []:
        if item in ("bundled", "hub") or (Path(item).is_dir() and not item.startswith("hf:")):
            _log(f"deftx: warning: --data {item} (where NusaX is read from) is deprecated for `deftx evaluate`; use "
                 f"--data-source {item}; --data now names your own labelled tables (accepted until deftx "
                 f"{DEPRECATED_UNTIL})")
            source = item
        else:
            tables.append(item)
    composition, model, tokenizer = _composition_and_model(args.task, args.lang, args.model)
    labels = list(composition.label_names)
    if tables:
        work = _own_tables(tables, labels, args)
    else:
        work = _nusax_tables(args, labels, source)
    rows = []
    with composition.applied(model):
        for lang, name, examples in work:
            res = evaluate(model, tokenizer, examples, len(labels), max_length=args.max_length, log=_log,
                           label=f"eval {lang} {name}")
            rows.append({"language": lang, "data": name, **res})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"| language | data | accuracy | macro-F1 | n |  ({args.split if not tables else 'your tables'})\n"
              f"|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['language']} | {r['data']} | {100 * r['accuracy']:.1f} | {100 * r['macro_f1']:.1f} | {r['n']} |")
    return 0


def _own_tables(tables: list[str], labels: list[str], args: argparse.Namespace):
    """(language, table, examples) for ``--data [LANG=]TABLE`` items, labels mapped to the task SFT's."""
    from deftx.data.tables import Columns, load_table

    columns = Columns(args.text_column, args.pair_column, args.label_column)
    out = []
    for item in tables:
        lang, sep, table = item.partition("=")
        if not sep or ":" in lang or "/" in lang:   # no LANG= prefix (hf:... and paths contain : or /)
            lang, table = args.language or "-", item
        out.append((lang, table, load_table(table, labels, lang, columns)))
    return out


def _nusax_tables(args: argparse.Namespace, labels: list[str], source: str):
    from deftx.data import NUSAX_LABELS, check_language, load_nusax_senti

    if labels != list(NUSAX_LABELS):
        raise DeftxError(f"{args.task}: without --data, evaluate scores NusaX sentiment (labels "
                         f"{list(NUSAX_LABELS)}); this task SFT has labels {labels}: give its test data with --data")
    if not args.languages:
        raise DeftxError("--languages: name the NusaX languages to evaluate on (or give your own tables with --data)")
    langs = [check_language(c.strip(), "nusax") for c in args.languages.split(",") if c.strip()]
    return [(lang, f"nusax {args.split}", load_nusax_senti(lang, args.split, source)) for lang in langs]


def cmd_sft_inspect(args: argparse.Namespace) -> int:
    from deftx.core.sft import SparseFineTuning

    sft = SparseFineTuning.load(args.path)
    meta = sft.metadata
    total = sum(d.numel for d in sft.diffs.values())
    info: dict[str, Any] = {
        "path": str(args.path), **sft.summary(), "density": sft.nnz / total if total else 0.0,
        "base_model": meta.base_model, "base_fingerprint": meta.base_fingerprint, "selection": meta.selection,
        "label_names": meta.label_names, "trained_on": meta.trained_on, "metrics": meta.metrics,
        "deftx_version": meta.deftx_version, "created": meta.created,
        "tensors": {n: {"shape": list(d.shape), "nnz": d.nnz, "density": d.nnz / max(d.numel, 1)}
                    for n, d in sft.diffs.items()},
        "head": {n: list(v.shape) for n, v in sft.head.items()},
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{args.path}: {meta.kind} SFT, language {meta.language}, task {meta.task}, method {meta.method}")
    print(f"  base model {meta.base_model} ({meta.base_fingerprint[:23]}...), deftx {meta.deftx_version}, "
          f"created {meta.created}")
    print(f"  {sft.nnz:,} non-zeros of {total:,} maskable entries (density {100 * info['density']:.4f}%), "
          f"{info['head_entries']:,} dense head entries")
    if meta.metrics:
        print(f"  metrics {json.dumps(meta.metrics)}")
    print(f"  {'tensor':<60} {'shape':>14} {'nnz':>10} {'density':>9}")
    for name, t in info["tensors"].items():
        shape = "x".join(map(str, t["shape"]))
        print(f"  {name:<60} {shape:>14} {t['nnz']:>10,} {100 * t['density']:>8.3f}%")
    for name, shape in info["head"].items():
        print(f"  {name:<60} {'x'.join(map(str, shape)):>14} {'(dense head)':>20}")
    return 0


def cmd_sft_compose(args: argparse.Namespace) -> int:
    from deftx.core.compose import COMPOSED_OUTPUT, export_hf_model

    _fresh_output(args.out, args.overwrite, COMPOSED_OUTPUT)
    composition, model, tokenizer = _composition_and_model(args.task, args.lang, args.model)
    out = export_hf_model(composition, model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: load it with AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
    return 0


def cmd_sft_pull(args: argparse.Namespace) -> int:
    from deftx.core.hub import download
    from deftx.core.sft import HUB_FILES, SFT_OUTPUT, SparseFineTuning

    if args.out:
        _fresh_output(args.out, args.overwrite, SFT_OUTPUT)
    path = download(args.repo, HUB_FILES, revision=args.revision, cache_dir=args.cache_dir,
                    local_files_only=args.offline)
    sft = SparseFineTuning.load(path)   # validated (checksum, shapes, indices) before anything is reported
    what = f"{sft.metadata.kind} SFT ({sft.metadata.language or sft.metadata.task}, {sft.nnz:,} entries)"
    if args.out:
        sft.save(args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}: {what} from {args.repo}")
    else:
        _log(f"{args.repo}: {what}, in the Hub cache at")
        print(path)
    return 0


def cmd_sft_push(args: argparse.Namespace) -> int:
    from deftx.core.sft import SparseFineTuning

    sft = SparseFineTuning.load(args.path)
    url = sft.push_to_hub(args.repo, revision=args.revision, private=args.private or None,
                          commit_message=args.message)
    print(f"pushed {args.path} to {args.repo}: {url}")
    return 0


def cmd_sft_import_composable(args: argparse.Namespace) -> int:
    from deftx.interop.composable import import_composable

    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    sft = import_composable(args.source, args.model, args.out, kind=args.kind, language=args.language,
                            task=args.task, label_names=labels, overwrite=args.overwrite, revision=args.revision,
                            log=_log)
    print(f"wrote {args.out}: {sft.metadata.kind} SFT, {sft.nnz:,} entries, {len(sft.head)} head tensors "
          f"(inspect it with: deftx sft inspect {args.out})")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from deftx.offline_model import ensure_offline_e5

    print(ensure_offline_e5(Path(args.cache) if args.cache else None, log=_log))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from deftx.config import preset_names, preset_summary
    from deftx.workflows.experiments.config import experiment_presets

    print("pipeline presets (deftx pipeline|train-lang|train-task|sweep --preset NAME):")
    for name in preset_names():
        print(f"  {name:<20} {preset_summary(name)}")
    for dataset, presets in experiment_presets().items():
        if not presets:
            continue
        print(f"\n{dataset} experiment presets (deftx experiment {dataset} --preset NAME):")
        for name, summary in presets:
            print(f"  {name:<20} {summary}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from deftx.config import to_dict

    if args.experiment:
        from deftx.workflows.experiments.config import load_experiment

        if args.method or args.address or args.local:
            raise DeftxError("--method, --address and --local apply to pipeline configs; with --experiment use "
                             "--set pipeline.KEY=VALUE")
        cfg = load_experiment(args.experiment, preset=args.preset, config_file=args.config, overrides=args.overrides)
    else:
        cfg = _load_config(args)
    data = json.loads(json.dumps(to_dict(cfg), default=str))   # paths and tuples as plain YAML values
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from deftx.workflows.sweeps.shared import check_sweep
    from deftx.workflows.sweeps.space import load_space
    from deftx.workflows.sweeps.tune import run_sweep

    extra = [f"output_dir={args.output_dir}"] if args.output_dir else []
    cfg = _load_config(args, extra)
    space = load_space(args.space)
    langs = check_sweep(cfg, space, [c.strip() for c in args.langs.split(",") if c.strip()], args.num_samples)
    _log(f"deftx {__version__}: sweep of the {space.sft} SFT's selection over {', '.join(langs)}, "
         f"{args.num_samples} trials each, objective {space.objective.key}, output {cfg.output_dir}")
    result = run_sweep(cfg, space, langs, args.num_samples, name=args.name, log=_log,
                       max_concurrent=args.max_concurrent)
    print(result.table())
    shared = ", ".join(f"{k} {v:.0f} s" for k, v in result.shared_seconds.items()) or "all reused"
    print(f"\nwall time {result.seconds / 60:.1f} min (shared work: {shared}); results in "
          f"{result.output_dir}/sweeps/{result.name}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    import shlex

    from deftx.workflows.experiments.config import load_experiment
    from deftx.workflows.experiments.run import run_and_report

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"pipeline.output_dir={args.output_dir}")
    cfg = load_experiment(args.dataset, preset=args.preset, config_file=args.config, overrides=overrides)
    command = "deftx " + " ".join(shlex.quote(a) for a in args.argv)
    if cfg.trains_task_models:
        systems = (f"methods {', '.join((['full_ft'] if cfg.full_ft and cfg.main_table else []) + list(cfg.methods))}"
                   f"; seeds {cfg.seeds}")
        if cfg.tuning.enabled:
            systems += f"; tuned on {', '.join(cfg.tuning.languages)} ({cfg.tuning.trials} trials per system)"
    else:
        systems = f"language SFTs only ({', '.join(cfg.methods)}; no task models)"
    _log(f"deftx {__version__}: {args.dataset} experiment ({cfg.preset}): {systems}; "
         f"{len(cfg.pipeline.target_languages)} targets; output {cfg.pipeline.output_dir}")
    _, directory = run_and_report(cfg, command=command, results_dir=args.results_dir, log=_log,
                                  report_only=args.report_only)
    print((directory / "results.md").read_text(encoding="utf-8"))
    return 0


def cmd_sweep_subnetworks(args: argparse.Namespace) -> int:
    from deftx.workflows.experiments.config import load_experiment
    from deftx.workflows.sweeps.subnetworks import load_subnetwork_space, run_subnetwork_sweep

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"pipeline.output_dir={args.output_dir}")
    cfg = load_experiment(args.dataset, preset=args.preset, config_file=args.config, overrides=overrides)
    space = load_subnetwork_space(args.space, cfg)
    _log(f"deftx {__version__}: sweep of subnetwork system {space.system!r} ({', '.join(space.dimensions)}), "
         f"{args.samples} trials, objective: held-out targets' validation score; output {cfg.pipeline.output_dir}")
    result = run_subnetwork_sweep(cfg, space, args.samples, name=args.name, log=_log)
    print(result.table())
    print(f"\nwall time {result.seconds / 60:.1f} min; results in {result.output_dir}")
    return 0 if result.best is not None else 1


def _registry(args: argparse.Namespace, create: bool = False):
    from deftx.tracking.registry import open_registry

    return open_registry(args.tracking_uri, log=_log, create=create)


def cmd_registry_list(args: argparse.Namespace) -> int:
    rows = _registry(args).listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no deftx models registered yet")
        return 0
    print(f"{'name':<36} {'versions':>8} {'latest':>7}  aliases")
    for r in rows:
        aliases = ", ".join(f"@{a}=v{v}" for a, v in r["aliases"].items()) or "-"
        score = f" (score {float(r['score']):.4f})" if r["score"] else ""
        print(f"{r['name']:<36} {r['versions']:>8} {r['latest'] or '-':>7}  {aliases}{score}")
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    info = _registry(args).show(args.ref)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['name']} version {info['version']}" + (f" (@{', @'.join(info['aliases'])})" if info["aliases"] else ""))
    print(f"  source {info['source']}\n  run {info['run_id']}")
    for key in sorted(info["tags"]):
        print(f"  {key}: {info['tags'][key]}")
    return 0


def cmd_registry_get(args: argparse.Namespace) -> int:
    from deftx.core.compose import COMPOSED_OUTPUT
    from deftx.tracking.registry import compose_from_registry

    _fresh_output(args.out, args.overwrite, COMPOSED_OUTPUT)

    out = compose_from_registry(_registry(args), args.ref, args.out, base_model=args.model,
                                overwrite=args.overwrite, log=_log)
    print(f"wrote {out}: load it with AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
    return 0


def cmd_registry_sync(args: argparse.Namespace) -> int:
    from deftx.tracking.registry import sync_pending

    done, left = sync_pending(_registry(args, create=True), args.dirs, log=_log)
    print(f"registered {done}; still pending {left}")
    return 1 if left else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from deftx.tracking.registry import load_model

    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise DeftxError("predict: give texts as arguments or on stdin")
    labels = load_model(args.ref, args.tracking_uri).predict(texts)
    if args.json:
        print(json.dumps([{"text": t, "label": lab} for t, lab in zip(texts, labels)], indent=2, ensure_ascii=False))
    else:
        for text, label in zip(texts, labels):
            print(f"{label}\t{text}")
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deftx", description="Composable sparse fine-tuning (LT-SFT, DeFT-X) for zero-shot cross-lingual transfer.")
    parser.add_argument("--version", action="version", version=f"deftx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("pipeline", help="language SFTs + task SFT + zero-shot NusaX evaluation, end to end",
                       description="Train language SFTs (source + targets) by masked LM, a task SFT on the source "
                                   "language on top of its language SFT, then evaluate task + target-language SFT "
                                   "on each NusaX test set. Finished SFTs are reused on re-runs.")
    _config_args(p)
    p.add_argument("--output-dir", help="where SFTs and results go (default from the config)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("train-lang", help="train one language SFT (masked LM on NusaX-MT train text)")
    _config_args(p)
    p.add_argument("--lang", required=True, help="language code, e.g. jav (any code with --text)")
    p.add_argument("--text", nargs="+", metavar="SOURCE",
                   help="the language's text: .txt/.txt.gz files (one sentence or paragraph per line), "
                        "hf:DATASET[:CONFIG][:SPLIT][:COLUMN], or names of bundled sources (default: the dataset's "
                        "text of --lang)")
    p.add_argument("--held-out", type=float, metavar="FRACTION",
                   help="share of the text kept out of training for the held-out MLM loss it reports "
                        "(default 0.02 with --text, else language_sft.held_out)")
    _output_dir(p, "output SFT directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_train_lang)

    p = sub.add_parser("train-task", help="train a NusaX sentiment task SFT on top of a source-language SFT")
    _config_args(p)
    p.add_argument("--lang-sft", metavar="DIR",
                   help="the source-language SFT directory to train on top of (omit to train on theta0)")
    p.add_argument("--source-lang", help="source language code (default: the config's source_language)")
    _output_dir(p, "output SFT directory")
    p.add_argument("--data", metavar="TABLE", help="your own labelled training data of the source language, instead "
                                                   "of the dataset's")
    p.add_argument("--eval-data", metavar="TABLE", help="its validation data (scored after training)")
    _table_args(p)
    p.add_argument("--labels", help="comma-separated label names, in class-id order (default: the distinct labels "
                                    "of --data, sorted)")
    p.add_argument("--metric", choices=["accuracy", "macro_f1"], default="accuracy",
                   help="the headline metric of your task (default accuracy)")
    p.add_argument("--task-name", default="task", help="the task's name in the SFT and the registry (default task)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_train_task)

    p = sub.add_parser("train-subnetworks", help="train a multi-source task model with language-specific subnetworks",
                       description="Multi-source training on the labelled data of --sources where a batch of language "
                                   "l only updates l's subnetwork (static, dynamic, optionally meta-learned; see the "
                                   "README). Settings: --subnet KEY=VALUE on deftx/subnetworks/config.py, e.g. "
                                   "--subnet mode=dynamic --subnet reselect_every=25 --subnet selection.density=0.3.")
    _config_args(p)
    p.add_argument("--sources", required=True, help="comma-separated labelled source languages, e.g. ind,jav,sun")
    p.add_argument("--lang-sft", action="append", default=[], metavar="LANG=DIR",
                   help="a source language's SFT directory, applied to that language's batches (repeatable)")
    p.add_argument("--subnet", action="append", default=[], metavar="KEY=VALUE", help="a subnetwork setting (repeatable)")
    _output_dir(p, "output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_train_subnetworks)

    p = sub.add_parser("subnetworks-export", help="the task SFT a language uses from a subnetwork model",
                       description="Write the part of a subnetwork model's change that --target uses (its own mask, "
                                   "or for an unseen language: union, full or a related language's) as an ordinary "
                                   "task SFT, to compose with the target's language SFT (deftx evaluate, sft compose, "
                                   "registry sync).")
    p.add_argument("model", help="a subnetwork model directory (deftx train-subnetworks)")
    p.add_argument("--target", required=True, help="the evaluation language")
    p.add_argument("--policy", choices=["union", "full", "related"], help="for an unseen target (default: the model's)")
    p.add_argument("--related", action="append", default=[], metavar="TARGET=SOURCE", help="for --policy related")
    _output_dir(p, "output SFT directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_subnetworks_export)

    p = sub.add_parser("sweep", help="Ray Tune sweep of the selection hyperparameters per target language",
                       description="One Tune experiment per target language over a search space file "
                                   "(tune_spaces/*.yaml); every trial is tracked in MLflow, its composed model "
                                   "registered, and the champion alias moved when it scores higher. Re-running the "
                                   "same command resumes an interrupted sweep without rerunning finished trials.")
    _config_args(p)
    p.add_argument("--space", required=True, help="search space file, e.g. tune_spaces/nusax.yaml")
    _option(p, "--languages", "--langs", dest="langs", required=True,
            help="comma-separated target languages, e.g. jav,sun,min")
    p.add_argument("--num-samples", type=int, default=8, help="trials per language (default 8)")
    p.add_argument("--name", help="sweep name (default <output dir name>-sweep); the same name resumes")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials running at once (default 1)")
    p.add_argument("--output-dir", help="where shared SFTs, trials and results go (default from the config)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("experiment", help="reproduce a results table (full FT vs LT-SFT vs DeFT-X, seeds, ablations)",
                       description="Train and evaluate every system of a results experiment on the same model, data, "
                                   "seeds and budget, then write a Markdown table, CSVs, plots and provenance under "
                                   "benchmarks/results/<dataset>-<preset>/ and log them to MLflow. Finished units "
                                   "are reused, so an interrupted experiment resumes with the same command.")
    p.add_argument("dataset", choices=["nusax", "americasnli", "table"],
                   help="the experiment's dataset (table: your own, with --config)")
    p.add_argument("--preset", help="small (minutes) or full (hours on 2 CPUs); NusaX also tuned (the bundled "
                                    "text, with a table tuned on validation), subnetworks-small and subnetworks-full "
                                    "(language-specific subnetworks); AmericasNLI also english (from the bundled "
                                    "English NLI pairs)")
    p.add_argument("--config", help="an experiment YAML file instead of a preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting, e.g. seeds=[1] or pipeline.cluster.backend=ray (repeatable)")
    p.add_argument("--output-dir", help="where SFTs and scores go (default from the preset)")
    p.add_argument("--results-dir", help="where the report goes (default benchmarks/results/<dataset>-<preset>)")
    _verbose_arg(p)
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the units finished so far (while the experiment runs, "
                        "or after it was interrupted)")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("sweep-subnetworks", help="Ray Tune sweep of a subnetwork system's settings (density, R, ...)",
                       description="Tune trials over the settings of one subnetwork system of a results experiment "
                                   "(a space file such as tune_spaces/nusax-subnetworks.yaml); the objective is the "
                                   "held-out targets' validation score. Language SFTs and the main table are trained "
                                   "once and shared; each trial is a nested MLflow run. The same command resumes.")
    p.add_argument("dataset", choices=["nusax", "americasnli"], help="the experiment's dataset")
    p.add_argument("--preset", help="an experiment preset with subnetwork systems, e.g. subnetworks-full")
    p.add_argument("--config", help="an experiment YAML file instead of a preset")
    p.add_argument("--space", required=True, help="search space file, e.g. tune_spaces/nusax-subnetworks.yaml")
    _option(p, "--num-samples", "--samples", dest="samples", type=int, default=8, help="trials (default 8)")
    p.add_argument("--name", help="sweep name (default <dataset>-<preset>-<system>); the same name resumes")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an experiment setting (repeatable)")
    p.add_argument("--output-dir", help="where shared work and trials go (default from the preset)")
    _verbose_arg(p)
    p.set_defaults(func=cmd_sweep_subnetworks)

    reg = sub.add_parser("registry", help="look up, download and compose registered SFTs").add_subparsers(
        dest="registry_command", metavar="SUBCOMMAND", required=True)

    def registry_parser(name: str, help: str) -> argparse.ArgumentParser:
        q = reg.add_parser(name, help=help)
        q.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow)")
        return q

    p = registry_parser("list", "registered deftx models, versions and aliases")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_registry_list)
    p = registry_parser("show", "one version's tags (metrics, method, hyperparameters, base fingerprint)")
    p.add_argument("ref", help="NAME@ALIAS, NAME/VERSION or NAME (latest), e.g. deftx-nusax_senti-jav@champion")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_registry_show)
    p = registry_parser("get", "download, verify the base fingerprint, compose into a Hugging Face model directory")
    p.add_argument("ref", help="a composed model (deftx-<task>-<lang>) or task SFT reference")
    _output_dir(p, "output directory (a Hugging Face model directory)")
    p.add_argument("--model", help="base model (default: the one recorded in the SFTs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_registry_get)
    p = registry_parser("sync", "upload registrations saved while the tracking server was unreachable")
    p.add_argument("dirs", nargs="+", help="output directories of pipelines or sweeps")
    p.set_defaults(func=cmd_registry_sync)

    p = sub.add_parser("predict", help="labels for texts from a registered composed model")
    p.add_argument("ref", help="e.g. deftx-nusax_senti-jav@champion")
    p.add_argument("texts", nargs="*", help="texts to classify (default: one per line on stdin)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="evaluate task SFT (+ language SFT) on NusaX languages")
    p.add_argument("--task", required=True, help="task SFT directory")
    _option(p, "--lang-sft", "--lang", dest="lang", metavar="DIR",
            help="language SFT directory to compose with (omit: task SFT alone)")
    p.add_argument("--data", action="append", metavar="[LANG=]TABLE",
                   help="your own labelled test data (repeatable; labels must be the task SFT's)")
    p.add_argument("--language", help="the language code of --data tables given without LANG=")
    _table_args(p)
    p.add_argument("--languages", help="without --data: comma-separated NusaX codes to evaluate on, e.g. jav,sun")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="NusaX split (default test)")
    p.add_argument("--data-source", default="bundled", help="where NusaX is read from: 'bundled', 'hub' or a "
                                                            "directory (default bundled)")
    p.add_argument("--model", help="base model (default: the one recorded in the task SFT)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)

    sft = sub.add_parser("sft", help="inspect and compose SFT directories").add_subparsers(
        dest="sft_command", metavar="SUBCOMMAND", required=True)
    p = sft.add_parser("inspect", help="metadata, non-zeros per tensor, density")
    p.add_argument("path", help="SFT directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_sft_inspect)
    p = sft.add_parser("compose", help="export theta0 + task SFT + language SFT as a Hugging Face model directory")
    p.add_argument("--task", required=True, help="task SFT directory (its head is used)")
    _option(p, "--lang-sft", "--lang", dest="lang", metavar="DIR", help="language SFT directory (its head is not used)")
    _output_dir(p, "output directory (a Hugging Face model directory)")
    p.add_argument("--model", help="base model (default: the one recorded in the task SFT)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_sft_compose)

    p = sft.add_parser("pull", help="download an SFT from the Hugging Face Hub (kept in the Hub cache)")
    p.add_argument("repo", help="Hub repository, org/name")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--output-dir", dest="out", metavar="DIR",
                   help="also write the SFT to this directory (default: print its path in the cache)")
    p.add_argument("--cache-dir", help="Hub cache directory (default: $HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    p.add_argument("--offline", action="store_true", help="use only the Hub cache, never the network")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir directory")
    p.set_defaults(func=cmd_sft_pull)
    p = sft.add_parser("push", help="upload an SFT directory (with its model card) to the Hugging Face Hub")
    p.add_argument("path", help="SFT directory")
    p.add_argument("repo", help="Hub repository, org/name (created if missing)")
    p.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_sft_push)
    p = sft.add_parser("import-composable", help="convert a composable-sft SFT (pytorch_diff.bin) into a deftx SFT",
                       description="Convert an SFT written by composable-sft (the LT-SFT authors' library, e.g. "
                                   "their released XLM-R language SFTs) into a deftx SFT directory. The file is "
                                   "read with torch.load(weights_only=True) and only the numpy globals such files "
                                   "need; a file referencing anything else is refused before unpickling.")
    p.add_argument("source", help="a pytorch_diff.bin file, the directory holding it, or a Hub repository "
                                  "(e.g. cambridgeltl/xlmr-lang-sft-quy-small)")
    p.add_argument("--revision", help="Hub branch, tag or commit (with a repository as source)")
    p.add_argument("--model", required=True, help="the base model it was trained on, e.g. xlm-roberta-base")
    p.add_argument("--output-dir", dest="out", required=True, metavar="DIR", help="output SFT directory")
    p.add_argument("--kind", choices=["language", "task"],
                   help="default: task if the file sets a classifier head, else language")
    p.add_argument("--language", help="language code to record (a language SFT's language, a task SFT's source)")
    p.add_argument("--task", help="task name to record (task SFTs)")
    p.add_argument("--labels", help="comma-separated label names of a task SFT (default LABEL_0, LABEL_1, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_sft_import_composable)

    models = sub.add_parser("models", help="base models").add_subparsers(dest="models_command", metavar="SUBCOMMAND",
                                                                        required=True)
    p = models.add_parser("fetch", help="download and convert the offline multilingual-e5-small model")
    p.add_argument("--cache", help="cache directory (default $DEFTX_CACHE or ~/.cache/deftx)")
    p.set_defaults(func=cmd_models_fetch)

    p = sub.add_parser("presets", help="list the built-in presets (pipeline and experiment)")
    p.set_defaults(func=cmd_presets)

    config = sub.add_parser("config", help="show a merged, validated configuration").add_subparsers(
        dest="config_command", metavar="SUBCOMMAND", required=True)
    p = config.add_parser("show", help="print the configuration a command would run with (YAML)",
                          description="Merge a preset or config file with --set overrides, validate the result, "
                                      "and print it in full, defaults included. Nothing is trained.")
    _config_args(p)
    p.add_argument("--experiment", choices=["nusax", "americasnli", "table"],
                   help="show an experiment configuration (deftx experiment DATASET --preset NAME) instead")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=cmd_config_show)
    _add_examples(parser)
    return parser


EXAMPLES = {
    "deftx": "deftx pipeline --preset demo",
    "deftx pipeline": "deftx pipeline --preset demo --set target_languages=[jav,sun] --output-dir runs/demo",
    "deftx train-lang": "deftx train-lang --preset demo --lang jav --output-dir sfts/lang-jav",
    "deftx train-task": "deftx train-task --preset demo --lang-sft sfts/lang-ind --output-dir sfts/task",
    "deftx train-subnetworks": "deftx train-subnetworks --preset demo --sources ind,jav,sun --subnet mode=dynamic "
                               "--output-dir subnets/ms",
    "deftx subnetworks-export": "deftx subnetworks-export subnets/ms --target bbc --policy union "
                                "--output-dir sfts/task-bbc",
    "deftx sweep": "deftx sweep --preset demo --space tune_spaces/nusax.yaml --languages jav,sun --num-samples 8",
    "deftx experiment": "deftx experiment nusax --preset small",
    "deftx sweep-subnetworks": "deftx sweep-subnetworks nusax --preset subnetworks-full "
                               "--space tune_spaces/nusax-subnetworks.yaml --num-samples 8",
    "deftx registry": "deftx registry get deftx-nusax_senti-jav@champion --output-dir composed/jav",
    "deftx registry list": "deftx registry list --tracking-uri sqlite:///runs/mlflow.db",
    "deftx registry show": "deftx registry show deftx-nusax_senti-jav@champion",
    "deftx registry get": "deftx registry get deftx-nusax_senti-jav@champion --output-dir composed/jav",
    "deftx registry sync": "deftx registry sync runs/demo",
    "deftx predict": "deftx predict deftx-nusax_senti-jav@champion 'Aku seneng banget karo layanan iki'",
    "deftx evaluate": "deftx evaluate --task sfts/task --lang-sft sfts/lang-jav --languages jav --split valid",
    "deftx sft": "deftx sft inspect sfts/lang-jav",
    "deftx sft inspect": "deftx sft inspect sfts/lang-jav --json",
    "deftx sft compose": "deftx sft compose --task sfts/task --lang-sft sfts/lang-jav --output-dir composed/jav",
    "deftx sft pull": "deftx sft pull my-org/e5-small-sft-jav --revision v1 --output-dir sfts/lang-jav",
    "deftx sft push": "deftx sft push sfts/lang-jav my-org/e5-small-sft-jav --private",
    "deftx sft import-composable": "deftx sft import-composable cambridgeltl/xlmr-lang-sft-quy-small "
                                   "--model xlm-roberta-base --language quy --output-dir sfts/lang-quy",
    "deftx models": "deftx models fetch",
    "deftx models fetch": "deftx models fetch --cache ~/.cache/deftx",
    "deftx presets": "deftx presets",
    "deftx config": "deftx config show --preset demo --set seed=1",
    "deftx config show": "deftx config show --preset demo --set language_sft.selection.rank=8",
}


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _subparsers(child)


def _add_examples(parser: argparse.ArgumentParser) -> None:
    """Every ``--help`` ends with an example (``EXAMPLES``, keyed by the command's prog)."""
    for p in _subparsers(parser):
        p.epilog = f"example: {EXAMPLES[p.prog]}"


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)   # its INFO lines (store set-up) are not ours to show
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if getattr(args, "verbose", False):
        os.environ["DEFTX_VERBOSE"] = "1"
    _check_required(args)
    # By default SIGTERM ends Python without unwinding (no finally block, no MLflow run ended); only
    # the main thread may install a handler, and the caller's own handler is put back afterwards.
    previous = (signal.signal(signal.SIGTERM, _raise_terminated)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()   # a closed pipe shows here, inside the handlers below, not at interpreter exit
        return code
    except DeftxError as exc:
        print(f"deftx: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except FileExistsError as exc:
        print(f"deftx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"deftx: {how} (finished SFTs are kept; re-run the same command to continue)", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:
        # the reader of our output went away (`deftx sft inspect ... | head`): stop quietly, and keep
        # the interpreter from failing again when it flushes stdout at exit
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
