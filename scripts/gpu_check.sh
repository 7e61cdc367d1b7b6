#!/usr/bin/env bash
# The prepared GPU run (issue 13): one command, about 8 minutes on one H200, report in one folder.
#
#   scripts/gpu_check.sh [REPORT_DIR]        # default: $OUT (device tool), else runs/gpu_check
#
# Steps (each logged to REPORT_DIR/logs/NN-name.log, with its status and time in REPORT_DIR/report.md):
#   1 env        python, torch, CUDA device, nvidia-smi
#   2 wheels     offline install of what the machine lacks from gpu_bundle/wheels
#                (pip install --no-index --find-links; scripts/gpu_wheels.sh prepares the bundle)
#   3 build      the extension with CUDA kernels (ninja, MAX_JOBS=nproc, TORCH_CUDA_ARCH_LIST=9.0),
#                in place; requires backend ext+cuda on a GPU
#   4 tests      the gpu-marked tests (tests/test_ops_gpu.py: CUDA == CPU for every op, values,
#                gradients, opcheck, index contract, no host sync)
#   5 bench      benchmarks/neighbors.py (vs vesin's CUDA list and our CPU op) and --scaling;
#                benchmarks/scatter.py on the GPU (vs torch's scatter / index_add_ and PyG softmax)
#   6 data       a small MP LMDB: built there if the data builder can run (it needs pymatgen), else the
#                one gpu_wheels.sh built on CPU, verified with `uae-dist data verify`
#   7 pretrain   a short bf16 pretraining on 1 GPU (DeepSpeed, NCCL): structures/s, peak GPU memory,
#                then a second run that must resume from the first one's checkpoint
#
# Without a CUDA device (the CPU rehearsal) the GPU parts are skipped and say so in the report; the
# rest runs (CPU build, benchmarks on CPU, data, a short fp32 gloo pretraining with the resume check).
# Exit status: 0 when no step failed (skipped steps are not failures). BUDGET_S (default 480) only
# skips the optional scaling benchmark once exceeded; pretraining always runs when the data is there.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
REPORT="${1:-${OUT:-$REPO/runs/gpu_check}}"
mkdir -p "$REPORT/logs"
REPORT="$(cd "$REPORT" && pwd)"
PY="${PYTHON:-python3}"
BUNDLE="${UAE_GPU_BUNDLE:-$REPO/gpu_bundle}"
WORK="${UAE_GPU_WORK:-$REPO/runs/gpu_check_work}"
BUDGET_S="${BUDGET_S:-480}"   # soft wall-clock budget: later optional steps are skipped past it
SKIP_BENCH="${SKIP_BENCH:-0}" # 1: no benchmark steps (a quicker rehearsal)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export UAE_REQUIRE_EXT=1
export UAE_GPU_STRUCTURES="$BUNDLE/structures.npz"
T_START=$SECONDS
MD="$REPORT/report.md"
FAILED=0

has_gpu() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
GPU=0
has_gpu && GPU=1

{
  echo "# gpu_check report"
  echo
  echo "- started: $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "- CUDA device: $([ $GPU = 1 ] && echo yes || echo 'NO (CPU rehearsal: GPU parts skipped)')"
  echo
  echo "| step | status | seconds | note |"
  echo "| --- | --- | --- | --- |"
} > "$MD"
NOTES=()

# step NAME NOTE CMD...: run CMD with its output in logs/, record status and time
NSTEP=0
step() {
  local name="$1" note="$2"
  shift 2
  NSTEP=$((NSTEP + 1))
  local log
  log="$REPORT/logs/$(printf '%02d' $NSTEP)-$name.log"
  local t0=$SECONDS
  echo "== [$NSTEP] $name: $*" | tee -a "$REPORT/console.log"
  "$@" > "$log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0)) status=ok
  if [ $rc -ne 0 ]; then
    status="FAILED (rc $rc)"
    FAILED=1
  fi
  echo "| $name | $status | $dt | $note |" >> "$MD"
  echo "   -> $status in ${dt}s (log: $log)" | tee -a "$REPORT/console.log"
  return $rc
}
skip() {
  NSTEP=$((NSTEP + 1))
  echo "| $1 | skipped | 0 | $2 |" >> "$MD"
  echo "== [$NSTEP] $1: skipped ($2)" | tee -a "$REPORT/console.log"
}
over_budget() { [ $((SECONDS - T_START)) -gt "$BUDGET_S" ]; }

# ------------------------------------------------------------------ 1 env
env_info() {
  "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "count", torch.cuda.device_count())
PY
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not found"
  nproc
}
step env "" env_info

# ------------------------------------------------------------------ 2 wheels
install_wheels() {
  if [ ! -d "$BUNDLE/wheels" ]; then
    echo "no $BUNDLE/wheels (run scripts/gpu_wheels.sh and carry gpu_bundle)"
    return 1
  fi
  # names only: pip keeps what is installed and takes the rest from the bundle, offline
  "$PY" -m pip install --no-index --find-links "$BUNDLE/wheels" --disable-pip-version-check \
    deepspeed lmdb vesin pyyaml pytest pytest-timeout
  "$PY" -c "import deepspeed, lmdb, vesin, yaml, pytest; print('deepspeed', deepspeed.__version__)"
}
step wheels "offline from gpu_bundle/wheels" install_wheels

