"""One-off check: the gemmi fast CIF path against pymatgen on whole data sets.

    PYTHONPATH=. .venv/bin/python benchmarks/cif_agreement.py [FILE.json.gz ...] [--limit N]

For every record: pymatgen's ``Structure.from_str(cif, fmt="cif")`` (through sources' reader with the
fast path off) and ``fast_cif.parse_cif_fast``; counts records the fast path accepts, and for those,
any difference in atomic numbers / site order, fractional coordinates (> 1e-8) or lattice (> 1e-8).
Prints per-structure times of both readers. Exit status 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uae_dist.data.fast_cif import parse_cif_fast  # noqa: E402
from uae_dist.data.sources import ParseError, parse_cif  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DEFAULT = [DATA / "mp_cgcnn_36737.json.gz", DATA / "hoip_kim2017_1346.json.gz"]


def symmetrised(path: pathlib.Path, n: int) -> list[str]:
    """Non-P1 versions (asymmetric unit + operations, CifWriter(symprec=0.01)) of n records spread over the set."""
    import warnings

    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter
    with gzip.open(path, "rt") as f:
        recs = json.load(f)
    out = []
    for r in recs[:: max(1, len(recs) // n)][:n]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(str(CifWriter(Structure.from_str(r["cif"], fmt="cif"), symprec=0.01)))
    return out


def check(path: pathlib.Path, limit: int | None, cifs: list[str] | None = None, name: str | None = None) -> int:
    if cifs is None:
        with gzip.open(path, "rt") as f:
            recs = json.load(f)
        if limit:
            recs = recs[:limit]
        cifs = [r["cif"] for r in recs]
    parse_cif_fast(cifs[0])  # warm-up (imports, element table)
    parse_cif(cifs[0], fast_cif=False)
    n = len(cifs)
    t_fast = t_pmg = 0.0
    accepted = mismatches = pmg_errors = 0
    max_df = max_dl = 0.0
    bit_identical = 0
    examples = []
    for k, text in enumerate(cifs):
        t0 = time.perf_counter()
        fast = parse_cif_fast(text)
        t1 = time.perf_counter()
        try:
            ref = parse_cif(text, fast_cif=False)
        except ParseError as e:
            ref = e
        t2 = time.perf_counter()
        t_fast += t1 - t0
        t_pmg += t2 - t1
        if isinstance(ref, ParseError):
            pmg_errors += 1
            if fast is not None:
                mismatches += 1
                examples.append((k, f"fast accepted, pymatgen failed: {ref}"))
            continue
        if fast is None:
            continue
        accepted += 1
        ok = (fast.numbers.shape == ref.numbers.shape and np.array_equal(fast.numbers, ref.numbers)
              and fast.frac.shape == ref.frac.shape)
        df = float(np.abs(fast.frac - ref.frac).max()) if ok else np.inf
        dl = float(np.abs(fast.lattice - ref.lattice).max())
        ok = ok and df <= 1e-8 and dl <= 1e-8 and bool(np.array_equal(fast.pbc, ref.pbc))
        if ok:
            max_df, max_dl = max(max_df, df), max(max_dl, dl)
            bit_identical += int(df == 0.0 and dl == 0.0)
        else:
            mismatches += 1
            examples.append((k, f"numbers/order equal={np.array_equal(fast.numbers, ref.numbers)} "
                                f"max|dfrac|={df:.3g} max|dlattice|={dl:.3g}"))
        if (k + 1) % 5000 == 0:
            print(f"  {k + 1}/{n} ...", flush=True)
    # the fast path alone, back to back (the interleaved timing above pays for pymatgen's cache pollution)
    t0 = time.perf_counter()
    for text in cifs:
        parse_cif_fast(text)
    t_alone = time.perf_counter() - t0
    print(f"{name or path.name}: {n} records")
    print(f"  fast path accepted {accepted} ({100 * accepted / n:.2f} %), declined {n - accepted - pmg_errors}, "
          f"pymatgen errors {pmg_errors}")
    print(f"  mismatches {mismatches}; bit-identical {bit_identical}/{accepted}; "
          f"max |dfrac| {max_df:.3g}, max |dlattice| {max_dl:.3g}")
    print(f"  time per structure: fast path {1e3 * t_fast / n:.4f} ms (all records, incl. declines), "
          f"pymatgen {1e3 * t_pmg / n:.3f} ms, speed-up {t_pmg / max(t_fast, 1e-12):.0f}x")
    print(f"  fast path alone, back to back: {1e3 * t_alone / n:.4f} ms per structure")
    for k, msg in examples[:10]:
        print(f"  record {k}: {msg}")
    return mismatches


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", type=pathlib.Path, default=DEFAULT)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--symmetrised", type=int, default=0, metavar="N",
                    help="also check N symmetrised (non-P1) CIFs written from the first file's structures")
    a = ap.parse_args()
    bad = sum(check(p, a.limit) for p in a.files)
    if a.symmetrised:
        cifs = symmetrised(a.files[0], a.symmetrised)
        bad += check(a.files[0], None, cifs, f"{a.files[0].name}, symmetrised with CifWriter(symprec=0.01)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
