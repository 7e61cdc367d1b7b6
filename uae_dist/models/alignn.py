"""ALIGNN (Choudhary & DeCost, npj Comput. Mater. 7, 185, 2021) on batched periodic graphs.

Graphs. The atom graph is the reference's k-nearest rule (jarvis ``nearest_neighbor_edges``,
``max_neighbors=12``, 8 Å): every atom's 12 nearest neighbours plus those tied with the 12th (the
loader's narrowing), made undirected — edge (i, j, s) brings (j, i, −s) — and deduplicated. The
line graph (the reference's ``g.line_graph(shared=True)``) has one node per directed bond and one
edge t = (e₁ → e₂) for every pair of bonds sharing an atom: e₁ = (b → a) and e₂ whose neighbour is
b, i.e. the bonds b→a and b→c meet at b (backtracking pairs a = c included, as in DGL). Its
feature is cos θ_abc = r_ba · r_bc / (|r_ba| |r_bc|), from the edge vectors with their periodic
image shifts, so images are handled exactly. It is built in torch inside ``forward`` (sorted
segments, ``repeat_interleave``; no Python loops).

Layers (reference ``alignn/models/alignn.py`` defaults): atom features (CGCNN's 92-d table) →
MLP(92, 256); bond length → RBF(0..8 Å, 80) → MLP(80, 64) → MLP(64, 256); cos θ → RBF(−1..1, 40) →
MLP(40, 64) → MLP(64, 256) (MLP = Linear, BatchNorm, SiLU; RBF exp(−γ (x − μ)²) with γ = 1/Δμ,
the SchNet-style width the reference uses); 4 ALIGNN layers (an edge-gated convolution on the atom
graph, then one on the line graph updating the bond and angle features) and 4 edge-gated
convolutions on the atom graph; mean over atoms; Linear(256, T). The edge-gated convolution
(Dwivedi et al. 2020), for bond e = (j → i) with features y_e:

    m_e = A h_j + B h_i + C y_e;   σ_e = sigmoid(m_e)
    h_i ← h_i + SiLU(BN(U h_i + Σ_e σ_e ⊙ V h_j / (Σ_e σ_e + 1e-6)))
    y_e ← y_e + SiLU(BN(m_e))

Reference training defaults: AdamW lr 0.01, weight decay 0, batch 64, MSE, a one-cycle schedule
(cosine warm-up over 30 % of the steps), 300 epochs. Differences: the neighbour ties (as CGCNN);
no fallback to a larger cutoff for an atom with fewer than 12 neighbours within 8 Å (the stored
graphs stop at 8 Å); batch-norm running statistics averaged over ranks each step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from uae_dist.fields import bounded
from uae_dist.ops import scatter

from . import ModelConfig, register
from .common import GaussianExpansion, gather, geometry, sync_batchnorm_stats
from .featurizers import AtomFeatures, lr_scale


@dataclass
class ALIGNNConfig(ModelConfig):
    name: str = "alignn"
    features: str = "cgcnn92"          # atom features (the reference's atom_features="cgcnn")
    features_trainable: bool = False
    features_lr_scale: float = bounded(1.0, ge=0)
    features_standardize: bool = False
    alignn_layers: int = bounded(4, ge=0)
    gcn_layers: int = bounded(4, ge=0)
    edge_input_features: int = bounded(80, ge=2)     # RBF bins of the bond length, 0..cutoff
    triplet_input_features: int = bounded(40, ge=2)  # RBF bins of cos θ, -1..1
    embedding_features: int = bounded(64, ge=1)
    hidden_features: int = bounded(256, ge=1)
    cutoff: float = bounded(8.0, gt=0)
    max_neighbors: int = bounded(12, ge=1)

    def graph(self) -> dict:
        return {"cutoff": self.cutoff, "max_neighbors": self.max_neighbors}


def mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.SiLU())


class RBF(GaussianExpansion):
    """The reference's RBFExpansion: ``bins`` centres from ``lo`` to ``hi``, γ = 1 / spacing."""

    def __init__(self, lo: float, hi: float, bins: int):
        super().__init__(lo, hi, bins, gamma=(bins - 1) / (hi - lo))


def undirected(ei: torch.Tensor, shift: torch.Tensor, vec: torch.Tensor, n: int,
               packed: bool | None = None):
    """Union of the edges and their reverses, deduplicated, sorted by centre.
    Returns ``(edge_index, vec)``; an edge's key is (i, j, shift), packed into one int64 when
    the sizes allow (``packed=None``: decide), else rows of ``torch.unique``."""
    i, j = ei
    i2, j2 = torch.cat([i, j]), torch.cat([j, i])
    s2 = torch.cat([shift, -shift])
    v2 = torch.cat([vec, -vec])
    if packed is None:
        packed = not len(s2) or (int(s2.abs().max()) <= 63 and n <= 2**21)
    if not packed:
        _, inv = torch.unique(torch.cat([i2[:, None], j2[:, None], s2], 1), dim=0,
                              return_inverse=True)
        key = inv
    else:  # one int64 per (i, j, shift): i, j below 2^21, each shift in 7 bits
        s = (s2 + 64).long()
        key = ((i2 * n + j2) << 21) | (s[:, 0] << 14) | (s[:, 1] << 7) | s[:, 2]
    first = _unique_first(key)
    return torch.stack([i2[first], j2[first]]), v2[first]


