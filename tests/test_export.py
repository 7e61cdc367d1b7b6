"""UAE export round trip: files, model card, load_uae, elementembeddings, the CLI entry points."""
import argparse
import hashlib
import json

import numpy as np
import pytest
import torch

import uae_dist
from _train_fixtures import launch, tiny_lmdb
from uae_dist import export as ex
from uae_dist.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tiny_lmdb(tmp_path_factory)
    out = tmp_path_factory.mktemp("export") / "run"
    launch("python", data, out, ["train.epochs=1", "export.after_train=true"], timeout=120)
    return out


@pytest.mark.timeout(150)
def test_export_after_training_round_trip(run):
    d = run / "uae"
    for f in ("uae.safetensors", "uae.npz", "atom_init.json", "embedding.json", "embedding.csv", "model_card.json"):
        assert (d / f).exists(), f
    card = json.loads((d / "model_card.json").read_text())
    best = ckpt.read_model(run / "checkpoints" / "best")
    table = best["model"]["embed.weight"].numpy()
    u = uae_dist.load_uae(d)
    assert u.embedding.shape == (100, 16) and np.array_equal(u.embedding, table)
    assert u["H"].shape == (16,) and np.array_equal(u[26], u["Fe"])
    counts = best["element_counts"].numpy()
    assert np.array_equal(u.seen, counts > 0) and 0 < u.seen.sum() < 100
    assert card["elements_unseen"] == [s for s, k in zip(u.symbols, u.seen) if not k]
    assert card["checkpoint_sha256"] == hashlib.sha256((run / "checkpoints/best/model.pt").read_bytes()).hexdigest()
    assert card["data"]["manifest_sha256"] and card["targets"] == ["e_form_per_atom", "band_gap"]
    assert card["uae_dist_version"] == uae_dist.__version__ and len(card["validation"]["mae"]) == 2
    atom_init = json.loads((d / "atom_init.json").read_text())
    assert list(atom_init) == [str(z) for z in range(1, 101)]
    assert np.allclose(atom_init["8"], table[7])
    npz = np.load(d / "uae.npz")
    assert np.array_equal(npz["embedding"], table)


@pytest.mark.timeout(60)
def test_elementembeddings_loads_json_and_csv(run):
    from elementembeddings.core import Embedding

    d = run / "uae"
    u = uae_dist.load_uae(d)
    for e in (Embedding.from_json(str(d / "embedding.json"), "uae"), Embedding.from_csv(str(d / "embedding.csv"), "uae")):
        assert e.dim == 16 and len(e.element_list) == 100
        assert np.allclose(e.embeddings["Fe"], u["Fe"], atol=1e-7)


@pytest.mark.timeout(60)
def test_cli_functions_only_seen(run, tmp_path):
    p = argparse.ArgumentParser()
    ex.add_arguments(p)
    args = p.parse_args([str(run), "--out", str(tmp_path / "u"), "--only-seen", "--formats", "json,atom_init,npz"])
    assert ex.run(args) == 0
    u = uae_dist.load_uae(tmp_path / "u")
    assert len(json.loads((tmp_path / "u" / "embedding.json").read_text())) == int(u.seen.sum())
    assert ex.run(p.parse_args([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])) == 2


def test_paper_variant_uae_is_linear_weight_transposed():
    from uae_dist.config import ModelConfig
    from uae_dist.models import build_model

    m = build_model(ModelConfig(variant="paper", emb_dim=16, d_model=32, layers=1, heads=4, ffn_dim=32), ["a"])
    assert torch.equal(m.element_embedding(), m.atom.weight.detach().t())


@pytest.mark.timeout(120)
def test_warm_start_from_checkpoint_with_other_targets(run, tmp_path):
    """train.init_from loads what fits (backbone, UAE) from any checkpoint, e.g. for a new target set."""
    data = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())["data_root"]
    out = tmp_path / "warm"
    p = launch("python", data, out, ["train.epochs=1", "data.targets=[band_gap]", "train.max_steps=1",
                                     f"train.init_from={run}", "optim.lr=1e-12", "optim.warmup_steps=0",
                                     "model.dropout=0.0"])
    assert "initialised weights from" in p.stdout
    a = ckpt.read_model(run / "checkpoints" / "best")["model"]["embed.weight"]
    b = ckpt.read_model(ckpt.latest(out / "checkpoints"))["model"]["embed.weight"]
    assert torch.allclose(a, b, atol=1e-6)
