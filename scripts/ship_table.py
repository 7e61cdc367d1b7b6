#!/usr/bin/env python3
"""Ship a pretraining's UAE with the package, as a named table (issue 10.4).

    python scripts/ship_table.py --run runs/pretrain --name mp-v1 \\
        --reproduce "make pretrain" --downstream runs/matrix_uae [--featurizer mp_v1 mp_v1_ft]

writes ``uae_dist/tables/<name>/``: every format of ``uae-dist export`` of the run's best
checkpoint, and a model card that adds to the export's (recipe = the run's config, data, split
and training-id hashes, validation and test metrics) the table's name, the command that
reproduces it, and its downstream results: for each task × backbone of the matrix results in
``--downstream`` (``uae-dist results`` is run there first), the test MAE over seeds of the
featurizers that used this table (frozen, fine-tuned) beside the backbone's default features and
the % change.
``load_uae("<name>")``, ``model.features: uae:<name>`` and ``uae-dist export <name> --out DIR``
then find it in an installed package, offline. The leak check of ``uae-dist finetune`` reads
the training ids shipped beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def downstream(runs_dir: Path, featurizers: list[str]) -> list[dict]:
    """The rows of ``featurizers`` and of each backbone's default, from ``uae-dist results``."""
    from uae_dist.experiments.results import gather_and_write

    rows = gather_and_write(runs_dir, plots=False).rows
    keep = ("task", "dataset", "target", "units", "backbone", "featurizer", "n_done", "mae_mean",
            "mae_std", "rmse_mean", "r2_mean", "mae_change_pct")
    return [{k: r.get(k) for k in keep} for r in rows
            if r["featurizer"] in featurizers or r["is_default"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="pretraining run directory")
    p.add_argument("--name", required=True, help="the table's name (uae_dist/tables/NAME)")
    p.add_argument("--reproduce", required=True, help="the command that reproduces the run")
    p.add_argument("--downstream", type=Path, help="a matrix's runs directory that used it")
    p.add_argument("--featurizer", nargs="+", default=["uae"],
                   help="that matrix's featurizers of this table (e.g. frozen and fine-tuned)")
    p.add_argument("--verdict", default="", help="one line on what the downstream results show")
    a = p.parse_args(argv)

    from uae_dist.export import CARD, export
    from uae_dist.tables import SHIPPED

    out = SHIPPED / a.name
    card = export(a.run, out)
    card["table_name"] = a.name
    card["recipe"] = {"reproduce": a.reproduce, "config": "the `config` field of this card",
                      "run": str(a.run)}
    if a.downstream:
        card["downstream"] = {"results": str(a.downstream), "featurizers": a.featurizer,
                              "rows": downstream(a.downstream, a.featurizer),
                              "verdict": a.verdict}
    (out / CARD).write_text(json.dumps(card, indent=1, allow_nan=False))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {len(list(out.iterdir()))} files, {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
