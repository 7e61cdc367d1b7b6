"""What the analysis knows about each element: its place in the periodic table and reference
properties from pymatgen's element data (``pymatgen.core.periodic_table.Element``).

Lanthanides (La–Lu) and actinides (Ac–Fm) get their own "group" labels ``Ln`` and ``An`` because
pymatgen puts them all in group 3, which would hide the f-series in the group colouring. Blocks are
pymatgen's (La and Ac count as f, Lu as d).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from uae_dist.elements import SYMBOLS


@dataclass(frozen=True)
class Property:
    """A reference property: pymatgen attribute, readable label, whether R² is taken on log10."""

    attr: str
    label: str
    log: bool = False


# Properties that reverse prediction tries to recover; each is defined for most of Z = 1..100.
PROPERTIES: tuple[Property, ...] = (
    Property("atomic_radius", "atomic radius (Å)"),
    Property("X", "electronegativity (Pauling)"),
    Property("ionization_energy", "1st ionisation energy (eV)"),
    Property("electron_affinity", "electron affinity (eV)"),
    Property("melting_point", "melting point (K)"),
    Property("boiling_point", "boiling point (K)"),
    Property("molar_volume", "molar volume (log10 cm³/mol)", log=True),
    Property("density_of_solid", "density of solid (log10 kg/m³)", log=True),
    Property("mendeleev_no", "Mendeleev (Pettifor) number"),
)


def f_series(z: int) -> str | None:
    """``Ln`` for La–Lu, ``An`` for Ac–Lr, else None."""
    if 57 <= z <= 71:
        return "Ln"
    if 89 <= z <= 103:
        return "An"
    return None


@dataclass(frozen=True)
class Site:
    """Where element Z sits: period 1..7, group 1..18 or 'Ln'/'An', block, and its cell in the
    usual 18-column drawing (row 0..6 for periods, rows 8 and 9 for the f-series)."""

    z: int
    symbol: str
    period: int
    group: int | str
    block: str
    row: int
    col: int


@lru_cache(maxsize=1)
def sites() -> tuple[Site, ...]:
    """The 100 sites, index k = element Z = k + 1."""
    from pymatgen.core.periodic_table import Element

    out = []
    for k, sym in enumerate(SYMBOLS):
        z = k + 1
        e = Element(sym)
        series = f_series(z)
        if series:
            row, col = (8 if series == "Ln" else 9), 2 + (z - (57 if series == "Ln" else 89))
        else:
            row, col = e.row - 1, e.group - 1
        out.append(Site(z, sym, int(e.row), series or int(e.group), str(e.block), row, col))
    return tuple(out)


GROUP_ORDER: tuple[int | str, ...] = tuple(range(1, 19)) + ("Ln", "An")
PERIOD_ORDER: tuple[int, ...] = tuple(range(1, 8))
BLOCK_ORDER: tuple[str, ...] = ("s", "p", "d", "f")


def _value(sym: str, prop: Property) -> float:
    from pymatgen.core.periodic_table import Element

    with warnings.catch_warnings():  # pymatgen warns for every element lacking a value
        warnings.simplefilter("ignore")
        try:
            v = getattr(Element(sym), prop.attr)
            v = float(v) if v is not None else math.nan
        except (AttributeError, TypeError, ValueError):
            return math.nan
    if not math.isfinite(v) or (prop.log and v <= 0):
        return math.nan
    return math.log10(v) if prop.log else v


@lru_cache(maxsize=1)
def property_table() -> dict[str, np.ndarray]:
    """attr → (100,) float64 of the values used as targets (log10 where the property says so);
    NaN where pymatgen has no value."""
    return {p.attr: np.array([_value(s, p) for s in SYMBOLS], dtype=np.float64)
            for p in PROPERTIES}


def property_by_attr(attr: str) -> Property:
    for p in PROPERTIES:
        if p.attr == attr:
            return p
    raise KeyError(f"unknown property {attr!r}; known: {', '.join(p.attr for p in PROPERTIES)}")

