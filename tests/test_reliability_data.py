"""Issue 8 points 2 and 5: training and verify refuse data that is not what the manifest says, and a
truncated shard is an error naming it, never SIGBUS. Real LMDB shards of real MP records, damaged
the way disks, copies and hand edits damage them; readers run as separate processes where a
regression would kill them with a signal."""
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _data_fixtures import mp_records, write_json
from _train_fixtures import launch
from uae_dist.data import CrystalGraphDataset
from uae_dist.data.build import build_lmdb
from uae_dist.data.verify import verify

pytestmark = pytest.mark.timeout(300)
SIGNAL_EXITS = {-7, -11, 135, 139}  # SIGBUS / SIGSEGV, as returncode or shell status


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    src = write_json(tmp_path_factory.mktemp("src") / "mp30.json.gz", mp_records(30))
    out = tmp_path_factory.mktemp("ds") / "mp30"
    build_lmdb(src, out, targets="e_form_per_atom,band_gap", cutoff=5.0, shards=2,
               progress=False, use_mpi=False)
    return out


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(built, dst)
    return dst


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root, m):
    (root / "manifest.json").write_text(json.dumps(m, indent=1))


def _restamp_shards(root):
    """Record the shards' current sizes and hashes in the manifest, as if the damage had happened
    before the build gathered them (a bit flip in memory, a buggy writer)."""
    from uae_dist.data.lmdb_store import file_sha256
    import xxhash

    m = _manifest(root)
    for s in m["shards"]:
        p = root / s["file"]
        s.update(bytes=p.stat().st_size, sha256=file_sha256(p),
                 xxh3_128=xxhash.xxh3_128(p.read_bytes()).hexdigest())
    _write_manifest(root, m)


