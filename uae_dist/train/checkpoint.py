"""Checkpoints in safetensors + JSON: nothing is unpickled on load, and any world size can resume.

One directory per checkpoint::

    checkpoints/step_00001234/
        model.safetensors      consolidated fp32 weights and buffers (by parameter name)
        optimizer.safetensors  consolidated optimizer state by parameter name, "exp_avg:embed.weight"
                               (AdamW) or "momentum_buffer:…" (SGD); metadata: optimizer step count
        rng/rank00000.safetensors  each rank's RNG streams (torch, NumPy, Python, CUDA)
        state.json             step, epoch, sampler position, normaliser (float64), best score,
                               element counts, run metadata, resolved config
        config.yaml            the resolved config, for people
    checkpoints/latest         name of the newest complete checkpoint (written last)
    checkpoints/best/          model.safetensors + state.json + config.yaml of the best validation

A checkpoint is written to ``<name>.tmp`` and renamed once every rank has finished, so a kill at
any moment leaves the previous one intact. The optimizer state is gathered from ZeRO partitions
with DeepSpeed's public ``safe_get_full_*`` API and scattered back with ``safe_set_full_*``, so a
checkpoint of 2 ranks resumes on 1 or 4 (weights, moments and step count are exact; the batches of
the interrupted epoch are re-dealt and each rank's dropout stream is re-seeded, so the continuation
is not bit-equal to an uninterrupted run on the old world size).
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
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


# --------------------------------------------------------------------------- optimizer state
def _uses_fragments(engine) -> bool:
    """ZeRO 1/2 and the bf16 optimizer keep fp32 masters in partitions (``_hp_mapping``)."""
    return any(hasattr(p, "_hp_mapping") for p in engine.module.parameters())


def _link_partitions(optimizer, lp_groups) -> None:
    """Point every parameter at its slice of the optimizer state.

    DeepSpeed's ZeRO 1/2 links these views once, right after the first optimizer step of the
    *first* parameter group, so the other groups' parameters report no state (DeepSpeed 0.19.8).
    Linking again after each step is idempotent and makes every group readable."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for lp, group in zip(lp_groups, optimizer.param_groups):
        flat = group["params"][0]
        if flat in optimizer.state and all(hasattr(p, "_hp_mapping") for p in lp):
            lazy_init_hp_params_optimizer_state(lp, flat, optimizer.state)


