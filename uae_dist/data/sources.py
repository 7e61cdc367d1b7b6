"""Structure sources: JSON lists of records with CIF strings, CGCNN folders, extxyz / ASE files.

A :class:`Source` gives cheap access to raw records (:meth:`Source.record`: id, targets, the
unparsed payload, and any ``problem`` the reader found) and parses one record into a
:class:`Crystal` on demand (:meth:`Source.parse`), raising :class:`ParseError` -- and only
:class:`ParseError` -- for a record that cannot be turned into one ordered periodic structure.
Sanity checks of the parsed numbers (element range, NaN coordinates, degenerate lattices, duplicate
ids ...) are the graph builder's job, not the reader's: parsed values are passed through as they
are.

What a reader decides from the whole source, never from one record: the id key, the default
targets (keys whose non-null values are numbers in most records that have them) and, for CGCNN, the
number of target columns (the commonest row width). A record that does not fit is not dropped
silently and does not change the others: it carries ``problem = (reason, detail)`` and the build
rejects it:

``missing_id``         the record lacks the source's id key (or it is null / empty)
``non_numeric_label``  a target value that is not a number (``"abc"``, ``true``, a list); null,
                       an empty CSV cell and ``nan`` mean "not labelled" and are kept
``malformed_row``      a CGCNN row with another number of columns than the file's rows
``unsafe_id``          a CGCNN id that is not a plain file name (``../x``, ``/abs``): it would read
                       a file outside the folder and outside the source hash

Only regular files are read (a FIFO or ``/dev/zero`` named ``X.cif`` would block or never end),
and a CIF file over :data:`MAX_FILE_BYTES` is refused (``unreadable_file``).

Formats (``open_source(path, fmt=...)``):

``json``
    A JSON list of dicts (``.json`` or ``.json.gz``), each with a CIF string under ``cif_key``. The
    id is taken from ``id_key``, by default the one of ``material_id, id, hoip_id, mpid, name`` that
    most records have (none: the record index). Integral numbers are written without a decimal point
    (``1346.0`` -> ``"1346"``). Numeric strings (``"1.5"``) are read as numbers.
``cgcnn``
    A folder with ``id_prop.csv`` (no header: ``id,target[,target2,...]``; a UTF-8 BOM is ignored)
    and ``ID.cif`` files. Targets are named ``target0, target1, ...``; ``targets`` either selects
    among those names or, given as many names as there are target columns, renames the columns.
``extxyz`` / ``ase``
    Any file ``ase.io.read(path, index=":")`` reads (``extxyz`` forces that format). Targets: the
    numeric ``atoms.info`` keys plus the calculator's ``energy`` (and ``energy_per_atom``) when
    present; id from the info key ``id_key``, by default whichever of ``id`` / ``name`` most frames
    have (none: the frame index). ``pbc`` comes from the Atoms; non-periodic axes are allowed as
    long as the cell has three linearly independent vectors (the fractional coordinates are
    defined with respect to it). A cell with a zero or dependent vector (the usual way to write a
    molecule or a slab without vacuum box) raises ``ParseError("non-periodic structure without a
    cell ...")``.

CIF payloads are parsed by :func:`uae_dist.data.cif.parse_cif` (gemmi fast path, pymatgen otherwise;
refusals of bad cells and changed chemistry are described there).
"""
from __future__ import annotations

import collections
import csv
import gzip
import hashlib
import io
import json
import operator
import pathlib
import warnings

import numpy as np

from .cif import parse_cif
from .crystal import Crystal, ParseError, describe_error
from .records import (MAX_FILE_BYTES, SourceRecord, _check_targets, _is_number, _labels,
                      _norm_id, _numeric_keys, _pick_id_key, _regular_source, _safe_file_id,
                      _sha256_file, _target_list, label_value, read_bounded)

__all__ = ["Crystal", "ParseError", "SourceRecord", "Source", "JsonSource", "CgcnnSource",
           "AseSource", "open_source", "parse_cif", "label_value", "MAX_FILE_BYTES"]

DEFAULT_ID_KEYS = ("material_id", "id", "hoip_id", "mpid", "name")


# --------------------------------------------------------------------------- sources
class Source:
    """Base class: random access to the records of one structure file / folder."""

    fmt: str = "?"

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self._sha = None
        self._names: list[str] = []
        self.per_atom: dict = {}   # derived targets {name: source key}, divided by the atom count

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
        return {"fmt": self.fmt, "path": str(self.path), "n": len(self),
                "targets": self.target_names()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, n={len(self)}, "
                f"targets={self.target_names()})")


