"""``uae-dist`` command line: parses and dispatches, nothing more."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def cmd_data_build(a) -> int:
    from uae_dist.data.build import BuildError, build_lmdb
    from uae_dist.data.options import BuildOptions, parse_bound

    try:
        bounds = {} if a.no_default_bounds else BuildOptions().bounds
        bounds |= dict(parse_bound(b) for b in a.bound or [])
        m = build_lmdb(a.source, a.out, targets=a.targets, cutoff=a.cutoff,
                       max_neighbors=a.max_neighbors, max_pairs=a.max_pairs, shards=a.shards,
                       workers=a.workers, limit=a.limit, resume=a.resume, overwrite=a.overwrite,
                       bounds=bounds, fmt=a.format, id_key=a.id_key, cif_key=a.cif_key,
                       fast_cif=not a.no_fast_cif, seed=a.seed, split=a.split,
                       split_file=a.split_file,
                       commit_every=a.commit_every, progress=not a.quiet)
    except (FileNotFoundError, ValueError, BuildError) as e:
        print(f"uae-dist data build: error: {e}", file=sys.stderr)
        return 2
    rank = next((int(os.environ[v]) for v in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
                 if v in os.environ), 0)
    if m is not None and rank == 0:
        c = m["counts"]
        print(f"{c['records']:,} records ({c['rejected']:,} rejected, see {a.out}/rejects.jsonl) "
              f"in {m['build']['wall_s']:.1f} s = {m['build']['records_per_s']:,.0f} "
              f"structures/s → {a.out}")
    return 0


def _add_build_arguments(b: argparse.ArgumentParser) -> None:
    """The build's options; defaults and their help come from BuildOptions / RunOptions."""
    from uae_dist.data.options import FORMATS, BuildOptions, RunOptions

    o, r = BuildOptions(), RunOptions()
    bounds = ", ".join(f"{k} [{lo:g}, {hi:g}]" for k, (lo, hi) in o.bounds.items())
    b.add_argument("--source", required=True, help="a file or folder (JSON(.gz) records, CGCNN "
                   "folder, extxyz or anything ASE reads) or a known data set name: mp, hoip")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--targets", default=o.targets, help="comma-separated label names (default: "
                   "the known set's, else every field holding numbers in most records)")
    b.add_argument("--cutoff", type=float, default=o.cutoff,
                   help=f"neighbour cutoff in Å (default {o.cutoff:g})")
    b.add_argument("--max-neighbors", type=int, default=o.max_neighbors,
                   help="keep the N nearest (whole tied shells)")
    b.add_argument("--max-pairs", type=int, default=o.max_pairs,
                   help="reject a structure whose estimated neighbour pairs exceed N "
                        f"(too_many_neighbors; default {o.max_pairs:,})")
    b.add_argument("--shards", type=int, default=o.shards, help=f"default {o.shards}")
    b.add_argument("--workers", type=int, default=r.workers,
                   help=f"local worker processes (default {r.workers})")
    b.add_argument("--limit", type=int, default=o.limit, help="only the first N source records")
    b.add_argument("--resume", action="store_true", default=r.resume,
                   help="finish an interrupted build")
    b.add_argument("--overwrite", action="store_true", default=r.overwrite,
                   help="delete the files of an existing build in --out first (refused if --out "
                        "holds files uae-dist did not write)")
    b.add_argument("--bound", action="append", metavar="NAME=LO:HI",
                   help=f"sanity bound of a label (repeatable); defaults: {bounds}")
    b.add_argument("--no-default-bounds", action="store_true")
    b.add_argument("--format", default=o.fmt, choices=FORMATS)
    b.add_argument("--id-key", default=o.id_key, help="key of the record id (default: the one "
                   "most records have of material_id, id, hoip_id, mpid, name)")
    b.add_argument("--cif-key", default=o.cif_key, help=f"JSON key of the CIF text "
                   f"(default {o.cif_key})")
    b.add_argument("--no-fast-cif", action="store_true", default=not o.fast_cif,
                   help="parse every CIF with pymatgen")
    b.add_argument("--split", default=",".join(f"{x:g}" for x in o.split),
                   help="train,val,test fractions (default %(default)s)")
    b.add_argument("--seed", type=int, default=o.seed, help="split seed (default %(default)s)")
    b.add_argument("--split-file", default=o.split_file, metavar="JSON|NAME",
                   help="use this split instead (train/val/test lists of ids, e.g. a published "
                        "split or another build's split.json, or the name of a shipped one such "
                        "as mp_cgcnn6000); unlisted records are rejected")
    b.add_argument("--commit-every", type=int, default=r.commit_every,
                   help="records per LMDB transaction (default %(default)s)")
    b.add_argument("-q", "--quiet", action="store_true", default=not r.progress,
                   help="no progress bar")


