"""MEGNet (Chen, Ye, Zuo, Zheng & Ong, Chem. Mater. 31, 3564, 2019), as matgl's torch port.

Graph: every neighbour image within 4 Å (matgl's ``cutoff=4.0``; the loader narrows the stored
8 Å graphs); bond lengths expanded on 100 Gaussians exp(−0.5 (d − μ)²), μ = 0..5 Å (matgl's
``BondExpansion(final=cutoff + 1, num_centers=100, width=0.5)``); the state is matgl's default
[0, 0] per crystal.

Blocks (matgl defaults): node embedding 16 → MLP(16, 64, 32), edges MLP(100, 64, 32), state
MLP(2, 64, 32) (softplus2 = softplus − ln 2 after every layer); 3 MEGNet blocks, the first without
and the others with a dense MLP(32, 64, 32) on e, v, u before the graph convolution, each with a
skip connection around it:

    e_ij ← φ_e(v_i ‖ v_j ‖ e_ij ‖ u)            φ = MLP(·, 64, 64, 32)
    v_i  ← φ_v(v_i ‖ mean_j e_ij ‖ u)
    u    ← φ_u(u ‖ mean_{ij} e_ij ‖ mean_i v_i)

then Set2Set (2 iterations, 1 LSTM layer) over the atoms and over the bonds of each crystal,
[q*_v ‖ q*_e ‖ u] (160) → MLP(160, 32, 16, T). Bond (i, j) here is the message aggregated at its
centre i; the ``[v_i ‖ v_j]`` blocks of φ_e's first weight are computed once per atom.

Element embedding: ``model.features: learned`` (default) is a trained 16-d table drawn N(0, 1) as
``nn.Embedding`` is; any other table (a UAE, ``megnet16``, …) *initialises* it, trained unless
``features_trainable=false``, and its width replaces 16. Reference training (matgl
``ModelLightningModule``): Adam lr 1e-3, MSE, cosine decay to 1e-5 over ``decay_steps=1000``
(stepped per epoch by Lightning: about constant for short runs; our config: constant), batch 128.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from uae_dist.fields import bounded
from uae_dist.ops import scatter, segment_softmax

from . import ModelConfig, register
from .common import GaussianExpansion, gather, geometry, softplus_shifted
from .featurizers import AtomFeatures, lr_scale


@dataclass
class MEGNetConfig(ModelConfig):
    name: str = "megnet"
    features: str = "learned"          # learned 16-d embedding, or a table that initialises it
    features_dim: int = bounded(16, ge=1)  # width of "learned" and "random"
    features_trainable: bool = True
    features_lr_scale: float = bounded(1.0, ge=0)
    features_standardize: bool = False
    cutoff: float = bounded(4.0, gt=0)    # Å
    n_rbf: int = bounded(100, ge=2)       # Gaussian centres from 0 to cutoff + 1 Å
    rbf_gamma: float = bounded(0.5, gt=0)  # exp(-γ (d - μ)²)
    nblocks: int = bounded(3, ge=1)
    hidden_input: list[int] = field(default_factory=lambda: [64, 32])
    hidden_conv: list[int] = field(default_factory=lambda: [64, 64, 32])
    hidden_output: list[int] = field(default_factory=lambda: [32, 16])
    niters_set2set: int = bounded(2, ge=1)
    nlayers_set2set: int = bounded(1, ge=1)
    dropout: float = bounded(0.0, ge=0, lt=1)

    def graph(self) -> dict:
        return {"cutoff": self.cutoff}

    def check(self) -> None:
        for key in ("hidden_input", "hidden_conv", "hidden_output"):
            v = getattr(self, key)
            if not v or min(v) < 1:
                raise ValueError(f"model.{key}={v}: a non-empty list of positive widths")
        if self.hidden_conv[-1] != self.hidden_input[-1]:
            raise ValueError(f"model.hidden_conv[-1]={self.hidden_conv[-1]} must equal "
                             f"model.hidden_input[-1]={self.hidden_input[-1]} (skip connections)")


class SoftPlus2(nn.Module):
    def forward(self, x):
        return softplus_shifted(x)


def mlp(dims, activate_last: bool = True) -> nn.Sequential:
    """matgl's MLP: Linear layers, softplus2 between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(dims) - 2 or activate_last:
            layers.append(SoftPlus2())
    return nn.Sequential(*layers)


