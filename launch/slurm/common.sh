# shellcheck shell=bash
# Shared by launch/slurm/*.sbatch (sourced, not run). Preemption -> checkpoint -> requeue for `accelerate launch`.
#
# How a preemption travels (each step tested in tests/test_slurm.py):
#  1. SLURM signals the BATCH SHELL only: `#SBATCH --signal=B:USR1@120` (120 s before the time limit) or an admin's /
#     a test's `scancel --signal=USR1 --batch JOBID`. The shell traps it (the step runs as `srun ... & wait $!`, so
#     the trap runs at once instead of after the step).
#  2. The trap forwards it with `scancel --signal=USR1 $SLURM_JOB_ID`: SLURM delivers it to every process of every
#     job step on every node (not to the batch shell), i.e. each node's `accelerate launch` agent AND its workers.
#  3. The agent is torch.distributed.elastic: it only survives SIGUSR1 because PET_SIGNALS_TO_HANDLE (below) adds
#     SIGUSR1 to its handled signals (default SIGTERM,SIGINT,SIGHUP,SIGQUIT). Without it SIGUSR1's default action
#     kills the agent at once (srun: "task 0: User defined signal 1"): the workers, signalled directly, may still
#     checkpoint, but nothing waits for them and the step ends under them. With it the agent re-sends SIGUSR1 to its
#     workers (a second copy: the trainer only sets a flag) and waits up to PET_SHUTDOWN_TIMEOUT s before SIGKILL.
#  4. The trainer checkpoints at the next update boundary, writes OUTPUT_DIR/preempted.json and exits 99. The agent
#     itself exits 1 (it reports the signal, not the workers' 99), so preempted.json is what the shell checks.
#  5. The shell runs `scontrol requeue $SLURM_JOB_ID`; the job comes back (SLURM_RESTART_COUNT=1, 2, ...) with the
#     same job id, output dir and log (--open-mode=append) and `resume=auto` continues from the checkpoint.
#     A SIGUSR1 that arrives before the trainer's handler is installed (the first seconds: imports, rendezvous) kills
#     the workers with no checkpoint; a step that fails after a SIGUSR1 is therefore requeued too (resume=auto
#     continues from the latest checkpoint there is, or starts over).
# SIGTERM (scancel, time limit, preemption by a higher-priority job) is NOT forwarded: SLURM already sends it to every
# process of every step itself, and one more copy reaching the agent while it waits for its workers would raise in
# that wait and end the agent early. The trainer still checkpoints on TERM (within SLURM's KillWait; seen here); the
# job is requeued after a TERM only with MARS_REQUEUE_ON_TERM=1, because `scontrol requeue` even turns a plain
# `scancel JOBID` into a requeue (seen here), and a cancel must stay a cancel.
#
# Environment knobs (all optional):
#   MARS_ROOT               repository root (default: the submit directory; submit from the repo root)
#   MARS_PYTHON             python with mars_dist + accelerate (default MARS_ROOT/.venv/bin/python, else python3)
#   MARS_TRAIN_CMD          what accelerate launches (default "-m mars_dist train"; or "path/to/script.py train")
#   MARS_ACCELERATE_CONFIG  accelerate config file (default launch/accelerate/cpu.yaml: torchrun launcher)
#   MARS_ACCELERATE_ARGS    extra `accelerate launch` flags, e.g. "--mixed_precision bf16"
#   MARS_PROCS_PER_NODE     processes per node (default: SLURM_GPUS_ON_NODE, else 1)
#   MARS_OUTPUT_DIR         output dir (default runs/slurm-JOBNAME-JOBID; an output_dir=... argument wins)
#   MARS_MAIN_PORT          rendezvous port (default 20000 + (JOBID + 1000*RESTARTS) % 20000, or the next free one);
#                           checked free on the first node before any node starts (exit 2 naming it if taken)
#   MARS_SHUTDOWN_TIMEOUT   seconds the agent waits for workers to checkpoint after a signal (default 100)
#   MARS_MAX_REQUEUES       stop requeueing after this many restarts (default 50)
#   MARS_REQUEUE_ON_TERM    1: requeue after SIGTERM too (default 0)

EXIT_PREEMPTED=99
EXIT_RANK_LOST=98  # mars_dist/run/elastic.py: a rank lost a peer; OUTPUT_DIR/rank_lost.json says so under accelerate launch

mars_log() { echo "[mars-slurm $(date +%H:%M:%S)] $*"; }

