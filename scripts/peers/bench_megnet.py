#!/usr/bin/env python3
"""Per-core speed of our MEGNet and matgl 4.1.2's on the same MP protocol structures, one thread:
featurisation (matgl: pymatgen CIF parse + Structure2Graph; ours: the LMDB loader of a 4 Å build)
and fwd + bwd + Adam step of the default models (batch 128).

    python scripts/peers/bench_megnet.py --data runs/protocol/mp6000 [--n 256] [--reps 3]
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
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from matgl.ext.pymatgen import Structure2Graph, get_element_list
    from matgl.graph.data import MGLDataLoader, MGLDataset
    from matgl.models import MEGNet
    from pymatgen.core import Structure

    from uae_dist.data import CrystalGraphDataset, collate
    from uae_dist.models import build_model, model_config_class

    cfg = model_config_class("megnet")()
    ds = CrystalGraphDataset(a.data / "lmdb_4A", "train", **cfg.graph())
    ids = ds.ids[: a.n]
    t = time.process_time()
    items = [ds[k] for k in range(a.n)]
    ours_load = time.process_time() - t
    t = time.process_time()
    sts = [Structure.from_file(a.data / "cgcnn" / f"{rid}.cif") for rid in ids]
    elements = get_element_list(sts)
    mds = MGLDataset(structures=sts, converter=Structure2Graph(element_types=elements, cutoff=4.0),
                     labels={"eform": [0.0] * a.n}, save_cache=False, root="/tmp/mgl_bench")
    peer_feat = time.process_time() - t
    loader, _ = MGLDataLoader(train_data=mds, val_data=mds, batch_size=a.batch, num_workers=0,
                              persistent_workers=False)
    pb = list(loader)  # (shuffled by MGLDataLoader: the same structures, another grouping)
    nb = a.n // a.batch
    ob = [collate(items[k * a.batch:(k + 1) * a.batch]) for k in range(nb)]
    torch.manual_seed(0)
    ours = build_model(cfg, ["e"]).train()
    from matgl.utils.training import ModelLightningModule

    peer = MEGNet(element_types=elements, cutoff=4.0).train()
    lit = ModelLightningModule(model=peer)  # its forward sets positions/offsets from the lattice
    o1 = torch.optim.Adam(ours.parameters(), lr=1e-3)
    o2 = torch.optim.Adam(peer.parameters(), lr=1e-3)

    def step_ours(b):
        o1.zero_grad()
        ours(b).view(-1).pow(2).mean().backward()
        o1.step()

    def step_peer(b):
        g, lat, state, _ = b
        o2.zero_grad()
        lit(g=g, lat=lat, state_attr=state).view(-1).pow(2).mean().backward()
        o2.step()

    cpu = {"ours": [], "peer": []}
    for _ in range(a.reps):
        for k in range(nb):
            for name, f, b in (("ours", step_ours, ob[k]), ("peer", step_peer, pb[k])):
                t = time.process_time()
                f(b)
                cpu[name].append(time.process_time() - t)
    res = {"n": a.n, "batch": a.batch,
           "train_cpu_s_per_1000": {k: 1000 * float(np.median(v)) / a.batch
                                    for k, v in cpu.items()},
           "featurise_cpu_s_per_1000": {"ours_loader": 1000 * ours_load / a.n,
                                        "peer_parse_and_graph": 1000 * peer_feat / a.n},
           "edges_per_structure": {"ours": ob[0].edge_index.shape[1] / ob[0].num_graphs,
                                   "peer": pb[0][0].edge_index.shape[1] / ob[0].num_graphs}}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
