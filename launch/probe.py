"""Check a launch before a long run: every rank joins one gloo group and all-reduces.

    DS_ACCELERATOR=cpu GPUS=2 ENTRY=launch/probe.py launch/train.sh   # 2 local ranks, deepspeed launcher
    CMD="python -u launch/probe.py" sbatch launch/train.sbatch          # every SLURM task of the job

Each rank prints one JSON line: rank, world size, local rank, node, master address, the
devices the launcher gave it (CUDA_VISIBLE_DEVICES) and the all-reduced sum of all ranks
(world*(world-1)/2 when the wiring is right).

`--until-signal DIR` then plays the trainer's preemption protocol without a model: one
all-reduced "stop?" flag per step until SIGUSR1/SIGTERM reaches any rank, then rank 0
writes DIR/preempted and all exit 42 (llara_dist.train.preempt.PREEMPTED_EXIT). A start that
finds DIR/preempted is a resumed run: it writes DIR/resumed and exits 0. So a launcher's
signal forwarding and requeue can be tested in seconds. `--kill-rank N` makes rank N die
by SIGKILL instead, as a crashed or OOM-killed trainer would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 42  # the trainer's status (llara_dist/train/preempt.py); a test checks they agree


def emit(record: dict) -> None:
    """One JSON line in ONE write: the ranks share the log, and print() may write the text
    and its newline separately (unbuffered output), interleaving two ranks' lines."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def env_rank() -> tuple[int, int, int]:
    """(rank, world, local rank) from torchrun/deepspeed variables, else SLURM's."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return rank, world, local


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--until-signal", metavar="DIR", help="run steps until a preemption signal (see above)")
    parser.add_argument("--step-s", type=float, default=0.2, help="seconds per pretend step")
    parser.add_argument("--max-s", type=float, default=120, help="give up (exit 1) after this long without a signal")
    parser.add_argument("--kill-rank", type=int, default=-1,
                        help="this rank SIGKILLs itself after the all-reduce (does a dead rank end the job?)")
    args = parser.parse_args()

    stop = {"sig": None}
    for s in (signal.SIGUSR1, signal.SIGTERM):  # before the (slow) group set-up: no signal is lost
        signal.signal(s, lambda signum, _: stop.update(sig=signal.Signals(signum).name))

    rank, world, local = env_rank()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    total = torch.tensor([rank])
    dist.all_reduce(total)
    emit({"rank": rank, "world": world, "local_rank": local,
          "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
          "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
          "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
          "rank_sum": int(total.item())})
    status = 0 if total.item() == world * (world - 1) // 2 else 1
    if rank == args.kill_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    if args.until_signal and status == 0:
        status = until_signal(Path(args.until_signal), rank, stop, args.step_s, args.max_s)
    dist.destroy_process_group()
    return status


def until_signal(folder: Path, rank: int, stop: dict, step_s: float, max_s: float) -> int:
    if (folder / "preempted").exists():
        if rank == 0:
            (folder / "resumed").write_text(os.environ.get("SLURM_RESTART_COUNT", "") + "\n")
        return 0
    start, step = time.monotonic(), 0
    while time.monotonic() - start < max_s:
        flag = torch.tensor([int(stop["sig"] is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item():
            if rank == 0:
                (folder / "preempted").write_text(f"step {step} signal {stop['sig']}\n")
            dist.barrier()  # the "save" is complete on every rank before any exits
            emit({"rank": rank, "preempted_at_step": step, "signal": stop["sig"]})
            return PREEMPTED_EXIT
        step += 1
        time.sleep(step_s)
    print(f"rank {rank}: no signal within {max_s}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
