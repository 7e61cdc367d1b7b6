#!/usr/bin/env python3
"""fwd + bwd + SGD step of our CGCNN and the reference's CrystalGraphConvNet (txie-93/cgcnn, from a
checkout outside this repository) on the same 256 MP protocol structures, one thread.

    python scripts/peers/bench_cgcnn.py REF_CHECKOUT [LMDB]   # /tmp/cgcnn_ref runs/protocol/mp6000/lmdb

The reference gets its own input layout (the 12 nearest per atom, Gaussian features precomputed,
as its featurisation would give); featurisation is not timed here.
"""
import sys, time, torch, numpy as np
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from cgcnn.model import CrystalGraphConvNet
from uae_dist.data import CrystalGraphDataset, collate
from uae_dist.models import build_model, model_config_class
from uae_dist.tables import load_table
cfg = model_config_class("cgcnn")()
ds = CrystalGraphDataset(sys.argv[2] if len(sys.argv) > 2 else "runs/protocol/mp6000/lmdb", "train",
                         **cfg.graph())
b = collate([ds[k] for k in range(256)])
# reference inputs: exactly the 12 nearest per atom (dense N x 12)
from uae_dist.ops import edge_vectors
_, d = edge_vectors(b.pos, b.cell, b.edge_index, b.shift, b.batch)
i, j = b.edge_index
N = b.num_nodes
idx = torch.zeros(N, 12, dtype=torch.long); dist = torch.full((N, 12), 9.0)
for a in range(N):
    sel = (i == a).nonzero().view(-1)
    o = torch.argsort(d[sel])[:12]; sel = sel[o]
    idx[a, :len(sel)] = j[sel]; dist[a, :len(sel)] = d[sel]
filt = np.arange(0, 8.2, 0.2)
nbr = torch.tensor(np.exp(-(dist.numpy()[..., None] - filt) ** 2 / 0.04), dtype=torch.float32)
table = torch.tensor(np.nan_to_num(load_table("cgcnn92").values))
atom_fea = table[b.z - 1]
cia = [torch.nonzero(b.batch == g).view(-1) for g in range(b.num_graphs)]
ref = CrystalGraphConvNet(92, 41); ref.train()
ours = build_model(cfg, ["e"]); ours.train()
o_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
o_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
def step_ref():
    o_ref.zero_grad(); ref(atom_fea, nbr, idx, cia).pow(2).mean().backward(); o_ref.step()
def step_ours():
    o_ours.zero_grad(); ours(b).pow(2).mean().backward(); o_ours.step()
res = {"ref": [], "ours": []}
for rep in range(4):
    for name, f in (("ref", step_ref), ("ours", step_ours)):
        t = time.process_time(); f(); res[name].append(time.process_time() - t)
for k, v in res.items():
    print(k, "CPU-s per 1000 structures:", " ".join(f"{x / 0.256:.2f}" for x in v),
          "median", f"{np.median(v[1:]) / 0.256:.2f}")
print("edges/atom ours", i.numel() / N)