class MEGNetConv(nn.Module):
    """Edge, node and state updates of one block (module doc), on edges sorted by centre."""

    def __init__(self, d: int, conv: list[int]):
        super().__init__()
        self.d = d
        self.edge_atoms = nn.Linear(d, 2 * conv[0], bias=False)  # v_i, v_j blocks of φ_e
        self.edge_rest = nn.Linear(2 * d, conv[0])                # e_ij, u blocks (+ bias)
        self.edge_mlp = nn.Sequential(SoftPlus2(), mlp(conv))
        self.node_mlp = mlp([conv[-1] + 2 * d, *conv])
        self.state_mlp = mlp([2 * conv[-1] + d, *conv])

    def forward(self, e, v, u, i, j, batch, edge_batch, n_graphs):
        n = v.shape[0]
        a_i, a_j = self.edge_atoms(v).chunk(2, dim=-1)
        z = gather(a_i, i, True) + gather(a_j, j)
        e = self.edge_mlp(z.add_(self.edge_rest(torch.cat([e, gather(u, edge_batch, True)], -1))))
        v = self.node_mlp(torch.cat([v, scatter(e, i, n, "mean", sorted=True),
                                     gather(u, batch, True)], -1))
        u = self.state_mlp(torch.cat([u, scatter(e, edge_batch, n_graphs, "mean", sorted=True),
                                      scatter(v, batch, n_graphs, "mean", sorted=True)], -1))
        return e, v, u


class MEGNetBlock(nn.Module):
    def __init__(self, d: int, dense: list[int] | None, conv: list[int], dropout: float):
        super().__init__()
        self.dense = nn.ModuleList(mlp(dense) for _ in range(3)) if dense else None
        self.conv = MEGNetConv(d, conv)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, e, v, u, *graph):
        e0, v0, u0 = e, v, u
        if self.dense is not None:
            e, v, u = self.dense[0](e), self.dense[1](v), self.dense[2](u)
        e, v, u = self.conv(e, v, u, *graph)
        return e0 + self.drop(e), v0 + self.drop(v), u0 + self.drop(u)


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals et al. 2016) of rows ``x`` grouped by a sorted ``index``."""

    def __init__(self, d: int, n_iters: int, n_layers: int):
        super().__init__()
        self.d, self.n_iters, self.n_layers = d, n_iters, n_layers
        self.lstm = nn.LSTM(2 * d, d, n_layers)

    def forward(self, x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
        h = (x.new_zeros(self.n_layers, n, self.d), x.new_zeros(self.n_layers, n, self.d))
        q_star = x.new_zeros(n, 2 * self.d)
        for _ in range(self.n_iters):
            q, h = self.lstm(q_star.unsqueeze(0), h)
            q = q.view(n, self.d)
            alpha = segment_softmax((x * gather(q, index, True)).sum(-1, keepdim=True), index, n,
                                    sorted=True)
            q_star = torch.cat([q, scatter(alpha * x, index, n, "sum", sorted=True)], -1)
        return q_star


class MEGNet(nn.Module):
    """``forward(batch)`` → (B, T) predictions in normalised units."""

    def __init__(self, cfg: MEGNetConfig, targets: list[str]):
        super().__init__()
        self.targets = list(targets)
        self.cutoff = cfg.cutoff
        self.features = AtomFeatures(cfg.features, cfg.features_dim, cfg.features_trainable,
                                     cfg.features_standardize)
        self.lr_scale = lr_scale(cfg.features_trainable, cfg.features_lr_scale)
        self.rbf = GaussianExpansion(0.0, cfg.cutoff + 1.0, cfg.n_rbf, cfg.rbf_gamma)
        hin, d = cfg.hidden_input, cfg.hidden_input[-1]
        self.node_encoder = mlp([self.features.dim, *hin])
        self.edge_encoder = mlp([cfg.n_rbf, *hin])
        self.state_encoder = mlp([2, *hin])
        self.blocks = nn.ModuleList(
            MEGNetBlock(d, None if k == 0 else [d, *hin], cfg.hidden_conv, cfg.dropout)
            for k in range(cfg.nblocks))
        self.node_s2s = Set2Set(d, cfg.niters_set2set, cfg.nlayers_set2set)
        self.edge_s2s = Set2Set(d, cfg.niters_set2set, cfg.nlayers_set2set)
        self.output_proj = mlp([5 * d, *cfg.hidden_output, len(self.targets)],
                               activate_last=False)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def element_embedding(self) -> torch.Tensor:
        """(100, features_dim): the element embedding (row Z - 1)."""
        return self.features.table.detach()

    def forward(self, data) -> torch.Tensor:
        dtype = self.output_proj[0].weight.dtype
        ei, _, _, d, batch, n_graphs = geometry(data, self.cutoff)
        i, j = ei[0], ei[1]
        edge_batch = batch[i]
        v = self.node_encoder(self.features(data.z).to(dtype))
        e = self.edge_encoder(self.rbf(d).to(dtype))
        u = self.state_encoder(v.new_zeros(n_graphs, 2))
        for block in self.blocks:
            e, v, u = block(e, v, u, i, j, batch, edge_batch, n_graphs)
        vec = torch.cat([self.node_s2s(v, batch, n_graphs),
                         self.edge_s2s(e, edge_batch, n_graphs), u], -1)
        return self.output_proj(self.drop(vec))


@register("megnet", MEGNetConfig)
def _build(cfg: MEGNetConfig, targets) -> MEGNet:
    return MEGNet(cfg, targets)
