#!/usr/bin/env bash
# A real 2-node SLURM cluster on this one machine, for tests and for trying the sbatch script.
#
#   launch/slurm/local_cluster.sh up       # install (apt) if missing, start munge, slurmctld, 2 slurmd
#   launch/slurm/local_cluster.sh status   # sinfo; exit 0 only if both nodes are up
#   launch/slurm/local_cluster.sh env      # the line to eval so sinfo/sbatch use this cluster
#   launch/slurm/local_cluster.sh down     # stop the daemons started here
#
# Needs root (apt-get, daemons). Debian's slurmd runs several daemons on one host: each
# is started with `-N nodeX` and its own port; both nodes have address 127.0.0.1.
# Everything the cluster writes (config, state, spool, logs) lives under $LLARA_SLURM_DIR.
# `up` is idempotent: a healthy cluster is reused, a broken or stale one is stopped and
# started afresh.
set -euo pipefail

DIR=${LLARA_SLURM_DIR:-/tmp/llara-slurm}   # config, state, spool and logs
PORT=${LLARA_SLURM_PORT:-16817}            # slurmctld port; the nodes use PORT+1, PORT+2
NODES=(node1 node2)
CONF=$DIR/slurm.conf
START_TIMEOUT=${LLARA_SLURM_START_TIMEOUT:-60}   # seconds to wait for both nodes to be idle

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sinfo munged; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root so apt-get can install them"
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >"$DIR/apt.log" 2>&1 \
        || die "apt-get install failed, see $DIR/apt.log"
    # Under systemd the packages start their own slurmctld/slurmd (one slurmd, the system
    # config): stop them, we start ours. The packaged munged is fine and is reused.
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        systemctl disable --now slurmctld slurmd >>"$DIR/apt.log" 2>&1 || true
    fi
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_ok && return
    [[ -s /etc/munge/munge.key ]] || {
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    }
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge_ok && return; sleep 0.1; done
    die "munged does not answer; see /var/log/munge/munged.log"
}

render_config() {
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    cat <<EOF
# Written by launch/slurm/local_cluster.sh: 2 slurmd daemons on one host.
ClusterName=llara-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups in containers/VMs: track processes by ancestry, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (defaults: 60 s, backfill 30 s) so a requeued job restarts soon.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# The nodes claim the host's CPUs twice; trust the config over what slurmd detects.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
# Two pretend GPUs per node (gres.conf: /dev/null, /dev/zero), so the sbatch script's
# --gpus-per-node is accepted here as on a GPU cluster; on CPU the trainers ignore it.
GresTypes=gpu
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=$cpus Gres=gpu:2 State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=$cpus Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool"
    render_config >"$CONF"
    printf 'AutoDetect=off\nName=gpu File=/dev/null\nName=gpu File=/dev/zero\n' >"$DIR/gres.conf"
    # Plain `sinfo`/`sbatch` find this cluster too, unless the machine has its own config.
    if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
        mkdir -p /etc/slurm && ln -sfn "$CONF" /etc/slurm/slurm.conf
    fi
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

nodes_idle() {
    # Both nodes answer and are idle (or busy with jobs: "mix"/"alloc").
    local states
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc)\$" <<<"$states" || return 1
    done
}

healthy() {
    [[ -f $CONF ]] && pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd-node1.pid" \
        && pid_alive "$DIR/slurmd-node2.pid" && munge_ok && nodes_idle
}

stop_daemons() {
    local pids=() f p
    for f in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
        [[ -s $f ]] && pids+=("$(cat "$f")")
    done
    # Daemons of an earlier run whose pid file is gone: only those started with this config.
    for p in $(pgrep -f -- "-f $CONF" 2>/dev/null || true); do pids+=("$p"); done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.2
    done
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -f "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"
}

show_logs() {
    for f in "$DIR"/log/*.log; do
        [[ -f $f ]] || continue
        say "--- last lines of $f"
        tail -n 15 "$f" >&2
    done
}

up() {
    mkdir -p "$DIR"
    install_packages
    start_munge
    if healthy && [[ $(render_config) == "$(cat "$CONF")" ]]; then
        say "already running ($CONF)"
        return
    fi
    stop_daemons
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"
    write_config
    slurmctld -f "$CONF" -c || { show_logs; die "slurmctld did not start, see $DIR/log/slurmctld.log"; }
    for n in "${NODES[@]}"; do
        mkdir -p "$DIR/spool/$n"
        slurmd -f "$CONF" -N "$n" || { show_logs; die "slurmd $n did not start, see $DIR/log/slurmd-$n.log"; }
    done
    local deadline=$((SECONDS + START_TIMEOUT))
    until nodes_idle; do
        if ((SECONDS > deadline)); then
            SLURM_CONF=$CONF sinfo -N >&2 || true
            show_logs
            die "nodes not idle after ${START_TIMEOUT}s; logs in $DIR/log"
        fi
        sleep 0.5
    done
    say "up: $(SLURM_CONF=$CONF sinfo -h -N -o '%N=%t' | tr '\n' ' ')(config $CONF)"
}

status() {
    [[ -f $CONF ]] || { say "not configured ($CONF missing)"; return 1; }
    pid_alive "$DIR/slurmctld.pid" || { say "slurmctld is not running"; return 1; }
    SLURM_CONF=$CONF sinfo -N || true
    healthy
}

down() {
    stop_daemons
    say "stopped (logs kept in $DIR/log)"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
