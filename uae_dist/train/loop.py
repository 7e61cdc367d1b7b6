"""The training loop shared by pretraining and fine-tuning (they differ in model, features and
data, not here). Read ``fit`` top to bottom: that is the whole algorithm.

One micro-batch per rank is one sampler batch (capped atoms, edges or structures), so DeepSpeed's
``train_micro_batch_size_per_gpu`` is 1 and an optimizer step takes ``train.grad_accum``
micro-batches on each of the ranks; the loss of a step is the per-structure mean over all of them
(``targets.step_loss``). One all-reduce per step carries the loss statistics and the flags every
rank must agree on (pre-emption, non-finite loss).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from uae_dist import config as C

from . import checkpoint as ckpt
from . import distributed as D
from .optim import set_lr
from .preemption import Preemption
from .session import Session
from .targets import step_loss

log = logging.getLogger("uae_dist.train")

NONFINITE_EXIT = 3


class NonFiniteLossError(RuntimeError):
    pass


def train_step(run: Session, window: list, counts: torch.Tensor) -> torch.Tensor:
    """Forward/backward of this rank's micro-batches of one optimizer step, then the step.

    Returns this rank's statistics: [loss share, per-target shares…, non-finite micro-batches,
    structures, atoms]."""
    engine, cols, t = run.engine, run.splits.cols, len(run.targets)
    scale = run.info.world_size * run.grad_accum  # undoes DeepSpeed's mean over ranks and steps
    stats = torch.zeros(t + 4, dtype=torch.float64)
    run.bad_ids = []
    for batch in window:
        batch = batch.to(run.device, non_blocking=True)  # pinned (GPU, workers): overlaps
        pred = engine(batch).float()
        share, per_t = step_loss(pred, run.normalizer.norm(batch.y[:, cols]), counts,
                                 run.cfg.train.loss)
        if not torch.isfinite(share):
            run.bad_ids.extend(batch.id)
        engine.backward(share * scale)
        engine.step()
        run.state.batches_done += 1
        run.state.element_counts += torch.bincount(batch.z.cpu() - 1, minlength=100).numpy()
        stats[0] += share.item()
        stats[1:1 + t] += per_t.double().cpu()
        stats[1 + t] += float(not torch.isfinite(share))
        stats[2 + t] += batch.num_graphs
        stats[3 + t] += batch.z.numel()
    return stats


def windows(loader, n: int):
    """Group the loader's micro-batches into optimizer steps of ``n``."""
    buf = []
    for batch in loader:
        buf.append(batch)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:  # the sampler makes every rank's count a multiple of n: this is a bug
        raise RuntimeError(f"{len(buf)} micro-batches left over (grad_accum {n})")


def fit(run: Session, stop: Preemption) -> str:
    """Train until the epochs or steps are done ('finished') or a signal arrives ('preempted')."""
    s, tc = run.state, run.cfg.train
    t = len(run.targets)
    log_win = torch.zeros(t + 4, dtype=torch.float64)  # steps, loss, per-target, structures, atoms
    t_win = time.time()
    bar = _progress(run)
    run.engine.train()
    while not run.done():
        for window in windows(run.epoch_batches(), run.grad_accum):
            set_lr(run.optimizer, lr := run.lr())
            stats = train_step(run, window, run.step_counts())
            s.step += 1
            wanted = stop.requested or s.step == tc.preempt_at_step
            agreed = D.all_reduce(torch.cat([stats, torch.tensor([float(wanted)])]))
            if agreed[1 + t] > 0:
                _nonfinite(run)
            log_win += torch.cat([torch.ones(1), agreed[:1 + t], agreed[2 + t:4 + t]])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{agreed[0].item():.4f}", epoch=s.epoch, refresh=False)
            if s.step % tc.log_every == 0:
                _log_train(run, log_win, time.time() - t_win, lr)
                log_win.zero_()
                t_win = time.time()
            if tc.fail_after_steps is not None and s.step >= tc.fail_after_steps:
                sys.stdout.flush()
                os._exit(17)  # testing: a crash with no checkpoint
            if agreed[-1] > 0:
                run.checkpoint("preempted")
                if run.rank0:
                    log.warning("signal received: checkpoint step %d written, exiting for requeue",
                                s.step)
                _close(bar)
                return "preempted"
            if tc.ckpt_every_steps and s.step % tc.ckpt_every_steps == 0:
                run.checkpoint("running")
            if run.done():
                break
        if s.batches_done >= len(run.sampler):  # the epoch is complete
            s.epoch, s.batches_done = s.epoch + 1, 0
        _end_of_epoch(run)
    if log_win[0] > 0:
        _log_train(run, log_win, time.time() - t_win, lr)
    _close(bar)
    return "finished"


