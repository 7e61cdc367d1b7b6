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
# CI (make test) sets UAE_REQUIRE_DATA=1: a missing data set then fails the tests that need it
# instead of skipping them, so a green run cannot hide that every data test was skipped
REQUIRE_DATA = os.environ.get("UAE_REQUIRE_DATA") == "1"


def need_data(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        msg = f"data set not found at {path} (set UAE_DATA_DIR or place ../shared/data)"
        if REQUIRE_DATA:
            pytest.fail(msg + "; UAE_REQUIRE_DATA=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    return path


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
    unguarded = []
    for item in items:
        if "gpu" in item.keywords:
            # a GPU test must prove that the CUDA kernels it tests are there (cuda_kernels fixture):
            # otherwise a CPU-only build could make "CUDA == CPU" compare the CPU code with itself
            if "cuda_kernels" not in getattr(item, "fixturenames", ()):
                unguarded.append(item.nodeid)
            if not has_gpu:
                item.add_marker(skip_gpu)
    if unguarded:
        raise pytest.UsageError("gpu-marked tests without the cuda_kernels fixture: " + ", ".join(unguarded))


@pytest.fixture(scope="session")
def mp_path():
    return need_data(MP_PATH)


@pytest.fixture(scope="session")
def hoip_path():
    return need_data(HOIP_PATH)


@pytest.fixture
def cuda_kernels():
    """For `gpu` tests: skip without a CUDA device; with one, fail unless uae_dist._C has CUDA kernels
    for every op (a GPU test never passes on the CPU code or the pure fallback)."""
    import torch

    from uae_dist.ops import _ext
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        _ext.require_cuda_kernels()
    except RuntimeError as exc:
        pytest.fail(f"GPU present but the CUDA kernels are not: {exc}")


try:  # one matrix run shared by two test files (absent where this conftest is copied alone)
    from _matrix_fixtures import small_run  # noqa: E402,F401
except ImportError:
    pass
