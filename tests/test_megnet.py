"""MEGNet: matgl's architecture, invariances, overfitting, a 2-rank DeepSpeed fine-tune whose UAE
initialises the (trained) element embedding, kill-and-resume."""
import json

import numpy as np
import pytest
import torch

from _backbone_checks import (one_thread,  # noqa: F401
                              batch, check_invariance, check_overfit, check_resume_equals,
                              crystals, final_weights, finetune, kill_and_resume, model)
from _train_fixtures import tiny_lmdb

pytestmark = pytest.mark.timeout(300)


def test_shape_and_invariance():
    check_invariance("megnet")
    check_invariance("megnet", features="megnet16", nblocks=2, dropout=0.1)


def test_overfits_a_tiny_batch():
    check_overfit("megnet")


def _copy_matgl_weights(ref, ours) -> None:
    """matgl's MEGNet weights into ours: same layers, φ_e's first weight split into its
    [v_i | v_j] (per atom) and [e | u] blocks, embedding rows moved from element_types to Z."""
    from uae_dist.elements import SYMBOLS

    sd = ref.state_dict()
    own = ours.state_dict()
    new = {}
    table = own["features.table"].clone()
    for k, sym in enumerate(ref.element_types):
        table[SYMBOLS.index(sym)] = sd["embedding.layer_node_embedding.weight"][k]
    new["features.table"] = table
    for key, val in sd.items():
        if key.startswith(("embedding.", "bond_expansion.")):
            continue
        name = key.replace(".layers.", ".")
        if ".conv.edge_func.0." in name:  # Linear(128, 64) on [v_i, v_j, e, u]
            base = name.split(".conv.")[0] + ".conv."
            if key.endswith("weight"):
                w = val
                new[base + "edge_atoms.weight"] = torch.cat([w[:, :32], w[:, 32:64]])
                new[base + "edge_rest.weight"] = w[:, 64:]
            else:
                new[base + "edge_rest.bias"] = val
            continue
        name = name.replace(".conv.edge_func.", ".conv.edge_mlp.1.")
        name = name.replace(".conv.node_func.", ".conv.node_mlp.")
        name = name.replace(".conv.state_func.", ".conv.state_mlp.")
        for k in ("edge", "node", "state"):
            name = name.replace(f".{k}_func.", f".dense.{('edge', 'node', 'state').index(k)}.")
        new[name] = val
    # edge_mlp.1 is mlp(conv) = Linear(64, 64), act, Linear(64, 32): matgl's layers 2 and 4
    fixed = {}
    for k, v in new.items():
        if ".edge_mlp.1." in k:
            layer = int(k.split(".edge_mlp.1.")[1].split(".")[0])
            k = k.replace(f".edge_mlp.1.{layer}.", f".edge_mlp.1.{layer - 2}.")
        fixed[k] = v
    missing = set(own) - set(fixed)
    assert not missing, missing
    ours.load_state_dict({k: v.to(own[k].dtype) for k, v in fixed.items()})


def test_same_function_as_matgl():
    """With matgl 4.1.2's weights copied in, our MEGNet predicts what matgl's does on its own
    graph of the same structures (the same function, not only the same parameter count)."""
    matgl = pytest.importorskip("matgl")
    from matgl.ext.pymatgen import Structure2Graph
    from matgl.models import MEGNet as RefMEGNet
    from pymatgen.core import Lattice, Structure

    torch.manual_seed(1)
    ref = RefMEGNet().eval()  # matgl runs in float32 (matgl.float_th)
    ours, cfg = model("megnet")
    ours.output_proj[-1] = torch.nn.Linear(16, 1)  # one target, as matgl's
    ours = ours.float().eval()
    _copy_matgl_weights(ref, ours)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    n_ours = sum(p.numel() for p in ours.parameters()) - 11 * 16  # 100 rows vs 89 types
    assert n_ours == n_ref
    conv = Structure2Graph(element_types=ref.element_types, cutoff=4.0)
    for z, pos, cell in crystals(3, seed=4):
        st = Structure(Lattice(cell), z, pos, coords_are_cartesian=True)
        g, lat, state = conv.get_graph(st)
        g.pbc_offshift = torch.matmul(g.pbc_offset, lat[0])
        g.pos = g.frac_coords @ lat[0]
        with torch.no_grad():
            want = ref(g=g, state_attr=torch.tensor(state, dtype=matgl.float_th))
            got = ours(batch(cfg, [(z, pos, cell)]))
        assert torch.allclose(got.view(-1).double(), want.view(-1).double(), atol=1e-5), (got, want)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lmdb(tmp_path_factory)


OVR = ["data.max_structures=16", "train.epochs=2", "train.ckpt_every_steps=2",
       "model.hidden_conv=[16,16,32]", "model.features_lr_scale=5.0"]


@pytest.mark.timeout(1500)
def test_two_rank_finetune_trained_uae_and_resume(data, tmp_path):
    uae = tmp_path / "uae"
    uae.mkdir()
    rows = np.random.default_rng(3).normal(size=(100, 8))
    (uae / "atom_init.json").write_text(json.dumps({str(z + 1): rows[z].tolist()
                                                    for z in range(100)}))
    ovr = OVR + [f"model.features=uae:{uae}"]
    ref = tmp_path / "ref"
    finetune("finetune_megnet", data, ref, ovr)
    table = final_weights(ref)["features.table"]
    assert table.shape == (100, 8)
    z_seen = torch.tensor([8, 3])  # O and Li occur in the first MP records
    moved = (table[z_seen - 1] - torch.tensor(rows, dtype=torch.float32)[z_seen - 1]).abs()
    assert moved.max() > 1e-4  # fine-tuned: the rows of elements in the data changed
    assert torch.equal(table[99], torch.tensor(rows[99], dtype=torch.float32))  # Fm: never seen
    out = tmp_path / "killed"
    kill_and_resume("finetune_megnet", data, out, ovr, kill_at=5)
    check_resume_equals(out, ref)
