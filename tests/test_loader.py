"""Issue 14.1: the batched fetch (``CrystalGraphDataset.__getitems__``) gives, through a DataLoader
with 0 and 2 workers, exactly the Batch that ``Batch.from_data_list`` makes of the per-item Data
(real MP records, with and without load-time narrowing), and a damaged record in a batch still
raises the DataError naming it."""
import json
import shutil

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from _data_fixtures import mp_records, write_json
from uae_dist.data import CrystalGraphDataset, DistributedAtomBatchSampler, GraphLoader, collate
from uae_dist.data import dataset as dataset_mod
from uae_dist.data.build import build_lmdb
from uae_dist.data.integrity import DataError
from uae_dist.ops import edge_vectors
from uae_dist.train.data import Head

pytestmark = pytest.mark.timeout(300)
NARROW = {"8A": {}, "4A_cap12": {"cutoff": 4.0, "max_neighbors": 12}}


@pytest.fixture(scope="module")
def built(tmp_path_factory, mp_path):
    src = write_json(tmp_path_factory.mktemp("src") / "mp150.json.gz", mp_records(150))
    out = tmp_path_factory.mktemp("ds") / "mp150"
    build_lmdb(src, out, targets="e_form_per_atom,band_gap", shards=3, progress=False,
               use_mpi=False)
    return out


class BatchedOnly(CrystalGraphDataset):
    """Fails if the loader fell back to per-item fetches (the batched path must be the one
    tested)."""

    def __getitem__(self, k):
        raise AssertionError("per-item __getitem__ used instead of __getitems__")


def assert_same_batch(got, want):
    assert type(got) is type(want)
    assert list(got._store.keys()) == list(want._store.keys())
    for k in want._store.keys():
        a, b = got[k], want[k]
        if torch.is_tensor(b):
            assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape)
            assert torch.equal(a, b), k
        else:
            assert type(a) is type(b) and a == b, k
    assert got.num_graphs == want.num_graphs and got.num_nodes == want.num_nodes
    assert got._store._num_nodes == want._store._num_nodes
    for d in ("_slice_dict", "_inc_dict"):
        a, b = getattr(got, d), getattr(want, d)
        assert list(a) == list(b), d
        for k in b:
            if b[k] is None:
                assert a[k] is None, (d, k)
            else:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (d, k)
    # and the Batch interface still takes it apart into the per-item graphs
    for x, y in zip(got.to_data_list(), want.to_data_list()):
        assert torch.equal(x.edge_index, y.edge_index) and x.id == y.id


def reference(ds, batches):
    return [Batch.from_data_list([ds[k] for k in b]) for b in batches]


@pytest.mark.parametrize("narrow", list(NARROW))
@pytest.mark.parametrize("workers", [0, 2])
def test_batched_loader_equals_per_item_collation(built, narrow, workers, monkeypatch):
    kw = NARROW[narrow]
    ds = CrystalGraphDataset(built, split=None, **kw)
    batched = BatchedOnly(built, split=None, **kw)
    sampler = DistributedAtomBatchSampler(ds.natoms, max_atoms=200, seed=3)
    batches = list(sampler)
    assert len(batches) > 4 and max(map(len, batches)) > 3
    want = reference(ds, batches)

    def per_record(*a):
        raise AssertionError("intact records left the batched fast path")

    monkeypatch.setattr(dataset_mod, "decode_record", per_record)  # forked workers inherit it
    dl = torch.utils.data.DataLoader(batched, batch_sampler=batches, collate_fn=collate,
                                     num_workers=workers)
    got = list(dl)
    assert len(got) == len(want) == len(batches)
    for g, w, b in zip(got, want, batches):
        assert g.id == [ds.ids[k] for k in b]
        assert_same_batch(g, w)
    edges = sum(g.edge_index.shape[1] for g in got)
    full = int(ds.nedges.sum())
    if kw:  # the narrowing did narrow: 4 Å and at most ~12 neighbours (whole shells) per centre
        assert edges < full / 4
        for g in got:
            _, d = edge_vectors(g.pos.double(), g.cell.double(), g.edge_index, g.shift, g.batch)
            assert float(d.max()) <= 4.0 + 1e-5
    else:
        assert edges == full


