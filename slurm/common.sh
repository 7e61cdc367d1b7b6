# shellcheck shell=bash
# Shared by slurm/pretrain.sh and slurm/finetune.sh (sourced, never run): logging, the environment every
# task needs, running a job step so that a signal can reach it, node-local staging, and the end of a job
# (done, failed, or checkpointed and requeued). docs/cluster.md explains the whole path.

JOB=${SLURM_JOB_ID:-0}
DRY=${UAE_DRY_RUN:-0}
preempted=0   # set by the TERM/USR1 trap: Slurm asked this job to stop (time limit, pre-emption, scancel)
step_pid=

log() { echo "[${UAE_SCRIPT:-slurm} $(date +%T) job $JOB restart ${SLURM_RESTART_COUNT:-0}] $*"; }
# fail RC REASON: the last line of the job's output file says why the job failed
fail() { local rc=$1; shift; log "FAILED: $*"; exit "$rc"; }
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }

# The environment every task inherits: venv, rendezvous address, threads, CPU/GPU.
setup_env() {
  local venv=${UAE_VENV:-.venv} nodelist=${SLURM_JOB_NODELIST:-localhost}
  # shellcheck disable=SC1091
  if [ -f "$venv/bin/activate" ]; then source "$venv/bin/activate"; fi
  PY=${UAE_PYTHON:-python}
  # the allocation's host names, in order (`scontrol show hostnames`; without a usable scontrol, our parser)
  NODES=$(scontrol show hostnames "$nodelist" 2>/dev/null | paste -sd ' ' || true)
  if [ -z "$NODES" ]; then
    NODES=$("$PY" -c 'import sys; from uae_dist.train.distributed import expand_nodelist as e; print(" ".join(e(sys.argv[1])))' "$nodelist")
  fi
  # rank 0 runs on the first node of the allocation and listens there; every task reads these two.
  # Its NodeAddr, not its name: Slurm's node names need not resolve (NodeName != host name is allowed).
  local first=${NODES%% *} addr=
  addr=$(scontrol show node -o "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
  export MASTER_ADDR=${MASTER_ADDR:-${addr:-$first}}
  # a port per job, so two jobs sharing a node do not collide (a requeued job keeps its id and its port)
  export MASTER_PORT=${MASTER_PORT:-$((29500 + JOB % 2000))}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  # no GPU allocated: DeepSpeed's CPU accelerator (gloo); otherwise DeepSpeed picks CUDA (nccl)
  if [ "${SLURM_GPUS_ON_NODE:-0}" = 0 ] && [ -z "${SLURM_JOB_GPUS:-}" ]; then export DS_ACCELERATOR=cpu; fi
}

# TERM (or USR1) to the batch shell: `#SBATCH --signal=B:TERM@120` before the time limit, `scancel --batch
# --signal=TERM`, or a pre-emption. Forward it to the running step's tasks; they checkpoint at the next
# optimizer step and exit 0, and finish_job requeues. Bash runs a trap only between commands, which is why
# every step runs as `cmd & wait` (run_step) rather than in the foreground.
on_term() {
  preempted=1
  log "signal received: asking the running step to checkpoint and stop"
  if [ "$DRY" != 1 ]; then
    # --signal without --batch reaches the job's steps (the srun tasks) and not this shell
    scancel --signal=TERM "$JOB" 2>/dev/null || { [ -n "$step_pid" ] && kill -TERM "$step_pid" 2>/dev/null; } || true
  fi
}
trap on_term TERM USR1

# run_step CMD...: run a job step in the background and wait for it; sets step_rc.
run_step() {
  if [ "$DRY" = 1 ]; then echo "+ $*"; step_rc=0; return 0; fi
  "$@" &
  step_pid=$!
  while :; do   # a trapped signal interrupts `wait`: keep waiting until the step itself has exited
    wait "$step_pid" && step_rc=0 || step_rc=$?
    kill -0 "$step_pid" 2>/dev/null || break
  done
  step_pid=
}

# stage_data DIR: copy a built LMDB to node-local disk on every node (one task per node) and set DATA_ROOT
# to the copy. $SLURM_TMPDIR where the site provides one (removed by the site), else /tmp/uae-USER-JOB
# (removed again by cleanup_stage). A copy is made under a temporary name and renamed when complete, so a
# copy cut short (pre-emption) is never taken for a good one; a node that already holds the same
# manifest (a requeued job on the same node) keeps its copy.
stage_data() {
  local data=$1
  [ -f "$data/manifest.json" ] || [ "$DRY" = 1 ] || fail 2 "data set '$data' not found (no manifest.json): build it with" \
    "'uae-dist data build --source mp --out $data' or point UAE_DATA at a built LMDB"
  if [ -n "${SLURM_TMPDIR:-}" ]; then STAGE_DIR=$SLURM_TMPDIR; STAGE_OWN=0
  else STAGE_DIR=/tmp/uae-${USER:-$(id -un)}-$JOB; STAGE_OWN=1; fi
  DATA_ROOT=$STAGE_DIR/$(basename "$data")
  log "staging $data -> $DATA_ROOT on every node"
  run_step srun --ntasks-per-node=1 --ntasks="${SLURM_NNODES:-1}" --kill-on-bad-exit=1 bash -c \
    "set -e; mkdir -p '$STAGE_DIR'
     if [ -f '$DATA_ROOT/manifest.json' ] && cmp -s '$data/manifest.json' '$DATA_ROOT/manifest.json'; then exit 0; fi
     rm -rf '$DATA_ROOT' '$DATA_ROOT.partial'
     cp -r '$data' '$DATA_ROOT.partial'
     mv '$DATA_ROOT.partial' '$DATA_ROOT'"
  if [ "$step_rc" != 0 ] && [ "$preempted" != 1 ]; then
    fail 1 "staging $data to node-local disk failed (exit $step_rc; the copy's error is above)"
  fi
}

cleanup_stage() {
  if [ "${STAGE_OWN:-0}" = 1 ] && [ "$DRY" != 1 ]; then
    srun --ntasks-per-node=1 --ntasks="${SLURM_NNODES:-1}" rm -rf "$STAGE_DIR" || log "could not remove $STAGE_DIR"
  fi
}

# What an exit code of launch/train.py (or the srun step around it) means, for the log.
explain_rc() {
  case $1 in
    2) echo "bad config or missing data (the error is printed above)" ;;
    3) echo "non-finite loss (step and record ids above); not requeued" ;;
    17) echo "test crash (train.fail_after_steps)" ;;
    # srun returns the worst exit status of its tasks: after one task dies, --kill-on-bad-exit ends the
    # others with TERM/KILL, so the line "srun: error: NODE: task N: ..." above names the one that died first
    137|143) echo "a task was killed by a signal (out of memory, a node lost, killed by hand); see the" \
                  "'srun: error: ... task N' lines above for the task that died first" ;;
    *) echo "a task failed; its error is above (lines are prefixed with the task number)" ;;
  esac
}

