"""Fast CIF reader (gemmi) that gives exactly what pymatgen's CIF parser gives, or declines.

``parse_cif_fast(text)`` returns a :class:`~uae_dist.data.crystal.Crystal` with the same atomic numbers,
site order, fractional coordinates and lattice matrix as ``pymatgen.core.Structure.from_str(text,
fmt="cif")`` (default options), or ``None`` when the CIF is one it cannot guarantee to read identically;
the caller then uses pymatgen. gemmi only tokenises the CIF (~10 us); the rest mirrors what pymatgen's
``CifParser`` does with an ordered structure:

* lattice: ``Lattice.from_parameters(a, b, c, alpha, beta, gamma)`` with pymatgen's default
  (non-VESTA) orientation: c along z, a in the xz plane -- same numpy operations, so bit-identical;
* coordinates within ``frac_tolerance = 1e-4`` (relative) of 1/3 or 2/3 are snapped to the ideal
  value, as ``CifParser._sanitize_data`` does, before anything else;
* symmetry images: each listed site goes through every ``_symmetry_equiv_pos_as_xyz`` (or
  ``_space_group_symop_operation_xyz``) operation (pymatgen's own ``SymmOp`` arithmetic; a CIF that lists
  no operations but names P 1 / number 1, or nothing, is P1 as for pymatgen), is wrapped with ``x - floor(x)`` and is kept unless it lies
  within ``site_tolerance = 1e-4`` (per fractional component, periodic) of an image already kept for
  the same element (``CifParser._unique_coords``);
* order: element groups, then sites sorted by electronegativity then symbol as pymatgen's final
  ``get_sorted_structure`` does (emulating its comparison exactly, NaN electronegativities included);
  within an element, listing order then operation order.

It declines (returns ``None``) for anything outside that path: partial or unusual occupancies,
a listed site that pymatgen would merge with another one (near-duplicates, symmetry images listed
twice), symbols that are not plain element symbols (oxidation-state labels such as ``Fe2+``, dummy
species, ``D``/``T``, water/hydroxyl shorthands), oxidation-state or magnetic CIFs, several data
blocks, non-ASCII text, tags spelt in another case (pymatgen's lookups are case-sensitive, gemmi's are
not), missing cell parameters, operations given only through a space-group symbol other than P 1,
unparseable or non-finite numbers, nearly flat cells, and any gemmi error.

Checked against pymatgen on all 36,737 MP and 1,346 HOIP CIFs (benchmarks/cif_agreement.py): every one
accepted, all bit-identical.
"""
from __future__ import annotations

import math
import re

import numpy as np

from .crystal import Crystal

try:  # gemmi is optional: without it every CIF goes through pymatgen
    import gemmi
    _cif_read_string = gemmi.cif.read_string
except Exception:  # pragma: no cover
    gemmi = None
    _cif_read_string = None

__all__ = ["parse_cif_fast", "available"]

FRAC_TOLERANCE = 1e-4   # pymatgen CifParser default frac_tolerance
SITE_TOLERANCE = 1e-4   # pymatgen CifParser default site_tolerance
MIN_THICKNESS = 0.02    # pymatgen rejects cells thinner than 0.01 A; leave anything near that to it

_CELL_TAGS = ("_cell_length_a", "_cell_length_b", "_cell_length_c",
              "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")
# the tags pymatgen's get_symops looks at first, in its order
_SYMOP_TAGS = ("_symmetry_equiv_pos_as_xyz", "_symmetry_equiv_pos_as_xyz_",
               "_space_group_symop_operation_xyz", "_space_group_symop_operation_xyz_")
# with no operations listed, pymatgen takes the space group from these (first one set), then from the
# number; only P1 (identity) is handled here
_HM_TAGS = ("_symmetry_space_group_name_H-M", "_symmetry_space_group_name_H_M", "_symmetry_space_group_name_H-M_",
            "_symmetry_space_group_name_H_M_", "_space_group_name_Hall", "_space_group_name_Hall_",
            "_space_group_name_H-M_alt", "_space_group_name_H-M_alt_", "_symmetry_space_group_name_hall",
            "_symmetry_space_group_name_hall_", "_symmetry_space_group_name_h-m", "_symmetry_space_group_name_h-m_")
