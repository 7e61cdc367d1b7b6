"""CGCNN (Xie & Grossman, PRL 120, 145301, 2018) on batched periodic graphs.

For an edge e = (i, j, image) of length d_e, with atom vectors v (N, F) and the Gaussian
expansion u_e = exp(-(d_e - μ_k)² / σ²), μ_k = 0, 0.2, …, 8 Å (41 centres), σ = 0.2 Å,

    z_e = BN₁(W [v_i ‖ v_j ‖ u_e] + b)          (E, 2F), batch norm over the batch's edges
    v_i ← softplus(v_i + BN₂(Σ_{e ∋ i} σ(z_e^f) ⊙ softplus(z_e^s)))   (paper eq. 5)

after ``v = Linear(table(Z))`` (the atom features, CGCNN's 92-d ``atom_init.json`` by default);
then the mean over a crystal's atoms, softplus, Linear(F, h), softplus, (n_h − 1) × [Linear(h, h),
softplus], Linear(h, T). The reference defaults (txie-93/cgcnn ``main.py``/``data.py``): F = 64,
3 convolutions, h = 128, n_h = 1, the 12 nearest neighbours within 8 Å, SGD lr 0.01 momentum 0.9,
batch 256 crystals, MSE on normalised targets, the best validation epoch tested.

Differences from the reference, each on purpose:

* neighbours: the 12 nearest *plus every neighbour tied with the 12th* (the loader's
  ``max_neighbors`` keeps whole shells, so the graph does not depend on the order of equal
  distances); an atom with fewer than 12 neighbours within 8 Å keeps the ones it has, where the
  reference pads with atom 0 at 9 Å;
* W [v_i ‖ v_j ‖ u_e] is computed as (W_i v)_i + (W_j v)_j + W_u u_e, the atom products once per
  atom rather than once per edge, and the filter and core halves of W and BN₁ are kept apart
  (the same function, fewer FLOPs and copies; initialised as the reference's one W);
* under data parallelism each rank normalises with its own batch statistics (as the reference
  does on its one batch) and the running statistics are averaged over the ranks every step.
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
class CGCNNConfig(ModelConfig):
    name: str = "cgcnn"
    features: str = "cgcnn92"          # atom features (see uae_dist.models.featurizers)
    features_trainable: bool = False   # the reference keeps its atom_init.json fixed
    features_lr_scale: float = bounded(1.0, ge=0)  # × the scheduled lr, when trainable
    features_standardize: bool = False  # z-score the table's columns (for raw tables: magpie)
    atom_fea_len: int = bounded(64, ge=1)
    n_conv: int = bounded(3, ge=0)
    h_fea_len: int = bounded(128, ge=1)
    n_h: int = bounded(1, ge=1)
    cutoff: float = bounded(8.0, gt=0)          # Å
    max_neighbors: int = bounded(12, ge=1)      # nearest kept (plus ties with the last)
    rbf_step: float = bounded(0.2, gt=0)        # Å; Gaussian centres 0, step, …, cutoff; σ = step

    def graph(self) -> dict:
        return {"cutoff": self.cutoff, "max_neighbors": self.max_neighbors}

    def check(self) -> None:
        if self.rbf_step >= self.cutoff:
            raise ValueError(f"model.rbf_step={self.rbf_step} must be < model.cutoff={self.cutoff}")


class ConvLayer(nn.Module):
    """One gated graph convolution (paper eq. 5) with its two batch norms.

    The reference's ``fc_full`` (2F + n_rbf → 2F) and ``bn1`` (2F) are held as their filter and
    core halves (batch norm is per channel, so this is the same function): the halves never
    need concatenating, which saves an (E, 2F) copy forward and backward."""

    def __init__(self, f: int, n_rbf: int):
        super().__init__()
        self.f = f
        self.w_atoms = nn.Linear(f, 4 * f, bias=False)  # [W_i^f, W_i^s, W_j^f, W_j^s] v, per atom
        self.w_filter = nn.Linear(n_rbf, f)              # W_u^f u_e + b^f
        self.w_core = nn.Linear(n_rbf, f)                # W_u^s u_e + b^s
        self.bn_filter = nn.BatchNorm1d(f)
        self.bn_core = nn.BatchNorm1d(f)
        self.bn2 = nn.BatchNorm1d(f)
        # The reference's default init of fc_full: U(±1/√fan_in) with fan_in = 2F + n_rbf. Each
        # half initialised by its own (smaller) fan-in would start with 1.6–2× larger weights,
        # and behind batch norm that is a 2.5–4× smaller effective SGD step (lr / |w|²).
        bound = (2 * f + n_rbf) ** -0.5
        for p in (*self.w_atoms.parameters(), *self.w_filter.parameters(),
                  *self.w_core.parameters()):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, v: torch.Tensor, i: torch.Tensor, j: torch.Tensor, u: torch.Tensor):
        fi, ci, fj, cj = self.w_atoms(v).split(self.f, dim=-1)
        zf = gather(fi, i, True) + gather(fj, j)
        zc = gather(ci, i, True) + gather(cj, j)
        zf = self.bn_filter(zf.add_(self.w_filter(u)))
        zc = self.bn_core(zc.add_(self.w_core(u)))
        msg = torch.sigmoid(zf) * F.softplus(zc)
        agg = scatter(msg, i, v.shape[0], "sum", sorted=True)
        return F.softplus(v + self.bn2(agg))


class CGCNN(nn.Module):
    """``forward(batch)`` → (B, T) predictions in normalised units."""

    def __init__(self, cfg: CGCNNConfig, targets: list[str]):
        super().__init__()
        self.targets = list(targets)
        self.cutoff = cfg.cutoff
        self.features = AtomFeatures(cfg.features, 92, cfg.features_trainable,
                                     cfg.features_standardize)
        self.lr_scale = lr_scale(cfg.features_trainable, cfg.features_lr_scale)
        n_rbf = int(round(cfg.cutoff / cfg.rbf_step)) + 1  # numpy arange(0, cutoff + step, step)
        self.rbf = GaussianExpansion(0.0, (n_rbf - 1) * cfg.rbf_step, n_rbf, 1 / cfg.rbf_step**2)
        f, h = cfg.atom_fea_len, cfg.h_fea_len
        self.embedding = nn.Linear(self.features.dim, f)
        self.convs = nn.ModuleList(ConvLayer(f, n_rbf) for _ in range(cfg.n_conv))
        self.conv_to_fc = nn.Linear(f, h)
        self.fcs = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.n_h - 1))
        self.fc_out = nn.Linear(h, len(self.targets))

    def element_embedding(self) -> torch.Tensor:
        """(100, atom_fea_len): the first layer's vector of each element, Linear(table(Z))."""
        w = self.embedding.weight
        return self.embedding(self.features.table.to(w.dtype)).detach()

    def forward(self, data) -> torch.Tensor:
        dtype = self.embedding.weight.dtype
        ei, _, _, d, batch, n_graphs = geometry(data, self.cutoff)
        i, j = ei[0], ei[1]
        v = self.embedding(self.features(data.z).to(dtype))
        u = self.rbf(d).to(dtype)
        for conv in self.convs:
            v = conv(v, i, j, u)
        crys = scatter(v, batch, n_graphs, "mean")
        crys = F.softplus(self.conv_to_fc(F.softplus(crys)))
        for fc in self.fcs:
            crys = F.softplus(fc(crys))
        if self.training:
            sync_batchnorm_stats(self)
        return self.fc_out(crys)


@register("cgcnn", CGCNNConfig)
def _build(cfg: CGCNNConfig, targets) -> CGCNN:
    return CGCNN(cfg, targets)