class JsonSource(Source):
    fmt = "json"

    def __init__(self, path, *, id_key=None, cif_key="cif", targets=None, fast_cif=True):
        super().__init__(path)
        self.fast_cif = bool(fast_cif)
        self.cif_key = cif_key
        _regular_source(self.path)
        opener = gzip.open if self.path.name.endswith(".gz") else open
        try:
            with opener(self.path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{self.path}: cannot read a JSON list of records: "
                             f"{describe_error(e)}") from None
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
        if data and cif_key not in seen:
            raise ValueError(f"{self.path}: no CIF key {cif_key!r} in the records; keys: {keys}")
        if id_key is None:
            id_key = _pick_id_key(data, DEFAULT_ID_KEYS)
        elif data and id_key not in seen:
            raise ValueError(f"{self.path}: id key {id_key!r} not in the records; keys: {keys}")
        self.id_key = id_key
        names = _target_list(targets)
        if names is None:
            names = _numeric_keys(data, {id_key, cif_key})
        else:
            self.per_atom = _check_targets(names, [key for key in keys if key != cif_key],
                                           str(self.path))
        self._names = names

    def __len__(self) -> int:
        return len(self._data)

    def record(self, k: int) -> SourceRecord:
        k = self._check_index(k)
        r = self._data[k]
        targets, problem = _labels(self._names, r.get, self.per_atom)
        if self.id_key is None:
            rid = str(k)
        else:
            rid = _norm_id(r.get(self.id_key))
            if rid is None:
                problem = ("missing_id", f"no {self.id_key!r} (the id key of this source) in the "
                                         "record, or it is null or empty")
        return SourceRecord(k, rid, targets, r.get(self.cif_key), problem)

    def parse(self, rec: SourceRecord) -> Crystal:
        return parse_cif(rec.payload, self.fast_cif)

    def describe(self) -> dict:
        return {"fmt": self.fmt, "path": str(self.path), "n": len(self), "id_key": self.id_key,
                "cif_key": self.cif_key, "targets": self.target_names(),
                "fast_cif": self.fast_cif, **({"per_atom": self.per_atom} if self.per_atom else {})}


class CgcnnSource(Source):
    fmt = "cgcnn"

    def __init__(self, path, *, targets=None, fast_cif=True):
        super().__init__(path)
        self.fast_cif = bool(fast_cif)
        idp = self.path / "id_prop.csv"
        if not idp.exists():
            raise ValueError(f"{self.path}: not a CGCNN folder (no id_prop.csv)")
        _regular_source(idp)
        with open(idp, "rb") as f:  # a regular file: the read ends
            text = f.read().decode("utf-8-sig", "replace")  # Excel writes a BOM
        rows = []
        for row in csv.reader(io.StringIO(text, newline="")):
            row = [c.strip() for c in row]
            if row and any(row):
                rows.append(row)
        self._rows = rows
        widths = collections.Counter(len(r) - 1 for r in rows)
        # the commonest width, so one odd row neither adds a column nor loses the others
        ncol = max(widths, key=lambda w: (widths[w], -w), default=0)
        self._ncol = ncol
        columns = [f"target{i}" for i in range(ncol)]
        names = _target_list(targets)
        if names is None:
            self._names, self._cols = columns, list(range(ncol))
        elif all(t in columns for t in names):
            self._names, self._cols = names, [columns.index(t) for t in names]
        elif len(names) == ncol:
            self._names, self._cols = names, list(range(ncol))
        else:
            raise ValueError(f"{idp}: unknown target(s) {[t for t in names if t not in columns]}; "
                             f"the file has {ncol} target column(s) {columns} (give that many "
                             "names to rename them)")

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, k: int) -> SourceRecord:
        k = self._check_index(k)
        row = self._rows[k]
        rid, vals = row[0] or None, row[1:]
        cells = {name: vals[c] if c < len(vals) else None
                 for name, c in zip(self._names, self._cols)}
        targets, problem = _labels(self._names, cells.get)
        if len(vals) != self._ncol:
            problem = ("malformed_row", f"id_prop.csv row {k + 1} has {len(vals)} value(s) after "
                                        f"the id; the file's rows have {self._ncol}")
        payload = None
        if rid is None:
            problem = ("missing_id", f"id_prop.csv row {k + 1} has an empty id")
        elif not _safe_file_id(rid):
            problem = ("unsafe_id", f"id {rid!r} is not a plain file name inside {self.path}")
        else:
            payload = self.path / f"{rid}.cif"
        return SourceRecord(k, rid, targets, payload, problem)

    def parse(self, rec: SourceRecord) -> Crystal:
        if rec.payload is None:
            raise ParseError(f"no CIF file for id {rec.id!r}", reason="unsafe_id")
        text = read_bounded(rec.payload).decode("utf-8", "replace")
        return parse_cif(text, self.fast_cif)

    def sha256(self) -> str:
        """sha256 over id_prop.csv then every regular *.cif in sorted name order (name, NUL, size,
        NUL, bytes). FIFOs and devices are skipped: they are never read either."""
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
        return {"fmt": self.fmt, "path": str(self.path), "n": len(self), "id_key": None,
                "cif_key": None, "targets": self.target_names(),
                "target_columns": list(self._cols), "fast_cif": self.fast_cif}


