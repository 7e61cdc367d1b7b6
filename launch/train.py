#!/usr/bin/env python
"""Pretrain a CrystalTransformer; the same command line under every launcher.

    python launch/train.py --config configs/pretrain.yaml [section.key=value ...]
    deepspeed --num_gpus 2 launch/train.py --config ...            # (DS_ACCELERATOR=cpu on CPU)
    torchrun --nproc_per_node 2 launch/train.py --config ...
    mpirun -np 2 python launch/train.py --config ...
    srun python launch/train.py --config ...                       # see slurm/pretrain.sh

Exit codes: 0 finished, or pre-empted after writing a checkpoint (train.preempt_exit_code, default 0;
rerun the same command to resume); 2 bad config or missing data; 3 non-finite loss.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

if "DS_ACCELERATOR" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/pretrain.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 model.layers=4")
    args = p.parse_args(argv)
    from uae_dist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from uae_dist.train.engine import NONFINITE_EXIT, NonFiniteLossError, train

    try:
        summary = train(cfg)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return NONFINITE_EXIT
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from uae_dist.train.distributed import cleanup

        try:
            cleanup()
        except Exception:
            pass
    if summary["status"] == "preempted":
        return cfg.train.preempt_exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
