"""Atom featurisers: documented widths, frozen vs trained tables and their learning rate, the
clear error for an element a table lacks."""
import json

import numpy as np
import pytest
import torch

from _backbone_checks import batch, crystals, model, one_thread  # noqa: F401
from uae_dist.models.featurizers import AtomFeatures
from uae_dist.train.optim import param_groups

WIDTHS = {"cgcnn92": 92, "onehot": 100, "megnet16": 16, "magpie": 22, "mat2vec": 200,
          "random:8:3": 8}


@pytest.mark.parametrize("spec,width", sorted(WIDTHS.items()))
def test_documented_widths(spec, width):
    f = AtomFeatures(spec, default_width=92)
    assert f.dim == width and f.table.shape == (100, width)
    assert torch.isfinite(f.table).all()


def test_random_and_learned_take_the_backbones_default_width():
    assert AtomFeatures("random", 92).dim == 92
    assert AtomFeatures("random", 16).dim == 16
    assert not torch.equal(AtomFeatures("random", 16).table, AtomFeatures("random:16:1", 16).table)
    torch.manual_seed(0)
    a = AtomFeatures("learned", 16).table
    torch.manual_seed(0)
    assert torch.equal(a, AtomFeatures("learned", 16).table)  # drawn from the model's seed
    for name, width in (("cgcnn", 92), ("alignn", 92), ("megnet", 16)):
        m, _ = model(name, features="random")
        assert m.features.dim == width


def test_uae_export_directory(tmp_path):
    rows = {str(z): [z, -z, 0.5] for z in range(1, 101)}
    (tmp_path / "atom_init.json").write_text(json.dumps(rows))
    f = AtomFeatures(f"uae:{tmp_path}", 92)
    assert f.dim == 3 and f(torch.tensor([8]))[0].tolist() == [8.0, -8.0, 0.5]


def test_standardize():
    f = AtomFeatures("magpie", 92, standardize=True)
    t = f.table[f.present].double()
    assert torch.allclose(t.mean(0), torch.zeros(t.shape[1], dtype=torch.float64), atol=1e-5)


def test_frozen_and_trained_tables_and_their_learning_rate():
    frozen, _ = model("cgcnn")
    assert not frozen.features.table.requires_grad
    groups = param_groups(frozen, 0.0)
    assert all(p is not frozen.features.table for g in groups for p in g["params"])
    trained, _ = model("cgcnn", features_trainable=True, features_lr_scale=0.1)
    (g,) = [g for g in param_groups(trained, 0.0)
            if any(p is trained.features.table for p in g["params"])]
    assert g["lr_scale"] == 0.1 and g["weight_decay"] == 0.0 and len(g["params"]) == 1
    m, cfg = model("megnet")  # MEGNet's embedding is trained by default
    assert m.features.table.requires_grad and not m.lr_scale == {}


def test_missing_element_is_a_clear_error(tmp_path):
    table = {str(z): [float(z), 1.0] for z in range(1, 101) if z not in (8, 22)}  # no O, Ti
    (tmp_path / "atom_init.json").write_text(json.dumps(table))
    for name in ("cgcnn", "alignn", "megnet"):
        m, cfg = model(name, features=str(tmp_path / "atom_init.json"))
        items = [([8, 22, 38, 8], *crystals(1)[0][1:])]
        items = [(z, np.resize(p, (4, 3)), c) for z, p, c in items]
        with pytest.raises(ValueError, match=r"has no row for O, Ti"):
            m(batch(cfg, items))
