"""A split given as a file (``data build --split-file``), so that published splits are reused.

The file is JSON with ``train``, ``val`` and ``test`` lists of record ids (other keys are
ignored; a ``split.json`` of another build qualifies). Records of the source whose id is in none
of the lists are rejected (``not_in_split``), so every kept record is in exactly one part; listed
ids that the build does not keep (absent from the source, or rejected) are counted in the
manifest. The file's sha256 is part of the build's identity: ``--resume`` with another file is
refused.

Published splits ship with the package under ``uae_dist/splits/`` and are given by name
(``--split-file mp_cgcnn6000``): :func:`resolve` turns a name into that file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .options import OptionError

PARTS = ("train", "val", "test")
SHIPPED = Path(__file__).resolve().parents[1] / "splits"


def shipped() -> list[str]:
    """Names of the splits shipped with the package."""
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


def resolve(spec) -> Path:
    """A path, or the name of a shipped split → an absolute path. A path that exists wins; a
    name that is neither is an OptionError listing the shipped names."""
    p = Path(spec)
    if p.exists():
        return p.resolve()
    if p.name == str(spec) and (SHIPPED / f"{spec}.json").exists():
        return SHIPPED / f"{spec}.json"
    raise OptionError("--split-file", f"{spec}: no such file, and not a shipped split "
                                      f"(shipped: {', '.join(shipped()) or 'none'})")


def load(path) -> tuple[dict[str, str], str]:
    """id → part, and the file's sha256. OptionError (naming ``--split-file``) if unusable."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise OptionError("--split-file", f"{p}: cannot read it ({e.strerror})") from None
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise OptionError("--split-file", f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise OptionError("--split-file", f"{p}: expected an object with train, val and test")
    part_of: dict[str, str] = {}
    for part in PARTS:
        ids = d.get(part)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise OptionError("--split-file", f"{p}: {part!r} must be a list of id strings")
        for rid in ids:
            if rid in part_of:
                raise OptionError("--split-file", f"{p}: id {rid!r} is listed in "
                                                  f"{part_of[rid]} and in {part}")
            part_of[rid] = part
    if not part_of:
        raise OptionError("--split-file", f"{p}: lists no id")
    return part_of, hashlib.sha256(raw).hexdigest()


def apply(part_of: dict[str, str], kept_ids: list[str]) -> tuple[dict, dict]:
    """The split of the kept records (each part in the build's record order) and what the
    manifest says of the file's ids the build did not keep."""
    split = {part: [] for part in PARTS}
    for rid in kept_ids:
        split[part_of[rid]].append(rid)  # every kept id is listed: the others were rejected
    kept = set(kept_ids)
    absent = [rid for rid in part_of if rid not in kept]
    return split, {"listed": len(part_of), "absent": len(absent), "absent_examples": absent[:5]}