_IT_TAGS = ("_space_group_IT_number", "_space_group_IT_number_", "_symmetry_Int_Tables_number",
            "_symmetry_Int_Tables_number_")
_SITE_TAGS = ("_atom_site_label", "_atom_site_type_symbol", "_atom_site_fract_x", "_atom_site_fract_y",
              "_atom_site_fract_z", "_atom_site_occupancy")
_UNCERTAINTY = re.compile(r"\(.+\)*")          # what pymatgen's str2float strips
_PMG_SPECIAL = re.compile("Hw|Ow|Wat|wat|OH|OH2|NO3")  # symbols pymatgen's _parse_symbol maps specially
_LABEL = re.compile(r"[A-Z][a-z]?\d*")
_TEXT_GUARDS = ("_space_group_magn", "_atom_site_moment", "_space_group_symop_magn",  # magCIF
                "powder_pattern", "save_", "global_", "stop_", "#\\#CIF_2",
                "_atom_site_attached_hydrogens")  # implicit H: refused by cif.parse_cif_pymatgen

_tables = None  # (symbol -> Z, symbol -> X (NaN kept), valid symbols incl. D/T)
_ops_cache: dict = {}


def available() -> bool:
    return _cif_read_string is not None


def _element_tables():
    global _tables
    if _tables is None:
        import warnings

        from pymatgen.core.periodic_table import Element
        z, x = {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for el in Element:
                if 1 <= el.Z <= 118 and el.symbol not in ("D", "T"):
                    z[el.symbol] = int(el.Z)
                    x[el.symbol] = float(el.X)
        valid = set(z) | {s for s in ("D", "T") if Element.is_valid_symbol(s)}
        _tables = (z, x, valid)
    return _tables


def _symop(s: str):
    """(pymatgen's SymmOp.from_xyz_str(s), is identity) (cached), or None if pymatgen rejects it."""
    op = _ops_cache.get(s)
    if op is None:
        from pymatgen.core.operations import SymmOp
        try:
            op = SymmOp.from_xyz_str(s)
            op.affine_matrix.setflags(write=False)
            op = (op, bool(np.array_equal(op.affine_matrix, np.eye(4))))
        except Exception:
            op = False
        if len(_ops_cache) < 100_000:
            _ops_cache[s] = op
    return None if op is False else op


def _str2float(s: str) -> float:
    """pymatgen's str2float for an unquoted token, but '.'/'?' and non-finite values raise."""
    if "(" in s:
        s = _UNCERTAINTY.sub("", s)
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(s)
    return v


def _unquote(v: str) -> str:
    if v and v[0] in "'\"":
        return gemmi.cif.as_string(v)
    return v


def _element_of(sym: str, from_label: bool, valid) -> str | None:
    """Element symbol pymatgen would read, restricted to plain cases; None otherwise."""
    if not from_label:
        return sym if sym in valid else None
    if _LABEL.fullmatch(sym) is None or _PMG_SPECIAL.match(sym):
        return None
    two = sym[:2].title()
    if two in valid:
        return two
    one = sym[0].upper()
    return one if one in valid else None


def _lattice_from_parameters(a, b, c, alpha, beta, gamma) -> np.ndarray:
    """Bit-identical to pymatgen's Lattice.from_parameters(..., vesta=False): the same numpy calls on the
    same shapes for every transcendental function; plain double arithmetic (in Python floats, which is
    the same IEEE arithmetic as on numpy scalars) for the rest."""
    angles_r = np.radians([alpha, beta, gamma])
    cos_alpha, cos_beta, cos_gamma = np.cos(angles_r).tolist()
    sin_alpha, sin_beta, sin_gamma = np.sin(angles_r).tolist()
    val = (cos_alpha * cos_beta - cos_gamma) / (sin_alpha * sin_beta)
    val = np.clip(np.float64(val), -1, 1)
    gamma_star = np.arccos(val)
    cg, sg = float(np.cos(gamma_star)), float(np.sin(gamma_star))
    return np.array([[a * sin_beta, 0.0, a * cos_beta],
                     [-b * sin_alpha * cg, b * sin_alpha * sg, b * cos_alpha],
                     [0.0, 0.0, float(c)]], dtype=np.float64)


def _pbc_match(p: np.ndarray, q: np.ndarray, tol: float) -> np.ndarray:
    """(len(p), len(q)) bool: all |d - round(d)| < tol, d = p_i - q_j (find_in_coord_list_pbc's test)."""
    d = p[:, None, :] - q[None, :, :]
    d -= np.round(d)
    np.abs(d, out=d)
    return (d[..., 0] < tol) & (d[..., 1] < tol) & (d[..., 2] < tol)


def _has_close_pair(c: np.ndarray, tol: float, dense_max: int = 48) -> bool:
    """Whether two rows of c match under find_in_coord_list_pbc's test (periodic, per component < tol)."""
    n = len(c)
    if n < 2:
        return False
    if n <= dense_max:
        return int(np.count_nonzero(_pbc_match(c, c, tol))) > n  # the diagonal always matches
    if float(np.abs(c).max()) > 1e3:
        return True  # wrapping below would lose the precision the prefilter relies on: decline
    # prefilter on x (circular distance of wrapped values, with slack), then the exact test on candidates
    x = c[:, 0] - np.floor(c[:, 0])
    order = np.argsort(x, kind="stable")
    sx = x[order]
    slack = tol * 1.001 + 1e-12
    ext = np.concatenate([sx, sx + 1.0])
    hi = np.searchsorted(ext, sx + slack, side="right")
    cnt = np.minimum(hi - np.arange(n) - 1, n - 1)
    total = int(cnt.sum())
    if total == 0:
        return False
    a = np.repeat(np.arange(n), cnt)
    b = (a + 1 + np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)) % n
    d = c[order[a]] - c[order[b]]
    d -= np.round(d)
    np.abs(d, out=d)
    return bool(((d[:, 0] < tol) & (d[:, 1] < tol) & (d[:, 2] < tol)).any())


