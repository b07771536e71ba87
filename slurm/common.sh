# shellcheck shell=bash
# Shared by slurm/pretrain.sbatch and slurm/finetune.sbatch (sourced, never run).
#
# megasink_train CONFIG [a.b=value ...]
#   One srun task per node, each running torchrun with a c10d rendezvous on the first host
#   of the allocation; workers run `python -m megasink.train CONFIG overrides...`. When the
#   trainer leaves RUN_DIR/PREEMPTED behind (it got SIGUSR1/SIGTERM, saved a checkpoint and
#   exited cleanly), the job requeues itself and the next start resumes from
#   checkpoints/latest (train.resume: auto).
#
# Environment knobs (all optional; pass them with `sbatch --export=ALL,NAME=value ...`):
#   MEGASINK_ROOT            repository root (default: the directory sbatch was run from)
#   MEGASINK_PYTHON          python with megasink installed (default: $MEGASINK_ROOT/.venv/bin/python,
#                            else python3 on PATH)
#   MEGASINK_NPROC_PER_NODE  worker processes per node (default: GPUs allocated per node;
#                            required for CPU-only runs, e.g. --gpus-per-node=0)
#   MEGASINK_MAX_RESTARTS    torchrun --max-restarts: whole-job restarts after a worker
#                            failure, each resuming from the latest checkpoint (default 0)
#   MEGASINK_RDZV_HOST       rendezvous host (default: first host of the allocation)
#   MEGASINK_RDZV_PORT       rendezvous port (default: 29500 + job id % 1000)
#   MEGASINK_RDZV_TIMEOUT    seconds torchrun waits for all nodes to join (default 900)
#   MEGASINK_SHUTDOWN_TIMEOUT seconds torchrun gives workers to exit after SIGTERM
#                            before SIGKILL (default 120: enough to write a checkpoint)
#   MEGASINK_REQUEUE         1: requeue after a checkpoint-on-signal exit (default), 0: don't
#   MEGASINK_MAX_REQUEUES    stop requeueing after this many restarts of the job (default 50)
#   MEGASINK_MODULE          python module torchrun runs (default megasink.train)

megasink_die() {
    echo "megasink-slurm: error: $*" >&2
    exit 2
}

