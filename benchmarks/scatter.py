"""Scatter / segment-softmax benchmark on graph-shaped inputs (not a test).

Ours (``uae_dist.ops.scatter``; unsorted and receiver-sorted index) against the fastest plain-torch
way to compute the same thing, measured in the same run (forward, and forward+backward), float32,
E = deg x N edges, feature widths F:

  sum      ``index_add_``
  mean     ``index_add_`` of the rows plus an ``index_add_`` count, divided (not
           ``scatter_reduce("mean")``, which is known to be slow)
  max/min  ``scatter_reduce("amax"/"amin")`` (torch has nothing faster)
  softmax  ``torch_geometric.utils.softmax`` (PyG's segment softmax; our own fallback if PyG is
           missing)

and ``torch_scatter`` where it imports (optional; not installed by requirements.txt). Ratio =
baseline time / ours: > 1 means ours is faster. A "SUMMARY scatter ..." line gives the geometric
means of the ratios per op.

    .venv/bin/python benchmarks/scatter.py --nodes 4000 --degrees 12,50 --widths 64,128,256
    .venv/bin/python benchmarks/scatter.py --device cuda
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uae_dist import ops  # noqa: E402
from uae_dist.ops import scatter, scatter_torch, segment_softmax, segment_softmax_torch  # noqa: E402

try:
    import torch_scatter  # type: ignore
except ImportError:  # pragma: no cover
    torch_scatter = None
try:
    from torch_geometric.utils import softmax as pyg_softmax
except ImportError:  # pragma: no cover
    pyg_softmax = None


def bench(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def fwd_bwd(f, src, g):
    def run():
        x = src.detach().requires_grad_(True)
        f(x).backward(g)
    return run


def torch_reduce(reduce):
    name = {"max": "amax", "min": "amin"}[reduce]

    def f(src, index, n):
        idx = index.view(-1, 1).expand_as(src)
        return src.new_zeros((n, src.shape[1])).scatter_reduce(0, idx, src, name, include_self=False)
    return f


def index_add_mean(src, index, n):
    """Sum and count with index_add_, then divide (empty rows 0): the fair plain-torch mean."""
    total = src.new_zeros((n, src.shape[1])).index_add_(0, index, src)
    count = src.new_zeros(n).index_add_(0, index, src.new_ones(index.shape[0]))
    return total / count.clamp_min(1).unsqueeze(1)


def baseline(reduce, index, n):
    """(name, fn) of the fair plain-torch baseline for `reduce` (see the module docstring)."""
    if reduce == "sum":
        return "index_add_", lambda x: x.new_zeros((n, x.shape[1])).index_add_(0, index, x)
    if reduce == "mean":
        return "index_add_+count", lambda x: index_add_mean(x, index, n)
    if reduce == "softmax":
        if pyg_softmax is not None:
            return "pyg softmax", lambda x: pyg_softmax(x, index, num_nodes=n)
        return "our fallback", lambda x: segment_softmax_torch(x, index, n)
    f = torch_reduce(reduce)
    return f"scatter_reduce({reduce})", lambda x: f(x, index, n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4000)
    ap.add_argument("--degrees", default="12,50")
    ap.add_argument("--widths", default="64,128,256")
    ap.add_argument("--reduces", default="sum,mean,max")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"# backend={ops.backend()} torch {torch.__version__} threads={torch.get_num_threads()} device={dev} "
          f"torch_scatter={'yes' if torch_scatter else 'no'} pyg={'yes' if pyg_softmax else 'no'}; "
          f"times in ms (median of {args.reps}); x = baseline / ours (unsorted index)")
    print(f"{'op':8s} {'E':>7s} {'F':>4s} {'baseline':>20s} | {'ours':>7s} {'ours(s)':>7s} {'base':>7s} {'x':>5s} "
          f"{'ts':>7s} | {'ours fb':>8s} {'ours(s)':>8s} {'base fb':>8s} {'x':>5s} {'ts fb':>7s}")
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    n = args.nodes
    ratios = {}
    for deg in [int(d) for d in args.degrees.split(",")]:
        e = deg * n
        index = torch.randint(0, n, (e,), generator=gen).to(dev)
        sidx = index.sort().values
        for width in [int(w) for w in args.widths.split(",")]:
            src = torch.randn(e, width, generator=gen).to(dev)
            g = torch.randn(n, width, generator=gen).to(dev)
            for reduce in args.reduces.split(",") + ["softmax"]:
                bname, base = baseline(reduce, index, n)
                ts_f = None
                if reduce == "softmax":
                    ours = lambda x, ix=index: segment_softmax(x, ix, n)  # noqa: E731
                    ours_s = lambda x, ix=sidx: segment_softmax(x, ix, n, sorted=True)  # noqa: E731
                    if torch_scatter is not None:
                        ts_f = lambda x, ix=index: torch_scatter.composite.scatter_softmax(x, ix, dim=0)  # noqa: E731
                    gg = torch.randn(e, width, generator=gen).to(dev)
                else:
                    ours = lambda x, ix=index, r=reduce: scatter(x, ix, n, r)  # noqa: E731
                    ours_s = lambda x, ix=sidx, r=reduce: scatter(x, ix, n, r, sorted=True)  # noqa: E731
                    if torch_scatter is not None:
                        ts_f = lambda x, ix=index, r=reduce: torch_scatter.scatter(x, ix, 0, dim_size=n, reduce=r)  # noqa: E731
                    gg = g

                def timed(f):
                    return bench(lambda: (f(), sync()), args.reps) * 1e3

                t_o = timed(lambda: ours(src))
                t_os = timed(lambda: ours_s(src))
                t_b = timed(lambda: base(src))
                t_ts = timed(lambda: ts_f(src)) if ts_f else float("nan")
                fb_o = timed(fwd_bwd(ours, src, gg))
                fb_os = timed(fwd_bwd(ours_s, src, gg))
                fb_b = timed(fwd_bwd(base, src, gg))
                fb_ts = timed(fwd_bwd(ts_f, src, gg)) if ts_f else float("nan")
                ratios.setdefault(reduce, []).append((t_b / t_o, fb_b / fb_o, t_b / t_os, fb_b / fb_os))
                print(f"{reduce:8s} {e:7d} {width:4d} {bname:>20s} | {t_o:7.2f} {t_os:7.2f} {t_b:7.2f} "
                      f"{t_b / t_o:5.1f} {t_ts:7.2f} | {fb_o:8.2f} {fb_os:8.2f} {fb_b:8.2f} {fb_b / fb_o:5.1f} "
                      f"{fb_ts:7.2f}")
                sys.stdout.flush()
    parts = []
    for reduce, rs in ratios.items():
        gm = [math.exp(sum(math.log(r[k]) for r in rs) / len(rs)) for k in range(4)]
        parts.append(f"{reduce}: fwd x{gm[0]:.2f} (sorted x{gm[2]:.2f}), fwd+bwd x{gm[1]:.2f} (sorted x{gm[3]:.2f})")
    print(f"SUMMARY scatter device={dev} vs fair baselines (geometric mean over shapes): " + "; ".join(parts))


if __name__ == "__main__":
    main()
