import gzip
import json

import numpy as np
import pytest
import torch

from uae_dist.data import CrystalGraphDataset, DistributedAtomBatchSampler, collate
from uae_dist.data.build import build_lmdb
from uae_dist.ops import edge_vectors


@pytest.fixture(scope="module")
def built(tmp_path_factory, mp_path):
    recs = json.load(gzip.open(mp_path))[:120]
    src = tmp_path_factory.mktemp("src") / "mp120.json.gz"
    with gzip.open(src, "wt") as fh:
        json.dump(recs, fh)
    out = tmp_path_factory.mktemp("ds") / "mp120"
    build_lmdb(src, out, targets="e_form_per_atom,band_gap", shards=3, progress=False, use_mpi=False)
    return out


def test_splits_partition_and_fields(built):
    parts = {s: CrystalGraphDataset(built, split=s) for s in ("train", "val", "test")}
    full = CrystalGraphDataset(built, split=None)
    assert sum(len(p) for p in parts.values()) == len(full) == 120
    assert set().union(*[set(p.ids) for p in parts.values()]) == set(full.ids)
    g = parts["train"][0]
    assert g.z.dtype == torch.long and g.pos.dtype == torch.float32
    assert g.cell.shape == (1, 3, 3) and g.pbc.shape == (1, 3) and g.y.shape == (1, 2)
    assert g.edge_index.shape[0] == 2 and g.shift.shape == (g.edge_index.shape[1], 3)
    assert (g.edge_index[0].diff() >= 0).all(), "edges grouped by centre atom"
    assert g.natoms.item() == g.num_nodes == parts["train"].natoms[0]
    vec, d = edge_vectors(g.pos.double(), g.cell[0].double(), g.edge_index, g.shift)
    assert float(d.max()) <= 8.0 + 1e-5 and float(d.min()) > 0.1
    assert parts["train"].targets_array().shape == (len(parts["train"]), 2)
    assert parts["train"].target_names == ["e_form_per_atom", "band_gap"]
    with pytest.raises(IndexError):
        full[len(full)]


def test_global_index_maps_to_the_right_record(built):
    full = CrystalGraphDataset(built, split=None)
    for k in [0, 1, 39, 40, 41, 80, 119, -1]:
        assert full[k].id == full.ids[k]
    # records come back in source order whatever the shard layout
    man = full.manifest["records"]
    assert man["source_index"] == sorted(man["source_index"])


def test_batches_and_dataloader_workers(built):
    ds = CrystalGraphDataset(built, split="train")
    sampler = DistributedAtomBatchSampler(ds.natoms, max_atoms=150, seed=0)
    ref = [b for b in torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=0)]
    dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    got = list(dl)
    assert len(got) == len(ref) == len(sampler)
    seen = []
    for a, b in zip(ref, got):
        assert a.id == b.id
        assert torch.equal(a.pos, b.pos) and torch.equal(a.edge_index, b.edge_index)
        assert a.cell.shape == (a.num_graphs, 3, 3)
        # Batch offsets edge indices per graph; the vectors stay right
        vec, d = edge_vectors(a.pos, a.cell, a.edge_index, a.shift, a.batch)
        assert float(d.max()) <= 8.0 + 1e-4
        seen += a.id
    assert sorted(seen) == sorted(ds.ids)


def test_missing_build_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="uae-dist data build"):
        CrystalGraphDataset(tmp_path)


def test_load_time_cutoff_and_cap_match_a_direct_build(built):
    from uae_dist.ops.neighbors_ref import neighbor_list_numpy

    ds = CrystalGraphDataset(built, split=None, dtype=torch.float64, cutoff=4.5, max_neighbors=12)
    for k in range(0, len(ds), 17):
        g = ds[k]
        i, j, sh = neighbor_list_numpy(g.pos.numpy(), g.cell[0].numpy(), [True] * 3, 4.5, 12)
        assert g.edge_index[0].tolist() == i.tolist() and g.edge_index[1].tolist() == j.tolist()
        assert g.shift.tolist() == sh.tolist()
    with pytest.raises(ValueError, match="exceeds"):
        CrystalGraphDataset(built, cutoff=9.0)
