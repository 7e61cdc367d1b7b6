"""Pretraining loop on a DeepSpeed engine (ZeRO 0/1/2; fp32 or bf16), small enough to hold in one's head.

    setup_distributed → datasets + atom-capped batch sampler → model + normaliser (train split)
    → deepspeed.initialize → [resume] → for epoch: for batch: forward, masked loss, agree on
    stop/non-finite flags, backward, step, log → validate (MAE per target in physical units,
    all-reduced) → checkpoint (+ best) → export the UAE.

One micro-batch per rank is one sampler batch (capped at ``data.max_atoms`` atoms), so DeepSpeed's
``train_micro_batch_size_per_gpu`` is 1 and ``train_batch_size = world_size * train.grad_accum``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from uae_dist import config as C
from uae_dist.models import build_model, masked_loss

from . import checkpoint as ckpt
from . import distributed as D
from .metrics import Metrics

log = logging.getLogger("uae_dist.train")

NONFINITE_EXIT = 3


class NonFiniteLossError(RuntimeError):
    pass


class _Stop:
    """Set by SIGTERM/SIGUSR1 (Slurm pre-emption); acted on at the next step boundary."""
    requested = False
    signum = None

    @classmethod
    def handler(cls, signum, frame):
        cls.requested, cls.signum = True, signum


# --------------------------------------------------------------------------- helpers
class _Head(torch.utils.data.Dataset):
    """The first ``n`` items of a split (smoke runs)."""

    def __init__(self, ds, n: int | None):
        self.ds, self.n = ds, len(ds) if n is None else min(n, len(ds))
        self.natoms = ds.natoms[: self.n]
        self.target_names = ds.target_names

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        return self.ds[k]

    def targets_array(self):
        return self.ds.targets_array()[: self.n]


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def ds_config(cfg: C.Config, world: int, on_gpu: bool) -> dict:
    path = Path(cfg.ds.config)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[2] / cfg.ds.config
    d = json.loads(path.read_text())
    gas = cfg.train.grad_accum
    d.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=gas, train_batch_size=world * gas,
             gradient_clipping=cfg.optim.grad_clip, zero_allow_untested_optimizer=True)
    d.setdefault("steps_per_print", 10**9)
    d.setdefault("wall_clock_breakdown", False)
    if cfg.ds.zero_stage is not None:
        d.setdefault("zero_optimization", {})["stage"] = cfg.ds.zero_stage
    prec = cfg.ds.precision if cfg.ds.precision != "auto" else ("bf16" if on_gpu else "fp32")
    d["bf16"] = {"enabled": prec == "bf16"}
    d["fp16"] = {"enabled": False}
    return d


def default_threads(local_world_size: int) -> int:
    """OMP_NUM_THREADS if set; else the cores this process is bound to, if the launcher bound it;
    else the node's cores shared among its local ranks."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    total = os.cpu_count() or 1
    try:
        mine = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        mine = total
    return max(1, mine if mine < total else total // max(1, local_world_size))


def lr_at(step: int, total: int, oc: C.OptimConfig) -> float:
    if step < oc.warmup_steps:
        return oc.lr * (step + 1) / oc.warmup_steps
    if oc.schedule == "constant":
        return oc.lr
    frac = min(1.0, (step - oc.warmup_steps) / max(1, total - oc.warmup_steps))
    lo = oc.lr * oc.min_lr_ratio
    return lo + 0.5 * (oc.lr - lo) * (1 + math.cos(math.pi * frac))


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(".bias") or "embed" in name or "atom." in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _setup_logging(rank0: bool) -> None:
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not rank0:
        logging.getLogger("uae_dist").setLevel(logging.WARNING)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ensure_data(cfg: C.Config, info: D.DistInfo) -> None:
    root = Path(cfg.data.root)
    if (root / "manifest.json").exists():
        return
    if not cfg.data.source:
        raise FileNotFoundError(f"{root}/manifest.json not found and data.source is not set: build the data set "
                                f"first (uae-dist data build --source ... --out {root})")
    if info.is_main:
        from uae_dist.data.build import build_lmdb

        log.info("building %s from %s", root, cfg.data.source)
        build_lmdb(cfg.data.source, root, targets=cfg.data.targets, limit=cfg.data.build_limit,
                   shards=max(1, info.world_size), workers=max(1, (os.cpu_count() or 1)), resume=True)
    D.barrier()


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(engine, loader, cols, mean: torch.Tensor, std: torch.Tensor, device) -> dict:
    """MAE per target in physical units over the whole split (each item on exactly one rank)."""
    module = engine.module
    was_training = module.training
    module.eval()
    t = len(cols)
    acc = torch.zeros(3, t, dtype=torch.float64)  # |err| sum, count, |y - train mean| sum
    for batch in loader:
        batch = batch.to(device)
        pred = engine(batch).double().cpu() * std + mean
        y = batch.y[:, cols].double().cpu()
        ok = torch.isfinite(y)
        acc[0] += torch.where(ok, (pred - y).abs(), 0.0).sum(0)
        acc[1] += ok.sum(0)
        acc[2] += torch.where(ok, (y - mean).abs(), 0.0).sum(0)
    D.all_reduce(acc)
    module.train(was_training)
    n = acc[1].clamp_min(1)
    return {"mae": (acc[0] / n).tolist(), "mean_predictor_mae": (acc[2] / n).tolist(), "count": acc[1].tolist()}


# --------------------------------------------------------------------------- the loop
def train(cfg: C.Config) -> dict:
    # from here on SIGTERM/SIGUSR1 only set a flag; the loop checkpoints and stops at its next step
    _Stop.requested = False
    old_handlers = {s: signal.signal(s, _Stop.handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
    info = D.setup_distributed(cfg.ds.backend)
    rank0 = info.is_main
    _setup_logging(rank0)
    tc = cfg.train
    torch.set_num_threads(tc.threads or default_threads(info.local_world_size))
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(info.device)
    out = Path(tc.out_dir)
    ck_root = out / "checkpoints"
    if rank0:
        ck_root.mkdir(parents=True, exist_ok=True)
    _ensure_data(cfg, info)

    from torch.utils.data import DataLoader

    from uae_dist.data import CrystalGraphDataset, DistributedAtomBatchSampler, collate

    # the stored graphs (8 Å by default) are cut to the model's cutoff in the loader, not in the model
    try:
        edge_cut = dict(cutoff=cfg.model.cutoff) if cfg.model.variant == "periodic" else {}
        train_full = CrystalGraphDataset(cfg.data.root, "train", **edge_cut)
        val_ds = _Head(CrystalGraphDataset(cfg.data.root, "val", **edge_cut), cfg.data.val_limit)
    except ValueError as e:
        raise C.ConfigError(f"model.cutoff: {e}") from None
    train_ds = _Head(train_full, cfg.data.train_limit)
    names = train_full.target_names
    targets = list(cfg.data.targets or names)
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise C.ConfigError(f"data.targets: {unknown} not in the data set's targets {names}")
    cols = [names.index(t) for t in targets]

    # identical initial weights on every rank, then rank-specific dropout streams
    seed_everything(tc.seed)
    model = build_model(cfg.model, targets)
    y_train = train_ds.targets_array()[:, cols]
    model.normalizer.fit(y_train)
    mean = model.normalizer.mean.double().clone()
    std = model.normalizer.std.double().clone()
    seed_everything(tc.seed + 1000003 * (info.rank + 1))

    import deepspeed

    dsc = ds_config(cfg, info.world_size, device.type == "cuda")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=dsc, dist_init_required=False)
    gas = engine.gradient_accumulation_steps()

    resolved = C.to_dict(cfg)
    run_meta = {"targets": targets, "world_size": info.world_size, "launcher": info.launcher,
                "data_root": str(cfg.data.root), "data_manifest_sha256": train_full.manifest_sha256,
                "n_train": len(train_ds), "n_val": len(val_ds), "ds_config": dsc,
                "normalizer": {"mean": mean.tolist(), "std": std.tolist()}}
    if rank0:
        C.dump_yaml(resolved, out / "config.yaml")
        (out / "ds_config.json").write_text(json.dumps(dsc, indent=1))
        n_par = sum(p.numel() for p in model.parameters())
        log.info("%s/%s: %d train / %d val crystals, targets %s, %.2fM parameters, %d rank(s) via %s, ZeRO-%d, %s",
                 cfg.model.name, cfg.model.variant, len(train_ds), len(val_ds), targets, n_par / 1e6,
                 info.world_size, info.launcher, engine.zero_optimization_stage(),
                 "bf16" if dsc["bf16"]["enabled"] else "fp32")

    sampler = DistributedAtomBatchSampler(train_ds.natoms, cfg.data.max_atoms, info.world_size, info.rank,
                                          seed=tc.seed, shuffle=True)
    val_sampler = DistributedAtomBatchSampler(val_ds.natoms, cfg.data.val_max_atoms or 2 * cfg.data.max_atoms,
                                              info.world_size, info.rank, seed=tc.seed, shuffle=False)
    val_loader = DataLoader(val_ds, batch_sampler=val_sampler, collate_fn=collate, num_workers=cfg.data.num_workers)
    steps_per_epoch = len(sampler) // gas
    total_steps = tc.max_steps or steps_per_epoch * tc.epochs

    # ---- state (restored on resume)
    step, epoch, batches_done, best_score, elapsed = 0, 0, 0, math.inf, 0.0
    elem_counts = torch.zeros(100, dtype=torch.int64)
    best_val = None
    resume_from = None
    if tc.resume == "auto":
        resume_from = ckpt.latest(ck_root)
    elif tc.resume:
        resume_from = ckpt.resolve(tc.resume)
    if resume_from is not None:
        mk = ckpt.read_model(resume_from)
        was = mk["meta"].get("data_manifest_sha256")
        if was and was != train_full.manifest_sha256:
            # the sampler position and normaliser belong to the old data: an exact resume is impossible
            raise C.ConfigError(f"{resume_from} was trained on another build of the data (manifest sha256 "
                                f"{was[:12]}… ≠ {train_full.manifest_sha256[:12]}…); start a new train.out_dir "
                                "with train.init_from=<checkpoint> to warm-start instead")
        engine.module.load_state_dict({k: v.to(device) for k, v in mk["model"].items()})
        rk = ckpt.read_rank(resume_from, info.rank)
        ckpt.load_optimizer_state(engine, rk["optimizer"])
        ckpt.set_rng_state(rk["rng"])
        meta = mk["meta"]
        step, epoch, batches_done = meta["step"], meta["sampler"]["epoch"], meta["sampler"]["batches_done"]
        best_score, best_val, elapsed = meta.get("best_score", math.inf), meta.get("best_val"), meta["elapsed_s"]
        elem_counts = rk["element_counts"].clone()
        engine.global_steps, engine.micro_steps = step, rk["micro_steps"]
        engine.global_samples = step * gas * info.world_size
        if rank0:
            log.info("resumed from %s: step %d, epoch %d, batch %d", resume_from, step, epoch, batches_done)
    elif tc.init_from:
        mk = ckpt.read_model(tc.init_from)
        own = engine.module.state_dict()
        # warm start keeps what fits (e.g. the backbone when the targets, hence the heads, differ)
        sd = {k: v.to(device) for k, v in mk["model"].items() if k in own and own[k].shape == v.shape}
        missing, unexpected = engine.module.load_state_dict(sd, strict=False)
        _sync_fp32_master(engine)
        if rank0:
            log.info("initialised weights from %s (missing %s, unexpected %s)", mk["path"], missing, unexpected)
    metrics = Metrics(out, targets, rank0, tc.tensorboard, resume_step=step if resume_from else None)

    def save(name: str, *, epoch_: int, batches_done_: int, status: str, val: dict | None = None) -> Path:
        counts = D.all_reduce(elem_counts.clone())
        digests = D.all_gather_object(param_digest(engine.module))  # replicas must hold identical weights
        meta = {**run_meta, "step": step, "epoch": epoch_, "status": status, "elapsed_s": elapsed_now(),
                "sampler": {"epoch": epoch_, "batches_done": batches_done_, "seed": tc.seed,
                            "num_replicas": info.world_size},
                "val": val, "best_score": best_score, "best_val": best_val,
                "elements_seen": [int(z) + 1 for z in torch.nonzero(counts).flatten()],
                "param_sha256_per_rank": digests,
                "uae_dist_version": __import__("uae_dist").__version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return ckpt.save(ck_root, name, engine, config=resolved, meta=meta, keep_last=tc.keep_last,
                         model_payload={"normalizer_mean": mean.clone(), "normalizer_std": std.clone(),
                                        "element_counts": counts},
                         rank_payload={"element_counts": elem_counts.clone(), "micro_steps": int(engine.micro_steps),
                                       "step": step})

    t_start = time.time()

    def elapsed_now() -> float:
        return elapsed + time.time() - t_start

    def validate(epoch_: int) -> tuple[dict, float]:
        v = evaluate(engine, val_loader, cols, mean, std, device)
        score = float(np.mean([m / s for m, s in zip(v["mae"], std.tolist())]))
        row = {"step": step, "epoch": epoch_, "score": score, "n_val": int(max(v["count"])),
               "elapsed_s": elapsed_now()}
        for k, t in enumerate(targets):
            row[f"mae_{t}"] = v["mae"][k]
            row[f"mean_predictor_mae_{t}"] = v["mean_predictor_mae"][k]
        metrics.log_val(row)
        if rank0:
            log.info("val step %d epoch %d: %s", step, epoch_, ", ".join(
                f"MAE {t} {v['mae'][k]:.4f} (mean predictor {v['mean_predictor_mae'][k]:.4f})"
                for k, t in enumerate(targets)))
        return {**v, "score": score, "targets": targets}, score

    status = "finished"
    pbar = None
    if rank0 and tc.progress:
        from tqdm import tqdm
        pbar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)
    win = torch.zeros(2 + len(targets) + 2, dtype=torch.float64)  # loss, n, per-target loss, structures, atoms
    t_win = time.time()
    engine.train()
    try:
        while epoch < tc.epochs and step < total_steps:
            sampler.set_epoch(epoch)
            if batches_done:
                sampler.load_state_dict({"epoch": epoch, "batches_done": batches_done, "seed": tc.seed,
                                         "num_replicas": info.world_size})
            loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate,
                                num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(tc.seed))
            for batch in loader:
                boundary = engine.is_gradient_accumulation_boundary()
                lr = lr_at(step, total_steps, cfg.optim)
                for g in engine.optimizer.param_groups:
                    g["lr"] = lr
                batch = batch.to(device)
                pred = engine(batch).float()
                y = (batch.y[:, cols].double() - mean.to(device)) / std.to(device)
                loss, per_t, _ = masked_loss(pred, y.float(), tc.loss)
                flags = D.all_reduce(torch.tensor([float(_Stop.requested), float(not torch.isfinite(loss))]), "max")
                if flags[1] > 0:
                    _nonfinite(loss, batch, step, epoch, batches_done, info.rank)
                engine.backward(loss)
                engine.step()
                batches_done += 1
                elem_counts += torch.bincount(batch.z.cpu() - 1, minlength=100)
                win += torch.tensor([loss.item(), 1.0, *per_t.double().cpu().tolist(), batch.num_graphs,
                                     batch.z.numel()], dtype=torch.float64)
                if not boundary:
                    continue
                step += 1
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch, refresh=False)
                if step % tc.log_every == 0 or step == total_steps:
                    w = D.all_reduce(win.clone())
                    dt = max(time.time() - t_win, 1e-9)
                    row = {"step": step, "epoch": epoch, "loss": w[0].item() / w[1].item(), "lr": lr,
                           "structures_per_s": w[-2].item() / dt, "atoms_per_s": w[-1].item() / dt,
                           "elapsed_s": elapsed_now()}
                    for k, t in enumerate(targets):
                        row[f"loss_{t}"] = w[2 + k].item() / w[1].item()
                    metrics.log_train(row)
                    if rank0:
                        log.info("step %d/%d epoch %d loss %.4f lr %.2e %.1f structures/s", step, total_steps,
                                 epoch, row["loss"], lr, row["structures_per_s"])
                    win.zero_()
                    t_win = time.time()
                if tc.fail_after_steps is not None and step >= tc.fail_after_steps:
                    sys.stdout.flush()
                    os._exit(17)  # testing: a crash with no checkpoint
                if flags[0] > 0:
                    save(f"step_{step:08d}", epoch_=epoch, batches_done_=batches_done, status="preempted")
                    status = "preempted"
                    if rank0:
                        log.warning("signal received: checkpoint step %d written, exiting for requeue", step)
                    return _finish(status, step, best_val, out, metrics, pbar, old_handlers)
                if tc.ckpt_every_steps and step % tc.ckpt_every_steps == 0 and batches_done < len(sampler):
                    save(f"step_{step:08d}", epoch_=epoch, batches_done_=batches_done, status="running")
                if step >= total_steps:
                    break
            finished_epoch = batches_done >= len(sampler)
            if finished_epoch:
                epoch, batches_done = epoch + 1, 0
            last = epoch >= tc.epochs or step >= total_steps
            val = None
            if last or (finished_epoch and epoch % tc.val_every == 0):
                val, score = validate(epoch)
                improved = score < best_score
                if improved:
                    best_score, best_val = score, val
            d = save(f"step_{step:08d}", epoch_=epoch, batches_done_=batches_done,
                     status="finished" if last else "running", val=val)
            if val is not None and improved and rank0:
                ckpt.save_best(ck_root, d)
            D.barrier()
        if rank0 and cfg.export.after_train:
            from uae_dist.export import export

            src = ck_root / ckpt.BEST if (ck_root / ckpt.BEST).exists() else ckpt.latest(ck_root)
            dest = Path(cfg.export.out_dir or out / "uae")
            export(src, dest, formats=cfg.export.formats)
            log.info("exported UAE of %s to %s", src, dest)
        return _finish(status, step, best_val, out, metrics, pbar, old_handlers)
    except BaseException:
        if pbar is not None:
            pbar.close()
        for s_, h in old_handlers.items():
            signal.signal(s_, h)
        raise


