"""Multi-task readout heads shared by every backbone."""
from __future__ import annotations

import torch
from torch import nn


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
