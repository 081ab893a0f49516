"""Distribution: ranks from the launcher's environment, batch arithmetic, the DeepSpeed ZeRO-3 (or 2) engine.

This module knows DeepSpeed and torch.distributed, nothing of prompts or losses:

    env = dist_env()                        # deepspeed / torchrun / srun / plain process
    init_distributed(env, timeout_s=300)
    plan = batch_plan(256, micro_batch=8, world=env.world)   # grad_accum derived, or refused
    ds = deepspeed_config(train_cfg, plan, dtype)
    with zero3_loading(ds):                 # HF from_pretrained/from_config enter zero.Init
        model = load_model(...)
    engine = build_engine(model, train_cfg, ds)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from llara_dist.config import ConfigError, deepspeed_override_problems, merge
from llara_dist.patches import skip_local_gather_syncs
from llara_dist.model.decoder import decoder_layers


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
                raise RuntimeError(f"{name} is not set")
            return default
        try:
            return int(raw)
        except ValueError:
            raise RuntimeError(f"{name}={raw!r} is not an integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        launcher, rank, world, local = "torchrun/deepspeed", num("RANK"), num("WORLD_SIZE"), num("LOCAL_RANK", 0)
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = num("SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else num("SLURM_NTASKS")
        launcher, rank, local = "slurm", num("SLURM_PROCID"), num("SLURM_LOCALID", 0)
    else:
        launcher, rank, world, local = "single", 0, 1, 0
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is outside world size {world} ({launcher} environment)")
    addr = env.get("MASTER_ADDR")
    if world > 1 and (not addr or "MASTER_PORT" not in env):
        raise RuntimeError(f"{launcher} environment with {world} ranks but MASTER_ADDR/MASTER_PORT are not set "
                           "(the sbatch script must export them, e.g. the first node of the allocation)")
    port = num("MASTER_PORT", 0)
    if world > 1 and port == 0:
        raise RuntimeError(f"MASTER_PORT=0 with {world} ranks: rank 0's store would bind a port the other ranks "
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
        raise ValueError(
            f"global batch {global_batch} rows cannot be split: micro_batch {micro_batch} x world {world} "
            f"= {per_pass} rows per pass, and {global_batch} / {per_pass} = {global_batch / per_pass:.3g} "
            f"is not a whole number of accumulation steps. Use a global batch that is a multiple of "
            f"{per_pass} (e.g. {lower} or {lower + per_pass}), or change micro_batch or the number of ranks.")
    return BatchPlan(global_batch, micro_batch, global_batch // per_pass, world)


def deepspeed_config(train, plan: BatchPlan, dtype: torch.dtype, gpu: bool | None = None) -> dict:
    """The DeepSpeed config dict from our TrainConfig and the batch plan, `train.deepspeed` merged in.

    `gpu`: build it for a GPU run (default: whether DeepSpeed's accelerator is one)."""
    gpu = on_gpu() if gpu is None else gpu
    problems = deepspeed_override_problems(train.deepspeed)
    if problems:
        raise ConfigError([f"train.{p}" for p in problems])
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    # CPU: torch's AdamW. GPU: torch's fused AdamW (nothing to build), or DeepSpeed's FusedAdam
    # (adam_impl=deepspeed: an nvcc JIT build at first start); offloaded states: DeepSpeed's CPU-Adam
    if not gpu:
        adam = {"torch_adam": True}
    elif train.offload_optimizer or train.adam_impl == "deepspeed":
        adam = {"torch_adam": False}
    else:
        adam = {"torch_adam": True, "fused": True}
    generated = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.lr, "betas": list(train.adam_betas), "eps": train.adam_eps,
            "weight_decay": train.weight_decay, **adam}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return merge(generated, copy.deepcopy(train.deepspeed))  # a copy: DeepSpeed pops keys from its config


def lr_factor(step: int, train) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then decay."""
    if step < train.warmup_steps:
        return (step + 1) / (train.warmup_steps + 1)
    if train.decay == "constant":
        return 1.0
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if train.decay == "cosine" else 1 - progress
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * shape


_hf_ds_config = None  # transformers holds only a weak reference: keep the object alive


@contextlib.contextmanager
def zero3_loading(ds_config: dict):
    """Make transformers build and load models under deepspeed.zero.Init (ZeRO-3; other stages: plainly).

    With an HfDeepSpeedConfig alive, `from_pretrained`/`from_config` enter zero.Init
    themselves (after their imports: an import under zero.Init's patched tensor
    constructors breaks torch._dynamo), so each parameter is created partitioned across
    ranks and a 7B model never materialises whole on one rank; resize_token_embeddings
    gathers and re-partitions.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    global _hf_ds_config
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    _hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
    assert is_deepspeed_zero3_enabled() == zero3
    yield


def apply_lora(model, train):
    """Wrap the model with peft LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                     target_modules=list(train.lora_targets), bias="none")
    return get_peft_model(model, cfg)


def build_engine(model, train, ds_config: dict):
    """The DeepSpeed engine: ZeRO-3 (or 2), AdamW, warm-up then decay; optional activation checkpointing, LoRA."""
    import deepspeed

    if train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if train.lora_r:
        model = apply_lora(model, train)
    if train.zero3_layer_gather is not False and train.zero_stage == 3:  # unset: on (the task may turn it off)
        layers = gather_by_layer(model, required=train.zero3_layer_gather is True)
        zero = ds_config["zero_optimization"]
        if layers and not {"stage3_prefetch_bucket_size", "prefetch_bucket_size"} & zero.keys():
            # prefetch the next layer whole, as FSDP prefetches its next unit: DeepSpeed's default
            # (5e7 elements) was sized for one linear at a time, a quarter of a 7B layer
            numel = [sum(getattr(p, "ds_numel", p.numel()) for p in layer.parameters()) for layer in layers]
            zero["stage3_prefetch_bucket_size"] = max(numel)
    params = [p for p in model.parameters() if p.requires_grad]

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))

    skip_local_gather_syncs()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                           lr_scheduler=scheduler)
    return engine


def gather_by_layer(model, required: bool = True) -> list:
    """ZeRO-3 leaf modules at the model's decoder layers (its `_no_split_modules`, the unit FSDP wraps):
    DeepSpeed then gathers and releases a layer's parameters in one hook pair at the layer instead of
    one per linear and norm inside it (on the H200 bench those per-module backward hooks took ~55 ms
    of a ~350 ms profiled step on the host, which the GPU waited for). Each layer must run once per
    backward: DeepSpeed reduces a leaf module's gradients when its backward ends (finetune runs the
    layers twice and gathers per module). Call before deepspeed.initialize, which installs the hooks.
    Returns the flagged layers: none for a model that names no layer class, unless `required` (then
    that is an error)."""
    from deepspeed.utils import set_z3_leaf_module

    layers = decoder_layers(model)
    if not layers:
        if not required:
            return []
        raise ValueError(f"train.zero3_layer_gather: {type(model).__name__} names no decoder layer class "
                         f"(_no_split_modules)")
    for layer in layers:
        set_z3_leaf_module(layer, True)
    return layers


def full_state_dict(module) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole, on every rank (CPU copies). For tests and small exports."""
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}


def all_reduce_sum(values: list[float], device=None) -> list[float]:
    """Sum a few numbers over all ranks (float64, one collective)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()
