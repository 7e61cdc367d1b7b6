"""Optimizer, parameter groups, learning-rate schedule and the DeepSpeed JSON the engine runs with."""
from __future__ import annotations

import json
import math

import torch

from uae_dist import config as C

# parameters that are never weight-decayed: biases, norms, embeddings (element tables)
_NO_DECAY = ("embed", "atom.", "features.")


def param_groups(model, weight_decay: float) -> list[dict]:
    """Groups by (weight decay, learning-rate scale); ``model.lr_scale`` maps a parameter-name
    prefix to a multiplier of the scheduled learning rate. Empty groups are left out."""
    scales = dict(getattr(model, "lr_scale", {}) or {})
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.dim() < 2 or name.endswith(".bias") or any(k in name for k in _NO_DECAY))
        scale = next((v for k, v in scales.items() if name.startswith(k)), 1.0)
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]


def make_optimizer(groups: list[dict], oc: C.OptimConfig) -> torch.optim.Optimizer:
    if oc.name == "adamw":
        return torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps)
    if oc.name == "sgd":
        return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum)
    raise ValueError(f"optim.name={oc.name!r}")


def lr_at(step: int, progress: float, oc: C.OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then cosine (or constant) in ``progress`` ∈ [0, 1], the fraction of the run's
    data already seen — a schedule that does not depend on the number of ranks."""
    if step < oc.warmup_steps:
        return oc.lr * (step + 1) / oc.warmup_steps
    if oc.schedule == "constant":
        return oc.lr
    lo = oc.lr * oc.min_lr_ratio
    return lo + 0.5 * (oc.lr - lo) * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def ds_config(cfg: C.Config, world: int, on_gpu: bool, n_params: int | None = None) -> dict:
    """DeepSpeed's JSON with the batch, precision and clipping fields this engine relies on;
    ZeRO buckets capped at ``n_params`` elements (see :func:`cap_buckets`)."""
    d = json.loads(C.find_config(cfg.ds.config, "json").read_text())
    gas = cfg.train.grad_accum
    d.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=gas,
             train_batch_size=world * gas, gradient_clipping=cfg.optim.grad_clip,
             zero_allow_untested_optimizer=True)
    d.setdefault("steps_per_print", 10**9)
    d.setdefault("wall_clock_breakdown", False)
    if cfg.ds.zero_stage is not None:
        d.setdefault("zero_optimization", {})["stage"] = cfg.ds.zero_stage
    prec = precision(cfg, on_gpu)
    d["bf16"] = {"enabled": prec == "bf16"}
    d["fp16"] = {"enabled": False}
    if prec == "bf16":
        stage = d.get("zero_optimization", {}).get("stage", 0)
        if stage == 0 and cfg.ds.zero_stage is None:
            # bf16 (chosen for a GPU, or asked for) over a JSON's stage 0: ZeRO-1 is what fp32
            # accumulation needs; only an explicit ds.zero_stage=0 is refused below
            d.setdefault("zero_optimization", {})["stage"] = stage = 1
        if stage not in (1, 2):
            # DeepSpeed's stage-0 bf16 path accumulates gradients in bf16 and refuses fp32
            raise C.ConfigError(f"ds.precision=bf16 needs ZeRO stage 1 or 2 (got {stage}): only "
                                "those accumulate and reduce gradients in fp32")
        d["data_types"] = {"grad_accum_dtype": "fp32"}
        d["communication_data_type"] = "fp32"
    if n_params is not None and cfg.ds.cap_buckets:
        cap_buckets(d, n_params)
    return d


def cap_buckets(d: dict, n_params: int) -> None:
    """ZeRO 1/2 allocate a fresh reduce bucket of ``reduce_bucket_size`` elements at every step
    and the kernel zero-fills its pages: with the shipped 5e7 (200 MB in fp32) that was 71 % of a
    CPU step of the 0.13 M-parameter pretraining model (torch.profiler: ``fill_`` under
    ``AccumulateGrad``; half the run's time in page faults). A bucket never needs to hold more
    than the model (nor any parameter more than its bucket), so cap both buckets there."""
    z = d.get("zero_optimization")
    if not z or not z.get("stage"):
        return
    cap = -(-max(int(n_params), 1) // 1024) * 1024  # DeepSpeed wants even sizes (NCCL alignment)
    for k in ("reduce_bucket_size", "allgather_bucket_size"):
        z[k] = min(int(z.get(k, 5 * 10**8)), cap)


def precision(cfg: C.Config, on_gpu: bool) -> str:
    return cfg.ds.precision if cfg.ds.precision != "auto" else ("bf16" if on_gpu else "fp32")
