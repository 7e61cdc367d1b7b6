"""Cluster scripts without a cluster: syntax, headers, and the commands they would run (UAE_DRY_RUN=1).
The same scripts run for real under a live Slurm in tests/test_slurm_live.py."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/common.sh", "slurm/pretrain.sh", "slurm/pretrain_hostfile.sh", "slurm/finetune.sh"]


def _run(args, env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(env)
    return subprocess.run(["bash", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)


def test_syntax():
    for s in SCRIPTS:
        subprocess.run(["bash", "-n", s], cwd=ROOT, check=True)


def test_sbatch_headers():
    for script, extra in (("slurm/pretrain.sh", "--output=slurm-%x-%j.out"), ("slurm/finetune.sh", "%A_%a")):
        text = (ROOT / script).read_text()
        for opt in ("#SBATCH --requeue", "#SBATCH --signal=B:TERM@", "#SBATCH --ntasks-per-node",
                    "#SBATCH --gpus-per-node", "#SBATCH --open-mode=append", "set -euo pipefail", extra):
            assert opt in text, (script, opt)
        # sbatch reads #SBATCH lines only up to the first command: all of them must come before it
        lines = text.splitlines()
        first_cmd = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith("#"))
        assert not any(l.startswith("#SBATCH") for l in lines[first_cmd:]), script
    common = (ROOT / "slurm/common.sh").read_text()
    assert "scontrol show hostnames" in common and "scontrol requeue" in common and "SLURM_TMPDIR" in common


def test_pretrain_dry_run(tmp_path):
    p = _run(["slurm/pretrain.sh", "train.epochs=3"],
             {"UAE_DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
              "SLURM_TMPDIR": str(tmp_path), "UAE_PYTHON": sys.executable, "PATH": f"/nonexistent:{os.environ['PATH']}"})
    # (no SLURM_CONF: an installed scontrol fails at once and the script parses the node list itself)
    assert p.returncode == 0, p.stderr
    assert "srun --ntasks-per-node=1 --ntasks=2" in p.stdout  # staging: one task per node
    assert "nodes: gpu07 gpu08;" in p.stdout and "master gpu07:29742" in p.stdout  # 29500 + 4242 % 2000
    lines = [ln for ln in p.stdout.splitlines() if "launch/train.py" in ln]
    check, train = lines  # the config is checked in the batch shell first, then the ranks start
    assert " --check " in check and not check.startswith("+ srun") and check.endswith("train.epochs=3")
    assert train.startswith("+ srun --kill-on-bad-exit=1 --label")
    assert f"data.root={tmp_path}/mp" in train and "train.resume=auto" in train and train.endswith("train.epochs=3")


def test_hostfile_dry_run(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("n1 slots=2\nn2 slots=2\n")
    p = _run(["slurm/pretrain_hostfile.sh", str(hf), "train.epochs=1"], {"UAE_DRY_RUN": "1"})
    assert p.returncode == 0 and "deepspeed --hostfile" in p.stdout and "--master_addr n1" in p.stdout


def test_finetune_dry_run_runs_the_array_task_cell(tmp_path):
    m = tmp_path / "matrix.yaml"
    m.write_text("cells: []\n")
    p = _run(["slurm/finetune.sh", str(m)],
             {"UAE_DRY_RUN": "1", "SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3",
              "SLURM_JOB_NODELIST": "gpu01", "UAE_PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout + p.stderr
    cmd = next(line for line in p.stdout.splitlines() if line.startswith("+ uae-dist"))
    # the runner stays in the batch shell and starts the cell's ranks as srun tasks
    assert cmd.startswith(f"+ uae-dist matrix run {m} --cell 3 --launcher srun "), cmd
    assert "--kill-on-bad-exit=1" in cmd
    assert "array 70 task 3: cell 3" in p.stdout


def test_finetune_refuses_bad_submissions(tmp_path):
    p = _run(["slurm/finetune.sh"], {"UAE_PYTHON": sys.executable})
    assert p.returncode == 2 and "usage: sbatch --array" in p.stdout
    p = _run(["slurm/finetune.sh", "a.yaml", "train.epochs=2"], {"UAE_PYTHON": sys.executable})
    assert p.returncode == 2 and "overrides go in the file" in p.stdout
    p = _run(["slurm/finetune.sh", str(tmp_path / "missing.yaml")], {"UAE_PYTHON": sys.executable})
    assert p.returncode == 2 and "not found" in p.stdout
    m = tmp_path / "m.yaml"
    m.write_text("cells: []\n")
    p = _run(["slurm/finetune.sh", str(m)], {"UAE_PYTHON": sys.executable})  # no array index: not an array task
    assert p.returncode == 2 and "not an array task" in p.stdout
