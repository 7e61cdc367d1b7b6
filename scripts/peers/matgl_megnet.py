#!/usr/bin/env python3
"""matgl's MEGNet (matgl 4.1.2, PyG) trained by matgl's own recipe on the MP protocol subset.

    python scripts/peers/matgl_megnet.py --data runs/protocol/mp6000 --out runs/cmp/matgl_megnet \
        [--epochs 50] [--batch 128] [--features megnet16|uae:DIR|…] [--seed 0]

The recipe of matgl's formation-energy tutorial, unchanged: ``Structure2Graph`` (4 Å,
``element_types`` from the training structures), ``MGLDataset``, ``MGLDataLoader``,
``MEGNet()`` defaults, ``ModelLightningModule`` defaults (Adam lr 1e-3, MSE, its cosine schedule)
and a Lightning ``Trainer`` on CPU. Two things are set for a side-by-side with ours: the split
is the protocol's (the ``split.json`` of ``<data>/lmdb``: CGCNN's split) and the test uses the
epoch of best validation MAE (as CGCNN and our engine do); ``data_mean``/``data_std`` are the
training set's, as our engine normalises. ``--features`` copies a table into the embedding
(``uae_dist.interop.load_into_megnet``; trained, as our MEGNet's).

Writes ``<out>/result.json``: test MAE (eV/atom), CPU-s of featurisation and of each epoch
(``time.process_time`` of this one-thread process), wall times.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="scripts/mp_protocol.py's --out")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--features", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import lightning as L
    import numpy as np
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from matgl.ext.pymatgen import Structure2Graph, get_element_list
    from matgl.graph.data import MGLDataLoader, MGLDataset
    from matgl.models import MEGNet
    from matgl.utils.training import ModelLightningModule
    from pymatgen.core import Structure
    from torch.utils.data import Subset

    torch.set_num_threads(1)
    L.seed_everything(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    folder = a.data / "cgcnn"
    with open(folder / "id_prop.csv") as fh:
        rows = [(r[0], float(r[1])) for r in csv.reader(fh)]
    split = json.loads((a.data / "lmdb" / "split.json").read_text())

    t0, w0 = time.process_time(), time.time()
    structures = [Structure.from_file(folder / f"{rid}.cif") for rid, _ in rows]
    pos = {rid: k for k, (rid, _) in enumerate(rows)}
    idx = {s: [pos[r] for r in split[s]] for s in ("train", "val", "test")}
    elements = get_element_list([structures[k] for k in idx["train"]])
    converter = Structure2Graph(element_types=elements, cutoff=4.0)
    ds = MGLDataset(structures=structures, converter=converter,
                    labels={"eform": [y for _, y in rows]}, save_cache=False,
                    root=str(a.out / "MGLDataset"))
    featurise = {"cpu_s": time.process_time() - t0, "wall_s": time.time() - w0}
    train, val, test = (Subset(ds, idx[s]) for s in ("train", "val", "test"))
    loaders = MGLDataLoader(train_data=train, val_data=val, test_data=test, batch_size=a.batch,
                            num_workers=0, persistent_workers=False)
    model = MEGNet(element_types=elements, cutoff=4.0)
    kept = None
    if a.features:
        from uae_dist.interop import load_into_megnet
        from uae_dist.tables import load_table

        t = load_table(a.features)
        model = MEGNet(element_types=elements, cutoff=4.0, dim_node_embedding=t.dim)
        kept = load_into_megnet(model, t, trainable=True)
    y = np.array([rows[k][1] for k in idx["train"]])
    module = ModelLightningModule(model=model, data_mean=float(y.mean()), data_std=float(y.std()))

    class EpochClock(Callback):
        def __init__(self):
            self.cpu, self.wall = [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self._c, self._w = time.process_time(), time.time()

        def on_validation_epoch_end(self, trainer, pl_module):  # train + validation of an epoch
            if not trainer.sanity_checking and hasattr(self, "_c"):
                self.cpu.append(time.process_time() - self._c)
                self.wall.append(time.time() - self._w)

    clock = EpochClock()
    best = ModelCheckpoint(dirpath=a.out / "ckpt", monitor="val_MAE", mode="min", save_top_k=1)
    trainer = L.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=1, logger=False,
                        callbacks=[clock, best], enable_progress_bar=False,
                        num_sanity_val_steps=0)
    t1 = time.time()
    trainer.fit(model=module, train_dataloaders=loaders[0], val_dataloaders=loaders[1])
    train_wall = time.time() - t1
    res = trainer.test(model=module, dataloaders=loaders[2], ckpt_path=best.best_model_path)
    out = {"model": "matgl 4.1.2 MEGNet", "epochs": a.epochs, "batch": a.batch,
           "features": a.features or "learned 16-d (matgl default)", "elements_kept": kept,
           "n": {k: len(v) for k, v in idx.items()}, "test_mae": res[0]["test_MAE"],
           "best_val_mae": float(best.best_model_score), "featurise": featurise,
           "epoch_cpu_s": clock.cpu, "epoch_wall_s": clock.wall, "train_wall_s": train_wall,
           "n_params": sum(q.numel() for q in model.parameters() if q.requires_grad)}
    (a.out / "result.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("epoch_")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