def _thickness_ok(lattice: np.ndarray) -> bool:
    """Interplanar spacings d_100, d_010, d_001 all comfortably above pymatgen's 0.01 A minimum."""
    (a1, a2, a3), (b1, b2, b3), (c1, c2, c3) = lattice.tolist()
    bc = (b2 * c3 - b3 * c2, b3 * c1 - b1 * c3, b1 * c2 - b2 * c1)
    ca = (c2 * a3 - c3 * a2, c3 * a1 - c1 * a3, c1 * a2 - c2 * a1)
    ab = (a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1)
    vol = abs(a1 * bc[0] + a2 * bc[1] + a3 * bc[2])
    for v in (bc, ca, ab):
        area = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
        if not vol >= MIN_THICKNESS * area:  # NaN-safe
            return False
    return vol > 0.0


def _guarded(text: str) -> bool:
    """True when the text has nothing pymatgen's tokenizer/parser would treat differently from gemmi."""
    if not text.isascii() or text.count("data_") != 1:
        return False
    for g in _TEXT_GUARDS:
        if g in text:
            return False
    # pymatgen strips '#...' at a line start or after whitespace even inside quotes; gemmi does not.
    # Only a '#' after other text on a line with quotes (or in a text field) could matter.
    pos = text.find("#")
    while pos != -1:
        ls = text.rfind("\n", 0, pos) + 1
        le = text.find("\n", pos)
        if le == -1:
            le = len(text)
        if text[ls:pos].strip():
            line = text[ls:le]
            if "'" in line or '"' in line or line.startswith(";"):
                return False
        pos = text.find("#", le)
    return True


def _tag_exact(block, tag: str):
    """('pair', value) / ('loop', column) for a tag spelt exactly so; ('absent', None); None if spelt otherwise."""
    p = block.find_pair(tag)
    if p is not None:
        return ("pair", p[1]) if p[0] == tag else None
    col = block.find_loop(tag)
    if len(col) or col.get_loop() is not None:
        loop = col.get_loop()
        if loop is None or tag not in list(loop.tags):
            return None
        return "loop", col
    return "absent", None


def _pair_for_pymatgen(block, tag: str):
    """Value pymatgen's ``data.data.get(tag)`` sees (exact spelling), '' if none; None if it is a loop."""
    p = block.find_pair(tag)
    if p is None:
        return None if len(block.find_loop(tag)) else ""
    return _unquote(p[1]) if p[0] == tag else ""


