"""CGCNN: the paper's convolution, invariances, overfitting, a 2-rank DeepSpeed fine-tune with a
frozen UAE, kill-and-resume."""
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from _backbone_checks import (one_thread,  # noqa: F401
                              batch, check_invariance, check_overfit, check_resume_equals,
                              crystals, final_weights, finetune, kill_and_resume, model)
from _train_fixtures import tiny_lmdb

pytestmark = pytest.mark.timeout(300)


def test_shape_and_invariance():
    check_invariance("cgcnn")
    check_invariance("cgcnn", features="onehot", atom_fea_len=16, n_conv=2, h_fea_len=8, n_h=2)


def test_overfits_a_tiny_batch():
    check_overfit("cgcnn", atom_fea_len=32, h_fea_len=32)


def test_convolution_is_the_papers_equation():
    """Eq. 5 written out per edge with the concatenated z_ij = v_i ‖ v_j ‖ u_ij and one weight
    matrix (the reference's fc_full), batch norm over edges then atoms, equals our layer."""
    m, cfg = model("cgcnn")
    m.train()
    b = batch(cfg, crystals(4))
    i, j = b.edge_index
    vec = b.pos[j] - b.pos[i] + torch.bmm(b.shift.double()[:, None], b.cell[b.batch[i]])[:, 0]
    d = vec.norm(dim=-1)
    centres = torch.arange(0, 8.2, 0.2, dtype=torch.float64)  # the reference's np.arange
    assert len(centres) == 41
    u = torch.exp(-(d[:, None] - centres) ** 2 / 0.2 ** 2)
    table = torch.as_tensor(np.nan_to_num(m.features.table.detach().numpy()))
    v = m.embedding(table[b.z - 1])
    for conv in m.convs:
        f = conv.f
        wa = conv.w_atoms.weight  # rows: [W_i^f, W_i^s, W_j^f, W_j^s]
        w_i = torch.cat([wa[:f], wa[f:2 * f]]).T
        w_j = torch.cat([wa[2 * f:3 * f], wa[3 * f:]]).T
        w = torch.cat([w_i, w_j, torch.cat([conv.w_filter.weight, conv.w_core.weight]).T])
        b_full = torch.cat([conv.w_filter.bias, conv.w_core.bias])
        z = torch.cat([v[i], v[j], u], -1) @ w + b_full
        gamma = torch.cat([conv.bn_filter.weight, conv.bn_core.weight])
        beta = torch.cat([conv.bn_filter.bias, conv.bn_core.bias])
        z = F.batch_norm(z, None, None, gamma, beta, training=True)
        gate, core = z.chunk(2, -1)
        s = torch.zeros_like(v).index_add_(0, i, torch.sigmoid(gate) * F.softplus(core))
        s = F.batch_norm(s, None, None, conv.bn2.weight, conv.bn2.bias, training=True)
        v = F.softplus(v + s)
    pooled = torch.stack([v[b.batch == g].mean(0) for g in range(b.num_graphs)])
    ref = m.fc_out(F.softplus(m.conv_to_fc(F.softplus(pooled))))
    assert torch.allclose(m(b), ref, atol=1e-10, rtol=0)


def test_defaults_are_the_references():
    from uae_dist.config import load_config

    cfg = load_config("finetune_cgcnn")
    mc = cfg.model
    assert (mc.features, mc.atom_fea_len, mc.n_conv, mc.h_fea_len, mc.n_h) == ("cgcnn92", 64, 3,
                                                                              128, 1)
    assert mc.graph() == {"cutoff": 8.0, "max_neighbors": 12}
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.data.max_structures) == \
        ("sgd", 0.01, 0.9, 256)
    m, _ = model("cgcnn")
    # the reference's CrystalGraphConvNet(92, 41) has 80,833 trainable parameters (1 target)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad) - (128 + 1)
    assert n == 80833


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lmdb(tmp_path_factory)


def _uae(tmp_path, dim=12):
    """A UAE export directory in the format of ``uae-dist export`` (atom_init.json + card)."""
    d = tmp_path / "uae"
    d.mkdir()
    rng = np.random.default_rng(5)
    (d / "atom_init.json").write_text(json.dumps(
        {str(z): rng.normal(size=dim).tolist() for z in range(1, 101)}))
    (d / "model_card.json").write_text(json.dumps({"format": "uae-dist UAE export",
                                                   "table_name": "test-uae"}))
    return d


OVR = ["model.cutoff=5.0", "model.atom_fea_len=16", "model.h_fea_len=16", "model.n_conv=2",
       "data.max_structures=16", "train.epochs=2", "train.ckpt_every_steps=2", "optim.lr=0.02"]


@pytest.mark.timeout(1500)
def test_two_rank_finetune_frozen_uae_and_resume(data, tmp_path):
    uae = _uae(tmp_path)
    ovr = OVR + [f"model.features=uae:{uae}"]
    ref = tmp_path / "ref"
    finetune("finetune_cgcnn", data, ref, ovr)
    m = json.loads((ref / "test_metrics.json").read_text())
    assert m["n_test"] > 0 and m["targets"]["e_form_per_atom"]["mae"] > 0
    w = final_weights(ref)
    want = torch.tensor(json.loads((uae / "atom_init.json").read_text())["8"])
    assert torch.equal(w["features.table"][7], want.float())  # frozen: unchanged
    out = tmp_path / "killed"
    kill_and_resume("finetune_cgcnn", data, out, ovr, kill_at=5)
    check_resume_equals(out, ref)
