"""Multi-task readout heads, the per-target normaliser and the masked loss shared by every backbone."""
from __future__ import annotations

import torch
from torch import nn


class Normalizer(nn.Module):
    """Per-target mean/std (from the training split) kept as buffers, so they travel in the state dict."""

    def __init__(self, n_targets: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_targets))
        self.register_buffer("std", torch.ones(n_targets))

    @torch.no_grad()
    def fit(self, y) -> "Normalizer":
        """``y``: (N, T) labels with NaN where missing."""
        y = torch.as_tensor(y, dtype=torch.float64)
        ok = torch.isfinite(y)
        n = ok.sum(0).clamp_min(1)
        yz = torch.where(ok, y, torch.zeros_like(y))
        mean = yz.sum(0) / n
        var = torch.where(ok, (y - mean) ** 2, torch.zeros_like(y)).sum(0) / (n - 1).clamp_min(1)
        std = var.sqrt()
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)).to(self.std.dtype))
        return self

    def norm(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std

    def denorm(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std + self.mean


class MultiTaskHeads(nn.Module):
    """One small MLP per target on the pooled crystal vector; output (B, T) in normalised units."""

    def __init__(self, d_in: int, n_targets: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden = hidden or d_in
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
            for _ in range(n_targets))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(h) for head in self.heads], dim=-1)


def masked_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse"):
    """Mean over targets of the per-target mean loss over labelled entries (NaN = missing).

    Returns ``(loss, per_target (T,), count (T,))``; a target without any label in the batch
    contributes 0 (and no gradient).
    """
    ok = torch.isfinite(target)
    t = torch.where(ok, target, pred.detach())
    if kind == "mse":
        err = (pred - t) ** 2
    elif kind == "l1":
        err = (pred - t).abs()
    elif kind == "huber":
        err = nn.functional.huber_loss(pred, t, reduction="none", delta=1.0)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    err = torch.where(ok, err, torch.zeros_like(err))
    cnt = ok.sum(0)
    per_target = err.sum(0) / cnt.clamp_min(1)
    has = (cnt > 0).to(pred.dtype)
    loss = (per_target * has).sum() / has.sum().clamp_min(1)
    return loss, per_target.detach(), cnt
