"""The UAE shipped with the package (issue 10.4): it loads offline from an installed package,
its provenance is complete and clean for the MP protocol, ``uae-dist export`` of it round-trips,
and it is not a random table (nor its own random initialisation)."""
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import uae_dist
from uae_dist.data import given_split
from uae_dist.tables import SHIPPED, load_table, shipped_names
from uae_dist.train import provenance as P

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["mp-v1", "mp-v2"]   # mp-v2 (pretrain_mp_st_ef) is the best of issue 10's recipes


@pytest.fixture(scope="module", params=NAMES)
def name(request):
    return request.param


@pytest.fixture(scope="module")
def table(name):
    return uae_dist.load_uae(name, warn=False)


@pytest.fixture(scope="module")
def card(name):
    return json.loads((SHIPPED / name / "model_card.json").read_text())


def test_it_is_shipped_with_its_provenance(name, table, card):
    assert name in shipped_names()
    assert table.values.shape == (100, card["model"]["embedding_dim"])
    assert card["table_name"] == name and card["recipe"]["reproduce"]
    assert card["config"]["model"]["name"] == "crystal_transformer"
    for part in ("validation", "test"):
        m = card[part]["metrics" if part == "validation" else "targets"]["e_form_per_atom"]
        assert 0 < m["mae"] < m["mean_predictor_mae"]
    d = card["data"]
    assert len(d["manifest_sha256"]) == len(d["split_sha256"]) == 64
    for f, sha in card["files"].items():  # every shipped file is the one the card names
        assert P.file_sha256(SHIPPED / name / f) == sha, f
    assert d["train_ids"]["count"] == len(P.read_ids(SHIPPED / name / P.EXPORTED_IDS))


def test_its_downstream_results_are_in_its_card(card):
    """The card carries the issue-10 downstream test of this table (CGCNN on the MP protocol and
    HOIP, MEGNet on HOIP, >= 3 seeds each) with % changes consistent with its own rows."""
    d = card["downstream"]
    assert d["verdict"] and d["featurizers"]
    rows = {(r["task"], r["backbone"], r["featurizer"]): r for r in d["rows"]}
    for task, bb in (("mp_ef", "cgcnn"), ("hoip_ae", "cgcnn"), ("hoip_ae", "megnet")):
        ref = rows[(task, bb, "default")]
        for f in d["featurizers"]:
            r = rows[(task, bb, f)]
            assert r["n_done"] >= 3 and r["mae_mean"] > 0 and r["mae_std"] > 0
            want = 100 * (r["mae_mean"] - ref["mae_mean"]) / ref["mae_mean"]
            assert r["mae_change_pct"] == pytest.approx(want, rel=1e-9)


def test_its_pretraining_never_saw_the_protocols_val_and_test(name, card):
    split = json.loads(given_split.resolve("mp_cgcnn6000").read_text())
    assert card["config"]["data"]["hold_out"] == "mp_cgcnn6000"
    assert P.leak_warning(f"uae:{name}", {"test": split["test"], "val": split["val"]}) is None
    seen = set(P.read_ids(SHIPPED / name / P.EXPORTED_IDS))
    assert len(seen & set(split["train"])) > 3000  # the protocol's train part was used


def test_it_differs_from_random_and_from_its_initialisation(table, card):
    from uae_dist import config as C
    from uae_dist.models import build_model

    rows = table.seen
    v = table.values[rows]
    rnd = load_table(f"random:{v.shape[1]}:0").values[rows]
    cfg = C.from_dict(card["config"])
    torch.manual_seed(cfg.train.seed)  # as the engine seeds before building the model
    init = build_model(cfg.model, card["targets"]).element_embedding().numpy()[rows]

    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert abs(corr(v, rnd)) < 0.2
    assert corr(v, init) < 0.9, "the table is still mostly its random initialisation"
    assert np.linalg.norm(v - init) > 0.5 * np.linalg.norm(v)


def test_export_of_it_round_trips(name, table, tmp_path):
    out = tmp_path / "again"
    p = subprocess.run([sys.executable, "-m", "uae_dist.cli", "export", name, "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    again = load_table(out)
    assert np.array_equal(again.values[table.seen], table.values[table.seen])
    card = json.loads((out / "model_card.json").read_text())
    assert card["exported_from"]["table"] == name
    assert set(card["files"]) == {"uae.safetensors", "uae.npz", "atom_init.json",
                                  "embedding.json", "embedding.csv", P.EXPORTED_IDS}
    init = json.loads((out / "atom_init.json").read_text())  # what the reference CGCNN reads
    assert set(init) == {str(k + 1) for k in np.flatnonzero(table.seen)}
    assert np.allclose(init["8"], table.values[7])


@pytest.mark.timeout(600)
def test_they_load_offline_from_an_installed_package(tmp_path):
    import shutil

    src = tmp_path / "src"  # a copy, so that the build leaves the checkout alone
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "data_build", "build", "*.egg-info", "*.so", "__pycache__"))
    env = {**os.environ, "UAE_NO_EXT": "1", "PIP_NO_INDEX": "1"}
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                       timeout=540, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("uae_dist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for n in NAMES:
        assert f"uae_dist/tables/{n}/model_card.json" in names
        assert f"uae_dist/tables/{n}/{P.EXPORTED_IDS}" in names
    assert "uae_dist/splits/mp_cgcnn6000.json" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    code = ("import sys, uae_dist, numpy as np; print(uae_dist.__file__); "
            "[np.save(f'{n}.npy', uae_dist.load_uae(n, warn=False).values) for n in sys.argv[1:]]")
    p = subprocess.run([sys.executable, "-c", code, *NAMES], capture_output=True, text=True,
                       timeout=120,
                       cwd=tmp_path, env={**env, "PYTHONPATH": str(site)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(str(site))
    for n in NAMES:
        assert np.array_equal(np.load(tmp_path / f"{n}.npy"), uae_dist.load_uae(n, warn=False).values)


def test_a_damaged_table_is_refused_not_exported(name, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(SHIPPED / name, bad)
    raw = bytearray((bad / "uae.safetensors").read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the embedding
    (bad / "uae.safetensors").write_bytes(bytes(raw))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "uae_dist.cli", "export", str(bad), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "does not match its model card" in p.stderr, p.stderr
    assert not out.exists()
