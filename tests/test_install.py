"""``pip install .`` gives a working ``uae-dist pretrain`` outside the checkout (issue 7.9): the
configs and DeepSpeed JSONs ship inside the package, and the same job runs in one process and
under the deepspeed launcher (``--module uae_dist.cli``).

The fresh venv borrows the test venv's dependencies through a .pth file (installing torch and
DeepSpeed again would take minutes) and is built without the C++ extension (UAE_NO_EXT=1; the ops
fall back to pure PyTorch), so what is tested is the package itself: its files, entry points and
imports, with no path into the checkout.
"""
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from _train_fixtures import BIN, ROOT, env, free_port, tiny_lmdb


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    v = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(v)], check=True)
    py = v / "bin" / "python"
    new_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(new_site) / "_deps.pth").write_text(site.getsitepackages()[0] + "\n")
    e = dict(os.environ, UAE_NO_EXT="1")
    p = subprocess.run([str(BIN / "pip"), "--python", str(py), "install", "-q", "--no-deps",
                        "--no-build-isolation", "--ignore-installed", str(ROOT)], env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return v


@pytest.mark.timeout(600)
def test_installed_cli_runs_outside_the_checkout(venv, tmp_path_factory, tmp_path):
    data = tiny_lmdb(tmp_path_factory)
    e = env()
    e.pop("PYTHONPATH")  # nothing from the checkout
    where = subprocess.run([str(venv / "bin/python"), "-c",
                            "import uae_dist; print(uae_dist.__file__)"],
                           cwd=tmp_path, env=e, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(venv)), where.stdout
    h = subprocess.run([str(venv / "bin/uae-dist"), "pretrain", "--help"], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "--config" in h.stdout, h.stderr
    common = ["--config", "pretrain_smoke", f"data.root={data}", "train.max_steps=3",
              "export.after_train=true", "train.progress=false"]
    single = tmp_path / "single"
    p = subprocess.run([str(venv / "bin/uae-dist"), "pretrain", *common,
                        f"train.out_dir={single}"], cwd=tmp_path, env=e, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    two = tmp_path / "two"
    e2 = dict(e, PATH=f"{venv}/bin:{e['PATH']}")
    p = subprocess.run([str(venv / "bin/python"), str(BIN / "deepspeed"), "--num_gpus", "2",
                        "--master_port", str(free_port()), "--module", "uae_dist.cli",
                        "pretrain", *common, f"train.out_dir={two}"], cwd=tmp_path, env=e2,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for out, world in ((single, 1), (two, 2)):
        assert (out / "checkpoints" / "best" / "model.safetensors").exists()
        assert (out / "uae" / "uae.safetensors").exists() and (out / "predictions_test.csv").exists()
        test = json.loads((out / "test_metrics.json").read_text())
        assert test["n_test"] > 0 and test["targets"]["e_form_per_atom"]["mae"] > 0
        state = json.loads((out / "checkpoints" / "best" / "state.json").read_text())
        assert state["meta"]["world_size"] == world
    assert ROOT.as_posix() not in (single / "config.yaml").read_text()  # no checkout paths
