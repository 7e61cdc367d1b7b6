#!/usr/bin/env python3
"""The side-by-side table of issue 9 from a folder of runs (ours and the peers, MP protocol).

    python scripts/peers/cmp_table.py runs/cmp

Reads, under the folder (the layout ``docs/results.md`` gives the commands for):

* ``ref_cgcnn_r*/``: txie-93/cgcnn runs (its ``test_results.csv`` of the best-validation model,
  ``log.txt``, and ``time.txt`` = ``/usr/bin/time -f %U_%S_%e``);
* ``cgcnn_s*``, ``megnet8_s*``, ``megnet_s*``, ``alignn_s*``: ``uae-dist finetune`` runs (``test_metrics.json``,
  ``val.csv``, ``config.yaml``) with ``<dir>.time`` beside them;
* ``matgl_megnet_s*/result.json`` and ``alignn_pure_s*/result.json`` (``scripts/peers/``).

Prints, per pair, the test MAE of every run, mean ± std over runs, the ratio of the means
(ours / peer), and CPU-s per epoch (whole runs, start-up and featurisation included, over the
epochs run; one thread each). Markdown, for ``docs/results.md``.
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path


def _cpu_s(path: Path):
    """user + sys CPU-s from the last line of a ``/usr/bin/time -f %U_%S_%e`` file."""
    if not path.exists():
        return None
    last = path.read_text().replace("\r", "\n").strip().splitlines()[-1]
    u, s, _wall = (float(x) for x in last.split("_"))
    return u + s


def _epochs(run: Path) -> int:
    with open(run / "val.csv") as fh:
        return max(int(r["epoch"]) for r in csv.DictReader(fh))


def ref_cgcnn(root: Path) -> list[dict]:
    out = []
    for d in sorted(root.glob("ref_cgcnn_r*")):
        if not (d / "test_results.csv").exists():
            continue
        with open(d / "test_results.csv") as fh:
            err = [abs(float(r[1]) - float(r[2])) for r in csv.reader(fh)]
        epochs = sum(1 for line in (d / "log.txt").read_text().splitlines()
                     if line.startswith(" * MAE"))  # one per validation; the test's is " ** MAE"
        cpu = _cpu_s(d / "time.txt")
        out.append({"run": d.name, "mae": sum(err) / len(err), "n_test": len(err),
                    "epochs": epochs, "cpu_s": cpu})
    return out


def ours(root: Path, prefix: str) -> list[dict]:
    out = []
    for d in sorted(root.glob(f"{prefix}_s*")):
        f = d / "test_metrics.json"
        if not d.is_dir() or not f.exists():
            continue
        m = json.loads(f.read_text())["targets"]["e_form_per_atom"]
        cpu = _cpu_s(d.with_suffix(".time"))
        out.append({"run": d.name, "mae": m["mae"], "n_test": m["count"], "epochs": _epochs(d),
                    "cpu_s": cpu})
    return out


def peer(root: Path, prefix: str, mae_key: str) -> list[dict]:
    out = []
    for d in sorted(root.glob(f"{prefix}_s*")):
        f = d / "result.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        cpu = _cpu_s(d.with_suffix(".time"))
        out.append({"run": d.name, "mae": r[mae_key], "n_test": r.get("n", {}).get("test"),
                    "epochs": r["epochs"], "cpu_s": cpu})
    return out


def _mae_stat(rows: list[dict]) -> str:
    xs = [r["mae"] for r in rows]
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f} (n={len(xs)})"


def table(root: Path) -> str:
    matgl = peer(root, "matgl_megnet", "test_mae")
    pairs = [("CGCNN", ours(root, "cgcnn"), "txie-93/cgcnn f42ab233", ref_cgcnn(root)),
             # megnet8: the 8 Å build narrowed to 4 Å while loading (every test structure, as
             # matgl); megnet: the 4 Å build, which rejects records with an isolated site
             ("MEGNet", ours(root, "megnet8"), "matgl 4.1.2 MEGNet", matgl),
             ("MEGNet (4 Å build)", ours(root, "megnet"), "matgl 4.1.2 MEGNet", matgl),
             ("ALIGNN", ours(root, "alignn"), "alignn 2026.8.11 alignn_atomwise_pure",
              peer(root, "alignn_pure", "test_mae_best_val"))]
    lines = ["| model | implementation | epochs | test MAE per run (eV/atom) | mean ± std | "
             "ours / peer | CPU-s per epoch |", "|---|---|---:|---|---|---:|---:|"]
    for name, mine, peer_name, theirs in pairs:
        if not mine and not theirs:
            continue
        ratio = "–"
        if mine and theirs:
            m = statistics.mean(r["mae"] for r in mine) / statistics.mean(r["mae"] for r in theirs)
            ratio = f"{m:.2f}×"
        for label, rows, first in (("ours", mine, True), (peer_name, theirs, False)):
            label += f" ({'/'.join(sorted({str(r['n_test']) for r in rows}))} test)" if rows else ""
            per_epoch = [r["cpu_s"] / r["epochs"] for r in rows if r.get("cpu_s") and r["epochs"]]
            epochs = "/".join(sorted({str(r["epochs"]) for r in rows})) or "–"
            maes = ", ".join(f"{r['mae']:.4f}" for r in rows) or "–"
            cpu = f"{statistics.mean(per_epoch):.1f}" if per_epoch else "–"
            lines.append(f"| {name} | {label} | {epochs} | {maes} | {_mae_stat(rows)} | "
                         f"{ratio if first else ''} | {cpu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(Path(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