@pytest.mark.parametrize("narrow", list(NARROW))
def test_graph_loader_workers_hand_batches_over_in_shared_slots(built, narrow):
    """Batches streamed from 2 workers through the shared slots equal the per-item collation,
    each one in a slot while it is alive; a consumer that keeps every batch exhausts the slots and
    the rest arrive packed, still equal; dropping them frees the slots."""
    kw = NARROW[narrow]
    ds = BatchedOnly(built, split=None, **kw)
    ref = CrystalGraphDataset(built, split=None, **kw)
    sampler = DistributedAtomBatchSampler(ds.natoms, max_atoms=80, seed=5)
    batches = list(sampler)
    want = reference(ref, batches)
    dl = GraphLoader(ds, sampler, num_workers=2)
    n = 0
    for g, w in zip(dl, want):
        assert_same_batch(g, w)
        ring = dl._ring
        assert len(ring.held) >= 1, "the batch in hand is not in a shared slot"
        n += 1
    assert n == len(batches) > ring.nslots  # slots were reused
    del g, w
    assert not ring.held
    got = list(dl)  # every batch kept alive
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_same_batch(g, w)
    assert dl._ring is ring and len(ring.held) == ring.nslots  # all taken, the others packed
    del got, g, w
    assert not ring.held and not ring.state.any()


def test_graph_loader_without_workers_or_fork_is_a_plain_loader(built):
    ds = CrystalGraphDataset(built, split=None, dtype=torch.float64)
    batches = [[0, 1, 2], [3, 4], [5]]
    want = reference(ds, batches)
    for dl in (GraphLoader(ds, batches),
               GraphLoader(ds, batches, num_workers=2, multiprocessing_context="spawn")):
        got = list(dl)
        for g, w in zip(got, want):
            assert_same_batch(g, w)


def test_float64_and_negative_indices_match_too(built):
    ds = CrystalGraphDataset(built, split="train", dtype=torch.float64, cutoff=5.0)
    idx = [-1, 0, 7, -5, 3]
    assert_same_batch(collate(ds.__getitems__(idx)), Batch.from_data_list([ds[k] for k in idx]))
    with pytest.raises(IndexError):
        ds.__getitems__([0, len(ds)])


def test_head_forwards_the_batched_fetch(built):
    ds = BatchedOnly(built, split="train")
    head = Head(ds, 20)
    out = head.__getitems__([0, 5, 19])
    assert len(out) == 1 and collate(out).id == [ds.ids[k] for k in (0, 5, 19)]
    dl = torch.utils.data.DataLoader(head, batch_sampler=[[0, 1], [2, 3, 4]], collate_fn=collate)
    assert [b.num_graphs for b in dl] == [2, 3]


def _record_offset(root, rid):
    """(shard path, byte offset of record ``rid``'s blob in it, the blob)."""
    import lmdb

    m = json.loads((root / "manifest.json").read_text())
    k = m["records"]["ids"].index(rid)
    shard = root / m["shards"][m["records"]["shard"][k]]["file"]
    env = lmdb.open(str(shard), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        blob = bytes(txn.get(b"r%010d" % m["records"]["source_index"][k]))
    env.close()
    data = shard.read_bytes()
    at = data.find(blob)
    assert at >= 0 and data.find(blob, at + 1) < 0, "record bytes not found once in the shard"
    return shard, at, blob


def _nan_coordinate(root, rid):
    shard, at, blob = _record_offset(root, rid)
    n = int.from_bytes(blob[:8], "little")
    start = at + 8 + n + json.loads(blob[8:8 + n])["pos"]["data_offsets"][0]
    data = bytearray(shard.read_bytes())
    data[start:start + 8] = np.float64(np.nan).tobytes()
    shard.write_bytes(bytes(data))


def _garbled_header(root, rid):
    shard, at, _ = _record_offset(root, rid)
    data = bytearray(shard.read_bytes())
    data[at + 8:at + 16] = b"\xff" * 8  # the JSON header no longer parses
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [(_nan_coordinate, "pos has NaN"),
                                            (_garbled_header, "cannot decode it")])
@pytest.mark.parametrize("workers,loader",
                         [(0, "DataLoader"), (2, "DataLoader"), (2, "GraphLoader")])
def test_damaged_record_in_a_batch_raises_naming_it(built, tmp_path, damage, message, workers,
                                                    loader):
    root = tmp_path / "copy"
    shutil.copytree(built, root)
    rid = json.loads((root / "split.json").read_text())["train"][4]
    damage(root, rid)  # same size: check="size" opens it, only the record read can tell
    ds = BatchedOnly(root, split="train", check="size")
    k = ds.ids.index(rid)
    others = [j for j in range(len(ds)) if j != k][:6]
    bad = others[:3] + [k] + others[3:]
    if loader == "GraphLoader":
        dl = GraphLoader(ds, [others, bad], num_workers=workers)
    else:
        dl = torch.utils.data.DataLoader(ds, batch_sampler=[others, bad], collate_fn=collate,
                                         num_workers=workers)
    with pytest.raises(DataError, match=rf"record '{rid}' in .*{message}"):
        list(dl)
    assert collate(ds.__getitems__(others)).num_graphs == len(others)  # the rest still reads


