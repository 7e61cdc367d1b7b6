"""Atom featurisers of the backbones: a per-element table looked up by atomic number.

``model.features`` names the table (any ``uae_dist.tables.load_table`` spec):

=============  =====  ====================================================================
spec           width  what
=============  =====  ====================================================================
``cgcnn92``    92     CGCNN's one-hot-encoded element properties (atom_init.json of the paper)
``onehot``     100    one-hot of Z
``megnet16``   16     MEGNet's learned element embedding (elementembeddings)
``magpie``     22     Magpie's element properties (raw scales: set ``features_standardize``)
``mat2vec``    200    mat2vec word embeddings (elementembeddings)
``uae:DIR``    d      an export of ``uae-dist export`` (or a shipped name, ``uae:mp-v1``)
``random``     w      standard normal, seed 0, the width w of the backbone's default table
``random:D:S`` D      standard normal of width D, seed S
``learned``    w      a fresh N(0, 1) table drawn from the model's seed (MEGNet's default)
=============  =====  ====================================================================

``model.features_trainable`` makes the table a trained parameter (``features.table``) with its
own learning rate, ``model.features_lr_scale`` × the scheduled rate (``model.lr_scale``);
otherwise it is a frozen parameter (``requires_grad=False``) that training never changes.

Rows the table lacks are stored as 0 and flagged in ``features.present``; an atom of such an
element is an error naming the element, raised at the first batch that holds one (the builder
does not see the data).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from uae_dist.elements import N_ELEMENTS, SYMBOLS


def resolve_spec(spec: str, default_width: int) -> str:
    """``random`` → ``random:<default_width>:0``; other specs unchanged."""
    return f"random:{default_width}:0" if spec == "random" else spec


def load_features(spec: str, default_width: int, standardize: bool = False) -> tuple[np.ndarray,
                                                                                     np.ndarray,
                                                                                     str]:
    """(100, d) float32 values (absent rows 0), (100,) present mask and the table's name."""
    if spec == "learned":
        return None, np.ones(N_ELEMENTS, bool), "learned"
    from uae_dist.tables import load_table

    t = load_table(resolve_spec(spec, default_width))
    values = np.nan_to_num(t.values.astype(np.float32), nan=0.0)
    present = t.present.copy()
    if standardize:
        mu = values[present].mean(0)
        sd = values[present].std(0)
        values = np.where(present[:, None], (values - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    return values.astype(np.float32), present, t.name


class AtomFeatures(nn.Module):
    """``forward(z)`` → (N, d) features of atoms with atomic numbers ``z`` (1-based)."""

    def __init__(self, spec: str, default_width: int, trainable: bool = False,
                 standardize: bool = False):
        super().__init__()
        values, present, self.table_name = load_features(spec, default_width, standardize)
        if values is None:  # "learned": nn.Embedding's N(0, 1) init, from the model's RNG
            values = torch.randn(N_ELEMENTS, default_width)
        self.spec, self.trainable = spec, bool(trainable)
        self.table = nn.Parameter(torch.as_tensor(values, dtype=torch.float32),
                                  requires_grad=self.trainable)
        self.register_buffer("present", torch.as_tensor(present, dtype=torch.bool),
                             persistent=False)

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def check(self, z: torch.Tensor) -> None:
        """Raise ValueError naming the elements of ``z`` the table does not define."""
        if bool(self.present[z - 1].all()):
            return
        bad = torch.unique(z[~self.present[z - 1]]).tolist()
        raise ValueError(f"model.features={self.spec!r} ({self.table_name}) has no row for "
                         f"{', '.join(SYMBOLS[k - 1] for k in bad)}, which occur in the data: "
                         "choose another table or drop those structures")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check(z)
        return self.table[z - 1]

    def extra_repr(self) -> str:
        return f"{self.spec!r}, dim={self.dim}, trainable={self.trainable}"


def lr_scale(trainable: bool, scale: float, prefix: str = "features.") -> dict[str, float]:
    """The model's ``lr_scale`` entry for its feature table."""
    return {prefix: float(scale)} if trainable else {}
