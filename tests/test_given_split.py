"""`uae-dist data build --split-file`: a given split is used as it is (issue 9.6)."""
import json
import subprocess
import sys

import pytest

from _train_fixtures import MP, ROOT, env
from uae_dist.data import CrystalGraphDataset
from uae_dist.data.build import build_lmdb


def _build(src_out, *args):
    cmd = [sys.executable, "-m", "uae_dist.cli", "data", "build", "--source", str(MP),
           "--out", str(src_out), "--limit", "60", "--cutoff", "5", "--shards", "2",
           "--workers", "1", "-q", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import need_data

    need_data(MP)
    out = tmp_path_factory.mktemp("given") / "base"
    build_lmdb(MP, out, cutoff=5.0, shards=1, workers=1, limit=60, progress=False)
    return out


@pytest.mark.timeout(300)
def test_given_split_is_used_as_it_is(base, tmp_path):
    own = json.loads((base / "split.json").read_text())
    # another split of the same ids: parts rotated, 4 ids left out, 2 ids the data lacks
    ids = own["train"] + own["val"] + own["test"]
    left_out, kept = ids[:4], ids[4:]
    given = {"train": kept[10:] + ["mp-none-1"], "val": kept[:5], "test": kept[5:10] + ["mp-none-2"]}
    f = tmp_path / "published.json"
    f.write_text(json.dumps(given))
    out = tmp_path / "out"
    p = _build(out, "--split-file", str(f))
    assert p.returncode == 0, p.stderr
    split = json.loads((out / "split.json").read_text())
    for part in ("train", "val", "test"):
        assert set(split[part]) == set(given[part]) - {"mp-none-1", "mp-none-2"}, part
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    base_rejects = [json.loads(x)["id"] for x in (base / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejects if r["reason"] == "not_in_split") == sorted(
        left_out + base_rejects)  # unlisted: checked before anything else of the record
    m = json.loads((out / "manifest.json").read_text())
    g = m["split"]["given"]
    assert g["listed"] == 57 and g["absent"] == 2 and set(g["absent_examples"]) == {
        "mp-none-1", "mp-none-2"}
    assert CrystalGraphDataset(out, "test").ids == split["test"]
    v = subprocess.run([sys.executable, "-m", "uae_dist.cli", "data", "verify", str(out), "-q"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    # the file is part of the build's identity: another file cannot resume this build
    given["val"], given["test"] = given["test"], given["val"]
    f.write_text(json.dumps(given))
    p = _build(out, "--split-file", str(f), "--resume")
    assert p.returncode != 0 and "option" in (p.stderr + p.stdout).lower(), p.stderr


@pytest.mark.parametrize("content, msg", [
    ('{"train": ["a"], "val": ["a"], "test": []}', "listed in train and in val"),
    ('{"train": ["a"], "val": []}', "'test' must be a list"),
    ("not json", "not valid JSON"),
])
def test_bad_split_file_is_exit_2_before_anything(tmp_path, content, msg):
    f = tmp_path / "split.json"
    f.write_text(content)
    out = tmp_path / "out"
    p = _build(out, "--split-file", str(f))
    assert p.returncode == 2 and "--split-file" in p.stderr and msg in p.stderr, p.stderr
    assert not out.exists()
