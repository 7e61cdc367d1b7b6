"""On-disk layout of a built data set: the file names every reader and writer uses, and which
files in a directory a build owns (the only ones ``--overwrite`` may delete).

::

    DIR/manifest.json      written last, atomically: its presence means "complete"
    DIR/split.json         train/val/test ids
    DIR/rejects.jsonl      one JSON object per rejected source record
    DIR/shards/shard-00000-of-00004.lmdb (+ "-lock")   one LMDB file per writer
"""
from __future__ import annotations

import json
import re
from pathlib import Path

MANIFEST = "manifest.json"
SPLIT = "split.json"
REJECTS = "rejects.jsonl"
SHARD_DIR = "shards"
FORMAT = "uae-dist graph LMDB"  # manifest["format"]

NAMES = (MANIFEST, SPLIT, REJECTS, SHARD_DIR)  # what a build creates directly in its directory
_SHARD_RE = re.compile(r"shard-\d{5}-of-\d{5}\.lmdb(-lock)?")
_TOP = (MANIFEST, SPLIT, REJECTS)


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.lmdb"


def _is_our_manifest(p: Path) -> bool:
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def classify(root: Path) -> tuple[list[Path], list[Path]]:
    """(files a build wrote, everything else) directly in ``root`` and in its shard folder.

    A build writes only the three top-level files (and their ``.tmp`` siblings while writing) and
    ``shards/shard-*-of-*.lmdb[-lock]``; a ``manifest.json`` of another format is not ours.
    """
    ours: list[Path] = []
    foreign: list[Path] = []
    if not root.is_dir():
        return ours, foreign
    for p in sorted(root.iterdir()):
        tmp = p.name.endswith(".tmp")
        name = p.name[:-4] if tmp else p.name
        if p.is_file() and not p.is_symlink() and name in _TOP:
            mine = tmp or name != MANIFEST or _is_our_manifest(p)
            (ours if mine else foreign).append(p)
        elif p.name == SHARD_DIR and p.is_dir() and not p.is_symlink():
            for q in sorted(p.iterdir()):
                mine = q.is_file() and not q.is_symlink() and _SHARD_RE.fullmatch(q.name)
                (ours if mine else foreign).append(q)
        else:
            foreign.append(p)
    return ours, foreign
