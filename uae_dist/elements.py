"""Element symbols of the rows every table and embedding uses: row k is element Z = k + 1."""
from __future__ import annotations

N_ELEMENTS = 100

SYMBOLS: tuple[str, ...] = (
    'H', 'He', 'Li', 'Be', 'B', 'C', 'N', 'O', 'F', 'Ne', 'Na', 'Mg', 'Al', 'Si', 'P', 'S', 'Cl',
    'Ar', 'K', 'Ca', 'Sc', 'Ti', 'V', 'Cr', 'Mn', 'Fe', 'Co', 'Ni', 'Cu', 'Zn', 'Ga', 'Ge', 'As',
    'Se', 'Br', 'Kr', 'Rb', 'Sr', 'Y', 'Zr', 'Nb', 'Mo', 'Tc', 'Ru', 'Rh', 'Pd', 'Ag', 'Cd', 'In',
    'Sn', 'Sb', 'Te', 'I', 'Xe', 'Cs', 'Ba', 'La', 'Ce', 'Pr', 'Nd', 'Pm', 'Sm', 'Eu', 'Gd', 'Tb',
    'Dy', 'Ho', 'Er', 'Tm', 'Yb', 'Lu', 'Hf', 'Ta', 'W', 'Re', 'Os', 'Ir', 'Pt', 'Au', 'Hg', 'Tl',
    'Pb', 'Bi', 'Po', 'At', 'Rn', 'Fr', 'Ra', 'Ac', 'Th', 'Pa', 'U', 'Np', 'Pu', 'Am', 'Cm', 'Bk',
    'Cf', 'Es', 'Fm',
)

Z_OF: dict[str, int] = {s: k + 1 for k, s in enumerate(SYMBOLS)}


def z_of(symbol: str) -> int | None:
    """Z of ``symbol`` (1..100), or None for a real element beyond Z = 100; ValueError otherwise."""
    if symbol in Z_OF:
        return Z_OF[symbol]
    from pymatgen.core.periodic_table import Element

    try:
        Element(symbol)
    except ValueError:
        raise ValueError(f"unknown element symbol {symbol!r}") from None
    return None
