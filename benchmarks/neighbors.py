"""Periodic neighbour-list benchmark on Materials Project structures (not a test).

Compares, in one run and on the same structures: our compiled CPU op called one structure at a time
(numpy in/out, as the data builder calls it; int64 and compact int32/int8 output) and batched,
pymatgen ``Structure.get_neighbor_list``, the ``vesin`` package (CPU, and CUDA on a GPU), our pure
NumPy fallback, and (on a GPU build with a device) the batched CUDA op. Ratios are against pymatgen
(and on a GPU against vesin's CUDA list): ratio of medians of per-structure times, and of totals.

Two sets of cells:
  mp     a random sample of MP structures as they are;
  dense  cells denser and larger than MP's, built from real MP structures: each is compressed to
         0.1166 atoms/A^3 (about 250 neighbours per atom at 8 A) and doubled along its shortest
         axis towards a random size in [20, 120] atoms (structures already denser are skipped).

    .venv/bin/python benchmarks/neighbors.py --n 1000 --cutoffs 5,6,8
    .venv/bin/python benchmarks/neighbors.py --save-structures s.npz   # arrays for a machine
    .venv/bin/python benchmarks/neighbors.py --structures s.npz         # ... without pymatgen
    .venv/bin/python benchmarks/neighbors.py --scaling                  # brute force vs cell list

Every table prints its ratios; one "SUMMARY neighbors ..." line per (set, cutoff) closes it.
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import pathlib
import sys
import time
import warnings

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uae_dist import ops  # noqa: E402
from uae_dist.ops import neighbor_list, neighbor_list_np, neighbor_list_numpy  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mp_cgcnn_36737.json.gz"
DENSE_RHO = 250 / (4 / 3 * np.pi * 8.0 ** 3)  # atoms / A^3 for ~250 neighbours within 8 A
CLOCK = time.perf_counter  # --clock cpu: time.process_time (robust to a loaded machine, blind to threads)


def load_structures(path, n, seed):
    from pymatgen.core import Structure

    with gzip.open(path, "rt") as fh:
        rows = json.load(fh)
    idx = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structs = [Structure.from_str(rows[k]["cif"], fmt="cif") for k in sorted(idx)]
    return structs


def dense_cells(structs, n, seed):
    """Compressed supercells of real MP structures (see the module docstring)."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for s in structs:
        if len(s) / s.volume > DENSE_RHO:
            continue
        goal = int(rng.integers(20, 121))
        d = s.copy()
        d.scale_lattice(len(d) / DENSE_RHO)
        while 2 * len(d) <= goal:
            m = [1, 1, 1]
            m[int(np.argmin(d.lattice.abc))] = 2
            d.make_supercell(m)
        if 20 <= len(d) <= 120:
            out.append(d)
        if len(out) >= n:
            break
    return out


def to_arrays(structs):
    return [(np.ascontiguousarray(s.cart_coords, dtype=np.float64),
             np.ascontiguousarray(s.lattice.matrix, dtype=np.float64),
             np.array(s.lattice.pbc, dtype=bool)) for s in structs]


def save_sets(path, sets):
    z = {}
    for name, arrs in sets.items():
        z[f"{name}_pos"] = np.concatenate([a[0] for a in arrs])
        z[f"{name}_cell"] = np.stack([a[1] for a in arrs])
        z[f"{name}_pbc"] = np.stack([a[2] for a in arrs])
        z[f"{name}_ptr"] = np.r_[0, np.cumsum([len(a[0]) for a in arrs])]
    np.savez_compressed(path, **z)


def load_sets(path):
    z = np.load(path)
    names = sorted({k.rsplit("_", 1)[0] for k in z.files})
    out = {}
    for name in names:
        ptr = z[f"{name}_ptr"]
        out[name] = [(z[f"{name}_pos"][ptr[b]:ptr[b + 1]], z[f"{name}_cell"][b], z[f"{name}_pbc"][b])
                     for b in range(len(ptr) - 1)]
    return out


