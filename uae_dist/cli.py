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


def build_parser() -> argparse.ArgumentParser:
    from uae_dist import __version__

    p = argparse.ArgumentParser(prog="uae-dist", description="Universal atomic embeddings for crystals: "
                                "data building, pretraining and export.")
    p.add_argument("--version", action="version", version=f"uae-dist {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