class AseSource(Source):
    """extxyz (or any format ase.io.read reads); every frame is one record, payload the Atoms."""

    def __init__(self, path, *, fmt="extxyz", id_key=None, targets=None):
        super().__init__(path)
        self.fmt = fmt
        import ase.io
        _regular_source(self.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames = ase.io.read(str(self.path), index=":",
                                     format="extxyz" if fmt == "extxyz" else None)
        except Exception as e:
            raise ValueError(f"{self.path}: ase cannot read it as {fmt}: "
                             f"{describe_error(e)}") from None
        if not isinstance(frames, list):
            frames = [frames]
        self._frames = frames
        infos = [a.info for a in frames]
        if id_key is not None and not any(id_key in i for i in infos):
            raise ValueError(f"{self.path}: id key {id_key!r} not in any frame's info")
        self.id_key = id_key if id_key is not None else _pick_id_key(infos, ("id", "name"))
        exclude = {id_key} if id_key is not None else {"id", "name"}
        available = _numeric_keys(infos, exclude)
        if any(self._energy(a) is not None for a in frames):
            available += [e for e in ("energy", "energy_per_atom") if e not in available]
        names = _target_list(targets)
        if names is None:
            names = available
        else:
            all_info = {key for i in infos for key in i}
            self.per_atom = _check_targets(names, available + sorted(all_info - set(available)),
                                           str(self.path))
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

    def _value(self, a, name):
        if name in a.info:
            return a.info[name]
        e = self._energy(a) if name in ("energy", "energy_per_atom") else None
        if e is None:
            return None
        return e if name == "energy" else (e / len(a) if len(a) else None)

    def record(self, k: int) -> SourceRecord:
        k = self._check_index(k)
        a = self._frames[k]
        targets, problem = _labels(self._names, lambda name: self._value(a, name), self.per_atom)
        if self.id_key is None:
            rid = str(k)
        else:
            rid = _norm_id(a.info.get(self.id_key))
            if rid is None:
                problem = ("missing_id", f"frame {k} has no info key {self.id_key!r} (the id key "
                                         "of this source)")
        return SourceRecord(k, rid, targets, a, problem)

    def parse(self, rec: SourceRecord) -> Crystal:
        a = rec.payload
        try:
            numbers = np.array(a.numbers, dtype=np.int64).reshape(-1)
            pbc = np.array(a.pbc, dtype=bool).reshape(3)
            cell = np.array(a.cell.array, dtype=np.float64).reshape(3, 3)
            pos = np.array(a.positions, dtype=np.float64).reshape(-1, 3)
        except Exception as e:
            raise ParseError(f"bad ase frame: {describe_error(e)}") from None
        if len(numbers) == 0:
            raise ParseError("empty structure: no atoms")
        if not np.all(np.isfinite(cell)) or np.linalg.matrix_rank(cell) < 3:
            what = ("non-periodic structure without a cell" if not pbc.all()
                    else "periodic structure with a degenerate cell")
            lengths = np.round(np.linalg.norm(cell, axis=1), 6).tolist()
            raise ParseError(f"{what}: cell vector lengths {lengths}, pbc {pbc.tolist()}; give "
                             "the frame three independent cell vectors")
        try:
            frac = np.linalg.solve(cell.T, pos.T).T
        except Exception as e:
            raise ParseError(f"cannot get fractional coordinates: {describe_error(e)}") from None
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


def open_source(path, *, fmt="auto", id_key=None, cif_key="cif", targets=None,
                fast_cif=True) -> Source:
    """Open a structure source; see the module docstring for the formats and options."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"structure source not found: {path}")
    fmt = (fmt or "auto").lower()
    if fmt == "auto":
        fmt = _guess_fmt(path)
    if fmt == "json":
        return JsonSource(path, id_key=id_key, cif_key=cif_key or "cif", targets=targets,
                          fast_cif=fast_cif)
    if fmt == "cgcnn":
        if not path.is_dir():
            raise ValueError(f"{path}: fmt='cgcnn' needs a folder with id_prop.csv")
        return CgcnnSource(path, targets=targets, fast_cif=fast_cif)
    if fmt in ("extxyz", "ase"):
        return AseSource(path, fmt=fmt, id_key=id_key, targets=targets)
    raise ValueError(f"unknown source format {fmt!r}; expected auto, json, cgcnn, extxyz or ase")
