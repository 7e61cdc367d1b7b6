"""Ingest throughput: structures/s of the whole build (parse + graph + LMDB write) beside the time
pymatgen's ``Structure.get_neighbor_list`` alone takes on the same structures, in one run.

    python benchmarks/ingest.py --n 5000 --workers 2          # the first 5,000 MP structures
    python benchmarks/ingest.py --n 0 --workers 2             # the whole set (reference on a sample)
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
import warnings

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="mp")
    ap.add_argument("--n", type=int, default=5000, help="structures (0 = all)")
    ap.add_argument("--ref-n", type=int, default=2000, help="structures timed with pymatgen (≤ n)")
    ap.add_argument("--cutoff", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--no-fast-cif", action="store_true")
    a = ap.parse_args()

    from pymatgen.core import Structure

    from uae_dist.data.build import build_lmdb
    from uae_dist.data.registry import resolve

    path, _ = resolve(a.source)
    records = json.load(gzip.open(path)) if str(path).endswith(".gz") else json.load(open(path))
    n = len(records) if a.n == 0 else min(a.n, len(records))
    ref_n = min(a.ref_n, n)
    # the reference: pymatgen's neighbour list alone on (a sample of) the same structures, parsed untimed
    idx = np.linspace(0, n - 1, ref_n).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        structs = [Structure.from_str(records[k]["cif"], fmt="cif") for k in idx]
        t_parse = (time.perf_counter() - t) / ref_n
    t = time.perf_counter()
    pairs = sum(len(s.get_neighbor_list(a.cutoff)[0]) for s in structs)
    t_nl = (time.perf_counter() - t) / ref_n

    out = tempfile.mkdtemp(prefix="uae_ingest_")
    try:
        t = time.perf_counter()
        m = build_lmdb(path, out, cutoff=a.cutoff, shards=a.shards, workers=a.workers, limit=n,
                       fast_cif=not a.no_fast_cif, progress=False, use_mpi=False)
        wall = time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)
    per = wall / n
    print(f"structures          {n:,} (pymatgen reference on {ref_n:,} of them), cutoff {a.cutoff:g} Å")
    print(f"build ({a.workers} workers)   {wall:8.2f} s  = {n / wall:8.1f} structures/s  "
          f"({m['counts']['edges']:,} edges, {m['counts']['rejected']} rejected)")
    print(f"pymatgen CIF parse  {t_parse * 1e3:8.3f} ms/structure (1 core)")
    print(f"pymatgen nbr list   {t_nl * 1e3:8.3f} ms/structure (1 core), {pairs / ref_n:,.0f} pairs/structure")
    print(f"ratio: whole build per structure / pymatgen neighbour list alone = {per / t_nl:.2f} "
          f"(< 1 means the full ingest beats pymatgen's neighbour list by itself)")
    print(f"ratio: whole build per structure / pymatgen CIF parse + neighbour list = {per / (t_parse + t_nl):.3f}")
    print(f"whole-set estimate: {len(records) * per:.1f} s for {len(records):,} structures")


if __name__ == "__main__":
    main()
