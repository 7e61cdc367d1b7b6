"""Helpers for the data reliability tests: small inputs made from real MP records, and the CLI run
as a real process (with a timeout, so that a hang fails the test instead of the CI job)."""
from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MP = Path(os.environ.get("UAE_DATA_DIR", ROOT.parent / "shared" / "data")) / \
    "mp_cgcnn_36737.json.gz"

_CACHE: dict = {}


def mp_records(n: int) -> list[dict]:
    """Copies of the first ``n`` MP records (skips the test when the data set is absent)."""
    import pytest

    if not MP.exists():
        pytest.skip(f"MP data set not found at {MP}")
    if "mp" not in _CACHE:
        with gzip.open(MP, "rt") as fh:
            _CACHE["mp"] = json.load(fh)
    return [dict(r) for r in _CACHE["mp"][:n]]


def write_json(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt") as fh:
        json.dump(records, fh)
    return path


def cgcnn_folder(root: Path, records: list[dict], target: str = "e_form_per_atom",
                 bom: bool = False) -> Path:
    """A CGCNN folder (id_prop.csv + ID.cif) of MP records."""
    root.mkdir(parents=True)
    with open(root / "id_prop.csv", "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f)
        for r in records:
            w.writerow([r["material_id"], r[target]])
    for r in records:
        (root / f"{r['material_id']}.cif").write_text(r["cif"])
    return root


def cli(*args, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    """``uae-dist ARGS`` as a process; a hang past ``timeout`` raises TimeoutExpired."""
    return subprocess.run([str(BIN / "uae-dist"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)


def rejects(out: Path) -> dict:
    """{id or index: reason} of a build's rejects.jsonl."""
    rows = [json.loads(ln) for ln in (Path(out) / "rejects.jsonl").read_text().splitlines()]
    return {r["id"] if r["id"] is not None else r["index"]: r["reason"] for r in rows}


def reject_rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "rejects.jsonl").read_text().splitlines()]


def manifest(out: Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())
