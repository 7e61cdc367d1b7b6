"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

DeepSpeed's own ``load_checkpoint`` unpickles arbitrary objects (``weights_only=False``), so this module
writes its own layout, one directory per checkpoint::

    checkpoints/step_00001234/
        model.pt         rank 0: consolidated fp32 weights, normaliser (fp64), element counts,
                         config / targets / meta as JSON strings            ← export reads only this
        rank00000.pt     per rank: its ZeRO optimizer partition (torch tensors, ints, floats, strings),
                         RNG states as tensors, sampler position
        config.yaml      the resolved config
        meta.json        step, epoch, sampler position, metrics, data manifest sha256, ...
    checkpoints/latest   name of the newest complete checkpoint (written last)
    checkpoints/best/    model.pt + config.yaml + meta.json of the best validation score

A checkpoint is first written to ``<name>.tmp`` and renamed once every rank has finished, so a kill at
any moment leaves the previous one intact. Resuming needs the same world size (ZeRO partitions and
the sampler's epoch plan depend on it); the model weights alone (``model.pt``) load anywhere.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from . import distributed as D

LATEST = "latest"
BEST = "best"
MODEL_FILE = "model.pt"
_DROP_KEYS = ("loss_scaler", "param_slice_mappings", "universal_checkpoint_info")


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


# --------------------------------------------------------------------------- safe containers
def _safe(obj):
    """Reduce to what weights_only unpickling accepts (tensors, numbers, str, bool, None, containers)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)  # IntEnum (ZeroStageEnum) → int
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, dict):
        return {(_safe(k) if not isinstance(k, str) else k): _safe(v) for k, v in obj.items()
                if k not in _DROP_KEYS}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_safe(v) for v in obj) if isinstance(obj, tuple) else [_safe(v) for v in obj]
    raise TypeError(f"cannot store {type(obj).__name__} in a weights_only checkpoint")


def optimizer_state(engine) -> dict:
    return _safe(engine.optimizer.state_dict())


def load_optimizer_state(engine, sd: dict) -> None:
    opt = engine.optimizer
    if engine.zero_optimization_stage() in (1, 2):
        # ZeRO reads state_dict_list[dp_rank]; every saved rank's file holds only its own partition
        ws = D.world_size()
        opt.load_state_dict([sd] * ws, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        opt.load_state_dict(sd)


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
          "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
          "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
          "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    pos = st["numpy_pos"].tolist()
    np.random.set_state(("MT19937", st["numpy_key"].numpy().astype(np.uint32), int(pos[0]), int(pos[1]),
                         float(st["numpy_gauss"][0])))
    random.setstate((3, tuple(int(v) for v in st["python"].tolist()), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def full_fp32_state_dict(engine) -> dict:
    """Consolidated fp32 weights (collective under ZeRO: every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out = {}
    params = dict(module.named_parameters())
    for name, t in module.state_dict().items():
        p = params.get(name)
        full = safe_get_full_fp32_param(p) if p is not None else None
        out[name] = (full if full is not None else t).detach().float().cpu().clone()
    return out


# --------------------------------------------------------------------------- write
def save(root, name: str, engine, *, model_payload: dict, rank_payload: dict, meta: dict, config: dict,
         keep_last: int = 2) -> Path:
    """Collective: write checkpoint ``root/name`` and point ``latest`` at it."""
    import yaml

    root = Path(root)
    rank = D.rank()
    tmp, final = root / f"{name}.tmp", root / name
    weights = full_fp32_state_dict(engine)
    opt = optimizer_state(engine)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    torch.save({"optimizer": opt, "rng": rng_state(), **rank_payload}, tmp / rank_file(rank))
    D.barrier()
    if rank == 0:
        torch.save({"model": weights, **model_payload, "config_json": json.dumps(config),
                    "meta_json": json.dumps(meta)}, tmp / MODEL_FILE)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = None
        if final.exists():  # same step saved twice (e.g. step-interval and end of run): swap, then delete
            old = root / f"{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, name)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last)
    D.barrier()
    return final


def save_best(root, src: Path) -> None:
    """Rank 0: copy the model part of checkpoint ``src`` to ``root/best``."""
    root = Path(root)
    tmp, final = root / f"{BEST}.tmp", root / BEST
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in (MODEL_FILE, "config.yaml", "meta.json"):
        shutil.copy2(src / f, tmp / f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _write_atomic(path: Path, text: str) -> None:
    t = path.with_name(path.name + ".tmp")
    t.write_text(text)
    os.replace(t, path)


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix == "")
    for p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- read
def latest(root) -> Path | None:
    """The checkpoint named by ``latest``; if that is gone (killed mid-swap), the newest complete step_*."""
    root = Path(root)
    p = root / LATEST
    if p.exists():
        d = root / p.read_text().strip()
        if (d / MODEL_FILE).exists():
            return d
    done = sorted(d for d in root.glob("step_*") if d.suffix == "" and (d / MODEL_FILE).exists())
    return done[-1] if done else None


def resolve(path) -> Path:
    """A checkpoint dir, its model.pt, a checkpoints/ dir (→ latest) or a run dir (→ best, else latest)."""
    p = Path(path)
    if p.is_file():
        return p.parent
    if (p / MODEL_FILE).exists():
        return p
    for root in (p, p / "checkpoints"):
        if (root / BEST / MODEL_FILE).exists() and root != p:
            return root / BEST
        lt = latest(root)
        if lt is not None:
            return lt
    raise FileNotFoundError(f"no checkpoint found at {p}")


def read_model(path) -> dict:
    """model.pt of a checkpoint, loaded with weights_only=True; JSON fields decoded."""
    d = resolve(path)
    ck = torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True)
    ck["config"] = json.loads(ck.pop("config_json"))
    ck["meta"] = json.loads(ck.pop("meta_json"))
    ck["path"] = str(d)
    return ck


def read_rank(path, rank: int) -> dict:
    f = Path(path) / rank_file(rank)
    if not f.exists():
        raise FileNotFoundError(f"{f} missing: checkpoint {path} was written by a different world size "
                                "(resume needs the same number of ranks; load model.pt alone to warm-start)")
    return torch.load(f, map_location="cpu", weights_only=True)
