#!/usr/bin/env bash
# Train with torchrun, the trainer's exit 42 ("preempted, checkpoint saved") kept.
#
#   RUN_DIR=runs/a launch/torchrun.sh --config run.yaml                       # every GPU of this machine
#   RUN_DIR=runs/a GPUS=4 launch/torchrun.sh --config run.yaml train.lr=2e-5  # arguments go to the trainer
#   DS_ACCELERATOR=cpu GPUS=2 RUN_DIR=runs/tiny launch/torchrun.sh --config tiny.yaml   # 2 CPU ranks (gloo)
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 RUN_DIR=/shared/runs/a launch/torchrun.sh --config run.yaml
#
# torchrun reports a rank's exit 42 as its own failure (status 1): a scheduler could not tell
# "preempted, requeue me" from a crash. The trainer's rank 0 writes RUN_DIR/PREEMPTED once the
# preemption checkpoint is complete (llara_dist/train/preempt.py); this script removes a stale one
# before it starts and turns a failed torchrun into 42 when one is there. RUN_DIR reaches the
# trainer as run_dir=RUN_DIR, so both look at the same folder (a shared one on many nodes, as
# the checkpoints need anyway).
#
# One node: `torchrun --standalone`, which hosts the rendezvous on a free port. Many nodes: one
# script per node with NNODES, NODE_RANK, MASTER_ADDR (the first node) and MASTER_PORT (29500).
# ENTRY="--module llara_dist finetune" for the contrastive stage. SIGUSR1/SIGTERM to this script
# reach the ranks as USR1 (see common.sh). DRY_RUN=1 prints the command.
set -euo pipefail
# no cd: relative paths mean what they mean in the caller's folder (see common.sh)
source "$(dirname "$0")/common.sh"

PREEMPTED_EXIT=42             # llara_dist/train/preempt.py PREEMPTED_EXIT
PREEMPTED_MARKER=PREEMPTED    # llara_dist/train/preempt.py PREEMPTED_MARKER
RANK_DEPTH=1                  # torchrun starts the ranks itself
RUN_DIR=${RUN_DIR:?set RUN_DIR to the run folder (given to the trainer as run_dir=RUN_DIR)}
GPUS=${GPUS:-$(default_gpus)}
NNODES=${NNODES:-1}

for arg in "$@"; do
    [[ $arg != run_dir=* ]] || { echo "torchrun.sh: give the run folder as RUN_DIR, not $arg" >&2; exit 2; }
done
if ((NNODES == 1)); then
    rdzv=(--standalone)
else
    [[ -n ${NODE_RANK:-} && -n ${MASTER_ADDR:-} ]] ||
        { echo "torchrun.sh: NNODES=$NNODES needs NODE_RANK and MASTER_ADDR" >&2; exit 2; }
    rdzv=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
          --master-port "${MASTER_PORT:-29500}")
fi

marker=$RUN_DIR/$PREEMPTED_MARKER
[[ -n ${DRY_RUN:-} ]] || rm -f "$marker"  # a stale one must not turn this start's crash into "preempted"
status=0
run_launcher torchrun "${rdzv[@]}" --nproc-per-node "$GPUS" $ENTRY "$@" "run_dir=$RUN_DIR" || status=$?
if ((status != 0)) && [[ -f $marker ]]; then
    echo "[launch] torchrun exited $status; $marker: the trainers saved step $(<"$marker") for preemption," \
        "exiting $PREEMPTED_EXIT" >&2
    status=$PREEMPTED_EXIT
fi
exit "$status"
