"""The exported table drives the peers: CGCNN's atom_init.json contract, alignn through
jarvis.core.specie, matgl's MEGNet embedding rows in element_types order."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from uae_dist import interop
from uae_dist.elements import SYMBOLS
from uae_dist.tables import load_table


@pytest.fixture
def uae(tmp_path):
    """An export directory as ``uae-dist export`` writes it: atom_init.json without the
    untrained rows, which the model card lists."""
    d = tmp_path / "uae"
    d.mkdir()
    rows = np.random.default_rng(0).normal(size=(100, 6))
    unseen = ["Fm", "Es"]
    (d / "atom_init.json").write_text(json.dumps(
        {str(z + 1): rows[z].tolist() for z in range(100) if SYMBOLS[z] not in unseen}))
    (d / "model_card.json").write_text(json.dumps({"format": "uae-dist UAE export",
                                                   "elements_unseen": unseen}))
    return d, rows


def test_cgcnn_atom_init_contract(uae, tmp_path):
    """What the reference's AtomCustomJSONInitializer does with the file: keys int(key), values
    np.array(value, dtype=float), one length (its orig_atom_fea_len)."""
    d, rows = uae
    path = interop.write_atom_init(f"uae:{d}", tmp_path / "atom_init.json")
    raw = json.loads(path.read_text())
    assert all(isinstance(k, str) and k.isdigit() for k in raw)
    emb = {int(k): np.array(v, dtype=float) for k, v in raw.items()}
    assert {len(v) for v in emb.values()} == {6}
    assert 100 not in emb and 99 not in emb  # untrained rows left out: a KeyError, not noise
    assert np.allclose(emb[8], rows[7], atol=1e-6)
    with pytest.raises(ValueError, match="Fm"):
        interop.write_atom_init(f"uae:{d}", tmp_path / "x.json", elements=["O", "Fm"])
    # the 92-d table reproduces CGCNN's own file bit for bit (same keys, same lists)
    cg = interop.atom_init_dict("cgcnn92")
    assert len(cg) == 100 and {len(v) for v in cg.values()} == {92}
    ref = os.environ.get("UAE_CGCNN_REF")  # a checkout of txie-93/cgcnn, if one is at hand
    if ref and (Path(ref) / "cgcnn" / "data.py").exists():
        import sys

        sys.path.insert(0, ref)
        from cgcnn.data import AtomCustomJSONInitializer

        ari = AtomCustomJSONInitializer(str(path))
        assert np.allclose(ari.get_atom_fea(8), rows[7], atol=1e-6)
        want = json.loads((Path(ref) / "data/sample-regression/atom_init.json").read_text())
        assert want == cg


def test_alignn_reads_the_table_through_jarvis(uae, tmp_path):
    pytest.importorskip("alignn")
    import jarvis.core.specie as specie
    from jarvis.core.atoms import Atoms

    d, rows = uae
    try:
        width = interop.use_table_in_alignn(f"uae:{d}", tmp_path / "atom_init.json",
                                            elements=["O", "Ti", "Sr"])
        assert width == 6
        assert np.allclose(specie.get_node_attributes("O", atom_features="cgcnn"), rows[7])
        from alignn.torch_graph_builder import build_pure_torch_graph

        atoms = Atoms(lattice_mat=np.eye(3) * 3.9, coords=[[0, 0, 0], [0.5, 0.5, 0.5],
                                                          [0.5, 0.5, 0], [0.5, 0, 0.5],
                                                          [0, 0.5, 0.5]],
                      elements=["Sr", "Ti", "O", "O", "O"], cartesian=False)
        g, lg = build_pure_torch_graph(atoms, two_body_cutoff=8.0, max_neighbors=12)
        feats = g.ndata["atom_features"]
        assert feats.shape == (5, width)
        assert torch.allclose(feats[2].double(), torch.tensor(rows[7]), atol=1e-6)
        from alignn.models.alignn_atomwise_pure import (ALIGNNAtomWisePure,
                                                        ALIGNNAtomWisePureConfig)

        m = ALIGNNAtomWisePure(ALIGNNAtomWisePureConfig(
            name="alignn_atomwise_pure", atom_input_features=width, calculate_gradient=False,
            alignn_layers=1, gcn_layers=1, hidden_features=16, embedding_features=8))
        out = m((g, lg, torch.tensor(atoms.lattice_mat, dtype=torch.float32)))
        assert torch.isfinite(out["out"]).all()
        with pytest.raises(ValueError, match="Fm"):
            interop.use_table_in_alignn(f"uae:{d}", elements=["Fm"])
    finally:
        interop.reset_alignn_table()
    assert len(specie.get_node_attributes("O", atom_features="cgcnn")) == 92


@pytest.mark.parametrize("trainable", [True, False])
def test_matgl_megnet_takes_rows_in_element_types_order(uae, trainable):
    pytest.importorskip("matgl")
    from matgl.models import MEGNet

    d, rows = uae
    t = load_table(f"uae:{d}")
    types = ("Ti", "O", "Sr", "Fm")  # not Z order
    m = MEGNet(element_types=types, dim_node_embedding=t.dim)
    kept = interop.load_into_megnet(m, t, trainable=trainable)
    w = m.embedding.layer_node_embedding.weight
    assert kept == ["Fm"]  # untrained in the export: left at matgl's initial row
    for k, sym in enumerate(types[:3]):
        assert torch.allclose(w[k].double(), torch.tensor(rows[SYMBOLS.index(sym)]), atol=1e-6)
    assert w.requires_grad == trainable
    with pytest.raises(ValueError, match="dim_node_embedding=6"):
        interop.load_into_megnet(MEGNet(element_types=types), t)
