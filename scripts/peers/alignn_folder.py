#!/usr/bin/env python3
"""alignn's DGL-free ``alignn_atomwise_pure`` trained by alignn's own folder recipe on the MP protocol.

    python scripts/peers/alignn_folder.py --data runs/protocol/mp6000 --out runs/cmp/alignn_pure_s0 \
        [--epochs 4] [--hidden 64] [--seed 0] [--n N]

alignn 2026.8.11's ``train_for_folder`` (``python -m alignn.train_alignn``), unmodified: it reads
the CIFs of ``<data>/cgcnn`` (linked into ``<out>/folder`` with an ``id_prop.csv`` that names the
files; same rows, same order), builds its own graphs (its DGL-free builder,
``neighbor_strategy="pure_torch"``: 12 nearest within 8 Å, triplets of those bonds, CGCNN's 92
features) and trains with its defaults: AdamW lr 0.01, weight decay 0, one-cycle, MSE, batch 64. The split
is its ``keep_data_order=False`` split (``random.seed(123); shuffle``, 0.8/0.1/0.1), which is
CGCNN's: this script checks that it equals ``<data>/lmdb/split.json`` before training.

The model is set as in ``scripts/peers/bench_alignn.py`` (4 ALIGNN + 4 GCN layers, embedding
64, 80/40 RBFs, no forces, no per-atom scaling) at ``--hidden`` width. alignn's own "Test MAE"
is of the *last* epoch's model (its ``best_model`` is a reference to the live network), so the
script also evaluates the saved ``best_model.pt`` (best validation loss) on the test split, as
CGCNN and our engine report. Writes ``<out>/result.json``; ``--n`` takes the first N rows (a
rehearsal: the split check is then skipped).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="scripts/mp_protocol.py's --out")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=None)
    a = p.parse_args(argv)

    from alignn.data import get_id_train_val_test

    out = a.out.resolve()
    folder = out / "folder"
    folder.mkdir(parents=True, exist_ok=True)
    src = (a.data / "cgcnn").resolve()
    with open(src / "id_prop.csv") as fh:
        rows = [(r[0], r[1]) for r in csv.reader(fh)][: a.n]
    with open(folder / "id_prop.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        for rid, y in rows:
            link = folder / f"{rid}.cif"
            if not link.exists():
                link.symlink_to(src / f"{rid}.cif")
            w.writerow([f"{rid}.cif", y])
    tr, va, te = get_id_train_val_test(total_size=len(rows), split_seed=123, train_ratio=0.8,
                                       val_ratio=0.1, test_ratio=0.1, keep_data_order=False)
    names = {"train": tr, "val": va, "test": te}
    if a.n is None:
        want = json.loads((a.data / "lmdb" / "split.json").read_text())
        for s, ix in names.items():
            if sorted(rows[k][0] for k in ix) != sorted(want[s]):
                raise SystemExit(f"alignn's {s} split differs from {a.data}/lmdb/split.json")
    model = dict(name="alignn_atomwise_pure", alignn_layers=4, gcn_layers=4,
                 hidden_features=a.hidden, embedding_features=64, atom_input_features=92,
                 edge_input_features=80, triplet_input_features=40, output_features=1,
                 calculate_gradient=False, energy_mult_natoms=False, use_penalty=False,
                 gradwise_weight=0.0, stresswise_weight=0.0, atomwise_weight=0.0,
                 three_body_cutoff=8.0)
    cfg = dict(dataset="user_data", target="target", id_tag="jid", atom_features="cgcnn",
               neighbor_strategy="pure_torch", cutoff=8.0, max_neighbors=12,
               three_body_cutoff=8.0, epochs=a.epochs, batch_size=64, learning_rate=0.01,
               weight_decay=0.0, optimizer="adamw", scheduler="onecycle", criterion="mse",
               random_seed=a.seed, train_ratio=0.8, val_ratio=0.1, test_ratio=0.1,
               keep_data_order=False, num_workers=0, use_lmdb=False, write_predictions=True,
               write_checkpoint=True, progress=False, output_dir=str(out / "train"),
               model=model)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    c0, w0 = _cpu_children(), time.time()
    with open(out / "train.log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "alignn.train_alignn", "--root_dir",
                              str(folder), "--config_name", str(out / "config.json"),
                              "--file_format", "cif", "--output_dir", str(out / "train")],
                             stdout=log, stderr=subprocess.STDOUT, cwd=out)
    cpu, wall = _cpu_children() - c0, time.time() - w0
    if rc != 0:
        raise SystemExit(f"alignn.train_alignn failed (exit {rc}); see {out / 'train.log'}")
    res = {"model": "alignn 2026.8.11 alignn_atomwise_pure", "epochs": a.epochs,
           "hidden": a.hidden, "seed": a.seed, "n": {s: len(v) for s, v in names.items()},
           "cpu_s": cpu, "wall_s": wall}
    res.update(_evaluate_best(out, model, rows, te, src))
    for line in (out / "train.log").read_text().splitlines():
        if line.startswith("Test MAE:"):
            res["test_mae_last_epoch"] = float(line.split()[-1])
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


def _evaluate_best(out: Path, model: dict, rows, test_ix, src: Path) -> dict:
    """Test MAE of ``best_model.pt`` (best validation loss) on graphs built as the pipeline builds
    them (``Graph.atom_dgl_multigraph`` with the config's settings, as pure-torch graphs)."""
    import numpy as np
    import torch
    from alignn.graphs import Graph
    from alignn.models.alignn_atomwise_pure import ALIGNNAtomWisePure, ALIGNNAtomWisePureConfig
    from alignn.pure_lmdb_dataset import _graph_to_torchgraph
    from alignn.torch_graph_builder import batch_torch_graph_pairs
    from jarvis.core.atoms import Atoms

    torch.set_num_threads(1)
    net = ALIGNNAtomWisePure(ALIGNNAtomWisePureConfig(**model))
    net.load_state_dict(torch.load(out / "train" / "best_model.pt", map_location="cpu"))
    net.eval()
    preds, ys = [], []
    for k0 in range(0, len(test_ix), 64):
        chunk = test_ix[k0:k0 + 64]
        pairs, lats = [], []
        for k in chunk:
            atoms = Atoms.from_cif(str(src / f"{rows[k][0]}.cif"))
            g, lg = Graph.atom_dgl_multigraph(
                atoms, cutoff=8.0, max_neighbors=12, atom_features="cgcnn",
                compute_line_graph=True, use_canonize=True, cutoff_extra=3.0,
                neighbor_strategy="pure_torch", three_body_cutoff=8.0, dtype="float32")
            pairs.append(_graph_to_torchgraph(g, lg))
            lats.append(torch.as_tensor(atoms.lattice_mat, dtype=torch.float32))
        g, lg = batch_torch_graph_pairs(pairs)
        with torch.no_grad():
            preds.extend(net((g, lg, torch.stack(lats)))["out"].view(-1).tolist())
        ys.extend(float(rows[k][1]) for k in chunk)
    err = np.abs(np.array(preds) - np.array(ys))
    return {"test_mae_best_val": float(err.mean()), "n_test_evaluated": len(ys)}


if __name__ == "__main__":
    raise SystemExit(main())
