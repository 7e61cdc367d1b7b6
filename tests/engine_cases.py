"""Engine checks that need a real process group, run by ``tests/test_engine.py`` under torchrun
(2 CPU ranks, gloo, real DeepSpeed engines) or as one process:

    torchrun --nproc_per_node 2 tests/engine_cases.py CASE DATA OUT

Each case writes ``OUT/CASE.json`` on rank 0 with what the test asserts on. Many sessions run in
one launch so the checks cost one start-up.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uae_dist.config import load_config  # noqa: E402
from uae_dist.train import checkpoint as ckpt  # noqa: E402
from uae_dist.train import distributed as D  # noqa: E402
from uae_dist.train.loop import run, train_step, windows  # noqa: E402
from uae_dist.train.session import Session  # noqa: E402

SMOKE = ["train.progress=false", "train.tensorboard=false", "export.after_train=false",
         "train.threads=1", "train.log_every=1", "train.test=false"]


def cfg(data, out, *extra):
    return load_config("pretrain_smoke", [f"data.root={data}", f"train.out_dir={out}", *SMOKE,
                                          *extra])


def weights(out) -> dict:
    return ckpt.read_model(ckpt.latest(Path(out) / "checkpoints"))["weights"]


def losses(out) -> list[str]:
    with open(Path(out) / "train.csv") as fh:
        return [line.split(",")[2] for line in fh.read().splitlines()[1:]]


# --------------------------------------------------------------------------- 7.1 loss weighting
def case_loss(data, out) -> dict:
    """One SGD step (lr 1, no momentum, clipping or decay) of the engine on R ranks equals the
    gradient of the per-structure mean loss over the step's global batch, computed directly."""
    from torch_geometric.data import Batch

    from uae_dist.models import build_model
    from uae_dist.train.targets import elementwise

    res = {}
    for stage in (0, 1, 2):
        c = cfg(data, Path(out) / f"loss{stage}", "optim.name=sgd", "optim.lr=1.0",
                "optim.momentum=0", "optim.weight_decay=0", "optim.grad_clip=0",
                "optim.warmup_steps=0", "optim.schedule=constant", "model.dropout=0",
                "train.grad_accum=2", f"ds.zero_stage={stage}", "data.max_atoms=48")
        s = Session(c)
        p0 = {k: v.clone() for k, v in ckpt.full_weights(s.engine).items()}
        s.sampler.set_epoch(0)
        global_batches = s.sampler.step_batches(0)
        window = next(windows(s.epoch_batches(), s.grad_accum))
        train_step(s, window, s.step_counts())
        p1 = ckpt.full_weights(s.engine)
        # the oracle: a fresh copy of the initial model, the loss written out directly
        torch.manual_seed(0)
        ref = build_model(c.model, s.targets)
        ref.load_state_dict(p0)
        idx = [i for b in global_batches for i in b]
        batch = Batch.from_data_list([s.splits.train[i] for i in idx])
        y = s.normalizer.norm(batch.y[:, s.splits.cols])
        err = elementwise(ref(batch).float(), torch.nan_to_num(y), "mse")
        ok = torch.isfinite(y)
        per_t = torch.where(ok, err, 0.0).sum(0) / ok.sum(0).clamp_min(1)
        loss = per_t[ok.any(0)].mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        dev = max(float((p0[n] - p1[n] - g).abs().max()) for n, g in grads.items())
        scale = max(float(g.abs().max()) for g in grads.values())
        # what the old loss gave (each micro-batch's own mean, averaged): the test must see it
        ref.zero_grad()
        for b in global_batches:
            mb = Batch.from_data_list([s.splits.train[i] for i in b])
            yb = s.normalizer.norm(mb.y[:, s.splits.cols])
            okb = torch.isfinite(yb)
            eb = elementwise(ref(mb).float(), torch.nan_to_num(yb), "mse")
            pb = torch.where(okb, eb, 0.0).sum(0) / okb.sum(0).clamp_min(1)
            (pb[okb.any(0)].mean() / len(global_batches)).backward()
        old = max(float((grads[n] - p.grad).abs().max()) for n, p in ref.named_parameters())
        sizes = [len(b) for b in global_batches]
        res[f"zero{stage}"] = {"max_abs_dev": dev, "grad_scale": scale, "batch_sizes": sizes,
                               "n_structures": len(idx), "old_loss_dev": old}
    return res


