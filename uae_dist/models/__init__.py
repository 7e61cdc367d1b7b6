"""Model registry: ``build_model(cfg.model, targets)``; future backbones (cgcnn, alignn, megnet) register here.

Every model takes a ``torch_geometric`` batch, returns (B, T) predictions in normalised units, owns a
``normalizer`` (per-target mean/std buffers) and exposes ``element_embedding() -> (100, d)``
(rows Z = 1..100).
"""
from __future__ import annotations

from typing import Callable

from .crystal_transformer import CrystalTransformer, PaperCrystalTransformer
from .heads import MultiTaskHeads, Normalizer, masked_loss

MODELS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


@register("crystal_transformer")
def _crystal_transformer(mc, targets):
    kw = dict(emb_dim=mc.emb_dim, d_model=mc.d_model, layers=mc.layers, heads=mc.heads, ffn_dim=mc.ffn_dim,
              dropout=mc.dropout, head_hidden=mc.head_hidden)
    if mc.variant == "paper":
        return PaperCrystalTransformer(targets, **kw)
    if mc.variant == "periodic":
        return CrystalTransformer(targets, cutoff=mc.cutoff, n_rbf=mc.n_rbf, **kw)
    raise ValueError(f"unknown crystal_transformer variant {mc.variant!r} (periodic | paper)")


def build_model(model_cfg, targets):
    if model_cfg.name not in MODELS:
        raise ValueError(f"unknown model {model_cfg.name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[model_cfg.name](model_cfg, list(targets))


__all__ = ["MODELS", "register", "build_model", "CrystalTransformer", "PaperCrystalTransformer",
           "MultiTaskHeads", "Normalizer", "masked_loss"]
