#!/usr/bin/env python3
"""The MP side-by-side protocol of issue 9: 6,000 MP structures, formation energy, CGCNN's split.

    python scripts/mp_protocol.py --out runs/protocol/mp6000 [--n 6000] [--seed 0]

writes, under ``--out``:

* ``cgcnn/`` — a folder the reference CGCNN (txie-93/cgcnn) reads unmodified: ``<id>.cif`` per
  structure, ``id_prop.csv`` (id, e_form_per_atom) in the order of the sample, and
  ``atom_init.json`` (CGCNN's 92-feature table, from ``uae_dist.tables.load_table("cgcnn92")``;
  ``--table onehot|random|…`` writes another);
* ``lmdb/`` — our graph data set built from that folder (``uae-dist data build``, 8 Å, every
  image; ``--lmdb NAME --cutoff C --max-neighbors K`` build narrower ones, e.g. the 12 nearest
  for CGCNN/ALIGNN or 4 Å for MEGNet, so the loader narrows nothing each epoch), whose
  ``split.json`` is CGCNN's own split of the same ids (``cgcnn_split.json``, given to the
  build as ``--split-file``; an id the build rejects is in no split, see the manifest);
* ``protocol.json`` — the source's sha256, the counts and the split sizes.

``--ship`` (re)writes the package's copy of the split, ``uae_dist/splits/mp_cgcnn6000.json``,
which ``uae-dist data build --source mp --split-file mp_cgcnn6000`` (and the CPU matrix) reads
to build the same 6,000 structures straight from the MP file; ``tests/test_protocol_split.py``
checks that the shipped file equals what this script computes.

The protocol, exactly: read ``mp_cgcnn_36737.json.gz`` (sha256 checked), drop the records with
``e_form_per_atom < -4.5`` eV/atom (bad old MP entries), keep the rest in file order and take
``random.Random(seed).sample(records, n)``. CGCNN's split (``cgcnn/data.py`` at f42ab233): it
reads ``id_prop.csv`` into a list, calls ``random.seed(123); random.shuffle(rows)``, then takes
train = the first ``int(0.8 n)`` rows, val = ``rows[-(n_val + n_test):-n_test]`` and test = the
last ``n_test = int(0.1 n)`` rows. :func:`cgcnn_split` reproduces that on the same ids.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MP = ROOT.parent / "shared" / "data" / "mp_cgcnn_36737.json.gz"
MP_SHA256 = "ae0a87e9ea075fb03fa0954af150c2cbb9ae7278412eadd040728672f7d2ef7c"
TARGET = "e_form_per_atom"
EF_MIN = -4.5
SHIPPED_SPLIT = ROOT / "uae_dist" / "splits" / "mp_cgcnn6000.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sample_records(path: Path = MP, n: int = 6000, seed: int = 0) -> list[dict]:
    """The protocol's records, in the order ``random.Random(seed).sample`` returns them."""
    got = sha256(path)
    if path.name == MP.name and got != MP_SHA256:
        raise SystemExit(f"{path}: sha256 {got} ≠ {MP_SHA256}")
    with gzip.open(path, "rt") as fh:
        records = [r for r in json.load(fh) if r[TARGET] is not None and r[TARGET] >= EF_MIN]
    return random.Random(seed).sample(records, n)


def cgcnn_split(ids: list[str], val_ratio: float = 0.1, test_ratio: float = 0.1,
                seed: int = 123) -> dict[str, list[str]]:
    """CGCNN's default split of the rows of ``id_prop.csv`` (ids in file order)."""
    rows = list(ids)
    random.seed(seed)  # CIFData.__init__ seeds the global RNG, then shuffles
    random.shuffle(rows)
    n = len(rows)
    n_train, n_val, n_test = int((1 - val_ratio - test_ratio) * n), int(val_ratio * n), \
        int(test_ratio * n)
    return {"train": rows[:n_train], "val": rows[-(n_val + n_test):-n_test],
            "test": rows[-n_test:]}


def protocol_split(path: Path = MP, n: int = 6000, seed: int = 0) -> dict:
    """The shipped form of the protocol's split: CGCNN's split of the sample, with provenance."""
    ids = [r["material_id"] for r in sample_records(path, n, seed)]
    return {"about": f"issue 9's MP protocol: {MP.name} without {TARGET} < {EF_MIN}, "
                     f"random.Random({seed}).sample(records, {n}) in file order, then CGCNN's "
                     "split (random.seed(123) shuffle, 0.8/0.1/0.1); scripts/mp_protocol.py",
            "source_sha256": MP_SHA256, **cgcnn_split(ids)}


def write_cgcnn_folder(records: list[dict], out: Path, table: str = "cgcnn92") -> None:
    from uae_dist.interop import write_atom_init
    from uae_dist.tables import load_table

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "id_prop.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        for r in records:
            w.writerow([r["material_id"], repr(float(r[TARGET]))])
    for r in records:
        (out / f"{r['material_id']}.cif").write_text(r["cif"])
    write_atom_init(load_table(table), out / "atom_init.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source", type=Path, default=MP)
    p.add_argument("--n", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", default="cgcnn92", help="atom_init.json of the reference's folder")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--lmdb", default="lmdb", help="name of the graph build under --out")
    p.add_argument("--cutoff", type=float, default=8.0, help="Å, of the graph build")
    p.add_argument("--max-neighbors", type=int, default=None,
                   help="also cap the stored graphs (12: CGCNN/ALIGNN; the loader's rule)")
    p.add_argument("--ship", action="store_true",
                   help="write the split to uae_dist/splits/mp_cgcnn6000.json and stop")
    a = p.parse_args(argv)
    if a.ship:
        dest = SHIPPED_SPLIT
        dest.write_text(json.dumps(protocol_split(a.source, a.n, a.seed), indent=0) + "\n")
        print(f"{dest}: written")
        return 0
    records = sample_records(a.source, a.n, a.seed)
    folder = a.out / "cgcnn"
    if not (folder / "id_prop.csv").exists():  # never rewrite a folder a run may be reading
        write_cgcnn_folder(records, folder, a.table)
    ids = [r["material_id"] for r in records]
    split = cgcnn_split(ids)
    lmdb = a.out / a.lmdb
    split_file = a.out / "cgcnn_split.json"
    split_file.write_text(json.dumps(split))
    if not (lmdb / "manifest.json").exists():
        cap = [] if a.max_neighbors is None else ["--max-neighbors", str(a.max_neighbors)]
        subprocess.run([sys.executable, "-m", "uae_dist.cli", "data", "build", "--source",
                        str(folder), "--out", str(lmdb), "--targets", TARGET, "--workers",
                        str(a.workers), "--cutoff", str(a.cutoff), "--split-file",
                        str(split_file), *cap], check=True)
    (a.out / "protocol.json").write_text(json.dumps({
        "source": str(a.source), "source_sha256": sha256(a.source), "n": a.n, "seed": a.seed,
        "dropped": f"{TARGET} < {EF_MIN}", "split": "cgcnn random.seed(123) 0.8/0.1/0.1",
        "sizes": {k: len(v) for k, v in split.items()}}, indent=1))
    sizes = json.dumps({k: len(v) for k, v in split.items()})
    print(f"{folder}: {len(ids)} structures; {lmdb}: split {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
