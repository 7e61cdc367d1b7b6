"""Periodic neighbour-list benchmark on Materials Project structures (not a test).

Compares, in one run and on the same structures: our compiled CPU op called one structure at a time
(numpy in/out, as the data builder calls it) and batched, pymatgen ``Structure.get_neighbor_list``, the
``vesin`` package, our pure NumPy fallback, and (on a GPU build with a device) the batched CUDA op.
Ratios are vs pymatgen: ratio of medians of per-structure times, and of totals.

    .venv/bin/python benchmarks/neighbors.py --n 1000 --cutoffs 5,6,8
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


def load_structures(path, n, seed):
    from pymatgen.core import Structure

    with gzip.open(path, "rt") as fh:
        rows = json.load(fh)
    idx = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structs = [Structure.from_str(rows[k]["cif"], fmt="cif") for k in sorted(idx)]
    return structs


def per_structure(fn, items):
    """Time fn(item) for each item; returns (times, pairs). The garbage collector is paused while timing
    (as timeit does), for every method alike."""
    times, pairs = np.empty(len(items)), 0
    gc.disable()
    try:
        for k, it in enumerate(items):
            t0 = time.perf_counter()
            n = fn(it)
            times[k] = time.perf_counter() - t0
            pairs += n
    finally:
        gc.enable()
    return times, pairs


def batched(arrays, cutoff, batch_size, device="cpu"):
    """Per-structure times of the batched op: structures are grouped by size (as a bucketing loader
    would) and each gets its batch's time / batch size, so medians compare like with like."""
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
        t0 = time.perf_counter()
        i, _, _ = neighbor_list(pos, cell, pbc, cutoff, batch=batch)
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        times[sel] = dt / len(chunk)
        pairs += len(i)
    return times, pairs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cutoffs", default="5,6,8")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-fallback", action="store_true", help="skip the (slow) pure NumPy fallback")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    structs = load_structures(args.data, args.n, args.seed)
    arrays = [(np.ascontiguousarray(s.cart_coords, dtype=np.float64),
               np.ascontiguousarray(s.lattice.matrix, dtype=np.float64),
               np.array(s.lattice.pbc, dtype=bool)) for s in structs]
    natoms = np.array([len(s) for s in structs])
    print(f"# {len(structs)} MP structures parsed in {time.perf_counter() - t0:.1f} s "
          f"(atoms: median {int(np.median(natoms))}, max {natoms.max()}); backend={ops.backend()}, "
          f"torch threads={torch.get_num_threads()}, cpu cores={os.cpu_count()}")
    try:
        import vesin
    except ImportError:  # pragma: no cover
        vesin = None
    cuda = ops.backend() == "ext+cuda" and torch.cuda.is_available()

    for cutoff in [float(c) for c in args.cutoffs.split(",")]:
        res = {}
        # warm-up (first call pays for lazy initialisation)
        neighbor_list_np(*arrays[0], cutoff)
        res["ours (one structure/call)"] = per_structure(lambda a: len(neighbor_list_np(*a, cutoff)[0]), arrays)
        nt = torch.get_num_threads()
        if nt > 1:
            torch.set_num_threads(1)
            res["ours (one/call, 1 thread)"] = per_structure(lambda a: len(neighbor_list_np(*a, cutoff)[0]), arrays)
            torch.set_num_threads(nt)
        res[f"ours batched ({args.batch_size}/call)"] = batched(arrays, cutoff, args.batch_size)
        if nt > 1:
            torch.set_num_threads(1)
            res[f"ours batched ({args.batch_size}/call, 1 thread)"] = batched(arrays, cutoff, args.batch_size)
            torch.set_num_threads(nt)
        if cuda:
            batched(arrays[:args.batch_size], cutoff, args.batch_size, "cuda")
            res[f"ours CUDA batched ({args.batch_size}/call)"] = batched(arrays, cutoff, args.batch_size, "cuda")
        res["pymatgen get_neighbor_list"] = per_structure(lambda s: len(s.get_neighbor_list(cutoff)[0]), structs)
        if vesin is not None:
            nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
            res["vesin"] = per_structure(lambda a: len(nl.compute(a[0], a[1], a[2], "ijS")[0]), arrays)
        if not args.skip_fallback:
            res["pure numpy fallback"] = per_structure(lambda a: len(neighbor_list_numpy(*a, cutoff)[0]), arrays)
        ref_t, _ = res["pymatgen get_neighbor_list"]
        print(f"\n## cutoff {cutoff:g} Å")
        print(f"{'method':34s} {'pairs':>10s} {'median us':>10s} {'total s':>8s} {'Mpairs/s':>9s} "
              f"{'x pmg (median)':>14s} {'x pmg (total)':>13s}")
        for name, (t, pairs) in res.items():
            print(f"{name:34s} {pairs:10d} {np.median(t) * 1e6:10.1f} {t.sum():8.3f} {pairs / t.sum() / 1e6:9.2f} "
                  f"{np.median(ref_t) / np.median(t):14.1f} {ref_t.sum() / t.sum():13.1f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
