"""Read graph records back as ``torch_geometric.data.Data``.

Shards are opened lazily, once per process (so the dataset is safe under DataLoader workers and
forked ranks); a global index maps to its shard by bisecting the cumulative shard counts.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from . import lmdb_store as store
from .build import MANIFEST, SPLIT
from .graph import SCHEMA_VERSION, decode_record
from ..ops.neighbors_ref import cap_mask


def load_manifest(root) -> tuple[dict, str]:
    p = Path(root) / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: build the data set first (uae-dist data build)")
    raw = p.read_bytes()
    m = json.loads(raw)
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{p}: schema version {m.get('schema_version')}, this uae-dist reads {SCHEMA_VERSION}")
    return m, hashlib.sha256(raw).hexdigest()


class CrystalGraphDataset(torch.utils.data.Dataset):
    """Graphs of one split (``"train"``, ``"val"``, ``"test"``) or of every record (``split=None``)."""

    def __init__(self, root, split: str | None = "train", dtype: torch.dtype = torch.float32,
                 cutoff: float | None = None, max_neighbors: int | None = None):
        """``cutoff``/``max_neighbors`` narrow the stored graphs at load time (in the loader workers),
        so one 8 Å build serves models with shorter cutoffs."""
        self.root = Path(root)
        self.manifest, self.manifest_sha256 = load_manifest(self.root)
        self.dtype = dtype
        built = float(self.manifest["options"]["cutoff"])
        if cutoff is not None and cutoff > built + 1e-9:
            raise ValueError(f"cutoff {cutoff} Å exceeds the {built} Å the data set was built with; rebuild it")
        self.cutoff = None if cutoff is None or cutoff >= built else float(cutoff)
        self.max_neighbors = max_neighbors
        rec = self.manifest["records"]
        self.target_names = list(self.manifest["targets"]["names"])
        # global order = source order; per shard, records are numbered in that order
        shard_of = np.asarray(rec["shard"], dtype=np.int64)
        src_index = np.asarray(rec["source_index"], dtype=np.int64)
        by_shard = np.lexsort((src_index, shard_of))
        counts = np.bincount(shard_of, minlength=len(self.manifest["shards"]))
        self._cum = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self._keys = src_index[by_shard]  # key of the k-th record in shard-major order
        shard_pos = np.empty(len(src_index), dtype=np.int64)
        shard_pos[by_shard] = np.arange(len(src_index))
        self._shard_files = [self.root / s["file"] for s in self.manifest["shards"]]
        if split is None:
            sel = np.arange(len(src_index))
        else:
            sp = json.loads((self.root / SPLIT).read_text())
            if split not in ("train", "val", "test"):
                raise ValueError(f"split must be train, val, test or None, got {split!r}")
            pos = {rid: k for k, rid in enumerate(rec["ids"])}
            sel = np.array(sorted(pos[r] for r in sp[split]), dtype=np.int64)
        self.split = split
        self.indices = sel  # indices into the manifest's record arrays
        self._flat = shard_pos[sel]  # shard-major position, bisected into (shard, offset)
        self.natoms = np.asarray(rec["natoms"], dtype=np.int64)[sel]
        self.nedges = np.asarray(rec["nedges"], dtype=np.int64)[sel]
        self.ids = [rec["ids"][k] for k in sel]

    def __len__(self) -> int:
        return len(self.indices)

    def targets_array(self) -> np.ndarray:
        y = self.manifest["records"]["y"]
        return np.array([[np.nan if v is None else v for v in y[k]] for k in self.indices],
                        dtype=np.float64).reshape(len(self), len(self.target_names))

    def locate(self, k: int) -> tuple[int, int]:
        """Item ``k`` → (shard, source index used as its key)."""
        flat = int(self._flat[k])
        shard = bisect.bisect_right(self._cum, flat) - 1
        return shard, int(self._keys[flat])

    def raw(self, k: int) -> dict:
        """Decoded arrays of item ``k`` (NumPy, no torch)."""
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        shard, key = self.locate(k)
        env = store.open_reader(self._shard_files[shard])
        with env.begin(buffers=True) as txn:
            blob = txn.get(store.rkey("r", key))
            if blob is None:
                raise KeyError(f"record {self.ids[k]!r} (key {key}) missing from {self._shard_files[shard]}")
            r = decode_record(bytes(blob))
        if self.cutoff is not None or self.max_neighbors is not None:
            r = self._narrow(r)
        return r

    def _narrow(self, r: dict) -> dict:
        vec = r["pos"][r["j"]] + r["shift"] @ r["cell"] - r["pos"][r["i"]]
        d = np.sqrt(np.einsum("ij,ij->i", vec, vec))
        keep = np.ones(len(d), dtype=bool) if self.cutoff is None else d <= self.cutoff
        if self.max_neighbors is not None:
            keep[keep] = cap_mask(r["i"][keep], d[keep], self.max_neighbors)
        for f in ("i", "j", "shift"):
            r[f] = r[f][keep]
        return r

    def __getitem__(self, k: int) -> Data:
        r = self.raw(k)
        f = self.dtype
        return Data(
            z=torch.from_numpy(r["z"]),
            pos=torch.from_numpy(r["pos"]).to(f),
            frac=torch.from_numpy(r["frac"]).to(f),
            cell=torch.from_numpy(r["cell"]).to(f).unsqueeze(0),
            pbc=torch.from_numpy(r["pbc"]).unsqueeze(0),
            edge_index=torch.from_numpy(np.stack([r["i"], r["j"]])),
            shift=torch.from_numpy(r["shift"]),
            y=torch.from_numpy(r["y"]).to(f).unsqueeze(0),
            natoms=torch.tensor([len(r["z"])]),
            idx=torch.tensor([int(k)]),
            id=r["id"],
            num_nodes=len(r["z"]),
        )


def collate(items: list[Data]) -> Batch:
    return Batch.from_data_list(items)
