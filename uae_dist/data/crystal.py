"""What a source reader hands the graph builder: one ordered periodic structure, or a ParseError."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Crystal:
    """One ordered periodic structure, as the graph builder consumes it."""
    numbers: np.ndarray   # (N,) int64 atomic numbers
    lattice: np.ndarray   # (3, 3) float64, rows are lattice vectors (pymatgen's orientation)
    frac: np.ndarray      # (N, 3) float64 fractional coordinates
    pbc: np.ndarray = field(default_factory=lambda: np.ones(3, dtype=bool))  # (3,) bool

    @property
    def cart(self) -> np.ndarray:
        return self.frac @ self.lattice


class ParseError(ValueError):
    """A record that cannot be parsed into one ordered structure; the message says why and
    ``reason`` is the reject code the build records (``parse_error`` unless more is known)."""

    def __init__(self, message: str, reason: str = "parse_error"):
        super().__init__(message)
        self.reason = reason


def describe_error(e: BaseException) -> str:
    """``Type: message`` on one line (the message's whitespace collapsed)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
