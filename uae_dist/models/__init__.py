"""Model registry: every backbone registers a builder and its typed config section.

    @register("cgcnn", CGCNNConfig)
    def _build(cfg: CGCNNConfig, targets: list[str]) -> nn.Module: ...

The contract the training engine relies on:

* ``model(batch)`` takes a ``torch_geometric`` batch of crystal graphs (fields ``z``, ``pos``,
  ``cell``, ``edge_index`` (centre i; neighbour j), ``shift``, ``batch``) and returns (B, T)
  predictions in *normalised* units (the engine owns the per-target normaliser, in float64);
* ``cfg.graph()`` says how the stored graphs (8 Å, every periodic image) are narrowed in the loader
  for this model (``{"cutoff": 4.0}``, ``{"cutoff": 8.0, "max_neighbors": 12}``, …);
* optional ``model.element_embedding() -> (100, d)`` (row k is element Z = k + 1): the UAE;
* optional ``model.lr_scale: dict[str, float]``: parameter-name prefix → learning-rate multiplier
  (0 freezes by convention; prefer ``requires_grad=False`` for a frozen table).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

MODELS: dict[str, tuple[type, Callable]] = {}


@dataclass
class ModelConfig:
    """Base of every model section; ``name`` selects the registered backbone."""

    name: str = "crystal_transformer"

    def graph(self) -> dict:
        """Loader-side narrowing of the stored graphs (keyword arguments of the dataset)."""
        return {}

    def check(self) -> None:
        """Cross-field checks beyond the per-field bounds; raise ``ValueError`` naming the keys."""


def register(name: str, config_cls: type):
    if not (dataclasses.is_dataclass(config_cls) and issubclass(config_cls, ModelConfig)):
        raise TypeError(f"{config_cls!r} must be a dataclass deriving from ModelConfig")

    def deco(fn):
        MODELS[name] = (config_cls, fn)
        return fn
    return deco


def model_config_class(name: str) -> type:
    _load_builtin()
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name][0]


def build_model(model_cfg: ModelConfig, targets):
    _load_builtin()
    if model_cfg.name not in MODELS:
        raise ValueError(f"unknown model {model_cfg.name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[model_cfg.name][1](model_cfg, list(targets))


def _load_builtin() -> None:
    """Import the built-in backbones (each registers itself on import)."""
    from . import alignn, cgcnn, crystal_transformer, megnet  # noqa: F401


__all__ = ["MODELS", "ModelConfig", "register", "build_model", "model_config_class"]
