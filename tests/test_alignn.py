"""ALIGNN: the undirected k-nearest graph and its line graph (periodic images), invariances,
overfitting, a 2-rank DeepSpeed fine-tune and kill-and-resume."""
import numpy as np
import pytest
import torch

from _backbone_checks import (one_thread,  # noqa: F401
                              batch, check_invariance, check_overfit, check_resume_equals,
                              crystals, finetune, kill_and_resume, model)
from _train_fixtures import tiny_lmdb
from uae_dist.models.alignn import undirected

pytestmark = pytest.mark.timeout(300)
SMALL = dict(hidden_features=16, embedding_features=8, alignn_layers=1, gcn_layers=1)


def test_shape_and_invariance():
    check_invariance("alignn", **SMALL)
    check_invariance("alignn", atol=1e-11)  # the reference size: 4 + 4 layers, 256 wide


def test_overfits_a_tiny_batch():
    check_overfit("alignn", lr=1e-2, **SMALL)


def test_blind_to_the_geometry_of_one_element_cells_as_the_reference():
    """The gated update averages V h_j over neighbours with σ-normalised weights: when every atom
    starts with the same features (one element) they stay equal, so two different Na cells give
    the same prediction — a property of the published architecture, reproduced; CGCNN's
    unnormalised sum sees the difference."""
    rng = np.random.default_rng(7)
    cells = [np.diag(rng.uniform(3.6, 4.6, 3)) for _ in range(2)]
    items = [([11, 11], rng.random((2, 3)) @ c, c) for c in cells]
    for name, same in (("alignn", True), ("cgcnn", False)):
        m, cfg = model(name, **(SMALL if name == "alignn" else {}))
        with torch.no_grad():
            out = m.eval()(batch(cfg, items))
        assert torch.allclose(out[0], out[1], atol=1e-12) == same, name


def _graphs(seed=0):
    m, cfg = model("alignn", **SMALL)
    b = batch(cfg, crystals(3, seed))
    ei, vec, lg, _, _ = m.graphs(b)
    return b, ei, vec, lg


def test_graph_is_undirected_and_unique():
    b, ei, vec, _ = _graphs()
    pos, cell = b.pos, b.cell
    keys = {}
    for e in range(ei.shape[1]):
        i, j = ei[:, e].tolist()
        shift = np.linalg.solve(cell[b.batch[i]].numpy().T,
                                (vec[e] - pos[j] + pos[i]).numpy()).round().astype(int)
        keys[(i, j, tuple(shift))] = e
    assert len(keys) == ei.shape[1]  # no duplicates
    for (i, j, s) in keys:
        assert (j, i, tuple(-np.array(s))) in keys  # every bond has its reverse
    assert bool((ei[0, 1:] >= ei[0, :-1]).all())  # sorted by centre
    n_knn = b.edge_index.shape[1]
    assert n_knn < ei.shape[1] <= 2 * n_knn


def test_line_graph_is_every_bond_pair_at_an_atom():
    """Brute force over all bond pairs: t = (e1 -> e2) when e1's centre is e2's neighbour; the
    angle at that atom between its bond e1 and the reversed e2 (periodic images included)."""
    _, ei, vec, (src, dst, cos) = _graphs(1)
    i, j = ei.tolist()
    want = {}
    for e2 in range(len(i)):
        for e1 in range(len(i)):
            if i[e1] == j[e2]:
                r1, r2 = vec[e1], -vec[e2]
                want[(e1, e2)] = float(r1 @ r2 / (r1.norm() * r2.norm()))
    got = {(a, b): c for a, b, c in zip(src.tolist(), dst.tolist(), cos.tolist())}
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) < 1e-12
    assert bool((dst[1:] >= dst[:-1]).all())
    # backtracking pairs (a -> b -> a) have cos = 1, as in DGL's line_graph(backtracking=True)
    assert any(abs(c - 1) < 1e-12 for c in want.values())


def test_undirected_key_fallback_agrees():
    """The packed-int64 dedup key and torch.unique over rows give the same graph."""
    b, _, _, _ = _graphs()
    vec = torch.randn(b.edge_index.shape[1], 3, dtype=torch.float64)
    a = undirected(b.edge_index, b.shift, vec, b.num_nodes, packed=True)
    c = undirected(b.edge_index, b.shift, vec, b.num_nodes, packed=False)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lmdb(tmp_path_factory)


OVR = ["model.cutoff=5.0", "model.hidden_features=16", "model.embedding_features=8",
       "model.alignn_layers=1", "model.gcn_layers=1", "model.edge_input_features=16",
       "model.triplet_input_features=8", "data.max_structures=16", "train.epochs=2",
       "train.ckpt_every_steps=2", "optim.warmup_steps=2", "optim.lr=0.003"]


@pytest.mark.timeout(1500)
def test_two_rank_finetune_and_resume(data, tmp_path):
    ref = tmp_path / "ref"
    finetune("finetune_alignn", data, ref, OVR)
    assert (ref / "predictions_test.csv").exists()
    out = tmp_path / "killed"
    kill_and_resume("finetune_alignn", data, out, OVR, kill_at=5)
    check_resume_equals(out, ref)
