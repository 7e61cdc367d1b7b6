#!/usr/bin/env bash
# Pretrain a CrystalTransformer with Slurm on N nodes x G GPUs: one task per GPU, started by srun.
# Submit from the repository root (the job runs there):
#
#   sbatch slurm/pretrain.sh [section.key=value ...]                       # the #SBATCH defaults below
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/pretrain.sh
#   sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 slurm/pretrain.sh   # CPU (gloo)
#
# Edit for your cluster: the #SBATCH lines below (partition, account, nodes, tasks and GPUs per node, CPUs,
# time), then the defaults under "settings" (or set the UAE_* variables at submit time). docs/cluster.md
# walks through it, how to read the output file, and how pre-emption and requeue work.
#
# Settings (environment variables, [default]); extra arguments are config overrides for the training:
#   UAE_CONFIG    YAML config                                          [configs/pretrain_full.yaml]
#   UAE_DATA      built LMDB (uae-dist data build) on a shared FS      [data_build/mp]
#   UAE_STAGE     1: copy UAE_DATA to node-local disk first            [1]
#                 ($SLURM_TMPDIR where the site sets it, else /tmp/uae-USER-JOB, removed at the end)
#   UAE_RUN_DIR   run + checkpoint directory, on a SHARED filesystem   [runs/pretrain]
#   UAE_VENV      virtual environment to activate                      [.venv]
#   UAE_PYTHON    interpreter                                          [python]
#   UAE_DRY_RUN   1: print the commands instead of running them       [0]
#   MASTER_PORT   rendezvous port on the first node                    [29500 + job id % 2000]
#
# Pre-emption and time limits: with --signal=B:TERM@120 Slurm sends TERM to this batch shell 120 s before
# the limit (so does `scancel --batch --signal=TERM JOB`). The trap forwards it to the training step; every
# rank stops at the next optimizer step, rank 0 writes checkpoints/step_N (status "preempted"), the tasks
# exit 0, and this script runs `scontrol requeue`. The requeued job (same id, SLURM_RESTART_COUNT+1, output
# appended) resumes from checkpoints/latest (train.resume=auto) and ends as an uninterrupted run would.
# TERM sent to the tasks only (`scancel --signal=TERM JOB`) checkpoints and requeues the same way.
# Exit codes: 0 finished or requeued; 1 staging/requeue failed; 2 bad config or missing data;
# 3 non-finite loss (never requeued); other: a task died (srun's code; the others are stopped).
#
#SBATCH --job-name=uae-pretrain
##SBATCH --partition=gpu          # <- your partition (remove one '#' to enable)
##SBATCH --account=myproject      # <- your account, where the site requires one
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

# ---- settings ----------------------------------------------------------------------------------------
REPO=${UAE_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
CONFIG=${UAE_CONFIG:-configs/pretrain_full.yaml}
DATA=${UAE_DATA:-data_build/mp}
STAGE=${UAE_STAGE:-1}
RUN_DIR=${UAE_RUN_DIR:-runs/pretrain}
# ------------------------------------------------------------------------------------------------------

# sbatch runs a copy of this script from its spool directory: work from the repository it was submitted in
cd "$REPO"
[ -f slurm/common.sh ] || { echo "run sbatch from the uae-dist repository root (or set UAE_REPO): $REPO" >&2; exit 2; }
UAE_SCRIPT=pretrain.sh
# shellcheck source=slurm/common.sh
source slurm/common.sh
setup_env

# ---- ENTRY POINT: the one place that names the training program (becomes `uae-dist pretrain` with the CLI)
TRAIN=("$PY" launch/train.py)
# ------------------------------------------------------------------------------------------------------

log "nodes: $NODES; ${SLURM_NTASKS:-1} task(s) x ${SLURM_CPUS_PER_TASK:-1} CPU(s); master $MASTER_ADDR:$MASTER_PORT"
log "config $CONFIG, data $DATA, run dir $RUN_DIR"
if [ -f "$RUN_DIR/checkpoints/latest" ]; then log "resuming from $RUN_DIR/checkpoints/$(cat "$RUN_DIR/checkpoints/latest")"; fi

# a bad config fails here, in the batch shell, with its error, before any rank starts
run "${TRAIN[@]}" --check --config "$CONFIG" "data.root=$DATA" "train.out_dir=$RUN_DIR" "$@" \
  || fail 2 "bad config or missing data: the config does not load (the error is above)"

DATA_ROOT=$DATA
if [ "$STAGE" = 1 ]; then
  stage_data "$DATA"
  if [ "$preempted" = 1 ]; then cleanup_stage; finish_job 0 unknown; fi   # signalled while copying
elif [ ! -f "$DATA/manifest.json" ]; then
  fail 2 "data set '$DATA' not found (no manifest.json): build it or point UAE_DATA at a built LMDB"
fi

# --kill-on-bad-exit: a task that dies takes the others down at once instead of leaving them blocked in a
# collective; --label: each line of the output file starts with its task (rank) number.
# --cpus-per-task again: some Slurm versions do not pass sbatch's value on to srun.
run_step srun --kill-on-bad-exit=1 --label --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  "${TRAIN[@]}" --config "$CONFIG" "data.root=$DATA_ROOT" "train.out_dir=$RUN_DIR" \
  train.resume=auto train.progress=false "$@"
[ "$DRY" = 1 ] && exit 0

status=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" "$RUN_DIR/summary.json" 2>/dev/null || echo unknown)
log "training step exited with $step_rc (run status: $status)"
cleanup_stage
finish_job "$step_rc" "$status"
