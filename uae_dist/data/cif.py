"""CIF text → :class:`Crystal`: gemmi fast path when it applies, pymatgen otherwise.

Both paths give the same structure (``fast_cif`` reproduces pymatgen bit for bit, or declines). On
top of what pymatgen accepts, a CIF is refused (``ParseError`` with a reject ``reason``) when

* a cell length is not > 0 or a cell angle is outside (0°, 180°) (``bad_cell``): pymatgen builds a
  lattice from ``a = -5.6`` without a word;
* pymatgen would change the chemistry while reading (``changed_chemistry``): a type symbol that is
  no element read as one (``Uuo`` → U), a site with occupancy 0 or −1 dropped (NaCl read as Cl),
  implicit hydrogens left out. The graph would otherwise carry the labels of another compound.
  Site labels are read as pymatgen reads them (a label-only CIF naming ``Uuo1`` is read as U);
* the structure is disordered (``parse_error``): a graph needs one element per site.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np

from .crystal import Crystal, ParseError, describe_error

# The checks below read the CIF's own tags, so both parsing paths refuse the same CIFs: the fast
# path declines every CIF they could apply to (occupancy != 1, unknown symbols, attached hydrogens).
# pymatgen's own composition check (a warning) misses CIFs without type symbols or formula.
_PMG_SPECIAL = re.compile("Hw|Ow|Wat|wat|OH|OH2|NO3")  # what pymatgen's _parse_symbol maps itself
_LETTERS = re.compile(r"[A-Za-z]+")
_CELL_TAG = re.compile(r"^[ \t]*(_cell_length_[abc]|_cell_angle_(?:alpha|beta|gamma))[ \t]+"
                       r"([^\s'\"]+)[ \t]*$", re.M)
_UNCERTAINTY = re.compile(r"\(.*$")


def check_cell_parameters(text: str) -> None:
    """ParseError('bad_cell') for a non-positive cell length or an angle outside (0, 180) degrees.
    Values that are not plain finite numbers are left to the parser and the builder."""
    for m in _CELL_TAG.finditer(text):
        tag, raw = m.group(1), m.group(2)
        try:
            v = float(_UNCERTAINTY.sub("", raw))
        except ValueError:
            continue
        if not math.isfinite(v):  # the builder rejects it as non_finite_lattice
            continue
        if tag.startswith("_cell_length") and not v > 0:
            raise ParseError(f"{tag} = {raw}: a cell length must be > 0 Å", reason="bad_cell")
        if tag.startswith("_cell_angle") and not 0 < v < 180:
            raise ParseError(f"{tag} = {raw}: a cell angle must lie strictly between 0 and 180 "
                             "degrees", reason="bad_cell")


def _atomic_number(sp) -> int:
    """Z of a pymatgen Element/Species; 0 for a DummySpecies (whose .Z is meaningless): the
    builder rejects it as element_out_of_range."""
    from pymatgen.core.periodic_table import DummySpecies
    if isinstance(sp, DummySpecies):
        return 0
    return int(sp.Z)


def _site_problems(raw: dict) -> list[str]:
    """Sites pymatgen would silently drop, leave incomplete or turn into another element, from the
    CIF's own tags (``CifParser.as_dict()`` before parsing): occupancy <= 0, implicit hydrogens
    (``_atom_site_attached_hydrogens``), or a type symbol that is no element but whose first
    letters are one (``Uuo`` is read as U). Labels are not type symbols and are not checked."""
    from pymatgen.core.periodic_table import Element

    problems = []
    for block in raw.values():
        labels = block.get("_atom_site_label") or []
        occ = block.get("_atom_site_occupancy") or []
        for k, v in enumerate([occ] if isinstance(occ, str) else occ):
            try:
                x = float(_UNCERTAINTY.sub("", v))
            except ValueError:
                continue
            if not x > 0:
                label = labels[k] if k < len(labels) and not isinstance(labels, str) else k
                problems.append(f"site {label} has occupancy {v}: pymatgen drops it")
        hyd = block.get("_atom_site_attached_hydrogens") or []
        for v in [hyd] if isinstance(hyd, str) else hyd:
            try:
                if float(_UNCERTAINTY.sub("", v)) != 0:
                    problems.append(f"implicit hydrogens (_atom_site_attached_hydrogens {v}) "
                                    "that the structure would lack")
                    break
            except ValueError:
                continue
        syms = block.get("_atom_site_type_symbol") or []
        for sym in [syms] if isinstance(syms, str) else syms:
            m = _LETTERS.match(sym.strip("'\""))
            el = m.group() if m else ""
            if not el or Element.is_valid_symbol(el) or _PMG_SPECIAL.match(el):
                continue
            as_el = next((e for e in (el[:2].title(), el[0].upper()) if Element.is_valid_symbol(e)),
                         None)
            if as_el is not None:  # otherwise a dummy species, rejected as element_out_of_range
                problems.append(f"type symbol {sym!r} is not an element (pymatgen reads {as_el})")
    return problems


def parse_cif_pymatgen(text: str) -> Crystal:
    """What ``pymatgen.core.Structure.from_str(text, fmt="cif")`` reads (the same CifParser call),
    refusing CIFs whose chemistry it changes (``changed_chemistry``)."""
    try:
        from pymatgen.io.cif import CifParser
    except Exception as e:  # pragma: no cover - pymatgen is a dependency
        raise ParseError(f"CIF parse failed: pymatgen unavailable ({describe_error(e)})") from None
    check_cell_parameters(text)  # the fast path declines these CIFs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parser = CifParser.from_str(text)
            problems = _site_problems(parser.as_dict())
            if not problems:
                s = parser.parse_structures(primitive=False)[0]
        except Exception as e:  # anything pymatgen throws (ValueError, KeyError, ...)
            why = [" ".join(str(w.message).split()) for w in caught
                   if str(w.message).startswith("No structure parsed")]
            detail = describe_error(e) + (f" ({'; '.join(why)})" if why else "")
            raise ParseError(f"CIF parse failed: {detail}") from None
    if problems:
        raise ParseError(f"pymatgen would change the chemistry of this CIF: {problems[0]}; fix "
                         "the CIF", reason="changed_chemistry")
    try:
        if len(s) == 0:
            raise ParseError("CIF parse failed: empty structure")
        if not s.is_ordered:
            for i, site in enumerate(s):
                if not site.is_ordered:
                    occ = ", ".join(f"{sp}:{amt:.4g}" for sp, amt in site.species.items())
                    raise ParseError(f"disordered structure: partially occupied site {i} ({occ}); "
                                     "a graph needs one element per site")
            raise ParseError("disordered structure: partially occupied site")  # pragma: no cover
        numbers = np.array([_atomic_number(site.specie) for site in s], dtype=np.int64)
        lattice = np.array(s.lattice.matrix, dtype=np.float64)
        frac = np.array(s.frac_coords, dtype=np.float64).reshape(-1, 3)
        pbc = np.array(s.lattice.pbc, dtype=bool).reshape(3)
    except ParseError:
        raise
    except Exception as e:
        raise ParseError(f"CIF parse failed: {describe_error(e)}") from None
    return Crystal(numbers, lattice, frac, pbc)


def parse_cif(text, fast_cif: bool = True) -> Crystal:
    """CIF text → Crystal (see the module docstring). Raises ParseError only."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str) or not text.strip():
        raise ParseError(f"CIF parse failed: no CIF text (got {type(text).__name__})")
    if fast_cif:
        try:
            from .fast_cif import parse_cif_fast
            c = parse_cif_fast(text)
        except Exception:
            c = None
        if c is not None:
            return c
    return parse_cif_pymatgen(text)
