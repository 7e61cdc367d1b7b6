#!/usr/bin/env python
"""Activation memory of a CrystalTransformer per atom and per edge, with and without activation
checkpointing (``model.checkpoint_activations``), on real MP graphs.

What is measured: the bytes autograd keeps for the backward pass (every tensor saved during the
forward, via ``torch.autograd.graph.saved_tensors_hooks``), over batches of different sizes; a
least-squares fit gives bytes ≈ a·atoms + b·edges + c. That is the memory that grows with the batch
(weights, gradients and optimizer state come on top and do not). The reference in the same run is
the model without checkpointing; the ratio is printed.

    python benchmarks/activation_memory.py data_build/mp --config pretrain_full
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def saved_bytes(model, batch) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch).sum()
    return total[0]


def main(argv=None) -> int:
    from torch_geometric.data import Batch

    from uae_dist.config import load_config
    from uae_dist.data import CrystalGraphDataset
    from uae_dist.models import build_model

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a built LMDB (uae-dist data build)")
    p.add_argument("--config", default="pretrain_full", help="model config (default %(default)s)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(a.config, [f"data.root={a.data}"])
    ds = CrystalGraphDataset(a.data, "val", **cfg.model.graph())
    rng = np.random.default_rng(0)
    sizes = np.linspace(4, 24, a.batches).astype(int)  # structures per batch
    rows = []
    models = {}
    for ck in (False, True):
        cfg.model.checkpoint_activations = ck
        torch.manual_seed(0)
        models[ck] = build_model(cfg.model, ["y"]).to(getattr(torch, a.dtype))
    for n in sizes:
        idx = rng.choice(len(ds), size=int(n), replace=False)
        batch = Batch.from_data_list([ds[int(i)] for i in idx])
        atoms, edges = int(batch.z.numel()), int(batch.edge_index.shape[1])
        rows.append((atoms, edges, saved_bytes(models[False], batch),
                     saved_bytes(models[True], batch)))
    r = np.array(rows, dtype=np.float64)
    design = np.stack([r[:, 0], r[:, 1], np.ones(len(r))], 1)
    fits = {name: np.linalg.lstsq(design, r[:, col], rcond=None)[0]
            for name, col in (("plain", 2), ("checkpointed", 3))}
    mc = cfg.model
    print(f"model {mc.name}/{getattr(mc, 'variant', '')} d_model={getattr(mc, 'd_model', '?')} "
          f"layers={getattr(mc, 'layers', '?')} cutoff={getattr(mc, 'cutoff', '?')} Å, {a.dtype}; "
          f"{len(r)} batches of {int(r[:, 0].min())}-{int(r[:, 0].max())} atoms, "
          f"{r[:, 1].sum() / r[:, 0].sum():.0f} edges/atom")
    print(f"{'':14s} {'bytes/atom':>12s} {'bytes/edge':>12s} {'MiB at 1k atoms':>16s}")
    per_atom_edges = r[:, 1].sum() / r[:, 0].sum()
    for name, (pa, pe, _) in fits.items():
        at_1k = (1000 * pa + 1000 * per_atom_edges * pe) / 2**20
        print(f"{name:14s} {pa:12.0f} {pe:12.0f} {at_1k:16.1f}")
    ratio = (r[:, 3] / r[:, 2]).mean()
    print(f"summary: checkpointing keeps {ratio:.3f}x the activation bytes of the plain model "
          f"(reference: the plain model, same batches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