# finish_job RC STATUS: the end of a job. STATUS is the run's own account (finished / preempted / unknown).
#   exit 0, finished                        -> exit 0 (COMPLETED)
#   exit 0, preempted (its tasks got TERM)  -> scontrol requeue, exit 0 (the job runs again and resumes)
#   this shell got TERM, step not 2 or 3    -> the same (the step resumes from its latest checkpoint)
#   anything else                           -> exit RC with the reason (FAILED)
# (STATUS counts only when the step exited 0: a step that failed may have left an older summary behind.)
finish_job() {
  local rc=$1 status=$2
  if [ "$rc" = 0 ] && [ "$status" = finished ]; then
    log "done"; exit 0
  fi
  if { [ "$rc" = 0 ] && [ "$status" = preempted ]; } || { [ "$preempted" = 1 ] && [ "$rc" != 2 ] && [ "$rc" != 3 ]; }; then
    log "checkpoint written (status $status); requeueing job $JOB to resume from it"
    # the job stays the same job (same id, same output file with --open-mode=append); Slurm starts it
    # again with SLURM_RESTART_COUNT+1 once resources are free
    scontrol requeue "$JOB" || fail 1 "scontrol requeue $JOB refused (submitted with --no-requeue?)"
    exit 0
  fi
  if [ "$rc" = 0 ]; then
    fail 1 "the step exited 0 but the run's status is '$status' (expected finished)"
  fi
  fail "$rc" "step exited with $rc: $(explain_rc "$rc")"
}
