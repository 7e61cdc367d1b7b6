"""Structure sources: JSON lists of records with CIF strings, CGCNN folders, extxyz / ASE files.

A :class:`Source` gives cheap access to raw records (:meth:`Source.record`: id, targets and the unparsed
payload) and parses one record into a :class:`Crystal` on demand (:meth:`Source.parse`), raising
:class:`ParseError` -- and only :class:`ParseError` -- for a record that cannot be turned into one
ordered periodic structure. Sanity checks of the parsed numbers (element range, NaN coordinates,
degenerate lattices, duplicate ids ...) are the graph builder's job, not the reader's: parsed values are
passed through as they are.

Formats (``open_source(path, fmt=...)``):

``json``
    A JSON list of dicts (``.json`` or ``.json.gz``), each with a CIF string under ``cif_key``. The id is
    taken from ``id_key`` (default: the first of ``material_id, id, hoip_id, mpid, name`` present in the
    first record, else the record index). Integral numbers are written without a decimal point
    (``1346.0`` -> ``"1346"``); a record whose id is missing or null gets its index as id. Targets default
    to every key whose values are numbers (or null) in the first records, minus the id and CIF keys.
``cgcnn``
    A folder with ``id_prop.csv`` (no header: ``id,target[,target2,...]``) and ``ID.cif`` files. Targets
    are named ``target0, target1, ...``; ``targets`` either selects among those names or, given as many
    names as there are target columns, renames the columns.
``extxyz`` / ``ase``
    Any file ``ase.io.read(path, index=":")`` reads (``extxyz`` forces that format). Targets: the numeric
    ``atoms.info`` keys plus the calculator's ``energy`` (and ``energy_per_atom``) when present; id from
    info ``id`` / ``name``, else the frame index. ``pbc`` comes from the Atoms; non-periodic axes are
    allowed as long as the cell has three linearly independent vectors (the fractional coordinates are
    defined with respect to it). A cell with a zero or dependent vector (the usual way to write a
    molecule or a slab without vacuum box) raises ``ParseError("non-periodic structure without a
    cell ...")``.

CIF payloads are parsed with :func:`uae_dist.data.fast_cif.parse_cif_fast` (gemmi) when ``fast_cif`` is
on and it accepts the CIF, which gives exactly what pymatgen would; otherwise with
``pymatgen.core.Structure.from_str(text, fmt="cif")``. A disordered (partially occupied or mixed) site
raises ``ParseError("disordered structure: partially occupied site ...")``.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import numbers as _numbers
import operator
import pathlib
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Crystal", "ParseError", "SourceRecord", "Source", "JsonSource", "CgcnnSource", "AseSource",
           "open_source", "parse_cif"]

DEFAULT_ID_KEYS = ("material_id", "id", "hoip_id", "mpid", "name")
_SNIFF = 100  # records looked at to choose default targets


# --------------------------------------------------------------------------- data classes
@dataclass
class Crystal:
    """One ordered periodic structure, as the graph builder consumes it."""
    numbers: np.ndarray   # (N,) int64 atomic numbers
    lattice: np.ndarray   # (3, 3) float64, rows are lattice vectors (pymatgen's orientation for CIFs)
    frac: np.ndarray      # (N, 3) float64 fractional coordinates
    pbc: np.ndarray = field(default_factory=lambda: np.ones(3, dtype=bool))  # (3,) bool

    @property
    def cart(self) -> np.ndarray:
        return self.frac @ self.lattice


class ParseError(ValueError):
    """A record that cannot be parsed into one ordered structure; the message says why."""


@dataclass
class SourceRecord:
    index: int       # position in the source (0-based)
    id: str          # record id kept from the source
    targets: dict    # {name: float}, NaN where missing / null / non-numeric
    payload: object  # raw, unparsed (CIF string, file path, ase Atoms ...)


# --------------------------------------------------------------------------- helpers
def _norm_id(v) -> str | None:
    """Record id as a string: integral numbers without a decimal point (1346.0 -> '1346')."""
    if v is None:
        return None
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, _numbers.Integral):
        return str(int(v))
    if isinstance(v, _numbers.Real):
        f = float(v)
        if math.isfinite(f) and f.is_integer():
            return str(int(f))
        return repr(f)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return str(v).strip()


def _is_number(v) -> bool:
    return isinstance(v, _numbers.Real) and not isinstance(v, bool)


def _to_float(v) -> float:
    """Target value as float; NaN for missing / null / non-numeric."""
    if v is None or isinstance(v, bool):
        return math.nan
    if isinstance(v, _numbers.Real):
        return float(v)
    if isinstance(v, (str, bytes)):
        try:
            return float(v)
        except ValueError:
            return math.nan
    if isinstance(v, np.ndarray) and v.size == 1 and np.issubdtype(v.dtype, np.number):
        return float(v.reshape(()))
    return math.nan


def _target_list(targets) -> list[str] | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
    else:
        names = [str(t).strip() for t in targets]
    if not names:
        return None
    dup = sorted({t for t in names if names.count(t) > 1})
    if dup:
        raise ValueError(f"target(s) given more than once: {dup}")
    return names


def _check_targets(names: list[str], available, what: str) -> None:
    available = list(available)
    missing = [t for t in names if t not in available]
    if missing:
        raise ValueError(f"unknown target(s) {missing} in {what}; available: {available}")


def _sha256_file(path: pathlib.Path, h=None):
    own = h is None
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() if own else h


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# --------------------------------------------------------------------------- CIF parsing
def _parse_cif_pymatgen(text: str) -> Crystal:
    try:
        from pymatgen.core import Structure
    except Exception as e:  # pragma: no cover - pymatgen is a dependency
        raise ParseError(f"CIF parse failed: pymatgen unavailable ({_reason(e)})") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            s = Structure.from_str(text, fmt="cif")
        except Exception as e:  # anything pymatgen throws (ValueError, KeyError, ZeroDivisionError ...)
            why = [" ".join(str(w.message).split()) for w in caught
                   if str(w.message).startswith("No structure parsed")]
            detail = _reason(e) + (f" ({'; '.join(why)})" if why else "")
            raise ParseError(f"CIF parse failed: {detail}") from None
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
        raise ParseError(f"CIF parse failed: {_reason(e)}") from None
    return Crystal(numbers, lattice, frac, pbc)


def _atomic_number(sp) -> int:
    """Z of a pymatgen Element/Species; 0 for a DummySpecies (whose .Z is meaningless) -- the builder rejects it."""
    from pymatgen.core.periodic_table import DummySpecies
    if isinstance(sp, DummySpecies):
        return 0
    return int(sp.Z)


def parse_cif(text, fast_cif: bool = True) -> Crystal:
    """CIF text -> Crystal; gemmi fast path when it applies, pymatgen otherwise. Raises ParseError only."""
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
    return _parse_cif_pymatgen(text)


# --------------------------------------------------------------------------- sources
class Source:
    """Base class: random access to the records of one structure file / folder."""

    fmt: str = "?"

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self._sha = None
        self._names: list[str] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def target_names(self) -> list[str]:
        return list(self._names)

    def _check_index(self, k) -> int:
        k = operator.index(k)
        n = len(self)
        if not 0 <= k < n:
            raise IndexError(f"record {k} out of range for {self.fmt} source of {n} records")
        return k

    def record(self, k: int) -> SourceRecord:
        raise NotImplementedError

    def parse(self, rec: SourceRecord) -> Crystal:
        raise NotImplementedError

    def __iter__(self):
        for k in range(len(self)):
            yield self.record(k)

    def sha256(self) -> str:
        if self._sha is None:
            self._sha = _sha256_file(self.path)
        return self._sha

    def describe(self) -> dict:
        return {"fmt": self.fmt, "path": str(self.path), "n": len(self), "targets": self.target_names()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, n={len(self)}, targets={self.target_names()})"


class JsonSource(Source):
    fmt = "json"

    def __init__(self, path, *, id_key=None, cif_key="cif", targets=None, fast_cif=True):
        super().__init__(path)
        self.fast_cif = bool(fast_cif)
        self.cif_key = cif_key
        opener = gzip.open if self.path.name.endswith(".gz") else open
        try:
            with opener(self.path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{self.path}: cannot read a JSON list of records: {_reason(e)}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{self.path}: expected a JSON list of objects (records), "
                             f"got {type(data).__name__}")
        self._data = data
        keys: list[str] = []
        seen = set()
        for r in data:
            for key in r:
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
        self.keys = keys
        first = data[0] if data else {}
        if data and cif_key not in seen:
            raise ValueError(f"{self.path}: no CIF key {cif_key!r} in the records; keys: {keys}")
        if id_key is None:
            id_key = next((key for key in DEFAULT_ID_KEYS if key in first), None)
        elif data and id_key not in seen:
            raise ValueError(f"{self.path}: id key {id_key!r} not in the records; keys: {keys}")
        self.id_key = id_key
        names = _target_list(targets)
        if names is None:
            sniff = data[:_SNIFF]
            names = [key for key in keys if key not in (id_key, cif_key)
                     and all(r.get(key) is None or _is_number(r.get(key)) for r in sniff)
                     and any(_is_number(r.get(key)) for r in sniff)]
        else:
            _check_targets(names, [key for key in keys if key != cif_key], str(self.path))
        self._names = names

    def __len__(self) -> int:
        return len(self._data)

    def record(self, k: int) -> SourceRecord:
        k = self._check_index(k)
        r = self._data[k]
        rid = _norm_id(r.get(self.id_key)) if self.id_key is not None else None
        if rid is None:
            rid = str(k)
        return SourceRecord(k, rid, {t: _to_float(r.get(t)) for t in self._names}, r.get(self.cif_key))

    def parse(self, rec: SourceRecord) -> Crystal:
        return parse_cif(rec.payload, self.fast_cif)

    def describe(self) -> dict:
        return {"fmt": self.fmt, "path": str(self.path), "n": len(self), "id_key": self.id_key,
                "cif_key": self.cif_key, "targets": self.target_names(), "fast_cif": self.fast_cif}


class CgcnnSource(Source):
    fmt = "cgcnn"

    def __init__(self, path, *, targets=None, fast_cif=True):
        super().__init__(path)
        self.fast_cif = bool(fast_cif)
        idp = self.path / "id_prop.csv"
        if not idp.is_file():
            raise ValueError(f"{self.path}: not a CGCNN folder (no id_prop.csv)")
        rows = []
        with open(idp, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                row = [c.strip() for c in row]
                if not row or not any(row):
                    continue
                rows.append(row)
        self._rows = rows
        ncol = max((len(r) - 1 for r in rows), default=0)
        columns = [f"target{i}" for i in range(ncol)]
        names = _target_list(targets)
        if names is None:
            self._names, self._cols = columns, list(range(ncol))
        elif all(t in columns for t in names):
            self._names, self._cols = names, [columns.index(t) for t in names]
        elif len(names) == ncol:
            self._names, self._cols = names, list(range(ncol))
        else:
            raise ValueError(f"{idp}: unknown target(s) {[t for t in names if t not in columns]}; the file has "
                             f"{ncol} target column(s) {columns} (give that many names to rename them)")

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, k: int) -> SourceRecord:
        k = self._check_index(k)
        row = self._rows[k]
        rid = row[0]
        vals = row[1:]
        t = {name: (_to_float(vals[c]) if c < len(vals) else math.nan) for name, c in zip(self._names, self._cols)}
        return SourceRecord(k, rid, t, self.path / f"{rid}.cif")

    def parse(self, rec: SourceRecord) -> Crystal:
        p = pathlib.Path(rec.payload)
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise ParseError(f"CIF file not found: {p}") from None
        except OSError as e:
            raise ParseError(f"CIF file unreadable: {p}: {_reason(e)}") from None
        return parse_cif(text, self.fast_cif)

    def sha256(self) -> str:
        """sha256 over id_prop.csv then every *.cif in sorted name order (name, NUL, size, NUL, bytes)."""
        if self._sha is None:
            h = hashlib.sha256()
            files = [self.path / "id_prop.csv"] + sorted(
                (p for p in self.path.iterdir() if p.suffix.lower() == ".cif" and p.is_file()),
                key=lambda p: p.name)
            for p in files:
                h.update(p.name.encode("utf-8") + b"\0" + str(p.stat().st_size).encode() + b"\0")
                _sha256_file(p, h)
            self._sha = h.hexdigest()
        return self._sha

    def describe(self) -> dict:
        return {"fmt": self.fmt, "path": str(self.path), "n": len(self), "id_key": None, "cif_key": None,
                "targets": self.target_names(), "target_columns": list(self._cols), "fast_cif": self.fast_cif}


class AseSource(Source):
    """extxyz (or any format ase.io.read reads); every frame is one record, payload the Atoms."""

    def __init__(self, path, *, fmt="extxyz", id_key=None, targets=None):
        super().__init__(path)
        self.fmt = fmt
        import ase.io
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames = ase.io.read(str(self.path), index=":", format="extxyz" if fmt == "extxyz" else None)
        except Exception as e:
            raise ValueError(f"{self.path}: ase cannot read it as {fmt}: {_reason(e)}") from None
        if not isinstance(frames, list):
            frames = [frames]
        self._frames = frames
        self.id_key = id_key
        if id_key is not None and not any(id_key in a.info for a in frames):
            raise ValueError(f"{self.path}: id key {id_key!r} not in any frame's info")
        id_keys = (id_key,) if id_key is not None else ("id", "name")
        self._id_keys = id_keys
        info_keys: list[str] = []
        seen = set()
        has_energy = False
        for a in frames:
            for key, v in a.info.items():
                if key not in seen and key not in id_keys and _is_number(v):
                    seen.add(key)
                    info_keys.append(key)
            if self._energy(a) is not None:
                has_energy = True
        available = list(info_keys)
        for extra in ("energy", "energy_per_atom"):
            if has_energy and extra not in seen:
                available.append(extra)
        names = _target_list(targets)
        if names is None:
            names = available
        else:
            all_info = {key for a in frames for key in a.info}
            _check_targets(names, available + sorted(all_info - set(available)), str(self.path))
        self._names = names

    @staticmethod
    def _energy(atoms):
        v = atoms.info.get("energy")
        if _is_number(v):
            return float(v)
        calc = atoms.calc
        if calc is None:
            return None
        results = getattr(calc, "results", None) or {}
        e = results.get("energy", results.get("free_energy"))
        try:
            return None if e is None else float(e)
        except (TypeError, ValueError):
            return None

    def __len__(self) -> int:
        return len(self._frames)

    def record(self, k: int) -> SourceRecord:
        k = self._check_index(k)
        a = self._frames[k]
        rid = None
        for key in self._id_keys:
            if a.info.get(key) is not None:
                rid = _norm_id(a.info[key])
                break
        if rid is None:
            rid = str(k)
        t = {}
        for name in self._names:
            if name in a.info:
                t[name] = _to_float(a.info[name])
            elif name == "energy":
                e = self._energy(a)
                t[name] = math.nan if e is None else e
            elif name == "energy_per_atom":
                e = self._energy(a)
                t[name] = math.nan if e is None or len(a) == 0 else e / len(a)
            else:
                t[name] = math.nan
        return SourceRecord(k, rid, t, a)

    def parse(self, rec: SourceRecord) -> Crystal:
        a = rec.payload
        try:
            numbers = np.array(a.numbers, dtype=np.int64).reshape(-1)
            pbc = np.array(a.pbc, dtype=bool).reshape(3)
            cell = np.array(a.cell.array, dtype=np.float64).reshape(3, 3)
            pos = np.array(a.positions, dtype=np.float64).reshape(-1, 3)
        except Exception as e:
            raise ParseError(f"bad ase frame: {_reason(e)}") from None
        if len(numbers) == 0:
            raise ParseError("empty structure: no atoms")
        if not np.all(np.isfinite(cell)) or np.linalg.matrix_rank(cell) < 3:
            what = "non-periodic structure without a cell" if not pbc.all() else "periodic structure with a degenerate cell"
            raise ParseError(f"{what}: cell vector lengths {np.round(np.linalg.norm(cell, axis=1), 6).tolist()}, "
                             f"pbc {pbc.tolist()}; give the frame three independent cell vectors")
        try:
            frac = np.linalg.solve(cell.T, pos.T).T
        except Exception as e:
            raise ParseError(f"cannot get fractional coordinates: {_reason(e)}") from None
        return Crystal(numbers, cell, np.ascontiguousarray(frac), pbc)

    def describe(self) -> dict:
        return {"fmt": self.fmt, "path": str(self.path), "n": len(self), "id_key": self.id_key,
                "cif_key": None, "targets": self.target_names(), "fast_cif": None}


# --------------------------------------------------------------------------- entry point
def _guess_fmt(path: pathlib.Path) -> str:
    if path.is_dir():
        if (path / "id_prop.csv").is_file():
            return "cgcnn"
        raise ValueError(f"{path}: a folder but not a CGCNN one (no id_prop.csv)")
    name = path.name.lower()
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith((".extxyz", ".xyz", ".extxyz.gz", ".xyz.gz")):
        return "extxyz"
    return "ase"


def open_source(path, *, fmt="auto", id_key=None, cif_key="cif", targets=None, fast_cif=True) -> Source:
    """Open a structure source; see the module docstring for the formats and options."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"structure source not found: {path}")
    fmt = (fmt or "auto").lower()
    if fmt == "auto":
        fmt = _guess_fmt(path)
    if fmt == "json":
        return JsonSource(path, id_key=id_key, cif_key=cif_key or "cif", targets=targets, fast_cif=fast_cif)
    if fmt == "cgcnn":
        if not path.is_dir():
            raise ValueError(f"{path}: fmt='cgcnn' needs a folder with id_prop.csv")
        return CgcnnSource(path, targets=targets, fast_cif=fast_cif)
    if fmt in ("extxyz", "ase"):
        return AseSource(path, fmt=fmt, id_key=id_key, targets=targets)
    raise ValueError(f"unknown source format {fmt!r}; expected auto, json, cgcnn, extxyz or ase")