def _end_of_epoch(run: Session) -> None:
    s, tc = run.state, run.cfg.train
    last = run.done()
    val = None
    if last or s.epoch % tc.val_every == 0:
        val, score = run.validate()
        improved = score < s.best_score
        if improved:
            s.best_score, s.best_val = score, val
    d = run.checkpoint("finished" if last else "running", val)
    if val is not None and improved and run.rank0:
        ckpt.save_best(run.ck_root, d)
    D.barrier()


def _log_train(run: Session, w: torch.Tensor, dt: float, lr: float) -> None:
    t = len(run.targets)
    n = max(w[0].item(), 1.0)
    s = run.state
    row = {"step": s.step, "epoch": s.epoch, "loss": w[1].item() / n, "lr": lr,
           "structures_per_s": w[2 + t].item() / max(dt, 1e-9),
           "atoms_per_s": w[3 + t].item() / max(dt, 1e-9), "elapsed_s": run.elapsed()}
    # this rank's process CPU time so far (all threads; restarts at 0 on resume): the kernel
    # share of the steady state, without start-up, is a difference of two rows
    row["cpu_user_s"], row["cpu_sys_s"] = os.times()[:2]
    for k, name in enumerate(run.targets):
        row[f"loss_{name}"] = w[2 + k].item() / n
    if run.device.type == "cuda":  # what the allocator held at most, for sizing batches
        row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.metrics.log_train(row)
    if run.rank0:
        log.info("step %d epoch %d loss %.4f lr %.2e %.1f structures/s", s.step, s.epoch,
                 row["loss"], lr, row["structures_per_s"])


def _progress(run: Session):
    if not (run.rank0 and run.cfg.train.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=run.total_steps(), initial=run.state.step, unit="step", dynamic_ncols=True,
                mininterval=1.0)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def _nonfinite(run: Session):
    gathered = D.all_gather_object(run.bad_ids or None)
    where = "; ".join(f"rank {r}: records {ids}" for r, ids in enumerate(gathered) if ids)
    s = run.state
    raise NonFiniteLossError(f"non-finite loss at step {s.step} (epoch {s.epoch}); {where}")


def run(cfg: C.Config) -> dict:
    """Train (or resume) as configured, then evaluate the best checkpoint on the test split.
    Collective: every rank calls it. Returns a summary; rank 0 writes ``summary.json``."""
    with Preemption() as stop:
        session = Session(cfg)
        try:
            status = fit(session, stop)
            test = session.test() if status == "finished" and cfg.train.test else None
        finally:
            session.close()
    s = session.state
    summary = {"status": status, "step": s.step, "best_val": s.best_val,
               "test": test, "run_dir": str(session.out)}
    if session.rank0:
        (session.out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
        try:
            from .plots import plot_run

            log.info("training curves → %s", plot_run(session.out))
        except Exception as e:  # a plot is never worth failing a finished run
            log.warning("could not plot the training curves: %s", e)
    summary["best_checkpoint"] = _best(Path(session.ck_root))
    return summary


def _best(root: Path) -> str | None:
    if (root / ckpt.BEST / ckpt.WEIGHTS).exists():
        return str(root / ckpt.BEST)
    lt = ckpt.latest(root)
    return str(lt) if lt else None
