"""Read graph records back as ``torch_geometric.data.Data``.

Shards are opened lazily, once per process (so the dataset is safe under DataLoader workers and
forked ranks); a global index maps to its shard by bisecting the cumulative shard counts.

The data must be what the manifest says, or the dataset refuses it with a DataError naming the file
or record (see :mod:`uae_dist.data.integrity`): at open, the manifest's record table against its
digest, split.json (a partition of the records, the file the build wrote) and every shard's size
and xxh3 hash (``check="size"``: sizes only, for data sets too large to hash at every start); at
every record read, the shard's size (so a shard truncated under a running job is an error, not
SIGBUS) and the decoded record against the manifest (id, sizes, labels, finite geometry).

A DataLoader fetches a whole batch through ``__getitems__`` (:mod:`.batched`): one transaction
per shard, one pass over the batch, the same checks and messages, and the Batch that
``collate`` of the per-item ``Data`` would make, ready made.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from . import lmdb_store as store
from .batched import Slow, assemble, empty, narrow, parse
from .collated import Packed, to_batch
from .ring import RingBatch, SlotFull, forking_ring
from .graph import SCHEMA_VERSION, decode_record
from .integrity import DataError, check_manifest_records, check_record, check_shard_file, \
    check_split, rebuild_hint
from .layout import MANIFEST, SPLIT


def load_manifest(root) -> tuple[dict, str]:
    p = Path(root) / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: build the data set first (uae-dist data build)")
    raw = p.read_bytes()
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{p}: not valid JSON ({e}); {rebuild_hint(root)}") from None
    if not isinstance(m, dict) or m.get("schema_version") != SCHEMA_VERSION:
        got = m.get("schema_version") if isinstance(m, dict) else None
        raise DataError(f"{p}: schema version {got}, this uae-dist reads {SCHEMA_VERSION}: "
                        "rebuild the data set with this version (uae-dist data build --overwrite)")
    return m, hashlib.sha256(raw).hexdigest()


class CrystalGraphDataset(torch.utils.data.Dataset):
    """Graphs of one split (``"train"``, ``"val"``, ``"test"``) or of every record
    (``split=None``)."""

    def __init__(self, root, split: str | None = "train", dtype: torch.dtype = torch.float32,
                 cutoff: float | None = None, max_neighbors: int | None = None,
                 check: str = "hash"):
        """``cutoff``/``max_neighbors`` narrow the stored graphs at load time (in the loader
        workers), so one 8 Å build serves models with shorter cutoffs. ``check`` is ``"hash"``
        (sizes and xxh3 of every shard at open) or ``"size"`` (sizes only)."""
        if check not in ("hash", "size"):
            raise ValueError(f"check must be 'hash' or 'size', got {check!r}")
        if split not in ("train", "val", "test", None):
            raise ValueError(f"split must be train, val, test or None, got {split!r}")
        self.root = Path(root)
        self.manifest, self.manifest_sha256 = load_manifest(self.root)
        check_manifest_records(self.root, self.manifest)
        self._shard_files = [check_shard_file(self.root, s, hash_it=check == "hash")
                             for s in self.manifest["shards"]]
        self._shard_bytes = [int(s["bytes"]) for s in self.manifest["shards"]]
        self.dtype = dtype
        built = float(self.manifest["options"]["cutoff"])
        if cutoff is not None and cutoff > built + 1e-9:
            raise ValueError(f"cutoff {cutoff} Å exceeds the {built} Å the data set was built "
                             "with; rebuild it")
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
        try:
            raw = (self.root / SPLIT).read_bytes()
        except OSError as e:
            raise DataError(f"{self.root / SPLIT}: cannot read it ({e.strerror}); "
                            f"{rebuild_hint(self.root)}") from None
        sp = check_split(self.root, self.manifest, raw)  # checked for every split, None too
        if split is None:
            sel = np.arange(len(src_index))
        else:
            pos = {rid: k for k, rid in enumerate(rec["ids"])}
            sel = np.array(sorted(pos[r] for r in sp[split]), dtype=np.int64)
        self.split = split
        self.indices = sel  # indices into the manifest's record arrays
        self._flat = shard_pos[sel]  # shard-major position, bisected into (shard, offset)
        self.natoms = np.asarray(rec["natoms"], dtype=np.int64)[sel]
        self.nedges = np.asarray(rec["nedges"], dtype=np.int64)[sel]
        self.ids = [rec["ids"][k] for k in sel]
        self._y = np.array([[np.nan if v is None else v for v in rec["y"][k]] for k in sel],
                           dtype=np.float64).reshape(len(sel), len(self.target_names))

    def __len__(self) -> int:
        return len(self.indices)

    def targets_array(self) -> np.ndarray:
        return self._y.copy()

    def locate(self, k: int) -> tuple[int, int]:
        """Item ``k`` → (shard, source index used as its key)."""
        flat = int(self._flat[k])
        shard = bisect.bisect_right(self._cum, flat) - 1
        return shard, int(self._keys[flat])

    def _index(self, k) -> int:
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return k

    def _shard_env(self, shard: int):
        path, size = self._shard_files[shard], self._shard_bytes[shard]
        # a shard truncated while mapped would SIGBUS on the next page read: one stat first
        if os.stat(path).st_size != size:
            raise DataError(f"{path}: changed size since the data set was opened (truncated or "
                            f"rewritten under a running job); {rebuild_hint(self.root)}")
        return store.open_reader(path, size), path

    def _get(self, txn, k: int, key: int, path) -> bytes:
        blob = txn.get(store.rkey("r", key))
        if blob is None:
            raise DataError(f"record {self.ids[k]!r} (key {key}) missing from {path}; "
                            f"{rebuild_hint(self.root)}")
        return bytes(blob)

    def _decode(self, blob: bytes, k: int, path) -> dict:
        try:
            r = decode_record(blob)
        except Exception as e:  # noqa: BLE001 - any decode failure is damage
            raise DataError(f"record {self.ids[k]!r} in {path}: cannot decode it ({e}); "
                            f"{rebuild_hint(self.root)}") from None
        check_record(r, self.ids[k], int(self.natoms[k]), int(self.nedges[k]), self._y[k],
                     str(path))
        if self.cutoff is not None or self.max_neighbors is not None:
            r = self._narrow(r)
        return r

    def raw(self, k: int) -> dict:
        """Decoded arrays of item ``k`` (NumPy, no torch)."""
        k = self._index(k)
        shard, key = self.locate(k)
        env, path = self._shard_env(shard)
        with env.begin(buffers=True) as txn:
            blob = self._get(txn, k, key, path)
        return self._decode(blob, k, path)

    def _narrow(self, r: dict) -> dict:
        # the batched path's narrowing on a batch of one: both give the same edges
        a = narrow({"pos": r["pos"], "cell": r["cell"][None], "i": r["i"], "j": r["j"],
                    "shift": r["shift"], "nedges": np.array([len(r["j"])])},
                   self.cutoff, self.max_neighbors)
        r.update(i=a["i"], j=a["j"], shift=a["shift"])
        return r

    def __getitem__(self, k: int) -> Data:
        return self._data(self.raw(k), k)

    def _data(self, r: dict, k: int) -> Data:
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

    def __getitems__(self, indices) -> list:
        """The batch ``indices`` as a one-element list holding its ``Batch`` (what
        ``Batch.from_data_list([self[k] for k in indices])`` gives, at a fraction of the cost):
        torch's DataLoader calls this with a whole batch and hands the list to ``collate``."""
        ks = [self._index(k) for k in indices]
        flat = self._flat[ks]
        shards = np.searchsorted(self._cum, flat, side="right") - 1
        keys = self._keys[flat].tolist()
        blobs, paths = [None] * len(ks), [None] * len(ks)
        for shard in np.unique(shards).tolist():  # one transaction per shard
            env, path = self._shard_env(shard)
            with env.begin() as txn:
                for p in np.flatnonzero(shards == shard).tolist():
                    blobs[p], paths[p] = self._get(txn, ks[p], keys[p], path), path
        natoms, nedges = self.natoms[ks], self.nedges[ks]
        t = len(self.target_names)
        ring = forking_ring()  # in a GraphLoader's worker: into a shared slot if one is free
        slot = ring.writer(self.dtype) if ring is not None else None
        try:
            recs = [parse(b, self.ids[k], n, e, t)
                    for b, k, n, e in zip(blobs, ks, natoms.tolist(), nedges.tolist())]
            a = self._assemble(recs, natoms, nedges, ks, slot)
        except Slow:  # a damaged or unusual record: the per-item path checks and raises
            if slot is not None:
                slot.cancel()
            return [Batch.from_data_list([self._data(self._decode(b, k, p), i)
                                          for b, k, p, i in zip(blobs, ks, paths, indices)])]
        except SlotFull:  # larger than the slot (not in the plan it was sized for)
            slot.cancel()
            slot, a = None, self._assemble(recs, natoms, nedges, ks, None)
        ids = [self.ids[k] for k in ks]
        shared = slot.finish(a, ids, indices, self.dtype) if slot is not None else None
        return [shared if shared is not None else to_batch(a, ids, indices, self.dtype)]

    def _assemble(self, recs, natoms, nedges, ks, slot) -> dict:
        """The batch's arrays, its edges written into ``slot`` when there is one (narrowed, only
        the kept edges go there)."""
        narrowing = self.cutoff is not None or self.max_neighbors is not None
        into = slot.take if slot is not None else empty
        a = assemble(recs, natoms, nedges, self._y[ks], empty if narrowing else into)
        return narrow(a, self.cutoff, self.max_neighbors, into) if narrowing else a


def collate(items: list) -> Batch:
    """A list of ``Data`` (per-item fetch) or ``__getitems__``'s one-element list of a ready
    ``Batch`` (in a DataLoader worker: its :class:`~.collated.Packed` form)."""
    if len(items) == 1 and isinstance(items[0], (Batch, RingBatch)):
        return items[0]  # a RingBatch only exists in a worker, which sends it as it is
    if len(items) == 1 and isinstance(items[0], Packed):  # from a worker's __getitems__
        # sent as is from a worker (it unpickles as the Batch), unpacked anywhere else
        return items[0] if torch.utils.data.get_worker_info() is not None else items[0].batch()
    return Batch.from_data_list(items)
