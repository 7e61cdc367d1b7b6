"""train/memory.py: glibc keeps freed memory in the process; what the user set wins."""
import json
import os
import platform
import subprocess
import sys

import pytest

from uae_dist.train.memory import SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = "import json; from uae_dist.train.memory import keep_freed_memory as k; print(json.dumps(k()))"


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                       timeout=60, check=True)
    return json.loads(p.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_settings_apply_and_user_variables_win():
    assert len(_run({})) == len(SETTINGS) == 3
    got = _run({"MALLOC_TOP_PAD_": "0"})
    assert len(got) == 2 and not any(s.startswith("malloc_top_pad") for s in got)
