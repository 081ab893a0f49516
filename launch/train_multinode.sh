#!/usr/bin/env bash
# Train on many nodes with the deepspeed launcher and a hostfile (`host slots=N` lines).
#
# From the first node, the launcher reaching the others by ssh (pdsh):
#   HOSTFILE=hostfiles/2x8.txt launch/train_multinode.sh --config run.yaml
#   HOSTFILE=hostfiles/2x8.txt INCLUDE="gpu-node-1:0,1,2,3@gpu-node-2" launch/train_multinode.sh ...
#   HOSTFILE=hostfiles/2x8.txt EXCLUDE="gpu-node-2:7" launch/train_multinode.sh ...
# One launcher per node, no ssh (SLURM, Kubernetes): the same HOSTFILE everywhere, the
# first host's address, and each node's index in the hostfile:
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=hostfiles/2x8.txt launch/train_multinode.sh --config run.yaml
#
# INCLUDE/EXCLUDE: NODE[:SLOT,SLOT...][@NODE...] (deepspeed's syntax), never both.
# Signals and exit 42 work as in train.sh (see common.sh). DRY_RUN=1 prints the command.
set -euo pipefail
# no cd: relative paths mean what they mean in the caller's folder (see common.sh)
source "$(dirname "$0")/common.sh"

HOSTFILE=${HOSTFILE:?set HOSTFILE to a hostfile, e.g. hostfiles/2x8.txt}
INCLUDE=${INCLUDE:-}
EXCLUDE=${EXCLUDE:-}
NODE_RANK=${NODE_RANK:-}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}

[[ -f $HOSTFILE ]] || { echo "train_multinode.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
args=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
[[ -n $INCLUDE ]] && args+=(--include "$INCLUDE")
[[ -n $EXCLUDE ]] && args+=(--exclude "$EXCLUDE")
[[ -n $MASTER_ADDR ]] && args+=(--master_addr "$MASTER_ADDR")
if [[ -n $NODE_RANK ]]; then
    [[ -n $MASTER_ADDR ]] || { echo "train_multinode.sh: NODE_RANK needs MASTER_ADDR" >&2; exit 2; }
    args+=(--no_ssh --node_rank "$NODE_RANK")
fi

run_launcher deepspeed "${args[@]}" --no_local_rank $ENTRY "$@"
