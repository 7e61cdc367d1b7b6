"""Helpers for the matrix tests: matrix files derived from the shipped smoke matrix, real
``uae-dist matrix`` / ``uae-dist results`` subprocesses, and one shared run of a small matrix."""
from __future__ import annotations

import copy
import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _train_fixtures import MP, ROOT, env

SMOKE = ROOT / "uae_dist" / "configs" / "matrix_smoke.yaml"
TIMEOUT = 900  # seconds per command: the CI machine is shared with other jobs


def smoke_dict() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def write_matrix(path: Path, d: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def cli(args, cwd, timeout: float = TIMEOUT, check_rc: int | None = None):
    p = subprocess.run([sys.executable, "-m", "uae_dist.cli", *map(str, args)], cwd=cwd,
                       env=env(), capture_output=True, text=True, timeout=timeout)
    if check_rc is not None and p.returncode != check_rc:
        raise AssertionError(f"uae-dist {' '.join(map(str, args))} exited {p.returncode}, "
                             f"expected {check_rc}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n"
                             f"{p.stderr[-6000:]}")
    return p


def popen(args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "uae_dist.cli", *map(str, args)], cwd=cwd,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def read_json(p) -> dict:
    return json.loads(Path(p).read_text())


def train_rows(cell_dir: Path) -> int:
    p = Path(cell_dir) / "train.csv"
    return max(0, len(p.read_text().splitlines()) - 1) if p.exists() else 0


def wait_until(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def wait_unlocked(cell_dir: Path, timeout: float = 300) -> None:
    """Wait until no process holds the cell's lock (its training process has exited)."""
    def free():
        with open(Path(cell_dir) / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
    wait_until(free, timeout, f"{cell_dir} to be unlocked")


def small_matrix() -> dict:
    """The shipped smoke matrix plus a featurizer whose cell fails inside the engine
    (model.cutoff 6 Å on graphs built at 5 Å), for seed 0 only: 5 cells, index 4 fails."""
    d = copy.deepcopy(smoke_dict())
    d["featurizers"]["broken"] = {"overrides": {"model.cutoff": 6.0}}
    d["exclude"] = [{"featurizer": "broken", "seed": 1}]
    return d


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """One real run of ``small_matrix`` with 2 cells at once: (work dir, matrix file, out root,
    completed process, wall seconds)."""
    from conftest import need_data

    need_data(MP)
    work = tmp_path_factory.mktemp("matrix_small")
    f = write_matrix(work / "small.yaml", small_matrix())
    t0 = time.time()
    p = cli(["matrix", "run", f, "--jobs", "2"], cwd=work)
    return work, f, work / "runs" / "matrix_smoke", p, time.time() - t0
