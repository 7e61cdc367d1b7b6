"""Jobs as launchers run them: parse the config, run the training engine, export.

Pretraining and fine-tuning run the same engine (``uae_dist.train.loop.run``); they differ in the
model, its atom features and the data, and pretraining exports its element table at the end.

    uae-dist pretrain --config pretrain [section.key=value …]          # one process
    uae-dist finetune --config FILE [section.key=value …]
    deepspeed --num_gpus 2 launch/train.py --config pretrain …          # (DS_ACCELERATOR=cpu on CPU)
    deepspeed --num_gpus 2 --module uae_dist.cli pretrain --config …    # from an installed package
    torchrun --nproc_per_node 2 -m uae_dist.cli pretrain --config …
    mpirun -np 2 uae-dist pretrain --config …
    srun uae-dist pretrain --config …                                   # see slurm/pretrain.sh

Exit codes: 0 finished, or pre-empted after writing a checkpoint (``train.preempt_exit_code``,
default 0; rerun the same command to resume); 2 bad config or missing data; 3 non-finite loss.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("uae_dist")

CONFIG_EXIT, NONFINITE_EXIT = 2, 3


def add_arguments(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", default=default_config,
                   help="YAML config: a path or a shipped name (default: %(default)s)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("--check", action="store_true",
                   help="only load and validate the config, then exit (0 valid, 2 not)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. train.epochs=2 model.layers=4")


def _export(cfg, summary: dict) -> None:
    from pathlib import Path

    from uae_dist.export import export

    src = summary.get("best_checkpoint")
    dest = Path(cfg.export.out_dir or Path(cfg.train.out_dir) / "uae")
    export(src, dest, formats=cfg.export.formats, include_unseen=cfg.export.include_unseen)
    log.info("exported the UAE of %s to %s", src, dest)


def pretrain(args) -> int:
    """Run a pretraining job (all ranks call this); rank 0 exports the UAE when it finishes."""
    return _job(args, export=True)


def finetune(args) -> int:
    """Run a fine-tuning job (all ranks call this): train, then test the best checkpoint."""
    return _job(args, export=False)


def _job(args, export: bool) -> int:
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    from uae_dist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return CONFIG_EXIT
    if args.check:
        print(f"config OK: {args.config} ({type(cfg.model).__name__}, out_dir {cfg.train.out_dir})")
        return 0
    from uae_dist.train import distributed as D
    from uae_dist.train.loop import NonFiniteLossError, run

    try:
        summary = run(cfg)
        done = summary["status"] == "finished"
        if export and done and cfg.export.after_train and D.rank() == 0:
            _export(cfg, summary)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return NONFINITE_EXIT
    except (ConfigError, FileNotFoundError, D.LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_EXIT
    finally:
        try:
            D.cleanup()
        except Exception:  # a peer that already failed must not hide this rank's error
            pass
    if summary["status"] == "preempted":
        return cfg.train.preempt_exit_code
    return 0


def main_pretrain(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, "pretrain")
    return pretrain(p.parse_args(argv))


def main_finetune(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, "finetune")
    return finetune(p.parse_args(argv))
