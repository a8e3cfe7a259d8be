"""Benchmark: SFT file size, save time and load+apply time, deftx vs the composable-sft format.

A random SFT on the e5-small-shaped maskable set (117,486,720 entries; ``--quick``: vocab 50k, 4
layers): K = 1% positions drawn uniformly without replacement, values N(0, 1e-3), no head.

Formats compared (same K, same values):

* ``deftx``      ``SparseFineTuning.save(dir)`` -> ``sft.safetensors`` (format 2: per tensor, row-major
                 indices as int32 counts per 65,536-entry block + int16 offsets, and fp32 values)
                 + ``sft.json``; written atomically with fsync. Load = ``SparseFineTuning.load(dir)``
                 (SHA-256 check, index/shape/dtype validation) and
                 ``apply(model, with_head=False, check_base=False)`` (gather + ``index_put_`` per tensor).
* ``reference``  composable-sft ``pytorch_diff.bin`` re-implemented from its description: a
                 ``torch.save`` pickle {'diffs': {name: {'size', 'index_steps', 'values'}}, 'abs': {}}
                 where index_steps is a Python list of delta-encoded sorted flat indices (flat index =
                 sum_i coord_i * prod(size[:i]), first element a numpy int64) found by a Python key-sort,
                 values fp32 in that order. Load = ``torch.load(weights_only=False)``, ``np.cumsum(dtype=int32)``,
                 div/mod decode to coordinates, ``sparse_coo_tensor(...).coalesce()``, ``param += diff``.
* ``reference, index_add_``  the same file, decoded with int64 cumsum and applied with
                 ``param.view(-1).index_add_`` (separates the format's cost from the sparse-add cost).

Save and load+apply are timed ``--repeats`` times (default 5) each; parameters are restored from a
pristine copy before every load+apply repetition (untimed). The page cache is warm (files were
just written). All methods must produce bit-identical parameters.

Usage:  python benchmarks/sft_io.py [--quick] [--repeats N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DENSITY = 0.01
VALUE_STD = 1e-3
REF_FILE = "pytorch_diff.bin"


# -- reference format (re-implemented) -------------------------------------------------------


def ref_encode(tensor):
    """Sparse COO tensor -> {'size', 'index_steps', 'values'} as composable-sft encodes it."""
    import numpy as np

    multipliers = np.cumprod([1] + list(tensor.size())[:-1], dtype=np.int64)
    coordinates = np.array(tensor.indices().to("cpu"), dtype=np.int64)
    indices = np.matmul(multipliers, coordinates)
    perm = list(range(len(indices)))
    perm.sort(key=lambda x: indices[x])
    indices = indices[perm]
    index_steps = indices[1:] - indices[:-1]
    index_steps = index_steps.tolist()
    if len(indices) > 0:
        index_steps = [indices[0]] + index_steps
    values = tensor.values().to("cpu")[perm]
    return {"size": tensor.size(), "index_steps": index_steps, "values": values}


def ref_decode(encoding):
    """Inverse of :func:`ref_encode`, as composable-sft decodes (int32 cumsum, div/mod, coalesce)."""
    import numpy as np
    import torch

    size = encoding["size"]
    index_steps = encoding["index_steps"]
    values = encoding["values"]
    indices = np.cumsum(index_steps, dtype=np.int32)
    modulos = np.cumprod(list(size), dtype=np.int32)
    divisors = np.concatenate([[1], modulos[:-1]], dtype=np.int32)
    coordinates = np.expand_dims(indices, 0) // np.expand_dims(divisors, 1)
    coordinates = coordinates % np.expand_dims(modulos, 1)
    return torch.sparse_coo_tensor(coordinates, values, size=size).coalesce()


def ref_save(diffs, directory: Path) -> Path:
    """``SFT.save``: encode every sparse diff, ``torch.save`` the dict."""
    import torch

    encoded = {n: ref_encode(p) for n, p in diffs.items()}
    path = directory / REF_FILE
    torch.save({"diffs": encoded, "abs": {}}, path)
    return path


def ref_load_apply(path: Path, model) -> None:
    """``SFT(path)`` + ``SFT.apply(model)``: unpickle, decode to sparse COO, ``param += diff``."""
    import torch

    tensors = torch.load(path, weights_only=False)  # the reference's own files need this (see output)
    diffs = {p: ref_decode(d) for p, d in tensors.get("diffs", {}).items()}
    abs_params = tensors.get("abs", {})
    with torch.no_grad():
        for name, diff in diffs.items():
            param = model.get_parameter(name)
            param += diff
        for name, value in abs_params.items():
            model.get_parameter(name).copy_(value)


def ref_load_apply_index_add(path: Path, model) -> None:
    """Same file, vectorised int64 decode to row-major flat indices, ``index_add_`` apply."""
    import numpy as np
    import torch

    tensors = torch.load(path, weights_only=False)
    with torch.no_grad():
        for name, enc in tensors["diffs"].items():
            size = list(enc["size"])
            fortran = np.cumsum(np.asarray(enc["index_steps"], dtype=np.int64))
            coords = np.unravel_index(fortran, size, order="F")
            flat = np.ravel_multi_index(coords, size, order="C")
            param = model.get_parameter(name)
            param.view(-1).index_add_(0, torch.from_numpy(flat), enc["values"])


# -- benchmark -------------------------------------------------------------------------------


def random_sft(maskable, k: int, seed: int):
    """K distinct positions uniformly over all maskable entries (sorted-name order), N(0, 1e-3) values."""
    import numpy as np
    import torch

    from deftx.core.sft import SFTMetadata, SparseDelta, SparseFineTuning

    names = sorted(maskable)
    sizes = [maskable[n].numel() for n in names]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(int(offsets[-1]), size=k, replace=False))
    values = (rng.standard_normal(k, dtype=np.float32) * np.float32(VALUE_STD)).astype(np.float32)
    cuts = np.searchsorted(flat, offsets)
    diffs = {}
    for i, n in enumerate(names):
        a, b = cuts[i], cuts[i + 1]
        idx = torch.from_numpy(flat[a:b] - offsets[i]).to(torch.int64)
        diffs[n] = SparseDelta(tuple(maskable[n].shape), idx, torch.from_numpy(values[a:b].copy()))
    return SparseFineTuning(diffs, head={}, metadata=SFTMetadata(kind="language"))


def to_reference_diffs(sft):
    """The reference's in-memory SFT: one coalesced sparse COO tensor per parameter."""
    import numpy as np
    import torch

    out = {}
    for name, d in sft.diffs.items():
        coords = np.stack(np.unravel_index(d.indices.numpy(), d.shape))
        out[name] = torch.sparse_coo_tensor(torch.from_numpy(coords), d.values, size=d.shape).coalesce()
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model (vocab 50k, 4 layers) for a fast check")
    p.add_argument("--repeats", type=int, default=5, help="repetitions of save and of load+apply (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's default)")
    C.add_json_option(p)
    p.add_argument("--keep", help="write the files into this directory and keep them (default: a temp dir)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    import warnings

    import torch

    from deftx.core.roles import maskable_parameters
    from deftx.core.topk import resolve_budget

    # the reference code paths trigger these (sparse invariant checks off; torch Tensor.__array__ copy kw)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array__.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    from deftx.core.sft import SparseFineTuning

    t_start = time.perf_counter()
    print("== SFT file I/O benchmark (benchmarks/sft_io.py) ==")
    print(C.machine_info())
    print(C.load_note("at start"))

    model = C.build_model(args.quick, seed=0)
    maskable = maskable_parameters(model)
    total = sum(t.numel() for t in maskable.values())
    k = resolve_budget(total, density=DENSITY)
    print(f"model: {C.describe_model(args.quick, maskable)}")
    print(f"random SFT: K = {k:,} positions ({DENSITY:.0%}) uniform without replacement, values N(0, {VALUE_STD:g}), "
          f"no head; repeats {args.repeats}", flush=True)
    base = {n: t.detach().clone() for n, t in maskable.items()}

    def restore() -> None:
        with torch.no_grad():
            for n, t in maskable.items():
                t.copy_(base[n])

    sft = random_sft(maskable, k, args.seed)
    ref_diffs = to_reference_diffs(sft)
    assert sft.nnz == k

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="deftx-sftio-"))
    work.mkdir(parents=True, exist_ok=True)
    deftx_dir = work / "deftx_sft"
    ref_dir = work / "reference_sft"
    ref_dir.mkdir(exist_ok=True)
    try:
        # -- save --
        t_save = {"deftx": [], "reference": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            sft.save(deftx_dir, overwrite=True)
            t_save["deftx"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ref_path = ref_save(ref_diffs, ref_dir)
            t_save["reference"].append(time.perf_counter() - t)
        size = {"deftx": dir_bytes(deftx_dir), "reference": ref_path.stat().st_size}
        size_st = (deftx_dir / "sft.safetensors").stat().st_size

        # -- load + apply --
        methods = {
            "deftx": lambda: SparseFineTuning.load(deftx_dir).apply(model, with_head=False, check_base=False),
            "reference": lambda: ref_load_apply(ref_path, model),
            "reference, index_add_": lambda: ref_load_apply_index_add(ref_path, model),
        }
        t_load = {m: [] for m in methods}
        results: dict[str, dict[str, torch.Tensor]] = {}
        for rep in range(args.repeats):
            for m, fn in methods.items():
                restore()
                t = time.perf_counter()
                fn()
                t_load[m].append(time.perf_counter() - t)
                if rep == 0:
                    results[m] = {n: t.detach().clone() for n, t in maskable.items()}
        restore()

        # -- correctness --
        expected = {n: base[n].clone() for n in base}
        for n, d in sft.diffs.items():
            expected[n].view(-1)[d.indices] += d.values
        identical = {m: all(torch.equal(r[n], expected[n]) for n in expected) for m, r in results.items()}
        changed = sum(int((results["deftx"][n] != base[n]).sum()) for n in base)

        try:
            torch.load(ref_path)  # default weights_only=True in torch >= 2.6
            wo_msg = "loads with the default weights_only=True"
        except Exception as exc:  # noqa: BLE001 - we only report what happens
            lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln]
            detail = lines[0].split(" was not")[0].replace("WeightsUnpickler error: ", "") if lines else ""
            wo_msg = f"FAILS with the default weights_only=True ({type(exc).__name__}: {detail or 'see torch.load'})"
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    med_save = {m: statistics.median(v) for m, v in t_save.items()}
    med_load = {m: statistics.median(v) for m, v in t_load.items()}
    rows = []
    for m in methods:
        fmt = "reference" if m.startswith("reference") else "deftx"
        rows.append([
            m if m != "deftx" else "deftx (sft.safetensors + sft.json)",
            f"{size[fmt]:,}", f"{size[fmt] / k:.2f}",
            C.summary(t_save[fmt], 3) if m != "reference, index_add_" else "(same file)",
            C.summary(t_load[m], 3),
            f"{med_load[m] / med_load['deftx']:.2f}x" if m != "deftx" else "1x",
            "yes" if identical[m] else "NO",
        ])
    print()
    print(C.table(["format / loader", "bytes", "B/entry", "save s, median [min-max] (n)",
                   "load+apply s, median [min-max] (n)", "load+apply vs deftx", "identical params"], rows))
    print(f"(deftx bytes = sft.safetensors {size_st:,} + sft.json {size['deftx'] - size_st:,}; dense fp32 "
          f"maskable params would be {4 * total:,} B)")
    print("\nratios:")
    print(f"  size: reference / deftx = {size['reference'] / size['deftx']:.2f} "
          f"(deftx files are {size['deftx'] / size['reference']:.2f}x the reference's: 2-byte block offsets "
          f"vs pickled delta-encoded ints)")
    print(f"  save time: reference / deftx = {med_save['reference'] / med_save['deftx']:.1f}x")
    print(f"  load+apply time: reference / deftx = {med_load['reference'] / med_load['deftx']:.1f}x "
          f"(reference file with index_add_ apply: {med_load['reference, index_add_'] / med_load['deftx']:.1f}x)")
    print(f"\nall loaders produce bit-identical parameters: {all(identical.values())} "
          f"({changed:,} entries differ from the base; K = {k:,}; fewer only where a value is below the fp32 "
          f"rounding step of its weight)")
    print(f"security: the reference file {wo_msg}; reading it needs torch.load(weights_only=False), which "
          f"unpickles arbitrary objects (arbitrary code execution on load). deftx reads safetensors + JSON only.")
    print("\n" + C.load_note("at end") + f"; total wall time {time.perf_counter() - t_start:.0f} s")
    C.write_json(args.json, {"bytes": size, "load_apply_seconds": med_load, "save_seconds": med_save, "k": k,
                             "identical": identical})


if __name__ == "__main__":
    main()