def test_graph_loader_ring_lives_with_its_iterator_and_batches(built):
    """A loader dropped while its iterator runs keeps its slots mapped until the last batch dies;
    then the ring is gone (no mapping left behind per epoch)."""
    import gc

    from uae_dist.data import ring as ring_mod

    ds = CrystalGraphDataset(built, split=None)
    batches = list(DistributedAtomBatchSampler(ds.natoms, max_atoms=80, seed=1))
    gc.collect()  # rings of earlier tests' loaders left in reference cycles (tracebacks)
    before = set(ring_mod._RINGS)
    it = iter(GraphLoader(ds, batches, num_workers=2))  # the loader itself is dropped here
    gc.collect()
    first = next(it)
    rest = [b.num_graphs for b in it]
    assert first.num_graphs + sum(rest) == len(ds)
    assert len(set(ring_mod._RINGS) - before) == 1
    del it
    gc.collect()
    assert len(set(ring_mod._RINGS) - before) == 1  # `first` still lives in a slot
    del first
    gc.collect()
    assert set(ring_mod._RINGS) == before


def _worker_info_ids(batch):
    info = torch.utils.data.get_worker_info()
    assert info is not None and info.num_workers == 2
    return info.id, len(batch)


def test_own_workers_take_batches_in_turn_and_see_worker_info(built):
    """Worker ``w`` of 2 loads batches ``w, w + 2, …`` (order kept, no reordering) and sees
    ``get_worker_info()`` as under torch's DataLoader."""
    ds = CrystalGraphDataset(built, split=None)
    batches = [[k] for k in range(9)]
    got = list(GraphLoader(ds, batches, num_workers=2, collate_fn=_worker_info_ids))
    assert got == [(k % 2, 1) for k in range(9)]


def _fail_init(wid):
    raise ValueError(f"init of worker {wid} failed")


def test_own_workers_report_errors_and_deaths_and_stop_when_dropped(built):
    import os
    import signal

    from uae_dist.data.workers import SlotWorkersIter

    ds = CrystalGraphDataset(built, split=None)
    batches = list(DistributedAtomBatchSampler(ds.natoms, max_atoms=40, seed=2))
    with pytest.raises(ValueError, match="init of worker 0 failed"):
        list(GraphLoader(ds, batches, num_workers=2, worker_init_fn=_fail_init))

    it = iter(GraphLoader(ds, batches, num_workers=2))
    assert isinstance(it, SlotWorkersIter)
    next(it)
    procs = list(it._procs)
    it.close()  # dropped early: the workers end, none is left behind
    assert all(not p.is_alive() for p in procs)
    with pytest.raises(StopIteration):
        next(it)

    it = iter(GraphLoader(ds, batches, num_workers=2))
    next(it)
    os.kill(it._procs[1].pid, signal.SIGKILL)
    it._procs[1].join()
    with pytest.raises(RuntimeError, match=r"worker 1 \(pid \d+\) .*exit code -9"):
        for _ in it:
            pass
    assert all(not p.is_alive() for p in it._procs)


def test_slot_writer_hands_out_its_own_memory_in_order():
    """A SlotWriter's arrays lie in its slot, one after the other and aligned; past the slot's end
    it raises SlotFull (the batch then goes packed); cancel gives the slot back."""
    from uae_dist.data.ring import BatchRing, SlotFull, SlotWriter

    ring = BatchRing(workers=1, per_worker=2, slot_bytes=4096)
    ring.state[1] = 1
    w = SlotWriter(ring, 1)
    e = w.take((2, 100), np.int64)
    s = w.take((100, 3), np.int8)
    assert w.owns(e) and w.owns(s) and not w.owns(np.zeros(3))
    assert s.__array_interface__["data"][0] >= e.__array_interface__["data"][0] + e.nbytes
    e[:] = 7
    assert np.frombuffer(ring.mm, np.int64, 200, ring.head + ring.slot_bytes).max() == 7
    other = SlotWriter(ring, 0).take((4,), np.int64)
    assert not w.owns(other)
    with pytest.raises(SlotFull):
        w.take((4096,), np.uint8)
    w.cancel()
    assert ring.state[1] == 0
