"""Reading helpers shared by the source formats: records, label values, key choice, safe file reads.

See :mod:`uae_dist.data.sources` for the policy these implement (keys chosen from the whole source,
non-numeric labels and unsafe ids as per-record problems, only bounded regular files read).
"""
from __future__ import annotations

import collections
import hashlib
import math
import numbers as _numbers
import os
import pathlib
import stat
from dataclasses import dataclass

import numpy as np

from .crystal import ParseError, describe_error

MAX_FILE_BYTES = 64 << 20  # one CIF file; a 200-atom P1 CIF is ~20 kB


# --------------------------------------------------------------------------- data classes
@dataclass
class SourceRecord:
    index: int       # position in the source (0-based)
    id: str | None   # record id kept from the source; None when the record has none
    targets: dict    # {name: float}, NaN where missing / null / not a number
    payload: object  # raw, unparsed (CIF string, file path, ase Atoms ...)
    problem: tuple[str, str] | None = None  # (reject reason, detail) found by the reader


class LabelError(ValueError):
    """A target value that is not a number."""


# --------------------------------------------------------------------------- helpers
def _norm_id(v) -> str | None:
    """Record id as a string: integral numbers without a decimal point (1346.0 -> '1346');
    None for a missing, null or empty id."""
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
    return str(v).strip() or None


def _is_number(v) -> bool:
    return isinstance(v, _numbers.Real) and not isinstance(v, bool)


def label_value(v) -> float:
    """One target value as float: NaN for "not labelled" (None, an empty string, ``nan``);
    LabelError for anything that is not a number (a bool, ``"abc"``, a list ...)."""
    if v is None:
        return math.nan
    if _is_number(v):
        return float(v)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str):
        if not v.strip():
            return math.nan
        try:
            return float(v)
        except ValueError:
            pass
    elif isinstance(v, np.ndarray) and v.size == 1 and np.issubdtype(v.dtype, np.number):
        return float(v.reshape(()))
    raise LabelError(f"{v!r} is not a number")


def _labels(names, get, derived=None) -> tuple[dict, tuple[str, str] | None]:
    """{name: value} for ``get(name)`` (``get(derived[name])`` for a derived target, still per
    structure), and the first non-numeric label as a problem."""
    out, problem = {}, None
    derived = derived or {}
    for name in names:
        v = get(derived.get(name, name))
        try:
            out[name] = label_value(v)
        except LabelError as e:
            out[name] = math.nan
            problem = problem or ("non_numeric_label", f"{name}: {e}")
    return out, problem


def _numeric_keys(dicts, exclude) -> list[str]:
    """Keys, in first-seen order, whose non-null values are numbers in more records than not,
    counted over every record (so one odd value neither adds nor removes a target)."""
    num: dict = collections.Counter()
    other: dict = collections.Counter()
    order: dict = {}
    for d in dicts:
        for key, v in d.items():
            if key in exclude or v is None:
                continue
            order.setdefault(key, len(order))
            (num if _is_number(v) else other)[key] += 1
    return [k for k in sorted(order, key=order.get) if num[k] > other[k]]


def _pick_id_key(dicts, candidates) -> str | None:
    """The candidate present (non-null) in most records, earlier candidates winning ties."""
    count = collections.Counter()
    for d in dicts:
        for key in candidates:
            if d.get(key) is not None:
                count[key] += 1
    best = max(candidates, key=lambda k: (count[k], -candidates.index(k)), default=None)
    return best if best is not None and count[best] else None


def _regular_source(path: pathlib.Path) -> None:
    """A source file must be a regular file (a FIFO would block, /dev/zero never end)."""
    try:
        st = path.stat()
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({describe_error(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file (a FIFO, device or socket); give the data "
                         "file itself")


def read_bounded(path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ParseError('unreadable_file')
    otherwise. Opened non-blocking and checked on the open descriptor, so a FIFO never blocks."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ParseError(f"CIF file not found: {path}", reason="unreadable_file") from None
    except OSError as e:
        raise ParseError(f"CIF file unreadable: {path}: {describe_error(e)}",
                         reason="unreadable_file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ParseError(f"{path}: not a regular file (a FIFO, device or directory); only "
                             "regular CIF files are read", reason="unreadable_file")
        if st.st_size > max_bytes:
            raise ParseError(f"{path}: {st.st_size:,} bytes; CIF files over {max_bytes:,} bytes "
                             "are not read", reason="unreadable_file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as e:
        raise ParseError(f"CIF file unreadable: {path}: {describe_error(e)}",
                         reason="unreadable_file") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while being read
        raise ParseError(f"{path}: over {max_bytes:,} bytes; not read", reason="unreadable_file")
    return data


def _safe_file_id(rid: str) -> bool:
    """An id that names a file directly inside the CGCNN folder."""
    return (rid not in (".", "..") and not any(c in rid for c in "/\\\0")
            and not os.path.isabs(rid))


PER_ATOM = "_per_atom"


def _check_targets(names: list[str], available, what: str) -> dict:
    """Refuse unknown targets; return the derived ones, ``{name: source key}``: a requested
    ``KEY_per_atom`` that the source lacks but whose ``KEY`` it has (MP's ``volume``, ``magmom``)
    is read from ``KEY`` and divided by the structure's atom count when its graph is built."""
    available = list(available)
    derived = {t: t[:-len(PER_ATOM)] for t in names if t not in available
               and t.endswith(PER_ATOM) and t[:-len(PER_ATOM)] in available}
    missing = [t for t in names if t not in available and t not in derived]
    if missing:
        raise ValueError(f"unknown target(s) {missing} in {what}; available: {available} "
                         f"(and KEY{PER_ATOM} for any of them)")
    return derived


def _target_list(targets) -> list[str] | None:
    if targets is None:
        return None
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str)
                                 else map(str, targets))]
    names = [t for t in names if t]
    if not names:
        return None
    dup = sorted({t for t in names if names.count(t) > 1})
    if dup:
        raise ValueError(f"target(s) given more than once: {dup}")
    return names


def _sha256_file(path: pathlib.Path, h=None):
    own = h is None
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() if own else h