def cmd_data_verify(a) -> int:
    from uae_dist.data.verify import verify

    problems = verify(a.dir, decode=not a.no_decode, progress=not a.quiet)
    for p in problems:
        print(f"DAMAGED: {p}")
    if problems:
        print(f"{a.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{a.dir}: OK")
    return 0


def cmd_data_info(a) -> int:
    from uae_dist.data.verify import format_summary, summary

    try:
        s = summary(a.dir)
    except FileNotFoundError as e:
        print(f"uae-dist data info: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=1) if a.json else format_summary(s))
    if a.plot:
        from uae_dist.data.verify import plot_summary

        plot_summary(a.dir, a.plot)
        print(f"plot → {a.plot}", file=sys.stderr if a.json else sys.stdout)
    return 0


def _add_experiments(sub) -> None:
    """``uae-dist matrix list|run|prepare`` and ``uae-dist results`` (docs/experiments.md)."""
    from uae_dist.experiments import commands as X

    mx = sub.add_parser("matrix", help="run an experiment matrix (backbone × featurizer × task × "
                        "seed) on this machine or as a Slurm array",
                        description="See docs/experiments.md for the matrix file.")
    msub = mx.add_subparsers(dest="matrix_command", metavar="ACTION", required=True)

    def matrix_file(p):
        p.add_argument("file", help="matrix YAML: a path or a shipped name (matrix_smoke)")
        p.add_argument("--out-root", default=None, help="replace the file's out_root")

    ls = msub.add_parser("list", help="the cells with their index and status, and the array size")
    matrix_file(ls)
    ls.add_argument("--count", action="store_true", help="print only the number of cells")
    ls.add_argument("--json", action="store_true", help="machine-readable cells")
    ls.add_argument("--commands", action="store_true", help="also each cell's command")
    ls.set_defaults(func=X.matrix_list)

    r = msub.add_parser("run", help="run the cells not done yet (resuming interrupted ones)",
                        description="Exit codes: 0 all selected cells done, 1 a cell failed, "
                        "2 bad matrix or --cell, 75 stopped by a signal (rerun to resume).")
    matrix_file(r)
    r.add_argument("--jobs", "-j", type=int, default=None, help="cells at once (default: run.jobs)")
    r.add_argument("--cell", type=int, default=None, metavar="K",
                   help="run only cell K (e.g. --cell $SLURM_ARRAY_TASK_ID)")
    r.add_argument("--launcher", default=None, help="command prefix of each cell, e.g. 'srun' or "
                   "'torchrun --nproc_per_node 2 --no-python' (default: run.launcher)")
    r.add_argument("--dry-run", action="store_true", help="print what would run and the commands")
    r.add_argument("--list", action="store_true", help="print the cells (like `matrix list`)")
    r.set_defaults(func=X.matrix_run)

    pr = msub.add_parser("prepare", help="build the matrix's data sets that are missing")
    matrix_file(pr)
    pr.add_argument("--workers", type=int, default=1, help="build worker processes")
    pr.set_defaults(func=X.matrix_prepare)

    res = sub.add_parser("results", help="gather a matrix's cells: table (mean ± std over seeds, "
                         "%% change vs the default featurizer), parity plots, learning curves")
    res.add_argument("runs_dir", help="the matrix's out_root (with matrix.json), or any folder "
                     "of cells")
    res.add_argument("--out", default=None, help="output folder (default: RUNS_DIR/results)")
    res.add_argument("--no-plots", action="store_true", help="tables only")
    res.add_argument("--strict", action="store_true", help="exit 1 if a cell is missing or failed")
    res.set_defaults(func=X.results)


def cmd_analyze(a) -> int:
    from uae_dist.analysis import analyze, parse_compare

    models = [m for m in a.models.split(",") if m]
    import shlex

    compare = ",".join(parse_compare(a.compare)) or "none"
    command = shlex.join(["uae-dist", "analyze", a.table, "--out", a.out, "--compare", compare,
                          "--seeds", str(a.seeds), "--seed", str(a.seed), "--k-max", str(a.k_max),
                          "--models", a.models, "--folds", str(a.folds), "--repeats",
                          str(a.repeats), "--permutations", str(a.permutations)])
    try:
        s = analyze(a.table, a.out, compare=parse_compare(a.compare), seeds=a.seeds,
                    k_max=a.k_max, models=models, folds=a.folds, repeats=a.repeats, seed=a.seed,
                    permutations=a.permutations, command=command)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"uae-dist analyze: error: {e}", file=sys.stderr)
        return 2
    c = s["clusters"]
    print(f"{s['table']}: {len(s['elements'])} elements analysed ({len(s['untrained'])} untrained"
          f", {len(s['absent'])} absent left out); k = {c['k']} (elbow {c['k_elbow']}), "
          f"silhouette {c['silhouette_mean']:.3f} ± {c['silhouette_std']:.3f} → "
          f"{a.out}/report.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from uae_dist import __version__

    p = argparse.ArgumentParser(prog="uae-dist", description="Universal atomic embeddings for crystals: "
                                "data building, pretraining and export.")
    p.add_argument("--version", action="version", version=f"uae-dist {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # the deepspeed launcher puts --local_rank=N before the command (deepspeed --module uae_dist.cli)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="build, verify and describe graph data sets (sharded LMDB)")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = dsub.add_parser("build", help="structures → periodic neighbour graphs → sharded LMDB + manifest",
                        description="Works in parallel with --workers; under `mpirun -np K` each MPI rank "
                                    "writes its own shards.")
    _add_build_arguments(b)
    b.set_defaults(func=cmd_data_build)

    v = dsub.add_parser("verify", help="check checksums, counts and decodability; exit 1 on damage")
    v.add_argument("dir")
    v.add_argument("--no-decode", action="store_true", help="skip decoding every record")
    v.add_argument("-q", "--quiet", action="store_true")
    v.set_defaults(func=cmd_data_verify)

    i = dsub.add_parser("info", help="readable summary of a built data set")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--plot", metavar="PNG", help="also draw histograms of sizes, edges and targets")
    i.set_defaults(func=cmd_data_info)

    pt = sub.add_parser("pretrain", help="pretrain a CrystalTransformer (any launcher) and export "
                        "its UAE", description="Run under deepspeed, torchrun, mpirun or srun as "
                        "it is; see uae_dist/jobs.py for the forms and exit codes.")
    from uae_dist import jobs

    jobs.add_arguments(pt, "pretrain")
    pt.set_defaults(func=jobs.pretrain)
    ft = sub.add_parser("finetune", help="train a backbone (any launcher) and test it",
                        description="The same engine, launchers and outputs as pretrain, without "
                        "the export; see uae_dist/jobs.py.")
    jobs.add_arguments(ft, "finetune")
    ft.set_defaults(func=jobs.finetune)

    _add_experiments(sub)

    an = sub.add_parser("analyze", help="maps, clusters, similarities, reverse prediction and "
                        "comparisons of a per-element table → report.md and report.html",
                        description="TABLE: an export directory, a file in an export format, or a "
                        "name (cgcnn92, onehot, random[:DIM[:SEED]], megnet16, magpie, mat2vec, "
                        "uae:NAME, …). Untrained and absent rows are left out and listed.")
    an.add_argument("table")
    an.add_argument("--out", required=True, help="output directory (created; files of the "
                    "analysis's names are overwritten)")
    an.add_argument("--compare", default=None, help="comma-separated tables to compare with "
                    "(default: cgcnn92,megnet16,magpie,mat2vec,onehot,random; 'none' for none)")
    an.add_argument("--seeds", type=int, default=5, help="UMAP/k-means seeds (default 5)")
    an.add_argument("--seed", type=int, default=0, help="first seed; also the folds' and "
                    "permutations' seed")
    an.add_argument("--k-max", type=int, default=10, help="largest k of the scan (from 2)")
    an.add_argument("--models", default="ridge,knn", help="reverse-prediction models: ridge, "
                    "knn, gbm (default ridge,knn)")
    an.add_argument("--folds", type=int, default=5)
    an.add_argument("--repeats", type=int, default=3, help="repeats of the k-fold split")
    an.add_argument("--permutations", type=int, default=999, help="Mantel permutations")
    an.set_defaults(func=cmd_analyze)

    e = sub.add_parser("export", help="write the universal atomic embeddings of a checkpoint for other tools")
    try:
        from uae_dist import export as _export
        _export.add_arguments(e)
        e.set_defaults(func=_export.run)
    except ImportError as err:  # pragma: no cover - only while the training stack is missing
        e.set_defaults(func=lambda a, err=err: (print(f"export unavailable: {err}", file=sys.stderr), 2)[1])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("pretrain", "finetune"):  # the engine sets up its own per-rank logging
        return int(args.func(args) or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
