"""Clean evaluation (issue 10.1): a pretraining trains on its train split only (checked on the ids
the engine's loader actually yields), records those ids, the export carries them with their hash,
and a fine-tuning run warns when its table's pretraining saw its test structures."""
import hashlib
import json
import subprocess
import sys

import pytest

from _backbone_checks import finetune_env
from _train_fixtures import MP, ROOT, launch, tiny_lmdb
from uae_dist import config as C
from uae_dist.train import data as Dt
from uae_dist.train import provenance as P


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tiny_lmdb(tmp_path_factory)
    out = tmp_path_factory.mktemp("provenance") / "run"
    launch("python", data, out, ["train.epochs=1", "export.after_train=true"], timeout=240)
    return data, out


def _loader_ids(cfg, splits) -> list:
    """The ids the engine's training loaders yield over one epoch, on each of 2 ranks."""
    seen = []
    for rank in range(2):
        sampler = Dt.train_sampler(cfg, splits.train, rank, 2)
        sampler.set_epoch(0)
        for b in Dt.train_loader(cfg, splits.train, sampler):
            seen += list(b.id)
    return seen


def _split(data):
    return json.loads((data / "split.json").read_text())


@pytest.mark.timeout(300)
def test_pretraining_trains_on_the_train_split_only(run):
    data, out = run
    sp = _split(data)
    recorded = P.read_ids(out / P.TRAIN_IDS)
    assert recorded and set(recorded) == set(sp["train"])
    cfg = C.load_config(out / "config.yaml")
    splits = Dt.open_splits(cfg)
    seen = _loader_ids(cfg, splits)
    assert set(seen) == set(sp["train"])
    assert not set(seen) & (set(sp["val"]) | set(sp["test"]))


def test_hold_out_keeps_another_splits_val_and_test_from_training(run, tmp_path):
    """``data.hold_out``: ids that a downstream split tests on never train (the loaders' ids)."""
    data, out = run
    sp = _split(data)
    given = {"train": sp["train"][:3], "val": sp["train"][3:6], "test": sp["train"][6:9] + ["x"]}
    f = tmp_path / "downstream.json"
    f.write_text(json.dumps(given))
    cfg = C.load_config(out / "config.yaml", [f"data.hold_out={f}"])
    splits = Dt.open_splits(cfg)
    held = set(given["val"]) | set(given["test"])
    every = Dt.open_splits(C.load_config(out / "config.yaml")).train.ids
    assert sorted(every) == sorted(sp["train"])
    assert list(splits.train.ids) == [i for i in every if i not in held]
    seen = _loader_ids(cfg, splits)
    assert set(seen) == set(splits.train.ids) and not set(seen) & held
    assert set(given["train"]) <= set(seen)
    assert sorted(splits.test.ids) == sorted(sp["test"])  # evaluation splits are untouched
    bad = C.load_config(out / "config.yaml", ["data.hold_out=no_such_split"])
    with pytest.raises(C.ConfigError, match="data.hold_out: no_such_split: .*shipped"):
        Dt.open_splits(bad)


def test_export_card_names_the_split_and_the_training_ids(run):
    data, out = run
    d = out / "uae"
    card = json.loads((d / "model_card.json").read_text())
    split_sha = hashlib.sha256((data / "split.json").read_bytes()).hexdigest()
    assert card["data"]["split_sha256"] == split_sha
    ids = card["data"]["train_ids"]
    assert ids["file"] == P.EXPORTED_IDS and ids["count"] == len(_split(data)["train"])
    assert P.file_sha256(d / P.EXPORTED_IDS) == ids["sha256"] == card["files"][P.EXPORTED_IDS]
    assert P.read_ids(d / P.EXPORTED_IDS) == P.read_ids(out / P.TRAIN_IDS)


def test_leak_warning_fires_only_on_seen_ids(run, tmp_path):
    data, out = run
    sp, spec = _split(data), f"uae:{out / 'uae'}"
    assert P.leak_warning(spec, {"test": sp["test"], "val": sp["val"]}) is None
    msg = P.leak_warning(spec, {"test": sp["test"] + sp["train"][:5], "val": sp["val"]})
    assert msg and "5 of its" in msg and repr(sp["train"][0]) in msg
    assert P.leak_warning("cgcnn92", {"test": sp["train"]}) is None  # not a pretraining export
    # an export whose card lost the record, or whose ids file was edited: cannot check, says so
    import shutil

    old = tmp_path / "old"
    shutil.copytree(out / "uae", old)
    (old / P.EXPORTED_IDS).write_text("other\n")
    assert "does not match" in P.leak_warning(f"uae:{old}", {"test": sp["test"]})
    card = json.loads((old / "model_card.json").read_text())
    card["data"].pop("train_ids")
    (old / "model_card.json").write_text(json.dumps(card))
    assert "does not record" in P.leak_warning(f"uae:{old}", {"test": sp["test"]})


@pytest.mark.timeout(400)
def test_finetune_warns_when_the_tables_pretraining_saw_its_test_set(run, tmp_path):
    data, out = run
    from uae_dist.data.build import build_lmdb

    # the same 120 structures split with another seed: some of its test ids were trained on
    other = tmp_path / "reshuffled"
    build_lmdb(MP, other, targets=["e_form_per_atom", "band_gap"], cutoff=5.0, shards=1,
               workers=1, limit=120, seed=1, progress=False)
    test_ids = set(_split(other)["test"])
    overlap = test_ids & set(_split(data)["train"])
    assert overlap
    cmd = [sys.executable, "-m", "uae_dist.cli", "finetune", "--config", "finetune_cgcnn",
           f"data.root={other}", f"train.out_dir={tmp_path / 'ft'}", f"model.features=uae:{out}/uae",
           "model.cutoff=5.0", "model.atom_fea_len=16", "model.h_fea_len=16", "model.n_conv=1",
           "data.max_structures=16", "train.max_steps=1", "train.progress=false",
           "train.tensorboard=false", "train.threads=1"]
    p = subprocess.run(cmd, cwd=ROOT, env=finetune_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert f"trained on {len(overlap)} of its {len(test_ids)} test structures" in log, log[-3000:]
