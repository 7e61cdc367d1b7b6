import os
import pathlib

import pytest

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
    config.addinivalue_line("markers", "slurm: needs a running Slurm controller (skipped without one)")
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
    return need_data(MP_PATH)


@pytest.fixture(scope="session")
def hoip_path():
    return need_data(HOIP_PATH)


from _matrix_fixtures import small_run  # noqa: E402,F401  (one matrix run shared by two test files)
