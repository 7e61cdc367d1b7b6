"""Invariances of the periodic CrystalTransformer (float64) and the lack of them in the paper variant."""
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from uae_dist.models import build_model
from uae_dist.models.crystal_transformer import CrystalTransformerConfig as ModelConfig
from uae_dist.ops import neighbor_list_numpy

CUTOFF = 4.5
pytestmark = pytest.mark.timeout(120)


def graph(z, pos, cell, cutoff=CUTOFF + 0.5):
    i, j, s = neighbor_list_numpy(pos, cell, [True] * 3, cutoff)
    return Data(z=torch.tensor(z), pos=torch.tensor(pos, dtype=torch.float64),
                cell=torch.tensor(cell, dtype=torch.float64)[None], edge_index=torch.from_numpy(np.stack([i, j])),
                shift=torch.from_numpy(s), num_nodes=len(z))


def crystal(seed=0):
    rng = np.random.default_rng(seed)
    cell = np.array([[3.9, 0.1, 0.0], [0.3, 4.2, 0.0], [0.2, -0.4, 4.6]])
    frac = rng.random((4, 3))
    return [8, 22, 38, 8], frac @ cell, cell


def model(variant="periodic", size="tiny"):
    torch.manual_seed(0)
    if size == "default":  # the paper-size defaults of ModelConfig (8 layers, 8 heads, 256, FFN 512)
        mc = ModelConfig(variant=variant, cutoff=CUTOFF)
    else:
        mc = ModelConfig(variant=variant, emb_dim=16, d_model=32, layers=2, heads=4, ffn_dim=64, dropout=0.0,
                         cutoff=CUTOFF, n_rbf=16)
    return build_model(mc, ["a", "b"]).double().eval()


def predict(m, graphs):
    with torch.no_grad():
        return m(Batch.from_data_list(graphs))


def transforms(z, pos, cell):
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    yield "rotation", graph(z, pos @ q.T, cell @ q.T)
    yield "translation", graph(z, pos + np.array([0.7, -1.3, 2.1]), cell)
    perm = rng.permutation(len(z))
    yield "permutation", graph([z[k] for k in perm], pos[perm], cell)
    yield "supercell", graph(z + z, np.concatenate([pos, pos + cell[0]]), cell * np.array([[2.0], [1.0], [1.0]]))


@pytest.mark.parametrize("size", ["tiny", "default"])
def test_periodic_variant_is_invariant(size):
    m = model(size=size)
    z, pos, cell = crystal()
    ref = predict(m, [graph(z, pos, cell)])
    for name, g in transforms(z, pos, cell):
        out = predict(m, [g])
        # float64: the real error is ~1e-16; 1e-12 leaves room for summation order only
        assert torch.allclose(out, ref, atol=1e-12, rtol=0), (name, out, ref)
    # batching does not mix crystals
    z2, pos2, cell2 = crystal(3)
    both = predict(m, [graph(z, pos, cell), graph(z2, pos2, cell2)])
    assert torch.allclose(both[0], ref[0], atol=1e-10)


def test_paper_variant_is_not_invariant():
    m = model("paper", "default")
    z, pos, cell = crystal()
    ref = predict(m, [graph(z, pos, cell)])
    diffs = {name: (predict(m, [g]) - ref).abs().max().item() for name, g in transforms(z, pos, cell)}
    for name in ("rotation", "translation", "supercell"):
        assert diffs[name] > 1e-4, diffs


def test_continuity_at_cutoff():
    """An atom crossing the model cutoff changes the output continuously (envelope)."""
    m = model()
    cell = np.eye(3) * 20.0
    outs = []
    for d in (CUTOFF - 1e-4, CUTOFF + 1e-4):
        outs.append(predict(m, [graph([14, 8], np.array([[1.0, 1, 1], [1.0 + d, 1, 1]]), cell, cutoff=CUTOFF + 1)]))
    assert (outs[0] - outs[1]).abs().max() < 1e-3


def test_element_embedding_shapes():
    for variant in ("periodic", "paper"):
        e = model(variant).element_embedding()
        assert e.shape == (100, 16)


def test_paper_variant_uae_is_the_vector_it_feeds_forward():
    """Linear(100, d) on one-hot(Z) feeds W[:, Z-1] + b forward: that, not W^T, is the table."""
    m = model("paper").float()
    onehot = torch.nn.functional.one_hot(torch.arange(100), 100).float()
    assert torch.allclose(m.element_embedding(), m.atom(onehot), atol=1e-6)
    assert not torch.allclose(m.element_embedding(), m.atom.weight.detach().t(), atol=1e-3)


def test_activation_checkpointing_same_gradients_less_saved_memory():
    """model.checkpoint_activations recomputes each block in backward: identical gradients, and
    autograd keeps far fewer bytes of activations (measured with saved-tensor hooks)."""
    from uae_dist.models.crystal_transformer import CrystalTransformerConfig

    z, pos, cell = crystal()
    batch = Batch.from_data_list([graph(z, pos, cell), graph(*crystal(3))])
    grads, saved = [], []
    for ck in (False, True):
        torch.manual_seed(0)
        mc = CrystalTransformerConfig(emb_dim=16, d_model=32, layers=3, heads=4, ffn_dim=64,
                                      dropout=0.0, cutoff=CUTOFF, n_rbf=16, checkpoint_activations=ck)
        m = build_model(mc, ["a"]).double()
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m(batch).sum()
        out.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        saved.append(total[0])
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(*grads))
    assert saved[1] < 0.5 * saved[0], saved
