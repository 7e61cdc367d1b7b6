#!/usr/bin/env bash
# Pretrain across nodes with the `deepspeed --hostfile` launcher (pdsh/ssh clusters, or inside a
# Slurm allocation without srun).
#
#   slurm/pretrain_hostfile.sh HOSTFILE [section.key=value ...]
#   slurm/pretrain_hostfile.sh --from-slurm [overrides ...]   # hostfile from $SLURM_JOB_NODELIST
#
# HOSTFILE is DeepSpeed's format, one line per node: `node01 slots=4`. Options (environment):
#   UAE_CONFIG   YAML config [configs/pretrain_full.yaml]     UAE_DATA    LMDB [data_build/mp]
#   UAE_RUN_DIR  shared run dir [runs/pretrain]               UAE_VENV    venv [.venv]
#   UAE_SLOTS    slots per node with --from-slurm [${SLURM_GPUS_ON_NODE:-1}]
#   MASTER_PORT  [29500]                                      UAE_DRY_RUN 1: print the command only
# The data set must be readable at UAE_DATA on every node. Resume after an interruption: rerun the
# same command (train.resume=auto picks checkpoints/latest).
set -euo pipefail
cd "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 1 ] || { sed -n '2,14p' "$0"; exit 2; }
VENV=${UAE_VENV:-.venv}
[ -f "$VENV/bin/activate" ] && source "$VENV/bin/activate"
if [ "$1" = --from-slurm ]; then
  shift
  HOSTFILE=$(mktemp /tmp/uae-hostfile.XXXXXX)
  scontrol show hostnames "${SLURM_JOB_NODELIST:?--from-slurm needs a Slurm allocation}" |
    awk -v s="${UAE_SLOTS:-${SLURM_GPUS_ON_NODE:-1}}" '{print $1" slots="s}' > "$HOSTFILE"
else
  HOSTFILE=$1; shift
fi
[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found" >&2; exit 2; }
MASTER_ADDR=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")
CMD=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}"
     launch/train.py --config "${UAE_CONFIG:-configs/pretrain_full.yaml}" "data.root=${UAE_DATA:-data_build/mp}"
     "train.out_dir=${UAE_RUN_DIR:-runs/pretrain}" train.resume=auto "$@")
if [ "${UAE_DRY_RUN:-0}" = 1 ]; then echo "+ ${CMD[*]}"; exit 0; fi
exec "${CMD[@]}"
