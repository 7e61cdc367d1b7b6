#!/usr/bin/env bash
# Compile-check the CUDA sources of uae_dist._C against a CUDA build of torch, on a machine without a GPU.
#
# Creates a throwaway venv with a CUDA torch, copies csrc/ + setup.py + uae_dist/ to a scratch directory
# (the repository is not touched) and builds the extension with nvcc. Heavy (~6 GB, ~10 min): not for CI.
#
#   scripts/check_cuda_build.sh                 # scratch in /tmp/uae_cuda_check
#   WORK=/scratch/x TORCH_SPEC=torch==2.14.1 CUDA_HOME=/usr/local/cuda scripts/check_cuda_build.sh
#
# Exit status 0 and "CUDA build OK" when every .cu/.cpp compiled and linked and the ops registered a
# CUDA kernel (checked by loading the library; no GPU is needed for that).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-/tmp/uae_cuda_check}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
PYTHON="${PYTHON:-python3.11}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

command -v "$PYTHON" >/dev/null || PYTHON=python3
mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
  "$PYTHON" -m venv "$WORK/venv"
fi
"$WORK/venv/bin/pip" install -q "$TORCH_SPEC" numpy setuptools wheel ninja
"$WORK/venv/bin/python" - <<'PY'
import torch
assert torch.version.cuda, f"{torch.__version__} is not a CUDA build of torch"
print("torch", torch.__version__, "CUDA", torch.version.cuda)
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
