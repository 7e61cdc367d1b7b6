"""Evaluation in physical units: predictions of a split, metrics, the test files of a run.

Each structure of the split is evaluated on exactly one rank (``eval_batches``: no padding);
predictions are gathered to every rank, so metrics are exact sums, not averages of averages.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from . import distributed as D


@torch.no_grad()
def predict(engine, loader, normalizer, cols: list[int], device) -> dict:
    """``{"id": [...], "y": (n, T), "pred": (n, T)}`` over all ranks, physical units, float64."""
    module = engine.module
    was_training = module.training
    module.eval()
    ids, ys, preds = [], [], []
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        preds.append(normalizer.denorm(engine(batch).float()).cpu().numpy())
        ys.append(batch.y[:, cols].double().cpu().numpy())
        ids.extend(batch.id)
    module.train(was_training)
    t = len(cols)
    mine = {"id": ids, "y": np.concatenate(ys) if ys else np.zeros((0, t)),
            "pred": np.concatenate(preds) if preds else np.zeros((0, t))}
    parts = D.all_gather_object(mine)
    return {"id": [i for p in parts for i in p["id"]],
            "y": np.concatenate([p["y"] for p in parts]),
            "pred": np.concatenate([p["pred"] for p in parts])}


def metrics(y: np.ndarray, pred: np.ndarray, train_mean: np.ndarray, targets: list[str]) -> dict:
    """Per target: MAE, RMSE, R², count, and the MAE of predicting the training mean."""
    out = {}
    for t, name in enumerate(targets):
        ok = np.isfinite(y[:, t])
        yt, pt = y[ok, t], pred[ok, t]
        n = int(ok.sum())
        err = pt - yt
        ss_tot = float(((yt - yt.mean()) ** 2).sum()) if n else 0.0
        out[name] = {
            "count": n,
            "mae": float(np.abs(err).mean()) if n else None,
            "rmse": float(np.sqrt((err ** 2).mean())) if n else None,
            "r2": float(1 - (err ** 2).sum() / ss_tot) if n and ss_tot > 0 else None,
            "mean_predictor_mae": float(np.abs(yt - train_mean[t]).mean()) if n else None,
        }
    return out


def score(m: dict, std: np.ndarray) -> float:
    """Model selection: mean over targets of MAE / training std (lower is better)."""
    vals = [v["mae"] / s for v, s in zip(m.values(), std) if v["mae"] is not None]
    return float(np.mean(vals)) if vals else float("inf")


def write_predictions(path, p: dict, targets: list[str]) -> None:
    """One row per (structure, labelled target): id, target, true, predicted."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "target", "true", "predicted"])
        for k, rid in enumerate(p["id"]):
            for t, name in enumerate(targets):
                if np.isfinite(p["y"][k, t]):
                    w.writerow([rid, name, repr(float(p["y"][k, t])), repr(float(p["pred"][k, t]))])


def write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, allow_nan=False))