def per_structure(fn, items, sync=None):
    """Time fn(item) for each item; returns (times, pairs). The garbage collector is paused while timing
    (as timeit does), for every method alike."""
    times, pairs = np.empty(len(items)), 0
    gc.disable()
    try:
        for k, it in enumerate(items):
            t0 = CLOCK()
            n = fn(it)
            if sync:
                sync()
            times[k] = CLOCK() - t0
            pairs += n
    finally:
        gc.enable()
    return times, pairs


def batched(arrays, cutoff, batch_size, device="cpu", compact=False, warm=True):
    """Per-structure times of the batched op: structures are grouped by size (as a bucketing loader
    would) and each gets its batch's time / batch size, so medians compare like with like.

    ``warm``: time a second pass over the same batches, as a loop over epochs sees the op (its
    output blocks are recycled between calls); the first pass pays a page fault and a zeroed page
    per 4 KiB of every new output block (tens of MB per call on dense cells): ``warm=False``."""
    if warm:
        batched(arrays, cutoff, batch_size, device, compact, warm=False)
    times, pairs = np.empty(len(arrays)), 0
    order = np.argsort([len(a[0]) for a in arrays], kind="stable")
    for b0 in range(0, len(arrays), batch_size):
        sel = order[b0:b0 + batch_size]
        chunk = [arrays[k] for k in sel]
        pos = torch.from_numpy(np.concatenate([a[0] for a in chunk])).to(device)
        cell = torch.from_numpy(np.stack([a[1] for a in chunk])).to(device)
        pbc = torch.from_numpy(np.stack([a[2] for a in chunk])).to(device)
        batch = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor([len(a[0]) for a in chunk])).to(device)
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = CLOCK()
        i, _, _ = neighbor_list(pos, cell, pbc, cutoff, batch=batch, compact=compact)
        if device != "cpu":
            torch.cuda.synchronize()
        dt = CLOCK() - t0
        times[sel] = dt / len(chunk)
        pairs += len(i)
    return times, pairs


def vesin_cuda_fn(vesin, cutoff):
    nl = vesin.NeighborList(cutoff=cutoff, full_list=True)

    def run(t):
        return len(nl.compute(t[0], t[1], t[2], "ijS")[0])
    return run


