"""A training session: everything one run holds, built once, restored from a checkpoint on resume.

``Session(cfg)`` resolves the launch, opens the data, fits the normaliser, builds the model and its
DeepSpeed engine, and resumes (``train.resume``) or warm-starts (``train.init_from``); its methods
are the pieces the loop in ``loop.py`` calls: the batches of an epoch, the label counts of a step,
the learning rate, validation, checkpoints, the test evaluation.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from uae_dist import config as C
from uae_dist.models import build_model

from . import checkpoint as ckpt
from . import data as Dt
from . import distributed as D
from . import evaluate as E
from .metrics import Metrics
from .optim import ds_config, lr_at, make_optimizer, param_groups, precision
from .targets import Normalizer

log = logging.getLogger("uae_dist.train")


@dataclass
class State:
    """What a checkpoint restores besides weights, optimizer and RNG."""

    step: int = 0                 # optimizer steps taken
    epoch: int = 0
    batches_done: int = 0         # this rank's micro-batches of the epoch's current plan
    best_score: float = math.inf
    best_val: dict | None = None
    elapsed_s: float = 0.0
    element_counts: np.ndarray = field(default_factory=lambda: np.zeros(100, dtype=np.int64))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def param_digest(module) -> str:
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def setup_logging(rank0: bool) -> None:
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not rank0:
        logging.getLogger("uae_dist").setLevel(logging.WARNING)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Session:
    def __init__(self, cfg: C.Config):
        self.cfg, tc = cfg, cfg.train
        self.info = D.setup_distributed(cfg.ds.backend)
        self.rank0 = self.info.is_main
        setup_logging(self.rank0)
        torch.set_num_threads(tc.threads or default_threads(self.info.local_world_size))
        if tc.keep_freed_memory:
            from .memory import cache_large_blocks, keep_freed_memory

            log.debug("malloc: %s; large-block cache: %s", keep_freed_memory(),
                      cache_large_blocks())
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = torch.device(self.info.device)
        self.out = Path(tc.out_dir)
        self.ck_root = self.out / "checkpoints"
        if self.rank0:
            self.ck_root.mkdir(parents=True, exist_ok=True)
        Dt.ensure_built(cfg, self.rank0, self.info.world_size)
        self.splits = sp = Dt.open_splits(cfg)
        self.targets = sp.targets
        try:
            self.normalizer = Normalizer.fit(sp.y_train, sp.targets)
        except ValueError as e:
            raise C.ConfigError(f"data.targets: {e}") from None
        self._build_engine()
        world, rank = self.info.world_size, self.info.rank
        self.sampler = Dt.train_sampler(cfg, sp.train, rank, world)
        self.val_loader = Dt.eval_loader(cfg, sp.val, rank, world)
        self.test_loader = Dt.eval_loader(cfg, sp.test, rank, world)
        self.state = State()
        self.meta = {"targets": sp.targets, "world_size": world, "launcher": self.info.launcher,
                     "data_root": str(cfg.data.root), "data_manifest_sha256": sp.manifest_sha256,
                     "n_train": len(sp.train), "n_val": len(sp.val), "n_test": len(sp.test),
                     "ds_config": self.ds_config, **self._provenance()}
        resumed = self._restore()
        self.metrics = Metrics(self.out, sp.targets, self.rank0, tc.tensorboard,
                               resume_step=self.state.step if resumed else None)
        self._t0 = time.time()
        if self.rank0:
            C.dump_yaml(cfg, self.out / "config.yaml")
            self._describe()

    # ------------------------------------------------------------------ construction
    def _provenance(self) -> dict:
        """Record the training ids (for the leak check of downstream runs) and check this run's
        own table for one (see :mod:`uae_dist.train.provenance`)."""
        from . import provenance as P

        sp, root = self.splits, Path(self.cfg.data.root)
        features = getattr(self.cfg.model, "features", None)
        if self.rank0 and isinstance(features, str):
            msg = P.leak_warning(features, {"test": list(sp.test.ids), "val": list(sp.val.ids)})
            if msg:
                log.warning("%s", msg)
        # rank 0 writes the checkpoints, so only its metadata is kept
        sha = P.write_ids(self.out / P.TRAIN_IDS, sp.train.ids) if self.rank0 else None
        return {"split_sha256": P.file_sha256(root / "split.json"), "train_ids_sha256": sha}

    def _build_engine(self) -> None:
        import deepspeed

        cfg = self.cfg
        on_gpu = self.device.type == "cuda"
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, self.targets)
        seed_everything(cfg.train.seed + 1000003 * (self.info.rank + 1))  # per-rank dropout
        groups = param_groups(model, cfg.optim.weight_decay)
        self.lp_groups = [list(g["params"]) for g in groups]
        self.optimizer = make_optimizer(groups, cfg.optim)
        self.ds_config = ds_config(cfg, self.info.world_size, on_gpu,
                                   sum(p.numel() for p in model.parameters()))
        args = SimpleNamespace(device_rank=self.info.device_index) if on_gpu else None
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    config=self.ds_config, args=args,
                                                    dist_init_required=False)
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.precision = precision(cfg, on_gpu)

    def _describe(self) -> None:
        cfg, sp = self.cfg, self.splits
        n_par = sum(p.numel() for p in self.engine.module.parameters())
        log.info("%s: %d train / %d val / %d test crystals, targets %s, %.2fM parameters, "
                 "%d rank(s) via %s, ZeRO-%d, %s", cfg.model.name, len(sp.train), len(sp.val),
                 len(sp.test), sp.targets, n_par / 1e6, self.info.world_size, self.info.launcher,
                 self.engine.zero_optimization_stage(), self.precision)

    def _restore(self) -> bool:
        tc = self.cfg.train
        src = None
        if tc.resume == "auto":
            src = ckpt.latest(self.ck_root)
        elif tc.resume:
            src = ckpt.resolve(tc.resume)
        if src is not None:
            self._resume(src)
            return True
        if tc.init_from:
            self._warm_start(tc.init_from)
        return False

    def _resume(self, src: Path) -> None:
        mk = ckpt.read_model(src)
        st = mk["state"]
        meta = st["meta"]
        if meta.get("data_manifest_sha256") != self.splits.manifest_sha256:
            # the sampler position and normaliser belong to the old data: no exact resume
            raise C.ConfigError(f"{src} was trained on another build of the data (manifest sha256 "
                                f"{str(meta.get('data_manifest_sha256'))[:12]}… ≠ "
                                f"{self.splits.manifest_sha256[:12]}…); start a new "
                                "train.out_dir with train.init_from=<checkpoint> to warm-start")
        if st["config"]["model"] != C.to_dict(self.cfg)["model"] or meta["targets"] != self.targets:
            raise C.ConfigError(f"{src} holds another model or target set than this config; "
                                "start a new train.out_dir (train.init_from warm-starts)")
        opt, opt_step = ckpt.read_optimizer(src)
        ckpt._prime(self.engine, self.optimizer, self.grad_accum)
        ckpt.load_weights(self.engine, mk["weights"])
        ckpt.load_optimizer(self.engine, self.optimizer, self.lp_groups, opt, opt_step,
                            self.grad_accum)
        self.normalizer = Normalizer.from_dict(st["normalizer"])
        s = self.state
        s.step, s.epoch, s.batches_done = st["step"], st["epoch"], 0
        s.best_score = math.inf if st["best_score"] is None else st["best_score"]
        s.best_val, s.elapsed_s = st["best_val"], st["elapsed_s"]
        if self.rank0:  # global counts live on rank 0; the all-reduce at the next save sums
            s.element_counts = np.asarray(st["element_counts"], dtype=np.int64)
        self.sampler.load_state_dict(st["sampler"])
        same_world = meta["world_size"] == self.info.world_size
        rng = ckpt.read_rng(src, self.info.rank) if same_world else None
        if rng is not None:
            ckpt.set_rng(rng)
        else:
            seed_everything(self.cfg.train.seed + 7919 * s.step + 1000003 * (self.info.rank + 1))
        e = self.engine
        e.global_steps, e.micro_steps = s.step, s.step * self.grad_accum
        e.global_samples = s.step * self.grad_accum * self.info.world_size
        if self.rank0:
            how = "" if same_world else (f" (saved by {meta['world_size']} rank(s): batches of "
                                         "the epoch re-dealt, dropout streams re-seeded)")
            log.info("resumed from %s: step %d, epoch %d%s", src, s.step, s.epoch, how)

    def _warm_start(self, path) -> None:
        """Weights that fit (e.g. the backbone when the heads differ); normaliser from this data."""
        mk = ckpt.read_model(path)
        own = self.engine.module.state_dict()
        sd = {k: v for k, v in mk["weights"].items() if k in own and own[k].shape == v.shape}
        missing, unexpected = ckpt.load_weights(self.engine, sd, strict=False)
        if self.rank0:
            log.info("initialised weights from %s (not loaded: %s)", mk["path"], missing)

    # ------------------------------------------------------------------ the pieces of a step
    def epoch_batches(self):
        """This rank's micro-batches of the current epoch, from the saved position on."""
        self.sampler.set_epoch(self.state.epoch)
        return Dt.train_loader(self.cfg, self.splits.train, self.sampler)

    def step_counts(self) -> torch.Tensor:
        """(T,) labels per target in the global batch of the step about to be taken."""
        from .targets import label_counts

        b = self.sampler.step_batches(self.state.batches_done // self.grad_accum)
        return torch.as_tensor(label_counts(self.splits.y_train, b), dtype=torch.float32)

    def lr(self) -> float:
        s, tc = self.state, self.cfg.train
        if tc.max_steps:
            progress = s.step / tc.max_steps
        else:
            progress = (s.epoch + self.sampler.epoch_fraction(s.batches_done)) / tc.epochs
        return lr_at(s.step, progress, self.cfg.optim)

    def total_steps(self) -> int:
        """For progress bars: max_steps, else the first epoch's steps × epochs (estimate)."""
        return self.cfg.train.max_steps or self.sampler.steps() * self.cfg.train.epochs

    def done(self) -> bool:
        s, tc = self.state, self.cfg.train
        return s.epoch >= tc.epochs or (tc.max_steps is not None and s.step >= tc.max_steps)

    def elapsed(self) -> float:
        return self.state.elapsed_s + time.time() - self._t0

    # ------------------------------------------------------------------ evaluation
    def validate(self) -> tuple[dict, float]:
        p = E.predict(self.engine, self.val_loader, self.normalizer, self.splits.cols, self.device)
        m = E.metrics(p["y"], p["pred"], self.normalizer.mean, self.targets)
        score = E.score(m, self.normalizer.std)
        s = self.state
        row = {"step": s.step, "epoch": s.epoch, "score": score, "n_val": len(p["id"]),
               "elapsed_s": self.elapsed()}
        for t, v in m.items():
            row[f"mae_{t}"], row[f"mean_predictor_mae_{t}"] = v["mae"], v["mean_predictor_mae"]
        self.metrics.log_val(row)
        if self.rank0:
            log.info("val step %d epoch %d: %s", s.step, s.epoch, ", ".join(
                f"MAE {t} {v['mae']:.4f} (mean predictor {v['mean_predictor_mae']:.4f})"
                for t, v in m.items() if v["mae"] is not None))
        return {"metrics": m, "score": score, "step": s.step, "epoch": s.epoch}, score

    def test(self) -> dict | None:
        """Evaluate the best checkpoint (else the latest) on the test split; write
        ``test_metrics.json`` and ``predictions_test.csv`` in the run and best directories."""
        if len(self.splits.test) == 0:
            return None
        best = self.ck_root / ckpt.BEST
        src = best if (best / ckpt.WEIGHTS).exists() else ckpt.latest(self.ck_root)
        mk = ckpt.read_model(src)
        ckpt.load_weights(self.engine, mk["weights"])
        p = E.predict(self.engine, self.test_loader, self.normalizer, self.splits.cols,
                      self.device)
        m = {"checkpoint": str(src), "step": mk["state"]["step"], "n_test": len(p["id"]),
             "targets": E.metrics(p["y"], p["pred"], self.normalizer.mean, self.targets)}
        if self.rank0:
            for d in (self.out, Path(src)):
                E.write_json(d / "test_metrics.json", m)
                E.write_predictions(d / "predictions_test.csv", p, self.targets)
            log.info("test (%s, %d crystals): %s", Path(src).name, len(p["id"]), ", ".join(
                f"MAE {t} {v['mae']:.4f}" for t, v in m["targets"].items() if v["mae"] is not None))
        D.barrier()
        return m

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, status: str, val: dict | None = None) -> Path:
        s = self.state
        counts = D.all_reduce(torch.as_tensor(s.element_counts.copy()))
        digests = D.all_gather_object(param_digest(self.engine.module))
        meta = {**self.meta, "status": status, "val": val,
                "elements_seen": [int(z) + 1 for z in np.nonzero(counts.numpy())[0]],
                "param_sha256_per_rank": digests,
                "uae_dist_version": __import__("uae_dist").__version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        state = {"step": s.step, "epoch": s.epoch,
                 "sampler": self.sampler.state_dict(s.batches_done),
                 "normalizer": self.normalizer.to_dict(),
                 "best_score": None if math.isinf(s.best_score) else s.best_score,
                 "best_val": s.best_val, "elapsed_s": self.elapsed(),
                 "element_counts": counts.tolist(), "meta": meta, "config": C.to_dict(self.cfg)}
        return ckpt.save(self.ck_root, f"step_{s.step:08d}", self.engine, self.optimizer,
                         self.lp_groups, state=state, keep_last=self.cfg.train.keep_last)

    def close(self) -> None:
        self.metrics.close()