def _nan_coordinate(root, rid: str) -> Path:
    """Overwrite the first coordinate of record ``rid`` in its shard file with NaN, in place."""
    import lmdb

    m = _manifest(root)
    k = m["records"]["ids"].index(rid)
    shard = root / m["shards"][m["records"]["shard"][k]]["file"]
    env = lmdb.open(str(shard), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        blob = bytes(txn.get(b"r%010d" % m["records"]["source_index"][k]))
    env.close()
    n = int.from_bytes(blob[:8], "little")
    start = 8 + n + json.loads(blob[8:8 + n])["pos"]["data_offsets"][0]
    data = bytearray(shard.read_bytes())
    at = data.find(blob)
    assert at >= 0 and data.find(blob, at + 1) < 0, "record bytes not found once in the shard"
    data[at + start:at + start + 8] = np.float64(np.nan).tobytes()
    shard.write_bytes(bytes(data))
    return shard


def _train_id(root) -> str:
    return json.loads((root / "split.json").read_text())["train"][3]


# ------------------------------------------------------------------ 8.2 damaged data
def test_nan_coordinate_is_refused_at_open(copy):
    shard = _nan_coordinate(copy, _train_id(copy))
    with pytest.raises(ValueError, match=f"{shard.name}.*damaged"):
        CrystalGraphDataset(copy, split="train")
    assert any(shard.name in p for p in verify(copy, progress=False))


def test_nan_coordinate_is_refused_when_decoded_naming_the_record(copy):
    rid = _train_id(copy)
    shard = _nan_coordinate(copy, rid)
    _restamp_shards(copy)  # the shard hashes agree: only the record itself shows the damage
    ds = CrystalGraphDataset(copy, split="train")
    k = ds.ids.index(rid)
    with pytest.raises(ValueError, match=rf"record '{rid}' in .*{shard.name}.*pos has NaN"):
        ds[k]
    ds[(k + 1) % len(ds)]  # the other records still read
    problems = verify(copy, progress=False)
    assert any(rid in p and "NaN" in p for p in problems), problems


def test_size_only_open_check_still_refuses_the_record(copy):
    """check="size" skips hashing at open (huge data sets); the record check remains."""
    rid = _train_id(copy)
    _nan_coordinate(copy, rid)  # same size, other bytes
    ds = CrystalGraphDataset(copy, split="train", check="size")
    with pytest.raises(ValueError, match=rf"record '{rid}'.*NaN"):
        ds[ds.ids.index(rid)]


@pytest.mark.timeout(400)
def test_training_refuses_a_record_with_a_nan_coordinate(copy, tmp_path):
    rid = _train_id(copy)
    _nan_coordinate(copy, rid)
    _restamp_shards(copy)
    r = launch("python", copy, tmp_path / "run", check=False, timeout=300)
    assert r.returncode != 0, "training ran on a NaN coordinate and exited 0"
    assert rid in r.stdout + r.stderr and "NaN" in r.stdout + r.stderr


def test_edited_label_in_the_manifest_is_refused_and_verify_finds_it(copy):
    m = _manifest(copy)
    k = 5
    rid = m["records"]["ids"][k]
    m["records"]["y"][k][0] = -1.0 if m["records"]["y"][k][0] != -1.0 else -2.0
    _write_manifest(copy, m)
    with pytest.raises(ValueError, match="record table"):
        CrystalGraphDataset(copy, split=None)
    problems = verify(copy, progress=False)
    assert any(rid in p and "labels" in p for p in problems), problems
    # even with its digest recomputed, the label disagrees with the shard
    from uae_dist.data.integrity import records_digest
    m["integrity"]["records_sha256"] = records_digest(m["records"])
    _write_manifest(copy, m)
    assert any(rid in p and "labels" in p for p in verify(copy, progress=False))
    with pytest.raises(ValueError, match=rf"record '{rid}'.*labels"):
        ds = CrystalGraphDataset(copy, split=None)
        ds[ds.ids.index(rid)]


SPLIT_DAMAGE = {
    "duplicate": lambda sp: sp["train"].append(sp["train"][0]),
    "overlap": lambda sp: sp["test"].append(sp["train"][0]),
    "unknown": lambda sp: sp["val"].append("mp-does-not-exist"),
}


@pytest.mark.parametrize("damage", list(SPLIT_DAMAGE))
def test_damaged_split_is_refused_and_verify_finds_it(copy, damage):
    sp = json.loads((copy / "split.json").read_text())
    first = sp["train"][0]
    SPLIT_DAMAGE[damage](sp)
    (copy / "split.json").write_text(json.dumps(sp))
    what = "mp-does-not-exist" if damage == "unknown" else first
    for split in ("train", "val", "test", None):
        with pytest.raises(ValueError, match=f"split.json.*{what}"):
            CrystalGraphDataset(copy, split=split)
    problems = verify(copy, progress=False)
    assert any(what in p for p in problems), problems


# ------------------------------------------------------------------ 8.5 truncated shards
def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


TRUNCATE = {"half": lambda n: n // 2, "one_page": lambda n: 5000, "empty": lambda n: 0}


@pytest.mark.parametrize("size", list(TRUNCATE))
@pytest.mark.parametrize("manifest_agrees", [False, True], ids=["manifest_differs", "restamped"])
def test_truncated_shard_is_an_error_naming_it_not_sigbus(copy, size, manifest_agrees):
    m = _manifest(copy)
    shard = copy / m["shards"][1]["file"]
    with open(shard, "r+b") as fh:
        fh.truncate(TRUNCATE[size](shard.stat().st_size))
    if manifest_agrees:  # then only the LMDB header can tell
        _restamp_shards(copy)
    r = subprocess.run([str(Path(sys.executable).parent / "uae-dist"), "data", "verify", str(copy),
                        "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.returncode not in SIGNAL_EXITS, (r.returncode, r.stderr)
    assert shard.name in r.stdout, r.stdout
    r = _run(f"""
        from uae_dist.data import CrystalGraphDataset
        ds = CrystalGraphDataset({str(copy)!r}, split=None)
        for k in range(len(ds)):
            ds[k]
        """)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "DataError" in r.stderr and shard.name in r.stderr.splitlines()[-1], r.stderr[-2000:]


def test_shard_truncated_while_a_job_reads_it_is_an_error_not_sigbus(copy):
    m = _manifest(copy)
    shard = copy / m["shards"][1]["file"]
    r = _run(f"""
        import os
        from uae_dist.data import CrystalGraphDataset
        ds = CrystalGraphDataset({str(copy)!r}, split=None)
        mine = [k for k in range(len(ds)) if ds.locate(k)[0] == 1]
        ds[mine[0]]  # shard 1 is open and mapped
        os.truncate({str(shard)!r}, os.path.getsize({str(shard)!r}) // 3)
        for k in mine:
            ds[k]
        """)
    assert r.returncode == 1 and r.returncode not in SIGNAL_EXITS, (r.returncode, r.stderr)
    last = r.stderr.splitlines()[-1]
    assert "DataError" in last and shard.name in last and "changed size" in last, last


def test_intact_copy_opens_and_reads(copy):
    """The checks pass on undamaged data (so the tests above fail for the damage alone)."""
    assert verify(copy, progress=False) == []
    ds = CrystalGraphDataset(copy, split=None)
    assert all(math.isfinite(float(ds[k].pos.sum())) for k in range(len(ds)))