# ------------------------------------------------------------------ 3 build
build_ext() {
  if [ $GPU = 1 ]; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
  fi
  UAE_USE_NINJA=1 MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace || return 1
  "$PY" - "$GPU" <<'PY'
import sys
from uae_dist.ops import _ext
print("backend", _ext.backend(), "load error", _ext.LOAD_ERROR)
assert _ext.HAS_EXT, _ext.LOAD_ERROR
if sys.argv[1] == "1":
    _ext.require_cuda_kernels()
    print("CUDA kernels registered for", _ext.OPS)
PY
}
step build "$([ $GPU = 1 ] && echo 'CUDA build' || echo 'CPU-only build (no CUDA device)')" build_ext
BUILD_OK=$?

# ------------------------------------------------------------------ 4 tests
if [ $GPU = 1 ] && [ $BUILD_OK = 0 ]; then
  step tests "tests/test_ops_gpu.py" timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops_gpu.py
  NOTES+=("tests: $(grep -E '[0-9]+ (passed|failed)' "$REPORT/logs/$(printf '%02d' $NSTEP)-tests.log" | tail -1)")
else
  # still collected, to prove they skip cleanly without a device
  step tests-collect "no CUDA device: gpu tests must skip" \
    timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops_gpu.py
  NOTES+=("tests: GPU tests skipped (no CUDA device): $(grep -E '[0-9]+ skipped' "$REPORT/logs/$(printf '%02d' $NSTEP)-tests-collect.log" | tail -1)")
fi

# ------------------------------------------------------------------ 5 bench
if [ "$SKIP_BENCH" = 1 ]; then
  skip bench-neighbors "SKIP_BENCH=1"
elif [ -f "$BUNDLE/structures.npz" ]; then
  step bench-neighbors "$([ $GPU = 1 ] && echo 'CUDA vs vesin CUDA, CPU' || echo 'CPU only')" \
    timeout 200 "$PY" benchmarks/neighbors.py --structures "$BUNDLE/structures.npz" --cutoffs 8 --skip-fallback
  if ! over_budget; then
    step bench-scaling "brute force vs cell list by size" \
      timeout 120 "$PY" benchmarks/neighbors.py --structures "$BUNDLE/structures.npz" --scaling
  else
    skip bench-scaling "over the ${BUDGET_S}s budget"
  fi
else
  skip bench-neighbors "no $BUNDLE/structures.npz"
fi
if [ "$SKIP_BENCH" = 1 ]; then
  skip bench-scatter "SKIP_BENCH=1"
elif [ $GPU = 1 ]; then
  step bench-scatter "CUDA vs torch index_add_/scatter_reduce, PyG softmax" \
    timeout 120 "$PY" benchmarks/scatter.py --device cuda --nodes 20000 --degrees 12,50 --widths 64,256
else
  step bench-scatter "CPU rehearsal (small); GPU part skipped" \
    timeout 120 "$PY" benchmarks/scatter.py --device cpu --nodes 1000 --degrees 12 --widths 64 --reps 3
fi

# ------------------------------------------------------------------ 6 data
DATA="$WORK/mp_lmdb"
make_data() {
  rm -rf "$DATA"
  mkdir -p "$WORK"
  if "$PY" -c "import pymatgen.core" 2>/dev/null && [ -f "$BUNDLE/mp_subset.json.gz" ]; then
    echo "building from $BUNDLE/mp_subset.json.gz here"
    "$PY" -m uae_dist.cli data build --source "$BUNDLE/mp_subset.json.gz" --out "$DATA" \
      --targets e_form_per_atom,band_gap --shards 1 --workers "$(nproc)" -q || return 1
  elif [ -f "$BUNDLE/mp_lmdb/manifest.json" ]; then
    echo "pymatgen not importable here: using the LMDB that gpu_wheels.sh built on CPU"
    cp -r "$BUNDLE/mp_lmdb" "$DATA" || return 1
  else
    echo "no data: neither pymatgen + mp_subset.json.gz nor a prebuilt mp_lmdb in $BUNDLE"
    return 1
  fi
  "$PY" -m uae_dist.cli data verify "$DATA" -q && "$PY" -m uae_dist.cli data info "$DATA"
}
step data "small MP LMDB" make_data
DATA_OK=$?
grep -q "using the LMDB that gpu_wheels.sh built" "$REPORT/logs/$(printf '%02d' $NSTEP)-data.log" 2>/dev/null \
  && NOTES+=("data: LMDB built on CPU by gpu_wheels.sh (no pymatgen on this machine), verified here")

