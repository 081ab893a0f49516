#!/usr/bin/env bash
# Train on one node: one rank per GPU, started by the deepspeed launcher.
#
#   launch/train.sh --config run.yaml                      # every GPU of this machine
#   GPUS=4 launch/train.sh --config run.yaml train.lr=2e-5 # arguments go to the trainer
#   DS_ACCELERATOR=cpu GPUS=2 launch/train.sh --config tiny.yaml   # 2 CPU ranks (gloo)
#   GPUS=2 ENTRY=launch/probe.py launch/train.sh           # check the wiring, no model
#
# On CPU there are no GPUs to count: GPUS is then the number of CPU ranks (default 1).
# SIGUSR1/SIGTERM to this script reach the ranks as USR1 (see common.sh); exit 42 means
# "preempted, checkpoint saved": start the same command again to resume.
set -euo pipefail
# no cd: relative paths mean what they mean in the caller's folder (see common.sh)
source "$(dirname "$0")/common.sh"

GPUS=${GPUS:-$(default_gpus)}
MASTER_PORT=${MASTER_PORT:-29500}

run_launcher deepspeed --num_gpus "$GPUS" --master_port "$MASTER_PORT" --no_local_rank $ENTRY "$@"