def _sync_fp32_master(engine) -> None:
    """After loading module weights: refresh ZeRO's fp32 master partitions from them."""
    from deepspeed.utils import safe_set_full_fp32_param

    for p in engine.module.parameters():
        if hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, p.detach().float())


def param_digest(module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _nonfinite(loss, batch, step, epoch, batch_no, rank):
    import torch.distributed as dist

    mine = list(batch.id) if not torch.isfinite(loss) else None
    gathered = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    bad = {r: ids for r, ids in enumerate(gathered) if ids is not None}
    where = "; ".join(f"rank {r}: records {ids}" for r, ids in bad.items())
    raise NonFiniteLossError(f"non-finite loss at step {step + 1} (epoch {epoch}, batch {batch_no} of the epoch); "
                             f"{where}")


def _finish(status, step, best_val, out, metrics, pbar, old_handlers) -> dict:
    if pbar is not None:
        pbar.close()
    metrics.close()
    for s, h in old_handlers.items():
        signal.signal(s, h)
    summary = {"status": status, "step": step, "best_val": best_val, "run_dir": str(out)}
    if D.rank() == 0:
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
        try:
            from uae_dist.train.plots import plot_run

            log.info("training curves → %s", plot_run(out))
        except Exception as e:  # a plot is never worth failing a finished run
            log.warning("could not plot the training curves: %s", e)
    return summary