def _unique_first(key: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each key, in key order (deterministic)."""
    order = torch.argsort(key, stable=True)
    k = key[order]
    new = torch.ones_like(k, dtype=torch.bool)
    new[1:] = k[1:] != k[:-1]
    return order[new]


def line_graph(ei: torch.Tensor, vec: torch.Tensor, n: int):
    """Bond pairs sharing an atom: ``(src, dst, cos)`` of the line graph, sorted by ``dst``.

    Edge e = (centre i, neighbour j) with ``vec`` r = x_j − x_i. For each e₂ = (c, b) and every
    e₁ = (b, a) (the bonds of b, a contiguous block as edges are sorted by centre): t = (e₁ → e₂),
    cos θ at b between r_ba = vec[e₁] and r_bc = −vec[e₂]."""
    i, j = ei
    deg = torch.bincount(i, minlength=n)
    ptr = torch.cumsum(deg, 0) - deg
    counts = deg[j]                          # bonds of each e₂'s neighbour b
    dst = torch.repeat_interleave(torch.arange(len(j), device=j.device), counts)
    start = torch.cumsum(counts, 0) - counts
    src = ptr[j[dst]] + torch.arange(len(dst), device=j.device) - start[dst]
    r1, r2 = vec[src], -vec[dst]
    cos = (r1 * r2).sum(-1) / (r1.norm(dim=-1) * r2.norm(dim=-1))
    return src, dst, cos.clamp(-1.0, 1.0)


class EdgeGatedGraphConv(nn.Module):
    """Edge-gated convolution over edges ``(src → dst)`` sorted by ``dst`` (see module doc)."""

    def __init__(self, d: int):
        super().__init__()
        self.src_gate, self.dst_gate, self.edge_gate = (nn.Linear(d, d) for _ in range(3))
        self.src_update, self.dst_update = nn.Linear(d, d), nn.Linear(d, d)
        self.bn_edges, self.bn_nodes = nn.BatchNorm1d(d), nn.BatchNorm1d(d)

    def forward(self, src, dst, h, y):
        n = h.shape[0]
        m = gather(self.src_gate(h), src) + gather(self.dst_gate(h), dst, True)
        m = m.add_(self.edge_gate(y))
        sigma = torch.sigmoid(m)
        num = scatter(sigma * gather(self.dst_update(h), src), dst, n, "sum", sorted=True)
        den = scatter(sigma, dst, n, "sum", sorted=True)
        x = self.src_update(h) + num / (den + 1e-6)
        return h + F.silu(self.bn_nodes(x)), y + F.silu(self.bn_edges(m))


class ALIGNN(nn.Module):
    """``forward(batch)`` → (B, T) predictions in normalised units."""

    def __init__(self, cfg: ALIGNNConfig, targets: list[str]):
        super().__init__()
        self.targets = list(targets)
        self.cutoff = cfg.cutoff
        d, emb = cfg.hidden_features, cfg.embedding_features
        self.features = AtomFeatures(cfg.features, 92, cfg.features_trainable,
                                     cfg.features_standardize)
        self.lr_scale = lr_scale(cfg.features_trainable, cfg.features_lr_scale)
        self.atom_embedding = mlp(self.features.dim, d)
        self.bond_rbf = RBF(0.0, cfg.cutoff, cfg.edge_input_features)
        self.edge_embedding = nn.Sequential(mlp(cfg.edge_input_features, emb), mlp(emb, d))
        self.angle_rbf = RBF(-1.0, 1.0, cfg.triplet_input_features)
        self.angle_embedding = nn.Sequential(mlp(cfg.triplet_input_features, emb), mlp(emb, d))
        self.alignn = nn.ModuleList(nn.ModuleList([EdgeGatedGraphConv(d), EdgeGatedGraphConv(d)])
                                    for _ in range(cfg.alignn_layers))
        self.gcn = nn.ModuleList(EdgeGatedGraphConv(d) for _ in range(cfg.gcn_layers))
        self.fc = nn.Linear(d, len(self.targets))

    def element_embedding(self) -> torch.Tensor:
        """(100, hidden): the atom embedding MLP of each element's row (eval-mode batch norm)."""
        was = self.atom_embedding.training
        self.atom_embedding.eval()
        w = self.atom_embedding[0].weight
        with torch.no_grad():
            out = self.atom_embedding(self.features.table.to(w.dtype))
        self.atom_embedding.train(was)
        return out

    def graphs(self, data):
        """Atom graph (edges sorted by centre, vectors) and line graph of a batch."""
        ei, shift, vec, _, batch, n_graphs = geometry(data, self.cutoff)
        n = data.z.shape[0]
        ei, vec = undirected(ei, shift, vec, n)
        return ei, vec, line_graph(ei, vec, n), batch, n_graphs

    def forward(self, data) -> torch.Tensor:
        dtype = self.fc.weight.dtype
        ei, vec, (t_src, t_dst, cos), batch, n_graphs = self.graphs(data)
        src, dst = ei[1], ei[0]  # bond (centre i, neighbour j) is the message j → i
        x = self.atom_embedding(self.features(data.z).to(dtype))
        y = self.edge_embedding(self.bond_rbf(vec.norm(dim=-1)).to(dtype))
        z = self.angle_embedding(self.angle_rbf(cos).to(dtype))
        for node_conv, edge_conv in self.alignn:
            x, m = node_conv(src, dst, x, y)
            y, z = edge_conv(t_src, t_dst, m, z)
        for conv in self.gcn:
            x, y = conv(src, dst, x, y)
        if self.training:
            sync_batchnorm_stats(self)
        return self.fc(scatter(x, batch, n_graphs, "mean"))


@register("alignn", ALIGNNConfig)
def _build(cfg: ALIGNNConfig, targets) -> ALIGNN:
    return ALIGNN(cfg, targets)
