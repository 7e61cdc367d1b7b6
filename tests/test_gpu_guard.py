"""The GPU tests cannot pass vacuously: conftest.py refuses a `gpu`-marked test that does not request
the ``cuda_kernels`` fixture (which skips without a device and fails without CUDA kernels)."""
import pathlib
import shutil
import subprocess
import sys

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")


def run_pytest(tmp_path, body):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text("import pytest\n\n" + body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_gpu_test_without_cuda_kernels_fixture_is_refused(tmp_path):
    res = run_pytest(tmp_path, "@pytest.mark.gpu\ndef test_probe():\n    pass\n")
    assert res.returncode != 0, res.stdout + res.stderr
    assert "without the cuda_kernels fixture" in res.stdout + res.stderr


def test_gpu_test_with_the_fixture_is_collected(tmp_path):
    res = run_pytest(tmp_path, "@pytest.mark.gpu\ndef test_probe(cuda_kernels):\n    pass\n")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert ("1 skipped" in out) or ("1 passed" in out), out
