#!/usr/bin/env bash
# Fine-tune an experiment matrix as a Slurm job array: one matrix cell per array task, each task possibly
# on several GPUs (one srun task per GPU). Submit from the repository root:
#
#   N=$(uae-dist matrix list MATRIX.yaml --count)          # number of cells
#   sbatch --array=0-$((N - 1))%8 slurm/finetune.sh MATRIX.yaml
#   uae-dist results runs/matrix                            # the table, once the array has finished
#
# `%8` runs at most 8 cells at once. A cell that is already done is skipped, so resubmitting the same
# array after a failure or a cancel only runs what is missing. Edit for your cluster: the #SBATCH lines
# (partition, account, GPUs and tasks per cell, CPUs, time); docs/cluster.md walks through it.
#
# Settings (environment variables, [default]):
#   UAE_VENV     virtual environment to activate              [.venv]
#   UAE_PYTHON   interpreter                                  [python]
#   UAE_DRY_RUN  1: print the command instead of running it   [0]
#   MASTER_PORT  rendezvous port of a multi-GPU cell          [29500 + job id % 2000]
#
# Pre-emption and time limits work as in slurm/pretrain.sh: TERM to this shell (--signal=B:TERM@120) is
# forwarded to the cell's tasks, which checkpoint and exit; the array task is requeued and its cell resumes.
# The data sets a matrix names are read where they are (no node-local staging here: they are small).
#
#SBATCH --job-name=uae-finetune
##SBATCH --partition=gpu          # <- your partition (remove one '#' to enable)
##SBATCH --account=myproject      # <- your account, where the site requires one
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out

set -euo pipefail

REPO=${UAE_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO"
[ -f slurm/common.sh ] || { echo "run sbatch from the uae-dist repository root (or set UAE_REPO): $REPO" >&2; exit 2; }
UAE_SCRIPT=finetune.sh
# shellcheck source=slurm/common.sh
source slurm/common.sh

[ $# -eq 1 ] || fail 2 "usage: sbatch --array=0-N slurm/finetune.sh MATRIX.yaml (overrides go in the file)"
MATRIX=$1; shift
[ -f "$MATRIX" ] || fail 2 "matrix file '$MATRIX' not found (relative paths are from $REPO)"
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || [ "$DRY" = 1 ] || fail 2 "not an array task: submit with sbatch --array=0-N"
CELL=${SLURM_ARRAY_TASK_ID:-0}
setup_env

# ---- PER-TASK COMMAND: the one place that runs a matrix cell. The matrix runner runs here, in the batch
# shell (it skips a finished cell and resumes a checkpointed one); it starts the cell's training under
# srun, one task per GPU, so the ranks are srun tasks (rank and world from distributed.py) and
# `scancel --signal=TERM` reaches them: they checkpoint and exit, and the job is requeued.
CELL_CMD=(uae-dist matrix run "$MATRIX" --cell "$CELL"
          --launcher "srun --kill-on-bad-exit=1 --label --cpus-per-task=${SLURM_CPUS_PER_TASK:-1}")
# ------------------------------------------------------------------------------------------------------

log "array ${SLURM_ARRAY_JOB_ID:-0} task $CELL: cell $CELL of $MATRIX on $NODES (${SLURM_NTASKS:-1} task(s))"
run_step "${CELL_CMD[@]}"
[ "$DRY" = 1 ] && exit 0
log "cell $CELL exited with $step_rc"
# a cell's own status is not known here: exit 0 counts as finished unless this shell was signalled
if [ "$step_rc" = 0 ] && [ "$preempted" != 1 ]; then finish_job 0 finished; fi
finish_job "$step_rc" "$([ "$step_rc" = 0 ] && echo preempted || echo unknown)"
