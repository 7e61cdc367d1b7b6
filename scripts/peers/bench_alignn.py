#!/usr/bin/env python3
"""Per-core speed of our ALIGNN and alignn's DGL-free ``alignn_atomwise_pure`` (alignn 2026.8.11)
on the same MP protocol structures: featurisation and fwd + bwd + AdamW step, one thread.

    python scripts/peers/bench_alignn.py --data runs/protocol/mp6000 [--n 128] [--reps 3]

The peer is configured as close to the paper's ALIGNN as its config allows: 4 ALIGNN + 4 GCN
layers, hidden 256, embedding 64, 80/40 RBFs, CGCNN's 92 features, 12 nearest within 8 Å and
triplets from every bond (three_body_cutoff 8), no forces, no per-atom scaling, no penalty.
It still differs from the paper's model: LayerNorm instead of BatchNorm in every gated
convolution, and its k-nearest graph is not made undirected.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from alignn.models.alignn_atomwise_pure import ALIGNNAtomWisePure, ALIGNNAtomWisePureConfig
    from alignn.torch_graph_builder import batch_torch_graph_pairs, build_pure_torch_graph
    from jarvis.core.atoms import Atoms

    from uae_dist.data import CrystalGraphDataset, collate
    from uae_dist.models import build_model, model_config_class

    cfg = model_config_class("alignn")()
    ds = CrystalGraphDataset(a.data / "lmdb_k12", "train", **cfg.graph())
    ids = ds.ids[: a.n]
    t = time.process_time()
    ours_items = [ds[k] for k in range(a.n)]
    ours_load = time.process_time() - t
    t = time.process_time()
    pairs = []
    for rid in ids:
        at = Atoms.from_cif(str(a.data / "cgcnn" / f"{rid}.cif"), use_cif2cell=False)
        pairs.append(build_pure_torch_graph(at, two_body_cutoff=8.0, three_body_cutoff=8.0,
                                            max_neighbors=12, atom_features="cgcnn"))
    peer_feat = time.process_time() - t
    torch.manual_seed(0)
    ours = build_model(cfg, ["e"]).train()
    peer = ALIGNNAtomWisePure(ALIGNNAtomWisePureConfig(
        name="alignn_atomwise_pure", alignn_layers=4, gcn_layers=4, hidden_features=256,
        embedding_features=64, atom_input_features=92, calculate_gradient=False,
        energy_mult_natoms=False, use_penalty=False, three_body_cutoff=8.0,
        gradwise_weight=0.0)).train()
    o1 = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    o2 = torch.optim.AdamW(peer.parameters(), lr=1e-3)
    nb = a.n // a.batch
    ob = [collate(ours_items[k * a.batch:(k + 1) * a.batch]) for k in range(nb)]
    pb = [batch_torch_graph_pairs(pairs[k * a.batch:(k + 1) * a.batch]) for k in range(nb)]
    y = torch.zeros(a.batch)

    def step_ours(b):
        o1.zero_grad()
        ours(b).view(-1).pow(2).mean().backward()
        o1.step()

    def step_peer(b):
        o2.zero_grad()
        out = peer((b[0], b[1], None))["out"]
        (out.view(-1) - y[: out.numel()]).pow(2).mean().backward()
        o2.step()

    cpu = {"ours": [], "peer": []}
    for _ in range(a.reps):
        for k in range(nb):
            for name, f, b in (("ours", step_ours, ob[k]), ("peer", step_peer, pb[k])):
                t = time.process_time()
                f(b)
                cpu[name].append(time.process_time() - t)
    per1000 = {k: 1000 * float(np.median(v)) / a.batch for k, v in cpu.items()}
    ei, _, lg, _, _ = ours.graphs(ob[0])
    res = {"n": a.n, "batch": a.batch,
           "train_cpu_s_per_1000": per1000,
           "featurise_cpu_s_per_1000": {"ours_loader": 1000 * ours_load / a.n,
                                        "peer_graph_build": 1000 * peer_feat / a.n},
           "edges_per_atom": {"ours": ei.shape[1] / ob[0].num_nodes,
                              "peer": pb[0][0].num_edges / pb[0][0].num_nodes},
           "triplets_per_atom": {"ours": lg[0].numel() / ob[0].num_nodes,
                                 "peer": pb[0][1].num_edges / pb[0][0].num_nodes},
           "params": {"ours": sum(q.numel() for q in ours.parameters() if q.requires_grad),
                      "peer": sum(q.numel() for q in peer.parameters())}}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
