# Sourced by the deepspeed launcher wrappers (train.sh, train_multinode.sh).
#
# Why the wrappers do not simply `exec deepspeed ...`: the deepspeed runner dies on
# SIGUSR1 (no handler) and leaves its ranks running, and its launch.py answers SIGTERM by
# terminating the ranks and exiting 1. Neither lets the trainers save. So the launcher
# runs in the background, the wrapper catches USR1/TERM and sends USR1 straight to the
# ranks (the children of deepspeed.launcher.launch); they save at the next step boundary
# and exit 42, which launch.py and the runner pass on as their own status.

# The program every rank runs: the trainer by default; ENTRY=launch/probe.py checks the wiring.
ENTRY=${ENTRY:---module llara_dist train}

signal_ranks() {  # runner pid -> USR1 to its grandchildren (runner -> launch.py -> ranks)
    local launch ranks
    for launch in $(pgrep -P "$1"); do
        ranks=$(pgrep -P "$launch" | tr '\n' ' ')
        echo "[launch] got preemption signal: USR1 to ranks $ranks" >&2
        [[ -n $ranks ]] && kill -USR1 $ranks
    done
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
    return "$status"
}
