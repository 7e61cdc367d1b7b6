import os
import pathlib
import sys

import pytest

# DeepSpeed JIT-builds its CPU comm op into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, one per
# user). Checkouts with their own venvs on one machine then rebuild it in turn at every launch (the include
# paths differ), minutes on a busy machine; a directory per venv builds it once. Launched ranks inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(pathlib.Path(sys.prefix) / "torch_extensions"))

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("UAE_DATA_DIR", ROOT.parent / "shared" / "data"))
MP_PATH = SHARED_DATA / "mp_cgcnn_36737.json.gz"
HOIP_PATH = SHARED_DATA / "hoip_kim2017_1346.json.gz"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slurm: starts a Slurm cluster of its own (needs root; skipped without, fails under UAE_REQUIRE_SLURM=1)")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def mp_path():
    if not MP_PATH.exists():
        pytest.skip(f"MP data set not found at {MP_PATH}")
    return MP_PATH


@pytest.fixture(scope="session")
def hoip_path():
    if not HOIP_PATH.exists():
        pytest.skip(f"HOIP data set not found at {HOIP_PATH}")
    return HOIP_PATH
