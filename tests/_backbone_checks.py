"""Checks every backbone test file runs: invariances (float64), overfitting a tiny batch, and real
2-rank DeepSpeed fine-tunes on CPU (uninterrupted, and killed then resumed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from _train_fixtures import BIN, ROOT, env, free_port, losses, rows
from uae_dist.models import build_model, model_config_class
from uae_dist.ops import neighbor_list_numpy
from uae_dist.ops.neighbors_ref import cap_mask
from uae_dist.train import checkpoint as ckpt


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test (as the runs use): on a shared machine, two threads waiting on
    each other make these tiny graphs 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def graph(z, pos, cell, cutoff: float, max_neighbors=None) -> Data:
    """A periodic graph as the loader serves it: every image within ``cutoff``, narrowed to
    ``max_neighbors`` (ties kept), float64."""
    i, j, s, d = neighbor_list_numpy(pos, cell, [True] * 3, cutoff, return_distances=True)
    keep = cap_mask(i, d, max_neighbors)
    return Data(z=torch.tensor(z), pos=torch.tensor(pos, dtype=torch.float64),
                cell=torch.tensor(cell, dtype=torch.float64)[None],
                edge_index=torch.from_numpy(np.stack([i[keep], j[keep]])),
                shift=torch.from_numpy(s[keep]), num_nodes=len(z))


def crystals(n: int = 3, seed: int = 0):
    """Small random triclinic crystals (z, Cartesian positions, cell rows), each of another
    composition (ALIGNN cannot tell two cells of one element apart: see test_alignn)."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        cell = np.diag(rng.uniform(3.6, 4.6, 3)) + rng.uniform(-0.4, 0.4, (3, 3))
        m = 2 + len(out) % 3
        frac = rng.random((m, 3))
        z = rng.choice([1, 3, 8, 11, 14, 22, 26, 38], m).tolist()
        if tuple(sorted(z)) in seen:
            continue
        seen.add(tuple(sorted(z)))
        out.append((z, frac @ cell, cell))
    return out


def model(name: str, **kw):
    torch.manual_seed(0)
    cfg = model_config_class(name)(**kw)
    return build_model(cfg, ["a", "b"]).double(), cfg


def batch(cfg, items) -> Batch:
    g = cfg.graph()
    return Batch.from_data_list([graph(z, p, c, g.get("cutoff", 8.0), g.get("max_neighbors"))
                                 for z, p, c in items])


def transformed(items):
    """(name, items) for a rotation, a translation, an atom permutation and a supercell."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    yield "rotation", [(z, p @ q.T, c @ q.T) for z, p, c in items]
    yield "translation", [(z, p + np.array([0.7, -1.3, 2.1]), c) for z, p, c in items]
    perm = [rng.permutation(len(z)) for z, _, _ in items]
    yield "permutation", [([z[k] for k in pm], p[pm], c) for (z, p, c), pm in zip(items, perm)]
    # a 2x1x1 supercell: every atom's neighbourhood (images included) is its twin's
    yield "supercell", [(z + z, np.concatenate([p, p + c[0]]), c * np.array([[2.0], [1], [1]]))
                        for z, p, c in items]


def check_invariance(name: str, atol: float = 1e-12, **kw) -> None:
    m, cfg = model(name, **kw)
    m.eval()
    items = crystals()
    with torch.no_grad():
        ref = m(batch(cfg, items))
        assert ref.shape == (len(items), 2) and torch.isfinite(ref).all()
        for what, other in transformed(items):
            out = m(batch(cfg, other))
            assert torch.allclose(out, ref, atol=atol, rtol=0), (what, (out - ref).abs().max())
        b = batch(cfg, items)  # the loader sorts by centre; a centre's edges come in any order
        order = torch.argsort(b.edge_index[0] * 10**6 + torch.randperm(b.edge_index.shape[1]))
        b.edge_index, b.shift = b.edge_index[:, order], b.shift[order]
        assert torch.allclose(m(b), ref, atol=atol, rtol=0), "edge order"
        # batching does not mix crystals
        alone = m(batch(cfg, items[:1]))
        assert torch.allclose(alone[0], ref[0], atol=atol, rtol=0)


def check_overfit(name: str, steps: int = 150, lr: float = 3e-3, factor: float = 0.05,
                  **kw) -> None:
    """A few crystals with random targets are learned: the loss falls below ``factor`` × its
    starting value."""
    m, cfg = model(name, **kw)
    m.train()
    items = crystals(6, seed=2)
    b = batch(cfg, items)
    y = torch.randn(len(items), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(b), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < factor * first, (first, loss.item())


# --------------------------------------------------------------------------- 2-rank launches
def finetune_cmd(config: str, data, out, overrides=(), nproc: int = 2) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
            "launch/finetune.py", "--config", config, f"data.root={data}",
            f"train.out_dir={out}", "train.progress=false", "train.tensorboard=false",
            "train.threads=1", "train.log_every=1", *overrides]


def finetune_env() -> dict:
    """The test launch environment, with DeepSpeed's JIT-built CPU ops kept per venv: in the shared
    ~/.cache/torch_extensions every other venv rebuilds them, and a build killed there leaves a
    lock file that hangs every later launch."""
    e = env()
    e["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return e


def finetune(config: str, data, out, overrides=(), check: bool = True, timeout: float = 600):
    p = subprocess.run(finetune_cmd(config, data, out, overrides), cwd=ROOT, env=finetune_env(),
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def final_weights(out) -> dict:
    return ckpt.read_model(ckpt.latest(out / "checkpoints"))["weights"]


def check_resume_equals(out, ref) -> None:
    """Same per-step losses, validation rows and final weights as the uninterrupted run."""
    assert losses(out) == losses(ref)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(rows(out, "val.csv")) == strip(rows(ref, "val.csv"))
    a, b = final_weights(out), final_weights(ref)
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad


def kill_and_resume(config: str, data, out, overrides, kill_at: int) -> None:
    p = finetune(config, data, out, [*overrides, f"train.fail_after_steps={kill_at}"], check=False)
    assert p.returncode != 0, p.stdout[-2000:]
    finetune(config, data, out, overrides)

