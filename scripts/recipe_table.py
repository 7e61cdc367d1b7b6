#!/usr/bin/env python3
"""The recipe × backbone × featurizer table of issue 10, from a matrix's ``uae-dist results``.

    uae-dist results runs/matrix_uae && python scripts/recipe_table.py runs/matrix_uae

One row per table (a featurizer name, its fine-tuned variant named ``<name>_ft``), one column
pair (as the featurizer sets it, and ``_ft``) per task × backbone: in matrix_uae the named tables
are frozen and ``_ft`` fine-tuned, while the baselines are as the backbone's config has them
(MEGNet trains its embedding). Each entry: test MAE mean ± std over seeds and, in brackets,
the ratio to the backbone's default features (the issue's targets are ratios: ≤ 0.85 for CGCNN on
the MP protocol, ≤ 0.66 for MEGNet on HOIP). Prints Markdown.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def cell(row: dict | None) -> str:
    if not row or not row["mae_mean"]:
        return "–"
    std = f" ± {float(row['mae_std']):.4f}" if row["mae_std"] else ""
    pct = row["mae_change_pct"]
    ratio = f" ({1 + float(pct) / 100:.2f}×)" if pct else " (1×)"
    n = "" if row["n_done"] == row["n_cells"] else f" [{row['n_done']}/{row['n_cells']}]"
    return f"{float(row['mae_mean']):.4f}{std}{ratio}{n}"


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys((r["task"], r["backbone"]) for r in rows))
    by = {(r["task"], r["backbone"], r["featurizer"]): r for r in rows}
    names = list(dict.fromkeys(r["featurizer"].removesuffix("_ft") for r in rows))
    head = "| table | " + " | ".join(f"{b} {t} | {b} {t} `_ft`" for t, b in cols)
    out = [head + " |", "|---" * (1 + 2 * len(cols)) + "|"]
    for n in names:
        vals = []
        for t, b in cols:
            frozen, ft = by.get((t, b, n)), by.get((t, b, f"{n}_ft"))
            vals += [cell(frozen), cell(ft) if ft else "–"]
        out.append(f"| {n} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a matrix's out_root, after `uae-dist results`")
    a = p.parse_args(argv)
    src = a.runs / "results" / "results.csv"
    if not src.exists():
        print(f"{src} not found: run `uae-dist results {a.runs}` first", file=sys.stderr)
        return 2
    with open(src, newline="") as f:
        print(table(list(csv.DictReader(f))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
