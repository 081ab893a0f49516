"""Where the ranks are and how the global batch splits over them: the launcher's environment, the
process group, the batch arithmetic, and sums over all ranks.

    env = dist_env()                        # deepspeed / torchrun / srun / plain process
    init_distributed(env, timeout_s=300)
    plan = batch_plan(256, micro_batch=8, world=env.world)   # grad_accum derived, or refused
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from llara_dist.errors import UserError
from llara_dist.quiet import quiet_stdout


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun/deepspeed", "slurm" or "single"


def dist_env(environ=None) -> DistEnv:
    """Rank and rendezvous from the environment of whichever launcher started us.

    - `deepspeed` and `torchrun` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
    - `srun` (one task per process) sets SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS),
      SLURM_LOCALID; the sbatch script exports MASTER_ADDR and MASTER_PORT;
    - a plain process is rank 0 of 1 with port 0: its store binds any free port, since no other
      rank has to find it (a port picked free and bound later could be taken in between).
    RANK wins over SLURM_*: a launcher started inside an allocation sets both.
    """
    env = os.environ if environ is None else environ

    def num(name: str, default: int | None = None) -> int:
        raw = env.get(name)
        if raw is None:
            if default is None:
                raise UserError(f"{name} is not set")
            return default
        try:
            return int(raw)
        except ValueError:
            raise UserError(f"{name}={raw!r} is not an integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        launcher, rank, world, local = "torchrun/deepspeed", num("RANK"), num("WORLD_SIZE"), num("LOCAL_RANK", 0)
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = num("SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else num("SLURM_NTASKS")
        launcher, rank, local = "slurm", num("SLURM_PROCID"), num("SLURM_LOCALID", 0)
    else:
        launcher, rank, world, local = "single", 0, 1, 0
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world} ({launcher} environment)")
    addr = env.get("MASTER_ADDR")
    if world > 1 and (not addr or "MASTER_PORT" not in env):
        raise UserError(f"{launcher} environment with {world} ranks but MASTER_ADDR/MASTER_PORT are not set "
                           "(the sbatch script must export them, e.g. the first node of the allocation)")
    port = num("MASTER_PORT", 0)
    if world > 1 and port == 0:
        raise UserError(f"MASTER_PORT=0 with {world} ranks: rank 0's store would bind a port the other ranks "
                           "cannot know; give the port they all join")
    return DistEnv(rank, world, local, addr or "127.0.0.1", port, launcher)


def on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def init_distributed(env: DistEnv, timeout_s: int = 300) -> None:
    """Join the process group: gloo on CPU, the accelerator's backend (nccl) on GPU.

    The timeout bounds how long a collective waits for a dead rank: the survivors fail
    instead of hanging for the default 30 minutes.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    # DeepSpeed reads these; a SLURM start does not set them
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    backend = "gloo" if not on_gpu() else get_accelerator().communication_backend_name()
    if on_gpu():
        get_accelerator().set_device(env.local_rank)
    with quiet_stdout():  # on CPU, DeepSpeed announces the shared-memory op it builds, once per rank
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s), rank=env.rank, world_size=env.world)


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # rows per optimizer step, all ranks
    micro_batch: int  # rows per forward on one rank
    grad_accum: int  # micro-batches per rank per step
    world: int


def batch_plan(global_batch: int, micro_batch: int, world: int) -> BatchPlan:
    """Derive grad_accum from global = micro x accum x world, or refuse with the arithmetic."""
    per_pass = micro_batch * world
    if global_batch % per_pass:
        lower = max(per_pass, global_batch // per_pass * per_pass)
        raise UserError(
            f"global batch {global_batch} rows cannot be split: micro_batch {micro_batch} x world {world} "
            f"= {per_pass} rows per pass, and {global_batch} / {per_pass} = {global_batch / per_pass:.3g} "
            f"is not a whole number of accumulation steps. Use a global batch that is a multiple of "
            f"{per_pass} (e.g. {lower} or {lower + per_pass}), or change micro_batch or the number of ranks.")
    return BatchPlan(global_batch, micro_batch, global_batch // per_pass, world)


def all_reduce_sum(values: list[float], device=None) -> list[float]:
    """Sum a few numbers over all ranks (float64, one collective)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()
