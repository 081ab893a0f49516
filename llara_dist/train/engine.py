"""The DeepSpeed ZeRO-3 (or 2) engine: its config, the LR schedule, loading under zero.Init, LoRA,
ZeRO-3 gathering by decoder layer. It knows DeepSpeed, nothing of prompts or losses:

    plan = batch_plan(256, micro_batch=8, world=env.world)   # distributed.py
    ds = deepspeed_config(train_cfg, plan, dtype)
    with zero3_loading(ds):                 # HF from_pretrained/from_config enter zero.Init
        model = load_model(...)
    engine = build_engine(model, train_cfg, ds)
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from llara_dist.config import ConfigError, deepspeed_override_problems, merge
from llara_dist.errors import UserError
from llara_dist.model.decoder import decoder_layers
from llara_dist.patches import skip_local_gather_syncs
from llara_dist.train.distributed import BatchPlan, on_gpu


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
    if train.gathers_by_layer():  # unset: on, unless LoRA without recompute (the task may turn it off)
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
        raise UserError(f"train.zero3_layer_gather: {type(model).__name__} names no decoder layer class "
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
