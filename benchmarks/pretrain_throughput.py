#!/usr/bin/env python
"""Pretraining throughput (structures/s) and data-parallel scaling, measured in one run.

For each model variant (periodic, paper) it launches launch/train.py with torchrun on 1 and 2 CPU
ranks (one thread each, the same atoms per rank per batch: weak scaling), and on 1 GPU when one is
available, for a fixed number of optimizer steps, then reads the structures/s that the training
loop itself logs (train.csv, first window dropped as warm-up) and prints

    scaling efficiency = throughput(2 ranks) / (2 × throughput(1 rank))

and the CPU time of each run (user and kernel, all ranks, start-up included), with rank 0's kernel
share in the steady state (train.csv's ``cpu_user_s``/``cpu_sys_s`` between its first and last
rows). ``--reference "k=v …"`` (repeatable)
adds the same runs with those overrides as same-run references; ``--uncapped`` is
``--reference ds.cap_buckets=false`` (DeepSpeed's 5e7-element ZeRO buckets, as before issue 14).

    .venv/bin/python benchmarks/pretrain_throughput.py --data data_build/mp [--steps 60]

Not a test: numbers depend on the machine and on whatever else runs on it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the paper variant concatenates element and coordinate features: same transformer width as the
# periodic model of configs/pretrain.yaml (d_model 64) with a 32 + 32 split
VARIANT_OVERRIDES = {"periodic": [], "paper": ["model.emb_dim=32"]}
BIN = Path(sys.executable).parent


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kernel_share(x: dict) -> float:
    """Kernel share of a whole run's CPU time (all ranks, start-up included)."""
    return x["sys_s"] / max(1e-9, x["user_s"] + x["sys_s"])


def measure(data, variant, ranks, steps, max_atoms, extra, gpu=False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = ["launch/train.py", "--config", "pretrain", f"data.root={data}", f"train.out_dir={out}",
                f"model.variant={variant}", *VARIANT_OVERRIDES.get(variant, []), f"train.max_steps={steps}", "train.log_every=10", "train.resume=null",
                "train.ckpt_every_steps=null", "train.progress=false", "train.tensorboard=false",
                "export.after_train=false", "data.val_limit=64", f"data.max_atoms={max_atoms}", "optim.warmup_steps=5",
                *([] if gpu else ["train.threads=1"]), *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        if not gpu:
            env["DS_ACCELERATOR"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(port()), *args]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        with open(out / "train.csv") as fh:
            rows = list(csv.DictReader(fh))
        s = [float(r["structures_per_s"]) for r in rows[1:]] or [float(rows[0]["structures_per_s"])]
        a = [float(r["atoms_per_s"]) for r in rows[1:]] or [float(rows[0]["atoms_per_s"])]
        # rank 0's own CPU time between its first and last log rows: the steady state, without
        # start-up (imports, rendezvous, opening the data) and the final validation
        du, dk = (float(rows[-1][k]) - float(rows[0][k]) for k in ("cpu_user_s", "cpu_sys_s"))
        return {"steady_user_s": du, "steady_sys_s": dk,
                "steady_kernel": dk / max(du + dk, 1e-9),
                "variant": variant, "ranks": ranks, "device": "cuda" if gpu else "cpu",
                "structures_per_s": statistics.median(s), "atoms_per_s": statistics.median(a),
                "extra": list(extra), "user_s": r1.ru_utime - r0.ru_utime,
                "sys_s": r1.ru_stime - r0.ru_stime}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data_build/mp")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-atoms", type=int, default=256, help="atoms per batch per rank")
    ap.add_argument("--variants", default="periodic,paper")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--uncapped", action="store_true",
                    help="also measure with ds.cap_buckets=false (the reference for kernel time)")
    ap.add_argument("--reference", action="append", default=[], metavar='"K=V …"',
                    help="also measure with these overrides (repeatable)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.layers=8")
    a = ap.parse_args()
    import torch

    refs = ([["ds.cap_buckets=false"]] if a.uncapped else []) + [r.split() for r in a.reference]
    results = []
    for v in a.variants.split(","):
        for r in (1, 2):
            for ref in [[]] + refs:
                results.append(measure(a.data, v, r, a.steps, a.max_atoms, a.overrides + ref))
                x = results[-1]
                x["ref"] = " ".join(ref)
                print(f"{v:9s} {r} CPU rank(s){' ' + x['ref'] if ref else ''}: "
                      f"{x['structures_per_s']:8.1f} structures/s {x['atoms_per_s']:9.0f} atoms/s"
                      f"  user {x['user_s']:6.1f} s  sys {x['sys_s']:6.1f} s "
                      f"({kernel_share(x):.0%} kernel; steady state "
                      f"on rank 0: {x['steady_kernel']:.0%})",
                      flush=True)
        if torch.cuda.is_available():
            results.append(measure(a.data, v, 1, a.steps, a.max_atoms, a.overrides, gpu=True))
            results[-1]["ref"] = ""
            print(f"{v:9s} 1 GPU       : {results[-1]['structures_per_s']:8.1f} structures/s", flush=True)
    print("\nvariant    1 rank   2 ranks   speed-up  efficiency" + ("   GPU/1 CPU rank" if torch.cuda.is_available() else ""))
    for v in a.variants.split(","):
        mine = [x for x in results if x["variant"] == v and x["device"] == "cpu" and not x["ref"]]
        one = next(x for x in mine if x["ranks"] == 1)
        two = next(x for x in mine if x["ranks"] == 2)
        sp = two["structures_per_s"] / one["structures_per_s"]
        line = f"{v:9s} {one['structures_per_s']:7.1f} {two['structures_per_s']:9.1f} {sp:9.2f}x {sp / 2:10.0%}"
        gpu = [x for x in results if x["variant"] == v and x["device"] == "cuda"]
        if gpu:
            line += f"   {gpu[0]['structures_per_s'] / one['structures_per_s']:10.1f}x"
        print(line)
        for ref in refs:
            for r in (1, 2):
                old = next(x for x in results if x["variant"] == v and x["ranks"] == r
                           and x["ref"] == " ".join(ref))
                new = next(x for x in mine if x["ranks"] == r)
                print(f"{v:9s} {r} rank(s): default / [{' '.join(ref)}] = "
                      f"{new['structures_per_s'] / old['structures_per_s']:.2f}x structures/s, "
                      f"kernel time {new['sys_s']:.1f} s vs {old['sys_s']:.1f} s")
        print(f"SUMMARY pretrain_throughput {v}: {one['structures_per_s']:.1f} -> "
              f"{two['structures_per_s']:.1f} structures/s on 1 -> 2 CPU ranks ({sp:.2f}x); "
              f"kernel share of CPU time, whole run {kernel_share(one):.0%} / "
              f"{kernel_share(two):.0%}, steady state (rank 0) {one['steady_kernel']:.0%} / "
              f"{two['steady_kernel']:.0%}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
