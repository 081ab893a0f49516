# Sourced by the launcher wrappers (train.sh, train_multinode.sh with deepspeed; torchrun.sh).
#
# Why the wrappers do not simply `exec deepspeed ...`: the deepspeed runner dies on
# SIGUSR1 (no handler) and leaves its ranks running, and its launch.py answers SIGTERM by
# terminating the ranks and exiting 1; torchrun answers SIGTERM with SIGTERM to the ranks
# and SIGKILL 30 s later. None lets the trainers save for sure. So the launcher runs in the
# background, the wrapper catches USR1/TERM and sends USR1 straight to the ranks; they save
# at the next step boundary and exit 42, which launch.py and the runner pass on as their
# own status (torchrun does not: see torchrun.sh).
#
# The wrappers stay in the folder they were started from (the deepspeed runner and torchrun start
# the ranks there): relative paths given to them or to the trainer (--config, run_dir=, data.shards=,
# HOSTFILE, RUN_DIR, ENTRY) are taken from there, as the user meant them. The repository goes on
# PYTHONPATH so that `--module llara_dist` imports this checkout from any folder, as it did when the
# repository root was the working folder (the deepspeed runner passes PYTHON* variables on to
# other nodes).
LLARA_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$LLARA_REPO${PYTHONPATH:+:$PYTHONPATH}"

# The program every rank runs: the trainer by default; ENTRY=launch/probe.py checks the wiring.
ENTRY=${ENTRY:---module llara_dist train}
# How many process generations below the launcher the ranks are: deepspeed runner ->
# launch.py -> ranks (2); torchrun -> ranks (1).
RANK_DEPTH=2

default_gpus() {  # the GPUs of this machine (nvidia-smi -L), at least 1: on CPU, one rank
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    echo $((n > 0 ? n : 1))
}

signal_ranks() {  # launcher pid -> USR1 to its descendants RANK_DEPTH generations down
    local ranks=$1 i
    for ((i = 0; i < RANK_DEPTH; i++)); do
        ranks=$(for pid in $ranks; do pgrep -P "$pid" || true; done)
    done
    ranks=$(echo $ranks)
    echo "[launch] got preemption signal: USR1 to ranks $ranks" >&2
    [[ -z $ranks ]] || kill -USR1 $ranks || true  # a rank that just ended must not end this script (set -e)
}

run_launcher() {  # run_launcher CMD...: run it, forward preemption signals, return its status
    echo "[launch] $*" >&2
    [[ -n ${DRY_RUN:-} ]] && return 0
    "$@" &
    local pid=$!
    trap "signal_ranks $pid" USR1 TERM
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done  # a trapped signal ends `wait` early
    local status=0
    wait "$pid" || status=$?
    if ((status == 42)); then  # the launchers log it as a failed rank ("[ERROR] ... return code = 42")
        echo "[launch] preempted: every rank saved its checkpoint (exit 42); start the same command again to resume" >&2
    fi
    return "$status"
}
