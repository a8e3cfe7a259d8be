"""Benchmark: LT-SFT / DeFT-X mask selection, deftx vs the composable-sft reference approach.

Setup (identical in every process): theta0 = the maskable tensors of a random-init BertModel with
the multilingual-e5-small shapes (117,486,720 entries in 147 tensors; ``--quick``: vocab 50k and 4
layers), theta1 = theta0 + N(0, 1e-3) (seeded), K = 1% of the maskable entries.

Methods, each run in its own fresh child process so that peak memory is not polluted by the others:

* ``ref``           re-implementation of composable-sft's ``unfreeze_k_most_changed_params``: per
                    tensor ``|theta1 - theta0|[~mask].tolist()`` appended to one Python list,
                    ``np.partition(list, len - K)`` for the K-th largest, then per tensor
                    ``mask |= (|delta| >= thresh) & ~mask`` (masks start all-False, as after ``freeze()``).
* ``lt_sft``        ``deftx.core.scoring.select_masks(theta0, theta1, K, change_magnitude)``.
* ``deftx_energy``  ``select_masks`` with ``DenoisedChangeScorer(energy=E)`` (DeFT-X; E=0.9).
* ``deftx_rank``    ``select_masks`` with ``DenoisedChangeScorer(rank=R)`` (R=8).

Time = the selection call (wall clock). Peak +RSS = ``ru_maxrss`` after the first repetition minus
the RSS just before it, with the kernel's peak watermark reset to the current RSS right before the
call (``/proc/self/clear_refs``), so setup allocations do not hide the method's own peak.

Usage:  python benchmarks/mask_selection.py [--quick] [--repeats N] [--methods ref,lt_sft,...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

METHODS = ("ref", "lt_sft", "deftx_energy", "deftx_rank")
DENSITY = 0.01
NOISE_STD = 1e-3
CHUNK = 1 << 22


# -- child side ------------------------------------------------------------------------------


def make_theta1(theta0, seed: int):
    """theta0 + N(0, NOISE_STD), generated in chunks (no full-size temporaries), deterministic."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    theta1 = {}
    for name, t0 in theta0.items():
        t1 = torch.empty_like(t0)
        src, dst = t0.reshape(-1), t1.view(-1)
        for a in range(0, src.numel(), CHUNK):
            b = min(a + CHUNK, src.numel())
            noise = torch.randn(b - a, generator=gen, dtype=t0.dtype)
            torch.add(src[a:b], noise, alpha=NOISE_STD, out=dst[a:b])
        theta1[name] = t1
    return theta1


def reference_select(theta0, theta1, masks, k: int) -> dict:
    """composable-sft ``unfreeze_k_most_changed_params``, re-implemented from its description.

    ``masks`` is updated in place (dict entries replaced as in the reference). Iterates in the
    model's parameter order, as the reference does over ``model.named_parameters()``.
    """
    import numpy as np
    import torch

    phases = {}
    with torch.no_grad():
        t = time.perf_counter()
        diffs = []
        for n in theta1:
            delta = theta1[n] - theta0[n]
            delta = delta.view(-1)
            valid_indices = (~masks[n]).view(-1)
            valid_deltas = delta[valid_indices]
            abs_deltas = torch.abs(valid_deltas)
            diffs.extend(abs_deltas.tolist())
        phases["list_build_s"] = time.perf_counter() - t
        if k > len(diffs):
            raise ValueError(f"asked to unfreeze {k} params but only {len(diffs)} are frozen")
        t = time.perf_counter()
        diffs = np.partition(diffs, len(diffs) - k)
        thresh = diffs[len(diffs) - k]
        del diffs
        phases["partition_s"] = time.perf_counter() - t
        t = time.perf_counter()
        n_masked = 0
        for n in theta1:
            abs_delta = (theta1[n] - theta0[n]).abs()
            to_mask = (abs_delta >= thresh) & (~masks[n])
            masks[n] = to_mask | masks[n]
            n_masked += to_mask.sum()
        phases["mask_update_s"] = time.perf_counter() - t
    return {"thresh": float(thresh), "n_masked": int(n_masked), "phases": phases}


def _global_indices(masks, names, offsets):
    """Selected entries as sorted global flat indices (tensors in sorted-name order, row-major)."""
    import numpy as np
    import torch

    parts = [torch.nonzero(masks[n].reshape(-1)).flatten().numpy() + offsets[n] for n in names]
    return np.concatenate(parts).astype(np.int64)


