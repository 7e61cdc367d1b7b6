"""The training engine's data: the three splits of a built data set, their samplers and loaders."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from uae_dist import config as C

log = logging.getLogger("uae_dist.train")


class Head(torch.utils.data.Dataset):
    """The structures of a split that a run uses: those whose id is not in ``drop`` (held out
    from training, ``data.hold_out``), then the first ``n`` of them (smoke runs)."""

    def __init__(self, ds, n: int | None, drop=frozenset()):
        idx = np.arange(len(ds))
        if drop:
            idx = idx[np.fromiter((i not in drop for i in ds.ids), bool, len(ds))]
        self.ds, self.idx = ds, idx[:n]
        self.n = len(self.idx)
        self.natoms, self.nedges = ds.natoms[self.idx], ds.nedges[self.idx]
        self.ids = [ds.ids[k] for k in self.idx]
        self.target_names = ds.target_names

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        return self.ds[int(self.idx[k])]

    def __getitems__(self, ks):
        ks = [int(self.idx[k]) for k in ks]
        # the dataset's batched fetch (one ready Batch), else the DataLoader's per-item fallback
        fetch = getattr(self.ds, "__getitems__", None)
        return fetch(ks) if fetch is not None else [self.ds[k] for k in ks]

    def targets_array(self):
        return self.ds.targets_array()[self.idx]


def held_out(spec: str | None) -> frozenset:
    """The ids that ``data.hold_out`` keeps from training: the val and test parts of that split
    (a JSON file or a shipped name, as ``data build --split-file`` takes), so that a table
    pretrained here never saw the structures a downstream run tests on."""
    if not spec:
        return frozenset()
    from uae_dist.data import given_split
    from uae_dist.data.options import OptionError

    try:
        part_of = given_split.load(given_split.resolve(spec))[0]
    except OptionError as e:
        raise C.ConfigError(f"data.hold_out: {str(e).removeprefix(e.option + ': ')}") from None
    return frozenset(i for i, part in part_of.items() if part != "train")


@dataclass
class Splits:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    targets: list[str]        # the trained targets (data.targets or all of the data set's)
    cols: list[int]           # their columns in the records' label vectors
    y_train: np.ndarray       # (N_train, T) training labels of those targets, NaN = missing
    manifest_sha256: str


def ensure_built(cfg: C.Config, is_main: bool, world_size: int) -> None:
    """Build ``data.root`` from ``data.source`` when it does not exist yet (rank 0; others wait)."""
    from . import distributed as D

    root = Path(cfg.data.root)
    if (root / "manifest.json").exists():
        return
    if not cfg.data.source:
        raise FileNotFoundError(f"{root}/manifest.json not found and data.source is not set: build "
                                f"the data set first (uae-dist data build --source … --out {root})")
    if is_main:
        from uae_dist.data.build import build_lmdb

        log.info("building %s from %s", root, cfg.data.source)
        build_lmdb(cfg.data.source, root, targets=cfg.data.targets, limit=cfg.data.build_limit,
                   shards=max(1, world_size), workers=max(1, os.cpu_count() or 1), resume=True)
    D.barrier()


def open_splits(cfg: C.Config) -> Splits:
    from uae_dist.data import CrystalGraphDataset

    kw = cfg.model.graph()
    try:
        full = {s: CrystalGraphDataset(cfg.data.root, s, **kw) for s in ("train", "val", "test")}
    except ValueError as e:
        raise C.ConfigError(f"{cfg.data.root}: {e}") from None
    names = full["train"].target_names
    targets = list(cfg.data.targets or names)
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise C.ConfigError(f"data.targets: {unknown} not in the data set's targets {names}")
    cols = [names.index(t) for t in targets]
    dc = cfg.data
    drop = held_out(dc.hold_out)
    train = Head(full["train"], dc.train_limit, drop)
    if drop:
        log.info("data.hold_out=%s: %d of %d training structures held out (in its val or test)",
                 dc.hold_out, sum(i in drop for i in full["train"].ids), len(full["train"]))
    return Splits(train, Head(full["val"], dc.val_limit), Head(full["test"], dc.test_limit),
                  targets, cols, train.targets_array()[:, cols], full["train"].manifest_sha256)


def train_sampler(cfg: C.Config, ds, rank: int, world: int):
    from uae_dist.data import DistributedAtomBatchSampler

    dc = cfg.data
    return DistributedAtomBatchSampler(ds.natoms, dc.max_atoms, world, rank, seed=cfg.train.seed,
                                       shuffle=True, nedges=ds.nedges, max_edges=dc.max_edges,
                                       max_structures=dc.max_structures,
                                       grad_accum=cfg.train.grad_accum)


def train_loader(cfg: C.Config, ds, sampler) -> DataLoader:
    from uae_dist.data import GraphLoader

    return GraphLoader(ds, sampler, num_workers=cfg.data.num_workers,
                       pin_memory=_pin(cfg),
                       generator=torch.Generator().manual_seed(cfg.train.seed))


def _pin(cfg: C.Config) -> bool:
    # page-locked batches let the host-to-GPU copy overlap the step (batch.to(non_blocking=True))
    return cfg.data.num_workers > 0 and torch.cuda.is_available()


def eval_loader(cfg: C.Config, ds, rank: int, world: int) -> DataLoader:
    """Every structure once, on one rank; batches twice the training cap unless set."""
    from uae_dist.data import GraphLoader
    from uae_dist.data.sampler import eval_batches

    dc = cfg.data
    cap_atoms = dc.val_max_atoms or (2 * dc.max_atoms if dc.max_atoms else None)
    cap_structures = 2 * dc.max_structures if dc.max_structures else None
    batches = eval_batches(ds.natoms, world, rank, nedges=ds.nedges, max_atoms=cap_atoms,
                           max_edges=2 * dc.max_edges if dc.max_edges else None,
                           max_structures=cap_structures)
    return GraphLoader(ds, batches, num_workers=cfg.data.num_workers, pin_memory=_pin(cfg))