# Number of GPUs Slurm gave this node (0 when none).
megasink_gpus_on_node() {
    local n=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $n && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        n=${SLURM_GPUS_PER_NODE##*:}          # "a100:8" -> 8
    fi
    if [[ -z $n && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local -a devs
        IFS=, read -r -a devs <<<"$CUDA_VISIBLE_DEVICES"
        n=${#devs[@]}
    fi
    [[ $n =~ ^[0-9]+$ ]] || n=0
    echo "$n"
}

# Set to 1 by the batch script's first trap if SIGUSR1 came before this file was sourced.
MEGASINK_USR1=${MEGASINK_USR1:-0}
MEGASINK_SRUN_PID=
MEGASINK_LAST_FORWARD=

megasink_forward_usr1() {
    if [[ -n $MEGASINK_SRUN_PID ]] && kill -0 "$MEGASINK_SRUN_PID" 2>/dev/null; then
        echo "megasink-slurm: forwarding SIGUSR1 to the training step (checkpoint and stop)"
        kill -USR1 "$MEGASINK_SRUN_PID" 2>/dev/null || true
        MEGASINK_LAST_FORWARD=$SECONDS
    fi
}

# SIGUSR1 to the batch shell: the time limit is near (or someone asked to stop).
megasink_on_usr1() {
    echo "megasink-slurm: batch shell got SIGUSR1 at $(date -Is)"
    MEGASINK_USR1=1
    megasink_forward_usr1
}

megasink_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || megasink_die "run this through sbatch (SLURM_JOB_ID is not set)"
    MEGASINK_ROOT=$(cd "${MEGASINK_ROOT:-$SLURM_SUBMIT_DIR}" && pwd)
    [[ -f $MEGASINK_ROOT/megasink/__init__.py ]] ||
        megasink_die "$MEGASINK_ROOT is not the megasink repository: submit from the repository root or set MEGASINK_ROOT"
    if [[ -z ${MEGASINK_PYTHON:-} ]]; then
        if [[ -x $MEGASINK_ROOT/.venv/bin/python ]]; then
            MEGASINK_PYTHON=$MEGASINK_ROOT/.venv/bin/python
        else
            MEGASINK_PYTHON=$(command -v python3) || megasink_die "no python3 on PATH; set MEGASINK_PYTHON"
        fi
    fi
    export MEGASINK_ROOT MEGASINK_PYTHON
    export PYTHONPATH=$MEGASINK_ROOT${PYTHONPATH:+:$PYTHONPATH}

    NNODES=$SLURM_JOB_NUM_NODES
    local gpus
    gpus=$(megasink_gpus_on_node)
    NPROC_PER_NODE=${MEGASINK_NPROC_PER_NODE:-$gpus}
    [[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
        megasink_die "no GPUs in this allocation and MEGASINK_NPROC_PER_NODE is not set (for a CPU run: sbatch --gpus-per-node=0 --export=ALL,MEGASINK_NPROC_PER_NODE=2 ...)"
    CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    RDZV_HOST=${MEGASINK_RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    RDZV_PORT=${MEGASINK_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}

    # Threads per worker: the node's cores shared among its ranks.
    local threads=$((CPUS_PER_NODE / NPROC_PER_NODE))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
    # A failed or timed-out NCCL collective aborts the communicator and raises in every
    # rank (after parallel.timeout_s) instead of hanging the job.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # EDIT for your fabric if NCCL picks the wrong interface, e.g.:
    #   export NCCL_SOCKET_IFNAME=ib0    GLOO_SOCKET_IFNAME=ib0    NCCL_IB_HCA=mlx5
    # Workers get a fresh TCPStore per torchrun restart (hosted by rank 0) instead of
    # sharing the rendezvous store, where a restarted gloo/NCCL bootstrap can read the
    # dead attempt's addresses (seen with torch 2.13, MEGASINK_MAX_RESTARTS > 0).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    export PYTHONUNBUFFERED=1
    export PYTHONFAULTHANDLER=1          # a hung or crashing rank prints Python stacks
}

# Print the run_dir the trainer will use (and validate the config before any srun).
megasink_run_dir() {
    "$MEGASINK_PYTHON" - "$@" <<'PY'
import os, sys
from megasink.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"megasink-slurm: config error: {e}")
print(os.path.abspath(cfg.run_dir))
PY
}

megasink_train() {
    local config=$1
    shift
    megasink_setup
    [[ -f $config ]] || megasink_die "config $config not found (paths are relative to $PWD)"
    local run_dir
    run_dir=$(megasink_run_dir "$config" "$@") || exit 2
    mkdir -p "$run_dir"

    local restarts=${SLURM_RESTART_COUNT:-0}
    echo "megasink-slurm: job $SLURM_JOB_ID (start $((restarts + 1))) on $NNODES node(s): $SLURM_JOB_NODELIST"
    echo "megasink-slurm: $NPROC_PER_NODE worker(s)/node, $CPUS_PER_NODE cpu(s)/node, OMP_NUM_THREADS=$OMP_NUM_THREADS"
    echo "megasink-slurm: rendezvous $RDZV_HOST:$RDZV_PORT, run_dir $run_dir"
    echo "megasink-slurm: $MEGASINK_PYTHON -m ${MEGASINK_MODULE:-megasink.train} $config $*"
    if [[ -f $run_dir/PREEMPTED ]]; then
        echo "megasink-slurm: resuming after preemption at step $(cat "$run_dir/PREEMPTED")"
    fi

    local started=$run_dir/.slurm-step-started
    touch "$started"
    # Signals. `#SBATCH --signal=B:USR1@300` sends SIGUSR1 to this batch shell 300 s before
    # the time limit; megasink_on_usr1 forwards it to srun, which hands it to every process
    # of the job step, and repeats it every 30 s until the step ends (a worker still
    # starting up has not installed its handler yet). The workers catch it and checkpoint;
    # the shell wrapper and torchrun must not die of it, so it is ignored there
    # (`trap '' USR1` is inherited through exec; the trainer installs its own handler).
    # A SIGUSR1 sent straight to the step (`scancel --signal=USR1 JOBID`) works the same.
    # torchrun itself forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to the workers and gives them
    # MEGASINK_SHUTDOWN_TIMEOUT seconds before SIGKILL.
    # --kill-on-bad-exit: one node failing stops the others at once.
    trap megasink_on_usr1 USR1
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
        --cpus-per-task="$CPUS_PER_NODE" --kill-on-bad-exit=1 \
        bash -c 'trap "" USR1; exec "$@"' megasink-node \
        "$MEGASINK_PYTHON" -m torch.distributed.run \
        --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
        --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \
        --rdzv-conf="join_timeout=${MEGASINK_RDZV_TIMEOUT:-900}" \
        --max-restarts="${MEGASINK_MAX_RESTARTS:-0}" \
        --shutdown-timeout="${MEGASINK_SHUTDOWN_TIMEOUT:-120}" \
        -m "${MEGASINK_MODULE:-megasink.train}" "$config" "$@" &
    MEGASINK_SRUN_PID=$!
    # A trapped SIGUSR1 interrupts `wait`: keep waiting while srun runs, and once a
    # SIGUSR1 came, poll and forward it again every 30 s.
    while kill -0 "$MEGASINK_SRUN_PID" 2>/dev/null; do
        if ((MEGASINK_USR1 == 0)); then
            wait "$MEGASINK_SRUN_PID" 2>/dev/null || true
            continue
        fi
        if [[ -z $MEGASINK_LAST_FORWARD ]] || ((SECONDS - MEGASINK_LAST_FORWARD >= 30)); then
            megasink_forward_usr1
        fi
        sleep 2 &
        wait $! 2>/dev/null || true
    done
    local rc=0
    wait "$MEGASINK_SRUN_PID" || rc=$?
    trap - USR1
    echo "megasink-slurm: training step exited with code $rc"

    # The trainer writes PREEMPTED after its checkpoint on SIGUSR1/SIGTERM. Only a file
    # written by this run counts (a stale one must not requeue forever). The step's exit code
    # does not: torchrun exits 1 after a SIGTERM although every rank saved and exited 0.
    if [[ $run_dir/PREEMPTED -nt $started ]]; then
        if [[ ${MEGASINK_REQUEUE:-1} != 1 ]]; then
            echo "megasink-slurm: checkpointed at step $(cat "$run_dir/PREEMPTED"); MEGASINK_REQUEUE=0, not requeueing"
        elif ((restarts >= ${MEGASINK_MAX_REQUEUES:-50})); then
            echo "megasink-slurm: checkpointed, but the job already restarted $restarts times (MEGASINK_MAX_REQUEUES); not requeueing" >&2
            return 1
        else
            echo "megasink-slurm: checkpointed at step $(cat "$run_dir/PREEMPTED"); requeueing job $SLURM_JOB_ID"
            # Ends this script: Slurm kills the batch step and puts the job back in the queue.
            scontrol requeue "$SLURM_JOB_ID" ||
                megasink_die "scontrol requeue failed: resubmit the same command to resume from the checkpoint"
            sleep 60
        fi
        return 0
    fi
    return "$rc"
}
