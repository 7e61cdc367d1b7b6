"""Graphs/s through a DataLoader with 0 and 2 workers (atom-capped batches), in one run.

    python benchmarks/loader.py data_build/mp --batches 200
"""
from __future__ import annotations

import argparse
import time

import torch


def run(ds, sampler, workers, batches):
    from uae_dist.data import collate

    dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                     persistent_workers=False)
    it = iter(dl)
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    graphs = 0
    for k, b in enumerate(it):
        graphs += b.num_graphs
        if k + 1 >= batches:
            break
    return graphs / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--split", default="train")
    ap.add_argument("--max-atoms", type=int, default=512)
    ap.add_argument("--batches", type=int, default=150)
    ap.add_argument("--cutoff", type=float, default=None, help="narrow graphs at load time (Å)")
    a = ap.parse_args()
    from uae_dist.data import CrystalGraphDataset, DistributedAtomBatchSampler

    ds = CrystalGraphDataset(a.root, split=a.split, cutoff=a.cutoff)
    rates = {}
    for w in (0, 2):
        s = DistributedAtomBatchSampler(ds.natoms, a.max_atoms, seed=w)
        rates[w] = run(ds, s, w, a.batches)
        print(f"workers={w}: {rates[w]:8.1f} graphs/s")
    print(f"ratio 2 workers / 0 workers = {rates[2] / rates[0]:.2f}")


if __name__ == "__main__":
    main()
