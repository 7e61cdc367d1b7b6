"""Cluster scripts: syntax, documented options, and the commands they would run (dry run, no Slurm here)."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/pretrain.sh", "slurm/pretrain_hostfile.sh"]


def _run(args, env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(env)
    return subprocess.run(["bash", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)


def test_syntax():
    for s in SCRIPTS:
        subprocess.run(["bash", "-n", s], cwd=ROOT, check=True)


def test_sbatch_header():
    text = (ROOT / "slurm/pretrain.sh").read_text()
    for opt in ("#SBATCH --requeue", "#SBATCH --signal=B:TERM@", "#SBATCH --ntasks-per-node", "#SBATCH --gpus-per-node"):
        assert opt in text
    assert "scontrol show hostnames" in text and "scontrol requeue" in text and "SLURM_TMPDIR" in text


def test_dry_run_commands(tmp_path):
    import sys

    p = _run(["slurm/pretrain.sh", "train.epochs=3"],
             {"UAE_DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
              "SLURM_TMPDIR": str(tmp_path), "UAE_PYTHON": sys.executable, "PATH": f"/nonexistent:{os.environ['PATH']}"})
    assert p.returncode == 0, p.stderr
    assert "srun --ntasks-per-node=1 --ntasks=2" in p.stdout
    assert "launch/train.py" in p.stdout and f"data.root={tmp_path}/mp" in p.stdout and "train.epochs=3" in p.stdout
    assert "master gpu07:" in p.stdout or "scontrol" in p.stdout
    hf = tmp_path / "hosts"
    hf.write_text("n1 slots=2\nn2 slots=2\n")
    p = _run(["slurm/pretrain_hostfile.sh", str(hf), "train.epochs=1"], {"UAE_DRY_RUN": "1"})
    assert p.returncode == 0 and "deepspeed --hostfile" in p.stdout and "--master_addr n1" in p.stdout


def _slurm_up() -> bool:
    import shutil

    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_two_tasks_cpu(tmp_path_factory):
    """With a live Slurm controller (e.g. /work/shared/notes/slurm_local_example.sh up): a real sbatch of
    slurm/pretrain.sh, 2 tasks via srun on CPU, data staged to node-local disk."""
    if not _slurm_up():
        pytest.skip("no running Slurm controller")
    import json
    import sys

    from _train_fixtures import SMOKE, tiny_lmdb

    data = tiny_lmdb(tmp_path_factory)
    work = tmp_path_factory.mktemp("sbatch")
    script = work / "pretrain_cpu.sh"  # the same script without the GPU request
    script.write_text("".join(l for l in (ROOT / "slurm/pretrain.sh").read_text().splitlines(True)
                              if not l.startswith("#SBATCH --gpus-per-node")))
    run_dir = work / "run"
    env = dict(os.environ, UAE_CONFIG=str(SMOKE), UAE_DATA=str(data), UAE_RUN_DIR=str(run_dir),
               UAE_PYTHON=sys.executable, UAE_VENV=str(ROOT / ".venv"), PYTHONPATH=str(ROOT))
    p = subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                        f"--output={work}/slurm-%j.out", str(script), "train.epochs=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    logs = "".join(f.read_text() for f in work.glob("slurm-*.out"))
    assert p.returncode == 0, p.stderr + logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    meta = json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["launcher"] == "slurm" and meta["world_size"] == 2