def run_set(name, arrays, structs, cutoff, args, vesin, cuda):
    res = {}
    nt = torch.get_num_threads()
    neighbor_list_np(*arrays[0], cutoff)  # warm-up: the first call pays for lazy initialisation
    res["ours (one structure/call)"] = per_structure(lambda a: len(neighbor_list_np(*a, cutoff)[0]), arrays)
    res["ours compact (one/call)"] = per_structure(
        lambda a: len(neighbor_list_np(*a, cutoff, compact=True)[0]), arrays)
    if nt > 1:
        torch.set_num_threads(1)
        res["ours (one/call, 1 thread)"] = per_structure(lambda a: len(neighbor_list_np(*a, cutoff)[0]), arrays)
        torch.set_num_threads(nt)
    bs = args.batch_size
    res[f"ours batched ({bs}/call, first pass)"] = batched(arrays, cutoff, bs, warm=False)
    res[f"ours batched ({bs}/call)"] = batched(arrays, cutoff, bs)
    res[f"ours batched compact ({bs}/call)"] = batched(arrays, cutoff, bs, compact=True)
    if nt > 1:
        torch.set_num_threads(1)
        res[f"ours batched ({bs}/call, 1 thread)"] = batched(arrays, cutoff, bs)
        torch.set_num_threads(nt)
    if cuda:
        batched(arrays[:bs], cutoff, bs, "cuda")
        res[f"ours CUDA batched ({bs}/call)"] = batched(arrays, cutoff, bs, "cuda")
        res[f"ours CUDA batched compact ({bs}/call)"] = batched(arrays, cutoff, bs, "cuda", compact=True)
        res["ours CUDA (one/call)"] = per_structure(
            lambda t: len(neighbor_list(t[0], t[1], t[2], cutoff)[0]),
            [tuple(torch.from_numpy(x).cuda() for x in a) for a in arrays], torch.cuda.synchronize)
    if structs is not None:
        res["pymatgen get_neighbor_list"] = per_structure(lambda s: len(s.get_neighbor_list(cutoff)[0]), structs)
    if vesin is not None:
        nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
        res["vesin"] = per_structure(lambda a: len(nl.compute(a[0], a[1], a[2], "ijS")[0]), arrays)
        if cuda:
            try:
                tens = [(torch.from_numpy(a[0]).cuda(), torch.from_numpy(a[1]).cuda(), torch.from_numpy(a[2]).cuda())
                        for a in arrays]
                fn = vesin_cuda_fn(vesin, cutoff)
                fn(tens[0])
                res["vesin CUDA (one/call)"] = per_structure(fn, tens, torch.cuda.synchronize)
            except Exception as exc:  # pragma: no cover - depends on the vesin build
                print(f"# vesin CUDA failed: {type(exc).__name__}: {exc}")
    if not args.skip_fallback:
        res["pure numpy fallback"] = per_structure(lambda a: len(neighbor_list_numpy(*a, cutoff)[0]), arrays)

    refs = [r for r in ("pymatgen get_neighbor_list", "vesin CUDA (one/call)") if r in res]
    print(f"\n## {name} cells, cutoff {cutoff:g} Å")
    head = f"{'method':38s} {'pairs':>10s} {'median us':>10s} {'total s':>8s} {'Mpairs/s':>9s}"
    for r in refs:
        short = "pmg" if r.startswith("pymatgen") else "vesinCUDA"
        head += f" {'x ' + short + ' (med)':>16s} {'x ' + short + ' (tot)':>16s}"
    print(head)
    pairs_ref = None
    for key, (t, pairs) in res.items():
        line = (f"{key:38s} {pairs:10d} {np.median(t) * 1e6:10.1f} {t.sum():8.3f} "
                f"{pairs / t.sum() / 1e6:9.2f}")
        for r in refs:
            rt = res[r][0]
            line += f" {np.median(rt) / np.median(t):16.1f} {rt.sum() / t.sum():16.1f}"
        print(line)
        pairs_ref = pairs if pairs_ref is None else pairs_ref
        if pairs != pairs_ref:
            print(f"# WARNING: {key} found {pairs} pairs, {pairs_ref} expected")
    summary = [f"SUMMARY neighbors set={name} cutoff={cutoff:g} n={len(arrays)}"]
    for r in refs:
        rt = res[r][0]
        short = "pymatgen" if r.startswith("pymatgen") else "vesin_cuda"
        for key, label in (("ours (one structure/call)", "per_structure"),
                           (f"ours batched ({bs}/call)", "batched"),
                           (f"ours batched ({bs}/call, first pass)", "batched_first_pass"),
                           (f"ours batched ({bs}/call, 1 thread)", "batched_1thread"),
                           (f"ours batched compact ({bs}/call)", "batched_compact"),
                           (f"ours CUDA batched ({bs}/call)", "cuda_batched"), ("vesin", "vesin_cpu")):
            if key in res:
                summary.append(f"{label}/{short}={np.median(rt) / np.median(res[key][0]):.1f}x")
    if not refs:
        summary.append("no reference (no pymatgen, no CUDA)")
    print(" ".join(summary))
    sys.stdout.flush()


