#!/usr/bin/env bash
# Compile-check the CUDA sources of uae_dist._C against a CUDA build of torch, on a machine without a GPU.
#
# One torch story: the version is the one pinned in requirements.txt (torch==X), taken as the CUDA
# build that PyPI ships for it (the pinned local wheel is the CPU build of the same version). pip
# runs with --isolated so that the CPU wheel on a local find-links path is not picked instead.
# Creates a throwaway venv, copies csrc/ + setup.py + uae_dist/_version.py to a scratch directory
# (the repository is not touched) and builds the extension with nvcc. Heavy (~3 GB of wheels, ~10 min):
# not for CI.
#
#   scripts/check_cuda_build.sh                       # scratch in /tmp/uae_cuda_check
#   WHEELS=/tmp/torch_cuda_wheels scripts/check_cuda_build.sh   # wheels already downloaded there
#   WORK=/scratch/x CUDA_HOME=/usr/local/cuda scripts/check_cuda_build.sh
#
# Exit status 0 and "CUDA build OK" when every .cu/.cpp compiled and linked and every op registered a
# CUDA kernel (checked by loading the library; no GPU is needed for that).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-/tmp/uae_cuda_check}"
TORCH_PIN="$(grep -E '^torch==' "$REPO/requirements.txt" | head -1 | tr -d '[:space:]')"
[ -n "$TORCH_PIN" ] || { echo "no torch==X pin in requirements.txt" >&2; exit 2; }
PYTHON="${PYTHON:-python3.11}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

command -v "$PYTHON" >/dev/null || PYTHON=python3
mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
  "$PYTHON" -m venv "$WORK/venv"
fi
PIP_OPTS=(--isolated --disable-pip-version-check -q)
if [ -n "${WHEELS:-}" ]; then PIP_OPTS+=(--find-links "$WHEELS"); fi
"$WORK/venv/bin/pip" install "${PIP_OPTS[@]}" "$TORCH_PIN" numpy setuptools wheel ninja
"$WORK/venv/bin/python" - "$TORCH_PIN" <<'PY'
import sys
import torch
want = sys.argv[1].split("==")[1]
assert torch.version.cuda, f"{torch.__version__} is not a CUDA build of torch"
assert torch.__version__.split("+")[0] == want, f"torch {torch.__version__}, pinned {want}"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "(pinned", sys.argv[1] + ")")
PY

# CUDA library headers (cuSPARSE, cuBLAS, ... included by ATen/cuda) come with the nvidia-* wheels that the
# CUDA torch pulls in, not necessarily with the toolkit at CUDA_HOME.
NV_INC="$("$WORK/venv/bin/python" -c 'import glob, site; print(":".join(glob.glob(site.getsitepackages()[0] + "/nvidia/cu*/include") + glob.glob(site.getsitepackages()[0] + "/nvidia/*/include")))')"
export CPATH="${NV_INC}${CPATH:+:$CPATH}"

SRC="$WORK/src"
rm -rf "$SRC"
mkdir -p "$SRC"
cp -r "$REPO/csrc" "$REPO/setup.py" "$SRC/"
mkdir -p "$SRC/uae_dist"
cp "$REPO/uae_dist/_version.py" "$SRC/uae_dist/"
touch "$SRC/uae_dist/__init__.py"
"$CUDA_HOME/bin/nvcc" --version | tail -1
cd "$SRC"
time "$WORK/venv/bin/python" setup.py -q build_ext --inplace

"$WORK/venv/bin/python" - <<'PY'
import glob, sys
import torch
sys.path.insert(0, ".")
so = glob.glob("uae_dist/_C*.so")
assert so, "no extension built"
torch.ops.load_library(so[0])
for op in ("neighbor_list", "scatter", "segment_softmax"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"uae_dist::{op}", key), (op, key)
print("CUDA build OK:", so[0])
PY