def _state_keys(optimizer) -> list[str]:
    keys = set()
    for st in optimizer.state.values():
        keys |= {k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
    return sorted(keys)


def _optimizer_step(optimizer) -> int:
    steps = [st["step"] for st in optimizer.state.values() if "step" in st]
    return int(max(float(s) for s in steps)) if steps else 0


def optimizer_tensors(engine, optimizer, lp_groups) -> tuple[dict, int]:
    """Collective: ``{"<key>:<param name>": full fp32 tensor}`` and the optimizer's step count."""
    from deepspeed.utils import safe_get_full_optimizer_state

    frag = _uses_fragments(engine)
    if frag:
        _link_partitions(optimizer, lp_groups)
    keys = _state_keys(optimizer)
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        for key in keys:
            if frag:
                v = safe_get_full_optimizer_state(p, key)
            else:
                v = optimizer.state.get(p, {}).get(key)
            if v is not None:
                out[f"{key}:{name}"] = v.detach().float().cpu().clone()
    return out, _optimizer_step(optimizer)


def _prime(engine, optimizer, grad_accum: int) -> None:
    """One optimizer step with zero gradients at learning rate 0: creates the optimizer's state
    (lazily allocated by torch and by DeepSpeed's partitions) without changing any weight."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    params = [p for p in engine.module.parameters() if p.requires_grad]
    steps = (engine.global_steps, engine.micro_steps, engine.global_samples)
    for _ in range(grad_accum):
        engine.backward(sum(p.sum() for p in params) * 0.0)
        engine.step()
    engine.global_steps, engine.micro_steps, engine.global_samples = steps
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def load_optimizer(engine, optimizer, lp_groups, tensors: dict, step: int, grad_accum: int) -> None:
    """Collective: restore the consolidated state written by ``optimizer_tensors``."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if not tensors:
        return
    frag = _uses_fragments(engine)
    if frag:
        _link_partitions(optimizer, lp_groups)
    params = dict(engine.module.named_parameters())
    for full, value in tensors.items():
        key, name = full.split(":", 1)
        if name not in params:
            raise KeyError(f"optimizer state for unknown parameter {name!r}")
        p = params[name]
        if frag:
            safe_set_full_optimizer_state(p, value.to(p.device), key)
        else:
            optimizer.state[p][key].copy_(value.to(optimizer.state[p][key]))
    for st in optimizer.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"].fill_(step)
        elif "step" in st:
            st["step"] = step


# --------------------------------------------------------------------------- weights
def full_weights(engine) -> dict:
    """Collective: consolidated fp32 weights (ZeRO masters, not bf16-rounded copies) + buffers."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    out = {}
    for name, t in engine.module.state_dict().items():
        p = params.get(name)
        full = safe_get_full_fp32_param(p) if p is not None else None
        src = full if full is not None else t
        out[name] = src.detach().to(torch.float32 if src.is_floating_point() else src.dtype)
        out[name] = out[name].cpu().contiguous().clone()
    return out


def load_weights(engine, weights: dict, strict: bool = True):
    """Collective under ZeRO: module weights and the fp32 masters behind them."""
    from deepspeed.utils import safe_set_full_fp32_param

    module = engine.module
    own = module.state_dict()
    sd = {k: v.to(own[k].device, own[k].dtype) for k, v in weights.items() if k in own}
    result = module.load_state_dict(sd, strict=strict)
    for name, p in module.named_parameters():
        if name in weights and hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, weights[name].to(p.device, torch.float32))
    return result


# --------------------------------------------------------------------------- RNG
def rng_tensors() -> dict:
    _, key, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy_key": torch.from_numpy(key.astype(np.int64)),
          "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
          "numpy_gauss": torch.tensor([gauss], dtype=torch.float64),
          "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    pos, has_gauss = st["numpy_pos"].tolist()
    np.random.set_state(("MT19937", st["numpy_key"].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), float(st["numpy_gauss"][0])))
    random.setstate((3, tuple(int(v) for v in st["python"].tolist()), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def rng_file(rank: int) -> str:
    return f"rng/rank{rank:05d}.safetensors"


# --------------------------------------------------------------------------- write
def save(root, name: str, engine, optimizer, lp_groups, *, state: dict, keep_last: int = 2) -> Path:
    """Collective: write checkpoint ``root/name`` and point ``latest`` at it."""
    import yaml
    from safetensors.torch import save_file

    root = Path(root)
    rank = D.rank()
    tmp, final = root / f"{name}.tmp", root / name
    weights = full_weights(engine)
    opt, opt_step = optimizer_tensors(engine, optimizer, lp_groups)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    D.barrier()
    save_file(rng_tensors(), str(tmp / rng_file(rank)))
    D.barrier()
    if rank == 0:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "uae-dist weights"})
        save_file(opt, str(tmp / OPTIMIZER), metadata={"step": str(opt_step),
                                                       "optimizer": type(optimizer).__name__})
        _write_json(tmp / STATE, state)
        (tmp / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
        old = None
        if final.exists():  # the same step saved twice (step interval, then epoch end): swap
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
    for f in (WEIGHTS, STATE, "config.yaml"):
        shutil.copy2(src / f, tmp / f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _write_json(path: Path, obj) -> None:
    # allow_nan=False: a NaN or infinity in a checkpoint is a bug to see, not to store
    path.write_text(json.dumps(obj, indent=1, allow_nan=False))


def _write_atomic(path: Path, text: str) -> None:
    t = path.with_name(path.name + ".tmp")
    t.write_text(text)
    os.replace(t, path)


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix == "")
    for p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- read
def _complete(d: Path) -> bool:
    return (d / WEIGHTS).exists() and (d / STATE).exists()


def latest(root) -> Path | None:
    """The checkpoint named by ``latest``; if that is gone (killed mid-swap), the newest complete."""
    root = Path(root)
    p = root / LATEST
    if p.exists():
        d = root / p.read_text().strip()
        if _complete(d):
            return d
    done = sorted(d for d in root.glob("step_*") if d.suffix == "" and _complete(d))
    return done[-1] if done else None


def resolve(path) -> Path:
    """A checkpoint dir, a file in it, a checkpoints/ dir (→ latest) or a run dir (→ best, else
    latest)."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if _complete(p):
        return p
    for root in (p, p / "checkpoints"):
        if root != p and _complete(root / BEST):
            return root / BEST
        lt = latest(root)
        if lt is not None:
            return lt
    raise FileNotFoundError(f"no checkpoint found at {p} (a directory with {WEIGHTS} and {STATE})")


def read_model(path) -> dict:
    """``{"weights", "state", "config", "path"}`` of a checkpoint (no optimizer, no RNG)."""
    from safetensors.torch import load_file

    d = resolve(path)
    state = json.loads((d / STATE).read_text())
    return {"weights": load_file(str(d / WEIGHTS)), "state": state, "config": state["config"],
            "path": str(d)}


def read_optimizer(path) -> tuple[dict, int]:
    from safetensors import safe_open

    f = Path(path) / OPTIMIZER
    with safe_open(str(f), "pt") as fh:
        step = int((fh.metadata() or {}).get("step", 0))
        return {k: fh.get_tensor(k) for k in fh.keys()}, step


def read_rng(path, rank: int) -> dict | None:
    from safetensors.torch import load_file

    f = Path(path) / rng_file(rank)
    return load_file(str(f)) if f.exists() else None