# mars_setup CONFIG [key=value ...]: sets MARS_* defaults, CONFIG, OUTPUT_DIR and TRAIN_ARGS (the trainer's args).
mars_setup() {
  if [ $# -lt 1 ]; then
    echo "usage: sbatch ${0##*/} CONFIG.yaml [key=value ...]" >&2
    exit 2
  fi
  MARS_ROOT=${MARS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  if [ -z "${MARS_PYTHON:-}" ]; then
    if [ -x "$MARS_ROOT/.venv/bin/python" ]; then MARS_PYTHON=$MARS_ROOT/.venv/bin/python; else MARS_PYTHON=python3; fi
  fi
  MARS_TRAIN_CMD=${MARS_TRAIN_CMD:--m mars_dist train}
  MARS_ACCELERATE_CONFIG=${MARS_ACCELERATE_CONFIG:-$MARS_ROOT/launch/accelerate/cpu.yaml}
  MARS_PROCS_PER_NODE=${MARS_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
  CONFIG=$1
  shift
  OUTPUT_DIR=${MARS_OUTPUT_DIR:-runs/slurm-${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-0}}
  local arg
  for arg in "$@"; do
    case $arg in output_dir=*) OUTPUT_DIR=${arg#output_dir=} ;; esac
  done
  # output_dir first so that an explicit output_dir=... among the user's arguments (later) wins in the trainer too.
  TRAIN_ARGS=("$CONFIG" "output_dir=$OUTPUT_DIR" "resume=auto" "$@")
  mkdir -p "$OUTPUT_DIR"
  # No GPU on the node: accelerate's worker side must be told CPU. Under the torchrun launcher it otherwise sees
  # LOCAL_RANK and no GPU and settles on DistributedType.NO (no gradient sync at all), unless the trainer itself
  # builds Accelerator(cpu=True). The batch shell runs on the first node; all nodes are assumed alike.
  if [ -z "${SLURM_GPUS_ON_NODE:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    export ACCELERATE_USE_CPU=${ACCELERATE_USE_CPU:-true}
  fi
  # torchrun agent (inside accelerate launch): survive and forward SIGUSR1; give the workers time to checkpoint.
  export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
  export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-${MARS_SHUTDOWN_TIMEOUT:-100}}
  mars_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ array task $SLURM_ARRAY_TASK_ID}" \
    "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-unset} nodes=${SLURM_JOB_NODELIST:-?} output_dir=$OUTPUT_DIR"
}

# mars_head_addr: the address of the job's first node (the rendezvous host), from SLURM's NodeAddr.
mars_head_addr() {
  local head addr
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  addr=$(scontrol show node "$head" | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2)
  echo "${addr:-$head}"
}

# _mars_port_free PORT: could a server socket bind PORT here (SO_REUSEADDR, as torch's TCPStore does)?
_mars_port_free() {
  "$MARS_PYTHON" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))' "$1" 2>/dev/null
}

# mars_pick_port: set MARS_PORT, the rendezvous port, checked free on this node: the batch shell runs on the first
# node of the allocation, where the rendezvous server listens. The default is derived from the job id, so that jobs
# sharing a node do not collide, and shifted on every requeue so that a socket of the previous run cannot be in the
# way; if it is taken the next free one is used. A taken MARS_MAIN_PORT is an error (exit 2). Checking before any
# node starts matters for multi-node jobs: accelerate / torch fail on the first node only, and the other nodes would
# wait for the rendezvous until it times out.
mars_pick_port() {
  if [ -n "${MARS_MAIN_PORT:-}" ]; then
    if ! _mars_port_free "$MARS_MAIN_PORT"; then
      mars_log "error: MARS_MAIN_PORT=$MARS_MAIN_PORT is already in use on $(hostname) (the rendezvous host);" \
        "choose another port or unset MARS_MAIN_PORT"
      exit 2
    fi
    MARS_PORT=$MARS_MAIN_PORT
    return
  fi
  local base=$(((SLURM_JOB_ID + 1000 * ${SLURM_RESTART_COUNT:-0}) % 20000)) i
  for i in $(seq 0 49); do
    MARS_PORT=$((20000 + (base + i) % 20000))
    if _mars_port_free "$MARS_PORT"; then
      [ "$i" -eq 0 ] || mars_log "rendezvous port $((20000 + base)) is in use on $(hostname); using $MARS_PORT"
      return
    fi
  done
  mars_log "error: no free rendezvous port in $((20000 + base))..$MARS_PORT on $(hostname); set MARS_MAIN_PORT"
  exit 2
}

# mars_main_port: the port mars_pick_port chose.
mars_main_port() {
  echo "${MARS_PORT:?call mars_pick_port first}"
}

# mars_accelerate_args NUM_MACHINES: the `accelerate launch` flags, TRAIN_CMD and TRAIN_ARGS as the array ACCEL_ARGS,
# without --machine_rank (each srun task adds its own $SLURM_NODEID).
mars_accelerate_args() {
  local nodes=$1
  # shellcheck disable=SC2206 # word splitting of the two knobs is intended
  ACCEL_ARGS=(--config_file "$MARS_ACCELERATE_CONFIG"
    --num_machines "$nodes" --num_processes $((nodes * MARS_PROCS_PER_NODE))
    --main_process_ip "$(mars_head_addr)" --main_process_port "$(mars_main_port)"
    ${MARS_ACCELERATE_ARGS:-} $MARS_TRAIN_CMD "${TRAIN_ARGS[@]}")
}

