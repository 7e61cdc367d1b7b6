"""Graphs/s of the loaders on the same atom-capped batches, in one run (ratios are what to read on
a shared machine):

  (a) reference: PyG's ``torch_geometric.loader.DataLoader`` collating (``Batch.from_data_list``)
      the same graphs already held in memory as ``Data``;
  (b) the old per-item path (``ds[k]`` per graph, then ``Batch.from_data_list``), 0 and 2 workers;
  (c) the batched path (``CrystalGraphDataset.__getitems__``), 0 and 2 workers, in torch's
      DataLoader (a worker sends its batch packed, the main process expands it);
  (d) the same in ``GraphLoader`` with 2 workers (its own forked workers, a pipe each, write
      batches into shared slots);

at the data set's cutoff and narrowed at load time (``--cutoff``; default: both 8 Å as built
and 4 Å), each the best of ``--repeat`` passes, taken in rounds (one pass of every loader per
round) so that a noisy machine's slow phases do not fall on one loader only. The process's
malloc is tuned as a training rank's (``train.keep_freed_memory``; ``--glibc-defaults`` to leave
it): without it, a batch's megabytes are mapped and zeroed afresh by the kernel at every batch.

    python benchmarks/loader.py data_build/mp --batches 200
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


class PerItem(torch.utils.data.Dataset):
    """The dataset without its batched fetch: the DataLoader falls back to ``ds[k]`` per item."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, k):
        return self.ds[k]


def rate(make_loader) -> float:
    """Graphs/s of one pass; the first batch (worker start-up) is not timed."""
    it = iter(make_loader())
    next(it)
    t, graphs = time.perf_counter(), 0
    for b in it:
        graphs += b.num_graphs
    return graphs / (time.perf_counter() - t)


def bench(root, split, cutoff, max_neighbors, max_atoms, n_batches, repeat):
    from torch_geometric.loader import DataLoader as PygLoader

    from uae_dist.data import CrystalGraphDataset, DistributedAtomBatchSampler, GraphLoader, collate

    ds = CrystalGraphDataset(root, split=split, cutoff=cutoff, max_neighbors=max_neighbors)
    batches = list(DistributedAtomBatchSampler(ds.natoms, max_atoms, seed=0))[:n_batches]
    flat = [k for b in batches for k in b]
    starts = np.cumsum([0] + [len(b) for b in batches]).tolist()
    mem_batches = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    edges = sum(ds[k].edge_index.shape[1] for k in flat) / len(flat)
    built = float(ds.manifest["options"]["cutoff"])

    def loader(dataset, w):
        return lambda: torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                                   collate_fn=collate, num_workers=w)

    def pyg_mem(threads):
        """PyG on the same graphs already in memory (built per pass, outside the timing, and
        dropped before the next loader forks its workers)."""
        mem = [ds[k] for k in flat]  # the same graphs, in memory, in batch order
        keep = torch.get_num_threads()
        torch.set_num_threads(threads or keep)
        try:
            return rate(lambda: PygLoader(mem, batch_sampler=mem_batches))
        finally:
            torch.set_num_threads(keep)

    threads = torch.get_num_threads()
    passes = {"pyg_mem": lambda: pyg_mem(None), "pyg_mem_1t": lambda: pyg_mem(1),
              "old0": lambda: rate(loader(PerItem(ds), 0)),
              "new0": lambda: rate(loader(ds, 0)),
              "ring2": lambda: rate(lambda: GraphLoader(ds, batches, num_workers=2)),
              "old2": lambda: rate(loader(PerItem(ds), 2)),
              "new2": lambda: rate(loader(ds, 2))}
    r = dict.fromkeys(passes, 0.0)
    for _ in range(repeat):  # rounds of one pass each: every loader sees the same machine phases
        for k, one in passes.items():
            r[k] = max(r[k], one())
    name = f"{cutoff or built:g}A" + (f"/cap{max_neighbors}" if max_neighbors else "")
    print(f"{name}: {len(batches)} batches of <= {max_atoms} atoms, {len(flat)} graphs, "
          f"{ds.natoms[flat].mean():.1f} atoms and {edges:.0f} edges per graph; "
          f"torch threads {threads}")
    rows = [("pyg_mem", "(a) in-memory Data, PyG DataLoader (Batch.from_data_list)"),
            ("pyg_mem_1t", "(a') the same, 1 torch thread"),
            ("old0", "(b) old per-item path, 0 workers"),
            ("old2", "(b) old per-item path, 2 workers"),
            ("new0", "(c) batched path, 0 workers"), ("new2", "(c) batched path, 2 workers"),
            ("ring2", "(d) GraphLoader, 2 own workers (shared slots)")]
    for k, label in rows:
        print(f"  {label:<60} {r[k]:9.0f} graphs/s")
    new = max(r["new0"], r["new2"], r["ring2"])
    print(f"  ratios: new0/in-memory PyG {r['new0'] / r['pyg_mem']:.2f} "
          f"(vs 1 thread {r['new0'] / r['pyg_mem_1t']:.2f}), best new/in-memory PyG "
          f"{new / r['pyg_mem']:.2f}, new0/old0 {r['new0'] / r['old0']:.2f}, "
          f"new2/old2 {r['new2'] / r['old2']:.2f}, 2 workers/0 workers: GraphLoader "
          f"{r['ring2'] / r['new0']:.2f}, DataLoader {r['new2'] / r['new0']:.2f} "
          f"(old {r['old2'] / r['old0']:.2f})")
    return (f"{name}: new {r['new0']:.0f} g/s (0w) {r['ring2']:.0f} (GraphLoader 2w) = "
            f"{r['new0'] / r['pyg_mem']:.1f}x in-memory PyG, {r['new0'] / r['old0']:.1f}x old; "
            f"2w/0w {r['ring2'] / r['new0']:.2f} (DataLoader {r['new2'] / r['new0']:.2f}, "
            f"old {r['old2'] / r['old0']:.2f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--split", default="train")
    ap.add_argument("--max-atoms", type=int, default=512)
    ap.add_argument("--batches", type=int, default=150)
    ap.add_argument("--repeat", type=int, default=2, help="passes per loader (best is kept)")
    ap.add_argument("--cutoff", type=float, default=None,
                    help="narrow graphs at load time (Å); default: as built and 4 Å")
    ap.add_argument("--max-neighbors", type=int, default=None)
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="leave malloc as glibc sets it (default: as a training rank sets it)")
    a = ap.parse_args()
    if not a.glibc_defaults:  # the process a loader runs in when it trains (train.keep_freed_memory)
        from uae_dist.train.memory import cache_large_blocks, keep_freed_memory

        print(f"malloc as in a training rank: {', '.join(keep_freed_memory()) or 'unchanged'}; "
              f"caching allocator for large blocks: {cache_large_blocks()}")
    settings = [(a.cutoff, a.max_neighbors)] if a.cutoff or a.max_neighbors \
        else [(None, None), (4.0, None)]
    summary = [bench(a.root, a.split, c, m, a.max_atoms, a.batches, a.repeat)
               for c, m in settings]
    print("SUMMARY " + " | ".join(summary))


if __name__ == "__main__":
    main()