def scaling(arrays, cutoff, cuda, vesin):
    """Time per structure vs atoms for supercells of one dense cell: where brute force stops paying."""
    base = max(arrays, key=lambda a: len(a[0]) / abs(np.linalg.det(a[1])))
    print(f"\n## scaling: supercells of a {len(base[0])}-atom dense cell, cutoff {cutoff:g} Å "
          f"(ms per structure, median of 3)")
    print(f"{'atoms':>7s} {'CPU brute':>10s} {'CPU cells':>10s} {'CPU auto':>10s}"
          + (f" {'CUDA':>10s}" if cuda else "") + (f" {'vesin CUDA':>11s}" if cuda and vesin else ""))
    op = torch.ops.uae_dist.neighbor_list.default if ops.HAS_EXT else None
    for reps in (1, 2, 3, 4, 6, 8, 11, 16):
        pos, cell, pbc = base
        shifts = np.stack(np.meshgrid(*[np.arange(reps)] * 3, indexing="ij"), -1).reshape(-1, 3)
        big_pos = (pos[None, :, :] + (shifts @ cell)[:, None, :]).reshape(-1, 3)
        big = (big_pos, cell * reps, pbc)
        if len(big_pos) > 20000:
            break
        t = [torch.from_numpy(x) for x in big]
        row = [f"{len(big_pos):7d}"]

        def med(f, sync=None):
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                f()
                if sync:
                    sync()
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[1] * 1e3
        for method in (1, 2, 0):
            row.append(f"{med(lambda: op(*t, None, cutoff, None, method)):10.2f}" if op else f"{'-':>10s}")
        if cuda:
            tc = [x.cuda() for x in t]
            neighbor_list(*tc, cutoff)
            row.append(f"{med(lambda: neighbor_list(*tc, cutoff), torch.cuda.synchronize):10.2f}")
            if vesin:
                try:
                    fn = vesin_cuda_fn(vesin, cutoff)
                    fn(tc)
                    row.append(f"{med(lambda: fn(tc), torch.cuda.synchronize):11.2f}")
                except Exception as exc:  # pragma: no cover
                    row.append(f"{type(exc).__name__:>11s}")
        print(" ".join(row))
        sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n", type=int, default=1000, help="MP structures (the dense set has up to n/2)")
    ap.add_argument("--sets", default="mp,dense")
    ap.add_argument("--cutoffs", default="5,6,8")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-fallback", action="store_true", help="skip the (slow) pure NumPy fallback")
    ap.add_argument("--structures", help=".npz written by --save-structures (no pymatgen needed)")
    ap.add_argument("--save-structures", help="write the sets' arrays to this .npz and exit")
    ap.add_argument("--scaling", action="store_true", help="only the supercell scaling table (8 Å)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (all threads) instead of wall time, for a loaded machine")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    t0 = time.perf_counter()
    wanted = args.sets.split(",")
    structs = {}
    if args.structures:
        sets = {k: v for k, v in load_sets(args.structures).items() if k in wanted}
    else:
        mp = load_structures(args.data, args.n, args.seed)
        structs = {"mp": mp, "dense": dense_cells(mp, max(1, args.n // 2), args.seed)}
        sets = {k: to_arrays(structs[k]) for k in wanted}
    if args.save_structures:
        save_sets(args.save_structures, sets)
        print(f"# wrote {', '.join(f'{k}: {len(v)}' for k, v in sets.items())} structures to "
              f"{args.save_structures}")
        return
    try:
        from pymatgen.core import Structure  # noqa: F401
        have_pmg = True
    except ImportError:
        have_pmg = False
    try:
        import vesin
    except ImportError:  # pragma: no cover
        vesin = None
    cuda = ops.backend() == "ext+cuda" and torch.cuda.is_available()
    for k, arrs in sets.items():
        natoms = np.array([len(a[0]) for a in arrs])
        dens = np.median([len(a[0]) / abs(np.linalg.det(a[1])) for a in arrs])
        print(f"# {k}: {len(arrs)} structures (atoms: median {int(np.median(natoms))}, max {natoms.max()}; "
              f"median density {dens:.4f}/A^3)")
    print(f"# loaded in {time.perf_counter() - t0:.1f} s; backend={ops.backend()}, cuda={cuda}, "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}, cpu cores={os.cpu_count()}, "
          f"pymatgen={'yes' if have_pmg else 'no'}, vesin={'yes' if vesin else 'no'}, clock={args.clock}")
    if args.scaling:
        scaling(sets.get("dense") or next(iter(sets.values())), 8.0, cuda, vesin)
        return
    if have_pmg and not structs:  # arrays only (--structures): pymatgen Structures of the same cells
        from pymatgen.core import Lattice, Structure
        structs = {k: [Structure(Lattice(a[1], pbc=tuple(bool(x) for x in a[2])), ["H"] * len(a[0]), a[0],
                                 coords_are_cartesian=True) for a in arrs] for k, arrs in sets.items()}
    for cutoff in [float(c) for c in args.cutoffs.split(",")]:
        for k, arrs in sets.items():
            pm = structs.get(k) if have_pmg else None
            run_set(k, arrs, pm, cutoff, args, vesin, cuda)


if __name__ == "__main__":
    main()
