"""Helpers for the training tests: a tiny real LMDB and subprocess launches of launch/train.py."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MP = Path(os.environ.get("UAE_DATA_DIR", ROOT.parent / "shared" / "data")) / "mp_cgcnn_36737.json.gz"
SMOKE = ROOT / "configs" / "pretrain_smoke.yaml"


def tiny_lmdb(tmp_path_factory, n: int = 120) -> Path:
    """First ``n`` MP records, 5 Å graphs, built once per session (shared through the base temp dir)."""
    from conftest import need_data

    need_data(MP)
    out = tmp_path_factory.getbasetemp() / f"uae_mp_tiny_{n}"
    if not (out / "manifest.json").exists():
        from uae_dist.data.build import build_lmdb

        build_lmdb(MP, out, targets=["e_form_per_atom", "band_gap"], cutoff=5.0, shards=1, workers=1, limit=n,
                   overwrite=True, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(gpu: bool = False) -> dict:
    """CPU runs hide any GPU (CUDA_VISIBLE_DEVICES="") so they behave the same on every machine."""
    e = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        e.pop(k, None)
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
             OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    if gpu:
        e.pop("DS_ACCELERATOR")
    else:
        e["CUDA_VISIBLE_DEVICES"] = ""
    return e


def command(kind: str, data: Path, out: Path, overrides=(), nproc: int = 2) -> list[str]:
    args = ["launch/train.py", "--config", str(SMOKE), f"data.root={data}", f"train.out_dir={out}", *overrides]
    if kind == "python":
        return [sys.executable, *args]
    if kind == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *args]
    if kind == "mpirun":
        return [str(BIN / "mpirun"), "-np", str(nproc), "--bind-to", "none", sys.executable, *args]
    raise ValueError(kind)


def launch(kind: str, data: Path, out: Path, overrides=(), nproc: int = 2, timeout: float = 240,
           check: bool = True, gpu: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run(command(kind, data, out, overrides, nproc), cwd=ROOT, env=env(gpu), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{kind} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def popen(kind: str, data: Path, out: Path, overrides=(), nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(command(kind, data, out, overrides, nproc), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def rows(out: Path, name: str = "train.csv") -> list[dict]:
    with open(Path(out) / name) as fh:
        return list(csv.DictReader(fh))


def losses(out: Path) -> list[tuple[int, str]]:
    return [(int(r["step"]), r["loss"]) for r in rows(out)]


def latest_meta(out: Path) -> dict:
    """The newest checkpoint's state.json: its run metadata merged with step, epoch, sampler…"""
    root = Path(out) / "checkpoints"
    state = json.loads((root / (root / "latest").read_text().strip() / "state.json").read_text())
    return {**state.pop("meta"), **state}