def _p1_by_name(block) -> bool:
    """No operations listed: True when pymatgen's get_symops falls back to P1 (identity) for sure."""
    for tag in _HM_TAGS:
        v = _pair_for_pymatgen(block, tag)
        if v is None:
            return False
        if v:
            return re.sub(r"[\s_]", "", v) == "P1"
    for tag in _IT_TAGS:
        v = _pair_for_pymatgen(block, tag)
        if v is None:
            return False
        if v:
            return int(_str2float(v)) == 1
    return True  # pymatgen: "No _symmetry_equiv_pos_as_xyz type key found. Defaulting to P1."


def parse_cif_fast(text: str):
    """CIF text -> Crystal identical to pymatgen's reading, or None to defer to pymatgen."""
    if _cif_read_string is None or not isinstance(text, str):
        return None
    try:
        return _parse(text)
    except Exception:
        return None


def _parse(text: str):
    if not _guarded(text):
        return None
    doc = _cif_read_string(text)
    if len(doc) != 1:
        return None
    block = doc[0]
    zt, xt, valid = _element_tables()

    # ---- cell
    cell = []
    for tag in _CELL_TAGS:
        p = block.find_pair(tag)
        if p is None or p[0] != tag or p[1][:1] in ("'", '"', ";"):
            return None
        cell.append(_str2float(p[1]))
    if not (min(cell[:3]) > 0 and all(0 < x < 180 for x in cell[3:])):
        return None  # cif.parse_cif_pymatgen refuses it (bad_cell)

    # ---- oxidation states / anything making pymatgen build Species: decline
    if block.find_value("_atom_type_oxidation_number") is not None or \
            len(block.find_loop("_atom_type_oxidation_number")):
        return None

    # ---- symmetry operations (first tag pymatgen would use)
    ops_strings = None
    for tag in _SYMOP_TAGS:
        found = _tag_exact(block, tag)
        if found is None:
            return None
        kind, val = found
        if kind == "absent":
            continue
        if kind == "pair":
            ops_strings = [_unquote(val)]
        else:
            ops_strings = [_unquote(v) for v in val]
        break
    if ops_strings is None:
        if not _p1_by_name(block):
            return None
        ops_strings = ["x, y, z"]
    if not ops_strings or not all(ops_strings):
        return None
    ops = []
    identity_only = len(ops_strings) == 1
    for s in ops_strings:
        found = _symop(s)
        if found is None:
            return None
        ops.append(found[0])
        identity_only = identity_only and found[1]

    # ---- atom sites: one loop, tags spelt as pymatgen expects
    col = block.find_loop("_atom_site_label")
    loop = col.get_loop()
    if loop is None:
        return None
    tags = list(loop.tags)
    if "_atom_site_label" not in tags:
        return None
    lowered = [t.lower() for t in tags]
    idx = {}
    for tag in _SITE_TAGS:
        if tag in tags:
            idx[tag] = tags.index(tag)
        elif tag in lowered or block.find_value(tag) is not None or len(block.find_loop(tag)):
            return None  # present but spelt differently or outside the site loop
    for tag in _SITE_TAGS[2:5]:
        if tag not in idx:
            return None
    width = loop.width()
    values = list(loop.values)
    n = len(values) // width
    if n == 0 or n * width != len(values):
        return None

    # element symbols
    if "_atom_site_type_symbol" in idx:
        elements = values[idx["_atom_site_type_symbol"]::width]
        for el in elements:
            if el not in zt:   # quoted, oxidation-state labels, dummies, D/T ...: pymatgen's business
                return None
    else:
        elements = []
        for s in values[idx["_atom_site_label"]::width]:
            el = _element_of(s, True, valid)
            if el is None or el not in zt:
                return None
            elements.append(el)

    # occupancies: exactly 1 (pymatgen treats a missing column as 1)
    if "_atom_site_occupancy" in idx:
        occ = values[idx["_atom_site_occupancy"]::width]
        if any("(" in s for s in occ):
            occ = [_UNCERTAINTY.sub("", s) for s in occ]
        for v in map(float, occ):
            if v != 1.0:
                return None

    # fractional coordinates (pymatgen's str2float: uncertainties stripped; '.', '?', quotes: declined)
    raw = np.empty((n, 3), dtype=np.float64)
    for j, tag in enumerate(("_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z")):
        col_vals = values[idx[tag]::width]
        if any("(" in s for s in col_vals):
            col_vals = [_UNCERTAINTY.sub("", s) for s in col_vals]
        raw[:, j] = list(map(float, col_vals))
    if not np.isfinite(raw).all():
        return None
    # snapped to 1/3, 2/3 as CifParser._sanitize_data does (math.isclose(f / c, 1, abs_tol=1e-4, rel_tol=0))
    for comparison in (1 / 3, 2 / 3):
        close = np.abs(raw / comparison - 1) <= FRAC_TOLERANCE
        if close.any():
            raw[close] = float(str(comparison))

    # ---- lattice (pymatgen orientation) and pymatgen's minimum-thickness check
    lattice = _lattice_from_parameters(*cell)
    if not np.isfinite(lattice).all() or not _thickness_ok(lattice):
        return None

    # ---- symmetry images, merging as CifParser._get_structure / _unique_coords do
    if identity_only:
        # a listed site within tolerance of an earlier one would be merged by pymatgen
        if _has_close_pair(raw, SITE_TOLERANCE):
            return None
        coords = raw - np.floor(raw)
        if not np.array_equal(coords, raw) and _has_close_pair(coords, SITE_TOLERANCE):
            return None  # wrapping brought two sites within tolerance: pymatgen would drop one
        cand_el = elements
    else:
        imgs = []
        for k in range(n):
            pt = (float(raw[k, 0]), float(raw[k, 1]), float(raw[k, 2]))
            images = np.array([op.operate(pt) for op in ops], dtype=np.float64)  # pymatgen's own arithmetic
            if k and _pbc_match(images, raw[:k], SITE_TOLERANCE).any():
                return None  # symmetry-equivalent of an earlier listed site: pymatgen merges them
            imgs.append(images - np.floor(images))
        coords = np.concatenate(imgs, axis=0)
        nops = len(ops)
        cand_el = [el for el in elements for _ in range(nops)]
        keep = np.zeros(len(coords), dtype=bool)
        for el in set(elements):  # keep an image unless it matches one already kept for the element
            members = [i for i, e in enumerate(cand_el) if e == el]
            match = _pbc_match(coords[members], coords[members], SITE_TOLERANCE)
            kept: list[int] = []
            for c in range(len(members)):
                if not kept or not match[c, kept].any():
                    kept.append(c)
            keep[[members[c] for c in kept]] = True
        coords = coords[keep]
        cand_el = [e for e, k in zip(cand_el, keep) if k]

    # ---- order: pymatgen's final get_sorted_structure() (Site.__lt__: electronegativity, then symbol)
    present = set(cand_el)
    if not any(math.isnan(xt[el]) for el in present):
        # a consistent total order: element groups ascending by (X, symbol), listing/operation order inside
        rank = {el: r for r, el in enumerate(sorted(present, key=lambda el: (xt[el], el)))}
        order = np.argsort(np.fromiter((rank[el] for el in cand_el), dtype=np.int64, count=len(cand_el)),
                           kind="stable")
    else:
        # NaN electronegativities make that comparison order-dependent: reproduce pymatgen's input order
        # (groups by Composition, i.e. descending Element order with NaN as +inf) and its exact comparisons
        import functools
        xinf = {el: (math.inf if math.isnan(xt[el]) else xt[el]) for el in present}
        seq = [i for el in sorted(present, key=lambda el: (xinf[el], el), reverse=True)
               for i, e in enumerate(cand_el) if e == el]

        def site_cmp(i, j):
            ei, ej = cand_el[i], cand_el[j]
            if xt[ei] < xt[ej]:
                return -1
            if xt[ei] > xt[ej]:
                return 1
            return -1 if ei < ej else 1
        order = np.asarray(sorted(seq, key=functools.cmp_to_key(site_cmp)), dtype=np.intp)
    numbers = np.array([zt[el] for el in cand_el], dtype=np.int64)[order]
    frac = np.ascontiguousarray(coords[order])
    return Crystal(numbers, lattice, frac, np.ones(3, dtype=bool))
