"""The rows of a table that the analysis may use, and the feature space every statistic shares.

Only *trained* rows enter (``Table.trained``: present in the table and, for a UAE, seen in
pretraining). Untrained rows of an export hold the mean of the trained rows and absent rows hold
NaN; both are listed in :class:`Frame` so the report can name them, and never reach a statistic.

The shared feature space is the z-score of each column over the analysed elements, with constant
columns dropped: tables mix units (magpie holds kelvin beside electron-volts) and a UAE's rows
share a large common component, so raw cosine similarities would mostly measure units and that
offset. Reverse prediction standardises inside each cross-validation fold instead (see reverse.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from uae_dist.elements import SYMBOLS
from uae_dist.tables import Table

MIN_ELEMENTS = 10  # fewer trained rows than this leave nothing to cluster or cross-validate


@dataclass
class Frame:
    """Analysed rows of one table.

    ``z`` (n,) atomic numbers in increasing order, ``raw`` (n, d) the table's values, ``x`` (n, d')
    the standardised non-constant columns; ``untrained``/``absent`` the symbols left out, and
    ``duplicates`` groups of analysed elements whose rows are identical (a sign of placeholders).
    """

    name: str
    z: np.ndarray
    raw: np.ndarray
    x: np.ndarray
    untrained: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    card: dict = field(default_factory=dict)

    @property
    def symbols(self) -> list[str]:
        return [SYMBOLS[z - 1] for z in self.z]

    @property
    def n(self) -> int:
        return len(self.z)

    def subset(self, zs) -> "Frame":
        """The same table restricted to atomic numbers ``zs`` (all analysed here), restandardised
        on them; what it leaves out is not this subset's business, so the lists stay empty."""
        zs = np.asarray(sorted(set(int(z) for z in zs)), dtype=np.int64)
        idx = np.searchsorted(self.z, zs)
        inside = (idx < self.n) & (self.z[np.minimum(idx, self.n - 1)] == zs)
        if len(zs) == 0 or not inside.all():
            raise ValueError(f"{self.name}: subset asks for elements this table does not analyse")
        raw = self.raw[idx]
        return Frame(self.name, zs, raw, standardise(raw), card=self.card)


def standardise(raw: np.ndarray) -> np.ndarray:
    """Column z-scores (float64) over the rows given; columns constant on them are dropped."""
    raw = np.asarray(raw, dtype=np.float64)
    mu, sd = raw.mean(0), raw.std(0)
    keep = sd > 1e-9 * np.maximum(1.0, np.abs(mu))
    return (raw[:, keep] - mu[keep]) / sd[keep]


def _duplicates(z: np.ndarray, raw: np.ndarray) -> list[list[str]]:
    _, inverse, counts = np.unique(raw, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    return [[SYMBOLS[z[i] - 1] for i in np.flatnonzero(inverse == g)]
            for g in np.flatnonzero(counts > 1)]


def frame_of(table: Table, min_elements: int = MIN_ELEMENTS) -> Frame:
    """The analysed rows of ``table``; ValueError if fewer than ``min_elements`` remain or the
    remaining rows do not vary."""
    ok = np.asarray(table.trained, bool) & np.asarray(table.present, bool)
    z = np.flatnonzero(ok) + 1
    if len(z) < min_elements:
        raise ValueError(f"table {table.name!r} has {len(z)} trained element rows; the analysis "
                         f"needs at least {min_elements}")
    raw = np.asarray(table.values, dtype=np.float64)[ok]
    if not np.isfinite(raw).all():  # Table promises finite present rows; say so if one is not
        raise ValueError(f"table {table.name!r} has non-finite values in trained rows")
    x = standardise(raw)
    if x.shape[1] == 0:
        raise ValueError(f"table {table.name!r}: every column is constant over its trained rows")
    return Frame(table.name, z, raw, x, untrained=list(table.untrained),
                 absent=list(table.missing), duplicates=_duplicates(z, raw),
                 card=dict(table.card or {}))


def single_threaded(fn):
    """Run ``fn`` with BLAS and OpenMP limited to one thread: matrices of ~100 rows gain nothing
    from threads, and on shared cores their spinning made reverse prediction several times
    slower."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            return fn(*args, **kwargs)
    return wrapper


def common_z(frames) -> np.ndarray:
    """Atomic numbers analysed in every frame given."""
    out = None
    for f in frames:
        out = set(f.z.tolist()) if out is None else out & set(f.z.tolist())
    return np.array(sorted(out or ()), dtype=np.int64)
