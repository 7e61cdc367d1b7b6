"""CrystalTransformer: the pretraining backbone whose per-element input embedding is the UAE.

Two variants share the element table, heads and normaliser:

``periodic`` (default) — attention over the edges of the periodic neighbour graph. Every neighbour
image within the cutoff is its own key: for centre i and edge e = (i, j, shift),

    w_e ∝ env(d_e) · exp(q_i·k_j / √d_h + φ_h(rbf(d_e))),   softmax over the edges of i,
    m_i = Σ_e w_e · (v_j ⊙ W_f rbf(d_e))  (+ a self slot: w_ii ∝ exp(q_i·k_i/√d_h + b_h), value v_i ⊙ f),

so geometry only enters through interatomic distances (rotation/translation invariant), atoms are
a set (permutation invariant), and in an n×m×l supercell every edge of an atom maps one-to-one to an
edge of its primitive-cell twin: features, mean pool and predictions are exactly those of the
primitive cell. (Summing pair biases over images in the logit domain would break this.) The
cosine envelope env(d) → 0 at the cutoff, used in the logit as log env, together with the self slot
(which keeps the softmax denominator away from 0) makes the output continuous as neighbours cross
the cutoff, even for an atom whose only neighbour is leaving.

``paper`` — the published recipe (Jin et al., Nat. Commun. 16, 1210, 2025): one-hot(Z) →
Linear(100, 128) ‖ Linear(3, d_model-128) on Cartesian coordinates, a plain transformer encoder over
the atoms of each crystal (padding mask), first-token readout. Not invariant to rotation,
translation, permutation or supercells; kept for an honest comparison. Its UAE is the vector the
model actually feeds forward for element Z, ``Linear(100, 128)(onehot(Z)) = W[:, Z-1] + b``.

Neither variant owns a normaliser: predictions are in normalised units and the training engine
keeps the per-target mean/std (float64) beside the weights, so bf16 engines never round them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from uae_dist.fields import bounded
from uae_dist.ops import edge_vectors, scatter, segment_softmax

from . import ModelConfig, register
from .heads import MultiTaskHeads

N_ELEMENTS = 100  # Z = 1..100


def _batch_vector(data, n_atoms: int, device) -> tuple[torch.Tensor, int]:
    b = getattr(data, "batch", None)
    if b is None:
        return torch.zeros(n_atoms, dtype=torch.long, device=device), 1
    return b, int(data.num_graphs)


@dataclass
class CrystalTransformerConfig(ModelConfig):
    name: str = "crystal_transformer"
    variant: str = "periodic"          # periodic (edge attention, invariant) | paper (published recipe)
    emb_dim: int = bounded(128, ge=1)  # width of the per-element embedding = the UAE
    d_model: int = bounded(256, ge=1)
    layers: int = bounded(8, ge=1)
    heads: int = bounded(8, ge=1)
    ffn_dim: int = bounded(512, ge=1)
    dropout: float = bounded(0.1, ge=0, lt=1)
    cutoff: float = bounded(8.0, gt=0)  # Å; edges beyond it are dropped, a smooth envelope inside
    n_rbf: int = bounded(32, ge=1)
    head_hidden: int | None = bounded(None, ge=1)  # hidden width of each target head (d_model)
    checkpoint_activations: bool = False  # recompute each block in backward: less memory, ~1.3x time
    emb_init_std: float = bounded(1.0, gt=0)  # initial spread of the table's rows (periodic variant)
    emb_lr_scale: float = bounded(1.0, gt=0)  # the table's learning rate, × the scheduled rate

    def graph(self) -> dict:
        # the stored graphs (8 Å by default) are cut to the model's cutoff in the loader
        return {"cutoff": self.cutoff} if self.variant == "periodic" else {}

    def check(self) -> None:
        if self.variant not in ("periodic", "paper"):
            raise ValueError(f"model.variant={self.variant!r}: must be one of periodic, paper")
        if self.d_model % self.heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by "
                             f"model.heads={self.heads}")
        if self.variant == "paper" and self.d_model <= self.emb_dim:
            raise ValueError(f"model.variant=paper concatenates element ({self.emb_dim}) and "
                             f"coordinate features: model.d_model={self.d_model} must exceed "
                             "model.emb_dim")


class GaussianRBF(nn.Module):
    def __init__(self, cutoff: float, n: int):
        super().__init__()
        self.cutoff, self.n = float(cutoff), int(n)
        self.gamma = 0.5 / (cutoff / max(n - 1, 1)) ** 2

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        centers = torch.linspace(0.0, self.cutoff, self.n, dtype=d.dtype, device=d.device)
        return torch.exp(-self.gamma * (d[:, None] - centers) ** 2)


def cosine_envelope(d: torch.Tensor, cutoff: float) -> torch.Tensor:
    return torch.where(d < cutoff, 0.5 * (torch.cos(math.pi * d / cutoff) + 1.0), torch.zeros_like(d))


class EdgeAttentionLayer(nn.Module):
    """Pre-LN transformer block whose attention runs over periodic-graph edges."""

    def __init__(self, d: int, heads: int, ffn: int, n_rbf: int, dropout: float):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.bias = nn.Sequential(nn.Linear(n_rbf, 2 * heads), nn.SiLU(), nn.Linear(2 * heads, heads))
        self.filt = nn.Linear(n_rbf, d)
        self.self_bias = nn.Parameter(torch.zeros(heads))
        self.self_filt = nn.Parameter(torch.ones(d))
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, g: "_EdgeLayout", rbf, log_env):
        n, e, i, j = x.shape[0], g.i.shape[0], g.i, g.j
        q, k, v = self.qkv(self.ln1(x)).view(n, 3, self.h, self.dh).unbind(1)
        # neighbour edges plus one self slot per atom (placed before the atom's edges, so the centre
        # index stays sorted): when every neighbour fades out at the cutoff the weight flows
        # continuously to the atom itself
        logit = g.merge((q[i] * k[j]).sum(-1) / math.sqrt(self.dh) + self.bias(rbf) + log_env[:, None],
                        (q * k).sum(-1) / math.sqrt(self.dh) + self.self_bias)  # (E + N, H)
        w = segment_softmax(logit, g.centre, n, sorted=True)
        val = g.merge(v[j] * self.filt(rbf).view(e, self.h, self.dh), v * self.self_filt.view(1, self.h, self.dh))
        agg = scatter((w[..., None] * val).reshape(e + n, self.h * self.dh), g.centre, n, "sum", sorted=True)
        x = x + self.drop(self.out(agg))
        return x + self.drop(self.ffn(self.ln2(x)))


class _EdgeLayout:
    """Edges sorted by centre ``i`` with a self slot in front of each atom's edges: slot positions
    are computed once per forward and shared by all layers."""

    def __init__(self, i: torch.Tensor, j: torch.Tensor, n: int):
        self.i, self.j, self.n = i, j, n
        e = i.shape[0]
        before = torch.cumsum(torch.bincount(i, minlength=n), 0) - torch.bincount(i, minlength=n)
        ar_n = torch.arange(n, device=i.device)
        self.self_pos = ar_n + before                                   # slot of atom a
        self.edge_pos = torch.arange(e, device=i.device) + i + 1         # k-th edge (sorted by i)
        self.centre = torch.empty(e + n, dtype=torch.long, device=i.device)
        self.centre[self.edge_pos] = i
        self.centre[self.self_pos] = ar_n

    def merge(self, edge_rows: torch.Tensor, self_rows: torch.Tensor) -> torch.Tensor:
        out = edge_rows.new_empty((edge_rows.shape[0] + self_rows.shape[0],) + tuple(edge_rows.shape[1:]))
        out[self.edge_pos] = edge_rows
        out[self.self_pos] = self_rows.to(edge_rows.dtype)
        return out


class CrystalTransformer(nn.Module):
    """Periodic (edge-attention) CrystalTransformer. ``forward(batch)`` → (B, T) normalised predictions."""

    variant = "periodic"

    def __init__(self, targets: list[str], emb_dim: int = 128, d_model: int = 256, layers: int = 8,
                 heads: int = 8, ffn_dim: int = 512, dropout: float = 0.1, cutoff: float = 8.0,
                 n_rbf: int = 32, head_hidden: int | None = None,
                 checkpoint_activations: bool = False, emb_init_std: float = 1.0,
                 emb_lr_scale: float = 1.0):
        super().__init__()
        self.targets = list(targets)
        self.cutoff = float(cutoff)
        self.checkpoint_activations = checkpoint_activations
        self.embed = nn.Embedding(N_ELEMENTS, emb_dim)  # row Z-1: the universal atomic embedding
        # a row moves little in a short run: a small initial spread leaves the table mostly learned
        nn.init.normal_(self.embed.weight, std=emb_init_std)
        if emb_lr_scale != 1.0:
            self.lr_scale = {"embed.": emb_lr_scale}
        self.proj = nn.Linear(emb_dim, d_model)
        self.rbf = GaussianRBF(cutoff, n_rbf)
        self.blocks = nn.ModuleList(EdgeAttentionLayer(d_model, heads, ffn_dim, n_rbf, dropout)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.heads = MultiTaskHeads(d_model, len(self.targets), head_hidden, dropout)

    def element_embedding(self) -> torch.Tensor:
        """(100, emb_dim): row k is element Z = k + 1."""
        return self.embed.weight.detach()

    def forward(self, data) -> torch.Tensor:
        z = data.z
        x = self.proj(self.embed(z - 1))
        batch, n_graphs = _batch_vector(data, z.shape[0], z.device)
        # geometry in the data's precision (fp32/fp64) even when the network runs in bf16
        pos = data.pos
        cell = data.cell.to(pos.dtype)
        _, dist = edge_vectors(pos, cell if cell.dim() == 3 else cell[None], data.edge_index, data.shift, batch)
        keep = dist < self.cutoff
        ei = data.edge_index[:, keep]
        d = dist[keep]
        if ei.shape[1] > 1 and bool((ei[0, 1:] < ei[0, :-1]).any()):  # the data contract sorts by i; be safe
            order = torch.argsort(ei[0], stable=True)
            ei, d = ei[:, order], d[order]
        layout = _EdgeLayout(ei[0], ei[1], x.shape[0])
        rbf = self.rbf(d).to(x.dtype)
        log_env = torch.log(cosine_envelope(d, self.cutoff).clamp_min(1e-30)).to(x.dtype)
        for blk in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(blk, x, layout, rbf, log_env, use_reentrant=False)
            else:
                x = blk(x, layout, rbf, log_env)
        pooled = scatter(self.ln_f(x), batch, n_graphs, "mean")
        return self.heads(pooled)


class PaperCrystalTransformer(nn.Module):
    """The published CrystalTransformer recipe (see module docstring)."""

    variant = "paper"

    def __init__(self, targets: list[str], emb_dim: int = 128, d_model: int = 256, layers: int = 8,
                 heads: int = 8, ffn_dim: int = 512, dropout: float = 0.1,
                 head_hidden: int | None = None, checkpoint_activations: bool = False, **_):
        super().__init__()
        if d_model <= emb_dim:
            raise ValueError(f"paper variant needs d_model > emb_dim (coordinates get d_model - emb_dim), "
                             f"got {d_model} <= {emb_dim}")
        self.targets = list(targets)
        self.atom = nn.Linear(N_ELEMENTS, emb_dim)  # one-hot(Z) → UAE; weight.T is the table
        self.coord = nn.Linear(3, d_model - emb_dim)
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn_dim, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.checkpoint_activations = checkpoint_activations
        self.ln_f = nn.LayerNorm(d_model)
        self.heads = MultiTaskHeads(d_model, len(self.targets), head_hidden, dropout)

    def element_embedding(self) -> torch.Tensor:
        """(100, emb_dim): the vector the model feeds forward for element Z (row Z - 1), W^T + b."""
        return (self.atom.weight.t() + self.atom.bias).detach()

    def forward(self, data) -> torch.Tensor:
        from torch_geometric.utils import to_dense_batch

        z = data.z
        onehot = nn.functional.one_hot(z - 1, N_ELEMENTS).to(self.atom.weight.dtype)
        x = torch.cat([self.atom(onehot), self.coord(data.pos.to(onehot.dtype))], dim=-1)
        batch, _ = _batch_vector(data, z.shape[0], z.device)
        dense, mask = to_dense_batch(x, batch)
        if self.checkpoint_activations and torch.is_grad_enabled():
            out = dense
            for layer in self.encoder.layers:
                out = checkpoint(layer, out, src_key_padding_mask=~mask, use_reentrant=False)
        else:
            out = self.encoder(dense, src_key_padding_mask=~mask)
        return self.heads(self.ln_f(out[:, 0]))


@register("crystal_transformer", CrystalTransformerConfig)
def _build(mc: CrystalTransformerConfig, targets):
    kw = dict(emb_dim=mc.emb_dim, d_model=mc.d_model, layers=mc.layers, heads=mc.heads,
              ffn_dim=mc.ffn_dim, dropout=mc.dropout, head_hidden=mc.head_hidden,
              checkpoint_activations=mc.checkpoint_activations)
    if mc.variant == "paper":
        return PaperCrystalTransformer(targets, **kw)
    return CrystalTransformer(targets, cutoff=mc.cutoff, n_rbf=mc.n_rbf,
                              emb_init_std=mc.emb_init_std, emb_lr_scale=mc.emb_lr_scale, **kw)