def run_child(args) -> dict:
    import numpy as np
    import torch

    from deftx.core.roles import embedding_parameter_names, maskable_parameters
    from deftx.core.scoring import DenoisedChangeScorer, change_magnitude, select_masks
    from deftx.core.topk import resolve_budget

    method = args.child
    if args.threads:
        torch.set_num_threads(args.threads)
    model = C.build_model(args.quick, seed=0)
    maskable = maskable_parameters(model)
    theta0 = {n: p.detach() for n, p in maskable.items()}  # model (named_parameters) order
    theta1 = make_theta1(theta0, seed=args.seed)
    embeddings = frozenset(embedding_parameter_names(model))
    total = sum(t.numel() for t in theta0.values())
    k = resolve_budget(total, density=DENSITY)
    names = sorted(theta0)
    offsets, off = {}, 0
    for n in names:
        offsets[n] = off
        off += theta0[n].numel()
    fingerprint = float(sum(float(theta1[n].double().sum()) + float(theta0[n].double().sum()) for n in names))

    def make_scorer():
        if method == "lt_sft":
            return change_magnitude
        if method == "deftx_energy":
            return DenoisedChangeScorer(rank=None, energy=args.energy, embedding_names=embeddings)
        if method == "deftx_rank":
            return DenoisedChangeScorer(rank=args.rank, energy=None, embedding_names=embeddings)
        raise ValueError(method)

    out = {"method": method, "k": k, "total": total, "tensors": len(theta0), "fingerprint": fingerprint,
           "times": [], "peak_reset": None, "load1": os.getloadavg()[0]}
    for rep in range(args.repeats):
        masks = None
        if method == "ref":  # trainer state after freeze(): all-False masks exist before selection
            masks = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in theta0.items()}
        gc.collect()
        if rep == 0:
            rss_before = C.current_rss()
            out["peak_reset"] = C.reset_peak_rss()
        t = time.perf_counter()
        if method == "ref":
            res = reference_select(theta0, theta1, masks, k)
        else:
            scorer = make_scorer()
            masks, report = select_masks(theta0, theta1, k, scorer)
        dt = time.perf_counter() - t
        out["times"].append(dt)
        if rep == 0:
            peak = C.peak_rss()
            out.update(rss_before=rss_before, peak=peak, extra=peak - rss_before)
            selected = _global_indices(masks, names, offsets)
            out["selected"] = int(selected.size)
            np.save(Path(args.out_dir) / f"{method}.npy", selected)
            if method == "ref":
                out.update(thresh=res["thresh"], ref_n_masked=res["n_masked"], phases=[res["phases"]])
            else:
                out["report_selected"] = report.selected
                if report.ranks:
                    ranks = sorted(report.ranks.values())
                    out["ranks"] = {"matrices": len(ranks), "min": ranks[0], "median": ranks[len(ranks) // 2],
                                    "max": ranks[-1]}
                if method == "lt_sft":  # K-th largest score and ties at it (outside the timed region)
                    thr = min(float((theta1[n] - theta0[n]).abs()[masks[n]].min()) for n in names
                              if bool(masks[n].any()))
                    above = sum(int(((theta1[n] - theta0[n]).abs() > thr).sum()) for n in names)
                    equal = sum(int(((theta1[n] - theta0[n]).abs() == thr).sum()) for n in names)
                    out.update(thresh=thr, n_above=above, n_equal=equal)
        elif method == "ref":
            out["phases"].append(res["phases"])
        del masks
    return out


# -- parent side -----------------------------------------------------------------------------

LABELS = {
    "ref": "reference (tolist + np.partition + >=)",
    "lt_sft": "deftx LT-SFT (select_masks, change_magnitude)",
    "deftx_energy": "deftx DeFT-X (DenoisedChangeScorer energy={energy})",
    "deftx_rank": "deftx DeFT-X (DenoisedChangeScorer rank={rank})",
}


def spawn(method: str, args, out_dir: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--repeats", str(args.repeats),
           "--seed", str(args.seed), "--rank", str(args.rank), "--energy", str(args.energy),
           "--threads", str(args.threads), "--out-dir", out_dir]
    if args.quick:
        cmd.append("--quick")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child for method {method!r} failed with exit code {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["process_wall_s"] = wall
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model (vocab 50k, 4 layers) for a fast check")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per method (memory from the 1st)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--rank", type=int, default=8, help="fixed rank for deftx_rank")
    p.add_argument("--energy", type=float, default=0.9, help="energy fraction for deftx_energy")
    p.add_argument("--seed", type=int, default=1, help="seed of the theta1 noise")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads in the children "
                   "(default: torch's default)")
    C.add_json_option(p)
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    if args.child:
        res = run_child(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # only so that the machine line shows what the children use
    t_start = time.perf_counter()
    print("== mask selection benchmark (benchmarks/mask_selection.py) ==")
    print(C.machine_info())
    cfg = C.model_config(args.quick)
    print(f"model: {'QUICK ' if args.quick else ''}e5-small-shaped BertModel (random init, add_pooling_layer=False), "
          f"vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"ffn {cfg['intermediate_size']}")
    print(f"theta1 = theta0 + N(0, {NOISE_STD:g}) (seed {args.seed}); K = {DENSITY:.0%} of maskable entries; "
          f"repeats {args.repeats}; each method in a fresh child process", flush=True)
    print(C.load_note("at start"), flush=True)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="deftx-masksel-") as out_dir:
        for m in methods:
            print(f"  running {m} ...", end=" ", flush=True)
            results[m] = spawn(m, args, out_dir)
            print(f"done ({results[m]['process_wall_s']:.1f} s wall incl. setup)", flush=True)
        selected = {m: np.load(Path(out_dir) / f"{m}.npy") for m in methods}

    first = results[methods[0]]
    print(f"\nmaskable entries: {first['total']:,} in {first['tensors']} tensors; K = {first['k']:,}")
    fps = {m: r["fingerprint"] for m, r in results.items()}
    same_input = len(set(fps.values())) == 1
    print(f"identical theta0/theta1 in all child processes (float64 checksum): {same_input}")
    if not all(r.get("peak_reset") for r in results.values()):
        print("WARNING: could not reset the peak-RSS watermark (/proc/self/clear_refs); peak +RSS may include "
              "setup allocations")

    print("1-min load average when each method started: "
          + ", ".join(f"{m} {r['load1']:.2f}" for m, r in results.items()))

    ref = results.get("ref")
    rows = []
    for m in methods:
        r = results[m]
        med = float(np.median(r["times"]))
        label = LABELS[m].format(energy=args.energy, rank=args.rank)
        t_ratio = m_ratio = "-"
        if ref is not None and m != "ref":
            t_ratio = f"{float(np.median(ref['times'])) / med:.1f}x"
            m_ratio = f"{ref['extra'] / max(r['extra'], 1):.1f}x"
        rows.append([label, f"{r['selected']:,}", f"{r['times'][0]:.2f}", C.summary(r["times"]),
                     C.gb(r["extra"]), t_ratio, m_ratio])
    print()
    print(C.table(["method", "selected", "1st rep s", "time s, median [min-max] (n)", "peak +RSS",
                   "ref/x time", "ref/x memory"], rows))
    print("(time = the selection call; ratios = reference median time / method median time and reference "
          "peak +RSS / method peak +RSS)")

    if ref is not None:
        ph = ref["phases"][0]
        print(f"\nreference phases (1st rep): list build {ph['list_build_s']:.2f} s, np.partition "
              f"{ph['partition_s']:.2f} s, mask update {ph['mask_update_s']:.2f} s; peak +RSS "
              f"{C.gb(ref['extra'])} = {ref['extra'] / ref['total']:.1f} B per maskable entry "
              f"(RSS before {C.gb(ref['rss_before'])})")
    for m in methods:
        if m != "ref":
            r = results[m]
            print(f"{m}: peak +RSS {C.gb(r['extra'])} = {r['extra'] / r['total']:.1f} B per maskable entry "
                  f"(includes the returned bool masks, {C.mb(r['total'])}; the reference's masks exist before "
                  f"the call)" + (f"; SVD ranks over {r['ranks']['matrices']} matrices: min {r['ranks']['min']}, "
                                  f"median {r['ranks']['median']}, max {r['ranks']['max']}" if "ranks" in r else ""))

    if ref is not None and "lt_sft" in results:
        lt = results["lt_sft"]
        a, b = selected["ref"], selected["lt_sft"]
        inter = np.intersect1d(a, b, assume_unique=True).size
        subset = inter == b.size
        print("\nagreement reference vs deftx LT-SFT:")
        print(f"  threshold (K-th largest |delta|): reference {ref['thresh']!r}, deftx {lt['thresh']!r} "
              f"-> {'equal' if ref['thresh'] == lt['thresh'] else 'DIFFERENT'}")
        print(f"  selected: reference {a.size:,} (= K + {a.size - lt['k']}), deftx {b.size:,} (= K exactly)")
        print(f"  entries at the threshold: {lt['n_equal']} tied, {lt['n_above']:,} strictly above; the reference "
              f"takes all {lt['n_equal']} ties (>=), deftx takes {lt['k'] - lt['n_above']} (first in canonical order)")
        print(f"  deftx set is a subset of the reference set: {subset}; reference-only entries: {a.size - inter}; "
              f"sets equal: {bool(subset and a.size == b.size)}")
        if not subset or a.size - b.size != lt["n_equal"] - (lt["k"] - lt["n_above"]):
            print("  WARNING: the selections disagree beyond threshold ties")
    if "lt_sft" in results:
        for m in ("deftx_energy", "deftx_rank"):
            if m in results:
                inter = np.intersect1d(selected["lt_sft"], selected[m], assume_unique=True).size
                print(f"overlap {m} vs LT-SFT: {inter:,} of K ({inter / results[m]['k']:.1%}) "
                      f"(DeFT-X denoising changes the ranking, as intended)")
    print("\n" + C.load_note("at end") + f"; total benchmark wall time {time.perf_counter() - t_start:.0f} s")
    C.write_json(args.json, {m: {"median_seconds": float(np.median(r["times"])), "extra_rss_bytes": r["extra"],
                                 "selected": r["selected"]} for m, r in results.items()})


if __name__ == "__main__":
    main()
