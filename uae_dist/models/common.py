"""Pieces the CGCNN, ALIGNN and MEGNet backbones share: graph geometry, Gaussian expansions,
batch-norm statistics kept equal across ranks, the config fields of an atom featuriser."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from uae_dist.ops import edge_vectors, scatter


def batch_vector(data) -> tuple[torch.Tensor, int]:
    """(N,) graph index of every atom and the number of graphs (a lone Data is one graph)."""
    b = getattr(data, "batch", None)
    if b is None:
        return torch.zeros(data.z.shape[0], dtype=torch.long, device=data.z.device), 1
    return b, int(data.num_graphs)


def geometry(data, cutoff: float | None = None):
    """Edges of the batch sorted by centre, their vectors and lengths (Å) in the data's float
    precision (fp32/fp64, never bf16): ``(edge_index (2, E), shift (E, 3), vec (E, 3), dist (E,),
    batch, B)``.
    ``cutoff`` drops the edges longer than it (the loader usually narrowed them already)."""
    batch, n_graphs = batch_vector(data)
    pos = data.pos
    cell = data.cell.to(pos.dtype)
    cell = cell if cell.dim() == 3 else cell[None]
    ei, shift = data.edge_index, data.shift
    vec, d = edge_vectors(pos, cell, ei, shift, batch)
    if cutoff is not None:
        keep = d <= cutoff
        if not bool(keep.all()):
            ei, shift, vec, d = ei[:, keep], shift[keep], vec[keep], d[keep]
    if ei.shape[1] > 1 and bool((ei[0, 1:] < ei[0, :-1]).any()):  # the contract sorts by i
        order = torch.argsort(ei[0], stable=True)
        ei, shift, vec, d = ei[:, order], shift[order], vec[order], d[order]
    return ei, shift, vec, d, batch, n_graphs


class GaussianExpansion(nn.Module):
    """``exp(-γ (x - μ_k)²)`` on ``n`` centres ``μ_k`` evenly spaced from ``start`` to ``stop``
    (both included). The references' widths: CGCNN γ = 1/σ² with σ = the 0.2 Å step (γ = 25);
    ALIGNN γ = 1/Δμ (SchNet style); matgl's MEGNet γ = 0.5 ("width" 0.5 multiplies d²)."""

    def __init__(self, start: float, stop: float, n: int, gamma: float):
        super().__init__()
        self.register_buffer("centers", torch.linspace(start, stop, n, dtype=torch.float64),
                             persistent=False)
        self.gamma = float(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exponents below -80 are clamped (their values, < 2e-35, become exactly that): far tails
        # underflow to denormals otherwise, which make exp() several times slower on CPU
        arg = (-self.gamma * (x[:, None] - self.centers.to(x.dtype)) ** 2).clamp_min_(-80.0)
        return torch.exp(arg)


class _Gather(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is our scatter-sum (a segment sum when
    ``index`` is sorted), instead of ``index_add_``."""

    @staticmethod
    def forward(ctx, x, index, is_sorted):
        ctx.save_for_backward(index)
        ctx.n, ctx.is_sorted = x.shape[0], is_sorted
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return scatter(grad.contiguous(), index, ctx.n, "sum", sorted=ctx.is_sorted), None, None


def gather(x: torch.Tensor, index: torch.Tensor, is_sorted: bool = False) -> torch.Tensor:
    """Rows ``x[index]``; ``is_sorted``: ``index`` is non-decreasing (edge centres)."""
    return _Gather.apply(x, index, is_sorted)


def softplus_shifted(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) − ln 2 (MEGNet's activation: 0 at 0)."""
    return nn.functional.softplus(x) - math.log(2.0)


def sync_batchnorm_stats(module: nn.Module) -> None:
    """Average the running mean/var of every BatchNorm of ``module`` over the ranks (one
    all-reduce): each rank normalises with its own batch statistics, as the reference does on
    its batch, but the statistics used at evaluation and saved in checkpoints are the same on
    every rank. Call once per training forward, on every rank (DeepSpeed does not sync buffers)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    if not bns:
        return
    bufs = [b for m in bns for b in (m.running_mean, m.running_var)]
    flat = torch.cat([b.detach().float().reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    k = 0
    for b in bufs:
        # through .data: autograd saved these buffers (train-mode backward never reads them),
        # and an in-place copy would bump their version and fail the backward pass
        b.data.copy_(flat[k:k + b.numel()].view_as(b).to(b.dtype))
        k += b.numel()

