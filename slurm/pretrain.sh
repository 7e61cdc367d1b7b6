#!/usr/bin/env bash
# Pretrain a CrystalTransformer with Slurm on N nodes × G GPUs: one task per GPU, started by srun.
#
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/pretrain.sh [section.key=value ...]
#   sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/pretrain.sh   # CPU nodes (gloo)
#
# Options (environment variables, [default]); extra arguments are config overrides for launch/train.py:
#   UAE_CONFIG    YAML config                                   [configs/pretrain_full.yaml]
#   UAE_DATA      built LMDB (uae-dist data build) on shared FS  [data_build/mp]
#   UAE_STAGE     1: copy UAE_DATA to node-local disk ($SLURM_TMPDIR, else /tmp) before training [1]
#   UAE_RUN_DIR   run + checkpoint directory, must be on a SHARED filesystem [runs/pretrain]
#   UAE_VENV      virtual environment to activate               [.venv]
#   UAE_PYTHON    interpreter                                   [python]
#   UAE_DRY_RUN   1: print the commands instead of running them [0]
#   MASTER_PORT   rendezvous port                               [29500 + job id % 2000]
#
# Rendezvous: MASTER_ADDR = first host of `scontrol show hostnames $SLURM_JOB_NODELIST`; each task
# learns its rank from SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID in uae_dist/train/distributed.py.
#
# Pre-emption and time limits: with --signal=B:TERM@120 Slurm sends SIGTERM to this batch shell 120 s
# before the limit. The trap forwards TERM to the srun step (scancel --signal=TERM), every rank stops
# at the next optimizer-step boundary, rank 0 writes checkpoints/step_N (status "preempted") and the
# tasks exit 0; then this script runs `scontrol requeue` (--requeue) and the requeued job resumes from
# checkpoints/latest (train.resume=auto) with the same losses as an uninterrupted run. A plain
# pre-emption (PreemptMode=REQUEUE) signals the tasks directly and works the same way.
# Exit codes: 0 finished or requeued; 2 bad config / missing data; 3 non-finite loss (no requeue).
#
#SBATCH --job-name=uae-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
CONFIG=${UAE_CONFIG:-configs/pretrain_full.yaml}
DATA=${UAE_DATA:-data_build/mp}
STAGE=${UAE_STAGE:-1}
RUN_DIR=${UAE_RUN_DIR:-runs/pretrain}
VENV=${UAE_VENV:-.venv}
PY=${UAE_PYTHON:-python}
DRY=${UAE_DRY_RUN:-0}
JOB=${SLURM_JOB_ID:-0}
NODELIST=${SLURM_JOB_NODELIST:-localhost}

run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
log() { echo "[pretrain.sh $(date +%T) job $JOB restart ${SLURM_RESTART_COUNT:-0}] $*"; }

[ -f "$VENV/bin/activate" ] && source "$VENV/bin/activate"

if command -v scontrol >/dev/null 2>&1; then
  MASTER_ADDR=$(scontrol show hostnames "$NODELIST" | head -n 1)
else
  MASTER_ADDR=$("$PY" -c 'import sys; from uae_dist.train.distributed import expand_nodelist as e; print(e(sys.argv[1])[0])' "$NODELIST")
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((29500 + JOB % 2000))}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
if [ "${SLURM_GPUS_ON_NODE:-0}" = 0 ] && [ -z "${SLURM_JOB_GPUS:-}" ]; then export DS_ACCELERATOR=cpu; fi

DATA_ROOT=$DATA
if [ "$STAGE" = 1 ]; then
  LOCAL=${SLURM_TMPDIR:-/tmp/uae-${USER:-$(id -un)}-$JOB}
  DATA_ROOT=$LOCAL/$(basename "$DATA")
  log "staging $DATA → $DATA_ROOT on every node"
  # copy to a temporary name and rename: a copy cut short by pre-emption is never mistaken for a good one
  run srun --ntasks-per-node=1 --ntasks="${SLURM_NNODES:-1}" bash -c \
    "mkdir -p '$LOCAL' && { [ -f '$DATA_ROOT/manifest.json' ] && cmp -s '$DATA/manifest.json' '$DATA_ROOT/manifest.json' || { rm -rf '$DATA_ROOT' '$DATA_ROOT.partial' && cp -r '$DATA' '$DATA_ROOT.partial' && mv '$DATA_ROOT.partial' '$DATA_ROOT'; }; }"
fi

preempted=0
srun_pid=
on_term() {
  preempted=1
  log "SIGTERM: asking the training step to checkpoint and stop"
  if [ "$DRY" != 1 ]; then scancel --signal=TERM "$JOB" 2>/dev/null || kill -TERM "$srun_pid" 2>/dev/null || true; fi
}
trap on_term TERM USR1

log "master $MASTER_ADDR:$MASTER_PORT, ${SLURM_NTASKS:-1} task(s), config $CONFIG, run dir $RUN_DIR"
# --cpus-per-task again: some Slurm versions do not pass sbatch's value on to srun
CMD=(srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$PY" launch/train.py --config "$CONFIG" "data.root=$DATA_ROOT"
     "train.out_dir=$RUN_DIR" train.resume=auto train.progress=false "$@")
if [ "$DRY" = 1 ]; then echo "+ ${CMD[*]}"; exit 0; fi
"${CMD[@]}" &
srun_pid=$!
rc=0
while :; do   # a trapped signal interrupts `wait`; keep waiting until srun itself has exited
  wait "$srun_pid" && rc=0 || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

status=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" "$RUN_DIR/summary.json" 2>/dev/null || echo unknown)
if [ "$preempted" = 1 ] && [ "$status" != finished ] && [ "$rc" != 2 ] && [ "$rc" != 3 ]; then
  log "checkpoint written; requeueing"
  scontrol requeue "$JOB"
  exit 0
fi
log "training exited with $rc (status $status)"
exit "$rc"
