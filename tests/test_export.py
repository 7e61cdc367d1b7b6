"""UAE export: files, model card, untrained-row policy, safe output directories, load_uae,
elementembeddings, the CLI, warm starts."""
import argparse
import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

import uae_dist
from _train_fixtures import launch, tiny_lmdb
from uae_dist import export as ex
from uae_dist.elements import SYMBOLS
from uae_dist.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tiny_lmdb(tmp_path_factory)
    out = tmp_path_factory.mktemp("export") / "run"
    launch("python", data, out, ["train.epochs=1", "export.after_train=true"], timeout=180)
    return out


def _load(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return uae_dist.load_uae(d)


@pytest.mark.timeout(200)
def test_export_after_training_round_trip(run):
    d = run / "uae"
    for f in ("uae.safetensors", "uae.npz", "atom_init.json", "embedding.json", "embedding.csv",
              "model_card.json"):
        assert (d / f).exists(), f
    card = json.loads((d / "model_card.json").read_text())
    best = ckpt.read_model(run / "checkpoints" / "best")
    table = best["weights"]["embed.weight"].numpy()
    seen = np.asarray(best["state"]["element_counts"]) > 0
    u = _load(d)
    assert u.embedding.shape == (100, 16) and 0 < seen.sum() < 100
    assert np.array_equal(u.seen, seen)
    assert np.array_equal(u.embedding[seen], table[seen])  # trained rows exactly
    assert np.allclose(u.embedding[~seen], table[seen].mean(0))  # untrained: the trained mean
    assert u["H"].shape == (16,) and np.array_equal(u[26], u["Fe"])
    assert card["elements_unseen"] == [s for s, k in zip(SYMBOLS, seen) if not k]
    digest = hashlib.sha256((run / "checkpoints/best/model.safetensors").read_bytes()).hexdigest()
    assert card["checkpoint_sha256"] == digest
    assert card["data"]["manifest_sha256"] and card["targets"] == ["e_form_per_atom", "band_gap"]
    assert card["uae_dist_version"] == uae_dist.__version__
    assert set(card["validation"]["metrics"]) == {"e_form_per_atom", "band_gap"}
    # the model card carries the test metrics of the run (issue 7.8)
    test = json.loads((run / "test_metrics.json").read_text())
    assert card["test"] == test and test["targets"]["band_gap"]["count"] > 0
    # untrained rows are left out of the text formats (issue 7.10)
    atom_init = json.loads((d / "atom_init.json").read_text())
    assert list(atom_init) == [str(z) for z in range(1, 101) if seen[z - 1]]
    assert np.allclose(atom_init["8"], table[7])
    assert len(json.loads((d / "embedding.json").read_text())) == seen.sum()


@pytest.mark.timeout(60)
def test_load_uae_says_which_rows_are_untrained(run):
    with pytest.warns(UserWarning, match="never trained") as rec:
        u = uae_dist.load_uae(run / "uae")
    assert u.untrained and all(s in str(rec[0].message) for s in u.untrained[:3])
    assert set(u.as_dict()) == {s for s, k in zip(SYMBOLS, u.seen) if k}


@pytest.mark.timeout(60)
def test_elementembeddings_loads_json_and_csv(run):
    from elementembeddings.core import Embedding

    d = run / "uae"
    u = _load(d)
    for e in (Embedding.from_json(str(d / "embedding.json"), "uae"),
              Embedding.from_csv(str(d / "embedding.csv"), "uae")):
        assert e.dim == 16 and len(e.element_list) == int(u.seen.sum())
        assert np.allclose(e.embeddings["O"], u["O"], atol=1e-7)


@pytest.mark.timeout(60)
def test_cli_include_unseen_and_errors(run, tmp_path):
    p = argparse.ArgumentParser()
    ex.add_arguments(p)
    args = p.parse_args([str(run), "--out", str(tmp_path / "u"), "--include-unseen",
                         "--formats", "json,atom_init,npz"])
    assert ex.run(args) == 0
    u = _load(tmp_path / "u")
    assert len(json.loads((tmp_path / "u" / "embedding.json").read_text())) == 100
    assert json.loads((tmp_path / "u" / "model_card.json").read_text())["elements_unseen"] == u.untrained
    assert ex.run(p.parse_args([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])) == 2


@pytest.mark.timeout(60)
def test_reexport_leaves_no_stale_files_and_refuses_foreign_dirs(run, tmp_path):
    """Issue 8.7: a re-export with fewer formats must not leave the old uae.safetensors behind;
    a directory with files we did not write is refused, not overwritten."""
    out = tmp_path / "u"
    ex.export(run, out)
    assert (out / "uae.safetensors").exists()
    ex.export(run, out, formats=["json"])
    assert sorted(p.name for p in out.iterdir()) == ["embedding.json", "model_card.json",
                                                    "pretrain_train_ids.txt"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="did not write"):
        ex.export(run, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        ex.export(run, tmp_path / "afile")


@pytest.mark.timeout(200)
def test_warm_start_uses_the_new_normaliser(run, tmp_path, tmp_path_factory):
    """train.init_from loads what fits (backbone, UAE) from any checkpoint; the normaliser is
    fitted on the new run's training labels, never taken from the old checkpoint (issue 7.4)."""
    from uae_dist.data import CrystalGraphDataset

    data = tiny_lmdb(tmp_path_factory, n=100)  # other data: other labels, other normaliser
    out = tmp_path / "warm"
    p = launch("python", data, out, ["train.epochs=1", "data.targets=[band_gap]",
                                     "train.max_steps=1", f"train.init_from={run}",
                                     "optim.lr=1e-12", "optim.warmup_steps=0", "model.dropout=0.0"])
    assert "initialised weights from" in p.stdout
    old = ckpt.read_model(run / "checkpoints" / "best")
    new = ckpt.read_model(ckpt.latest(out / "checkpoints"))
    assert torch.allclose(old["weights"]["embed.weight"], new["weights"]["embed.weight"], atol=1e-6)
    ds = CrystalGraphDataset(data, "train")
    y = ds.targets_array()[:, ds.target_names.index("band_gap")]
    mean = new["state"]["normalizer"]["mean"][0]
    assert np.isclose(mean, np.nanmean(y), rtol=1e-13, atol=0)
    assert not np.isclose(mean, old["state"]["normalizer"]["mean"][1], rtol=1e-6, atol=0)
