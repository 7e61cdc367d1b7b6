#!/usr/bin/env python
"""Fine-tune a backbone: the script every launcher runs (``uae-dist finetune`` is the same
job from an installed package). See ``uae_dist/jobs.py`` for the launch forms and exit codes.

    deepspeed --num_gpus 2 launch/finetune.py --config FILE [section.key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from uae_dist.jobs import main_finetune  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_finetune())