# mars_launch: one `accelerate launch` per node of the allocation (srun, one task per node), machine rank =
# SLURM_NODEID, rendezvous on the first node; with preemption handling (mars_run_step). Does not return.
mars_launch() {
  local nodes=${SLURM_JOB_NUM_NODES:-1}
  mars_pick_port
  mars_accelerate_args "$nodes"
  mars_log "launch: $nodes node(s) x $MARS_PROCS_PER_NODE process(es), rendezvous $(mars_head_addr):$(mars_main_port)"
  # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): pass it on, or each task gets one CPU.
  # --kill-on-bad-exit=0: a node whose agent exits first (e.g. after a checkpoint) must not kill the others.
  # shellcheck disable=SC2016 # $SLURM_NODEID must expand in each task, not here
  mars_run_step srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=0 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
    bash -c 'exec "$0" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"' \
    "$MARS_PYTHON" "${ACCEL_ARGS[@]}"
}

_mars_on_signal() {
  local sig=$1
  MARS_GOT_SIGNAL=$sig
  if [ "$sig" = USR1 ]; then
    mars_log "got SIGUSR1: forwarding to every job step (scancel --signal=USR1 $SLURM_JOB_ID)"
    scancel --signal=USR1 "$SLURM_JOB_ID" || mars_log "scancel --signal failed"
  else
    mars_log "got SIG$sig: the steps got it from SLURM too; waiting for the checkpoint"
  fi
}

# _mars_preempted RC: should this run be requeued? Exit code 99 (a launcher that passes it on), or a preempted.json
# (OUTPUT_DIR/ or a sweep's OUTPUT_DIR/trial_*/) written during this run, or a failed step after SIGUSR1 (the signal
# came before the trainer could handle it). With a shared output dir (MARS_SHARED_OUTPUT=1: a sweep's array tasks)
# another task's marker must not count, so there a marker counts only when this task itself got the signal.
# A lost rank (mars_dist/run/elastic.py: exit 98, rank_lost.json written during this run) is requeued too: resume=auto
# continues from the last complete checkpoint (bounded by MARS_MAX_REQUEUES like a preemption).
_mars_preempted() {
  [ "$1" -eq "$EXIT_PREEMPTED" ] && return 0
  [ "$1" -eq "$EXIT_RANK_LOST" ] && return 0
  [ "$MARS_GOT_SIGNAL" = USR1 ] && [ "$1" -ne 0 ] && return 0
  [ "$1" -ne 0 ] && [ -n "$(find "$OUTPUT_DIR" -maxdepth 1 -name rank_lost.json -newer "$MARS_STAMP" 2>/dev/null)" ] \
    && return 0
  if [ -n "$MARS_GOT_SIGNAL" ] || [ "${MARS_SHARED_OUTPUT:-0}" != 1 ]; then
    [ -n "$(find "$OUTPUT_DIR" -maxdepth 2 -name preempted.json -newer "$MARS_STAMP" 2>/dev/null)" ] && return 0
  fi
  return 1
}

# mars_run_step CMD...: run CMD in the background with the preemption traps, wait for it, then requeue the job if the
# trainer was preempted. Exits the batch script with the step's status (0 after a requeue).
mars_run_step() {
  MARS_GOT_SIGNAL=""
  MARS_STAMP="$OUTPUT_DIR/.slurm-start-${SLURM_JOB_ID:-0}"
  touch "$MARS_STAMP"  # markers older than this are a previous run's
  trap '_mars_on_signal USR1' USR1
  trap '_mars_on_signal TERM' TERM
  "$@" &
  local pid=$! rc
  # `wait` returns early (status > 128) when a trapped signal arrives; keep waiting until the step itself is done.
  while true; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  mars_log "step finished with status $rc${MARS_GOT_SIGNAL:+ after SIG$MARS_GOT_SIGNAL}"
  if _mars_preempted "$rc"; then
    rm -f "$MARS_STAMP"
    if [ "$MARS_GOT_SIGNAL" = TERM ] && [ "${MARS_REQUEUE_ON_TERM:-0}" != 1 ]; then
      mars_log "checkpointed after SIGTERM; not requeueing (MARS_REQUEUE_ON_TERM=1 to requeue)"
      exit "$EXIT_PREEMPTED"
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MARS_MAX_REQUEUES:-50}" ]; then
      mars_log "preempted, but already restarted ${SLURM_RESTART_COUNT:-0} times (MARS_MAX_REQUEUES); giving up"
      exit "$EXIT_PREEMPTED"
    fi
    mars_log "preempted (trainer checkpointed, or was signalled before it could), or a rank was lost;" \
      "requeueing job $SLURM_JOB_ID"
    # The controller ends this run (batch shell included) and queues the job again; nothing after this matters.
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    mars_log "scontrol requeue failed"
    exit "$EXIT_PREEMPTED"
  fi
  rm -f "$MARS_STAMP"
  exit "$rc"
}
