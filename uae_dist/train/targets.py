"""Targets: the float64 normaliser (one source of truth) and the loss over an optimizer step.

The loss of an optimizer step is, per target, the mean over every labelled structure of the
step's *global* batch (all ranks, all accumulation micro-batches), then the mean over the targets
that have a label in that batch:

    L = 1/|T'| Σ_{t ∈ T'} Σ_{labelled (i, t)} ℓ(pred_it, y_it) / N_t,    N_t = labels of t in the step

so every structure weighs the same whatever the size of its micro-batch, and training optimises
what validation measures. ``N_t`` comes from the sampler's plan and the training labels, known on
every rank without communication; each micro-batch contributes its share, and the engine scales
the share by ranks × accumulation steps to undo DeepSpeed's averaging of gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Normalizer:
    """Per-target mean and std of the training labels, in float64, kept outside the model so a
    bf16 engine never rounds them; checkpoints store them as JSON numbers (exact)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, y: np.ndarray, names: list[str]) -> "Normalizer":
        """``y``: (N, T) training labels, NaN where missing. Refuses targets with no labels or a
        non-finite spread (e.g. a label of 1e308) instead of silently dropping them."""
        y = np.asarray(y, dtype=np.float64)
        ok = np.isfinite(y)
        n = ok.sum(0)
        for t, name in enumerate(names):
            if n[t] == 0:
                raise ValueError(f"target {name!r} has no label in the training split")
        with np.errstate(over="ignore", invalid="ignore"):
            mean = np.where(ok, y, 0.0).sum(0) / n
            var = np.where(ok, (y - mean) ** 2, 0.0).sum(0) / np.maximum(n - 1, 1)
            std = np.sqrt(var)
        for t, name in enumerate(names):
            if not (np.isfinite(mean[t]) and np.isfinite(std[t])):
                raise ValueError(f"target {name!r}: training labels have mean {mean[t]} and std "
                                 f"{std[t]}; remove the outliers (uae-dist data build --bound "
                                 f"{name}=LO:HI)")
        return cls(mean, np.where(std > 1e-12, std, 1.0))

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))

    def norm(self, y: torch.Tensor) -> torch.Tensor:
        m, s = (torch.as_tensor(a, device=y.device) for a in (self.mean, self.std))
        return ((y.double() - m) / s).float()

    def denorm(self, pred: torch.Tensor) -> torch.Tensor:
        m, s = (torch.as_tensor(a, device=pred.device) for a in (self.mean, self.std))
        return pred.double() * s + m


def label_counts(y: np.ndarray, batches: list[list[int]]) -> np.ndarray:
    """(T,) labelled entries per target over ``batches`` (indices into the rows of ``y``)."""
    idx = [i for b in batches for i in b]
    return np.isfinite(y[idx]).sum(0) if idx else np.zeros(y.shape[1], dtype=np.int64)


def elementwise(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return (pred - target) ** 2
    if kind == "l1":
        return (pred - target).abs()
    if kind == "huber":
        return nn.functional.huber_loss(pred, target, reduction="none", delta=1.0)
    raise ValueError(f"unknown loss {kind!r}")


def step_loss(pred: torch.Tensor, target: torch.Tensor, counts: torch.Tensor, kind: str = "mse"):
    """This micro-batch's share of the step loss (module docstring).

    ``pred``/``target``: (B, T) in normalised units, NaN targets = missing; ``counts``: (T,) labels
    per target in the whole step. Returns ``(share, per_target_share (T,))``; the step's loss is
    the sum of the shares over micro-batches and ranks."""
    ok = torch.isfinite(target)
    err = elementwise(pred, torch.where(ok, target, pred.detach()), kind)
    err = torch.where(ok, err, torch.zeros_like(err))
    counts = counts.to(pred.device, pred.dtype)
    present = counts > 0
    per_target = err.sum(0) / counts.clamp_min(1)
    share = (per_target * present).sum() / present.sum().clamp_min(1)
    return share, per_target.detach()