# --------------------------------------------------------------------------- 7.2 exact resume
RESUME_CASES = [("0", "fp32", 1), ("0", "fp32", 3), ("1", "fp32", 3), ("2", "fp32", 1),
                ("1", "bf16", 3), ("2", "bf16", 1)]


def case_resume(data, out) -> dict:
    res = {}
    for stage, prec, gas in RESUME_CASES:
        name = f"z{stage}_{prec}_ga{gas}"
        base = [f"ds.zero_stage={stage}", f"ds.precision={prec}", f"train.grad_accum={gas}",
                "train.epochs=3", "model.dropout=0.1", "data.max_atoms=48"]
        a, b = Path(out) / f"{name}_a", Path(out) / f"{name}_b"
        run(cfg(data, a, *base))
        first = run(cfg(data, b, *base, "train.preempt_at_step=3"))
        second = run(cfg(data, b, *base))
        wa, wb = weights(a), weights(b)
        res[name] = {"statuses": [first["status"], second["status"]],
                     "same_weights": all(torch.equal(wa[k], wb[k]) for k in wa),
                     "same_losses": losses(a) == losses(b), "steps": len(losses(a)),
                     "fp32_not_bf16_rounded": bool(any(
                         not torch.equal(v, v.bfloat16().float()) for v in wa.values()
                         if v.is_floating_point())),
                     "normalizer": ckpt.read_model(ckpt.latest(a / "checkpoints"))["state"][
                         "normalizer"]}
    return res


# --------------------------------------------------------------------------- 7.3 other world sizes
def case_save(data, out) -> dict:
    """Pre-empt a run (this world size) mid-epoch and leave its checkpoint for another size."""
    s = run(cfg(data, out, "train.epochs=2", "train.preempt_at_step=3", "data.max_atoms=48"))
    return {"status": s["status"], "world": D.world_size()}


def case_restore(data, out) -> dict:
    """Resume the checkpoint of another world size: weights and optimizer state come back exactly;
    then train to the end."""
    c = cfg(data, out, "train.epochs=2", "data.max_atoms=48")
    src = ckpt.latest(Path(out) / "checkpoints")
    saved_w = ckpt.read_model(src)
    saved_opt, saved_step = ckpt.read_optimizer(src)
    s = Session(c)
    w = ckpt.full_weights(s.engine)
    opt, step = ckpt.optimizer_tensors(s.engine, s.optimizer, s.lp_groups)
    same_w = all(torch.equal(w[k], saved_w["weights"][k]) for k in w)
    same_opt = (opt.keys() == saved_opt.keys()
                and all(torch.equal(opt[k], saved_opt[k]) for k in opt))
    s.close()
    saved_world = saved_w["state"]["meta"]["world_size"]
    result = run(c)
    counts = np.asarray(ckpt.read_model(ckpt.latest(Path(out) / "checkpoints"))["state"][
        "element_counts"])
    return {"same_weights": same_w, "same_optimizer": same_opt, "n_opt_tensors": len(opt),
            "opt_step": [step, saved_step], "status": result["status"], "step": result["step"],
            "saved_world": saved_world, "world": D.world_size(),
            "atoms_seen": int(counts.sum())}


CASES = {"loss": case_loss, "resume": case_resume, "save": case_save, "restore": case_restore}

if __name__ == "__main__":
    name, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result = CASES[name](data, out)
    if D.rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(result, indent=1))
    D.cleanup()