# ------------------------------------------------------------------ 7 pretrain
# >>> THE ONE PLACE THAT CALLS THE TRAINING ENGINE (the lead renames configs/keys here) >>>
PRETRAIN_CONFIG="${PRETRAIN_CONFIG:-configs/pretrain.yaml}"
pretrain() {  # pretrain RUN_DIR MAX_STEPS TIMEOUT_S
  local precision=auto workers=0
  [ $GPU = 1 ] && precision=bf16 && workers=4
  timeout "$3" "$PY" launch/train.py --config "$PRETRAIN_CONFIG" \
    data.root="$DATA" data.num_workers="$workers" train.out_dir="$1" train.max_steps="$2" train.epochs=1000 \
    train.ckpt_every_steps="$PRETRAIN_CKPT" train.log_every=20 train.progress=false \
    train.tensorboard=false ds.precision="$precision" export.after_train=false
}
# <<< end of the engine call <<<
if [ $GPU = 1 ]; then STEPS1=200; STEPS2=300; PRETRAIN_CKPT=100; else STEPS1=30; STEPS2=45; PRETRAIN_CKPT=15; fi
RUN="$WORK/pretrain"
mem_sampler() {  # peak GPU memory in MiB (all processes on device 0), every 200 ms
  local peak=0 v
  while :; do
    v=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -1)
    [ -n "$v" ] && [ "$v" -gt "$peak" ] && peak=$v && echo "$peak" > "$REPORT/peak_gpu_mib"
    sleep 0.2
  done
}
run_pretrain() {
  rm -rf "$RUN"
  local sampler=""
  if [ $GPU = 1 ] && command -v nvidia-smi >/dev/null; then
    mem_sampler &
    sampler=$!
  fi
  pretrain "$RUN" "$STEPS1" "${PRETRAIN_TIMEOUT_S:-240}"
  local rc=$?
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  return $rc
}
resume_pretrain() {  # must continue from the checkpoint at STEPS1, not start again
  pretrain "$RUN" "$STEPS2" "${PRETRAIN_TIMEOUT_S:-180}" 2>&1 | tee "$WORK/resume.log"
  [ "${PIPESTATUS[0]}" = 0 ] || return 1
  if grep -qE "resumed from .*: step $STEPS1\b" "$WORK/resume.log"; then
    echo "RESUME CHECK: ok (resumed from the step-$STEPS1 checkpoint)"
  else
    echo "RESUME CHECK: FAILED (no 'resumed from ...: step $STEPS1' in the log)"
    return 1
  fi
  "$PY" - "$RUN" "$STEPS2" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(f"{sys.argv[1]}/train.csv")))
last = max(int(float(r["step"])) for r in rows)
print("train.csv last step", last)
sys.exit(0 if last == int(sys.argv[2]) else 1)
PY
}
if [ $DATA_OK = 0 ]; then  # not subject to the soft budget: this step is the point of the run
  step pretrain "$([ $GPU = 1 ] && echo "bf16, 1 GPU, NCCL, $STEPS1 steps" || echo "CPU rehearsal: fp32, gloo, $STEPS1 steps")" \
    run_pretrain
  PT_OK=$?
  if [ $PT_OK = 0 ]; then
    step pretrain-resume "to $STEPS2 steps from the step-$STEPS1 checkpoint" resume_pretrain
  else
    skip pretrain-resume "the first run failed"
  fi
  "$PY" - "$RUN" "$REPORT" <<'PY' >> "$REPORT/console.log" 2>&1
import csv, pathlib, statistics, sys
run, report = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = list(csv.DictReader(open(run / "train.csv"))) if (run / "train.csv").exists() else []
sps = [float(r["structures_per_s"]) for r in rows if r.get("structures_per_s")]
peak = (report / "peak_gpu_mib").read_text().strip() if (report / "peak_gpu_mib").exists() else "n/a"
alloc = [float(r["gpu_peak_gib"]) for r in rows if r.get("gpu_peak_gib")]
held = f", {max(alloc):.2f} GiB allocated by torch (gpu_peak_gib)" if alloc else ""
line = (f"pretrain: {len(rows)} logged rows, structures/s median {statistics.median(sps[1:] or sps):.1f} "
        f"(first logged window excluded), peak GPU memory {peak} MiB (nvidia-smi, whole device)"
        f"{held}" if sps else "pretrain: no train.csv rows")
(report / "pretrain_summary.txt").write_text(line + "\n")
print(line)
PY
  [ -f "$REPORT/pretrain_summary.txt" ] && NOTES+=("$(cat "$REPORT/pretrain_summary.txt")")
else
  skip pretrain "no data"
fi

# ------------------------------------------------------------------ summary
{
  echo
  echo "## figures"
  echo
  for n in "${NOTES[@]}"; do echo "- $n"; done
  grep -h "^SUMMARY" "$REPORT"/logs/*.log 2>/dev/null | sed 's/^/- /'
  echo
  echo "- total: $((SECONDS - T_START)) s (soft budget ${BUDGET_S} s); failed steps: $FAILED"
  [ $GPU = 1 ] || echo "- CPU rehearsal: GPU build, GPU tests, CUDA benchmarks and bf16/NCCL were NOT run"
} >> "$MD"
cat "$MD"
exit $FAILED
