"""How the engine holds and runs the decoder layers: ZeRO-3 gathering per module or per layer
(train.zero3_layer_gather), ZeRO-2, layers compiled whole, all training the same (2 gloo ranks); and
the decoder's output taken by a hook (modeling.forward_hidden).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import load_tiny, micro_batches

from llara_dist.config import TrainConfig
from llara_dist.train.distributed import batch_plan, dist_env
from llara_dist.train.engine import deepspeed_config

# how the engine holds the weights: ZeRO-3 gathering per module (DeepSpeed's way), per decoder layer
# (train.zero3_layer_gather, the default), the same with each layer compiled whole (model.compile_layers),
# and ZeRO-2 (train.zero_stage=2: whole on every rank): (ZeRO stage, gather by layer, compile layers)
GATHERINGS = {"module": (3, False, False), "layer": (3, True, False), "compiled": (3, True, True),
              "zero2": (2, True, False)}


def _gathering_worker(rank, world, port, paths, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from deepspeed.utils import z3_leaf_module

    from llara_dist.model import fused
    from llara_dist.model.decoder import decoder_layers
    from llara_dist.model.objective import Objective
    from llara_dist.train.distributed import init_distributed
    from llara_dist.train.engine import build_engine, zero3_loading
    from llara_dist.train.pretrain import train_step

    init_distributed(dist_env(), timeout_s=60)
    tokenizer_dir, tiny_llama_dir, shared_data = paths
    got = {}
    for name, (stage, by_layer, compiled) in GATHERINGS.items():
        # every weight partitioned, however small (DeepSpeed keeps those under 1e5 elements whole)
        small = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {}
        train = TrainConfig(global_batch=2 * world, micro_batch=1, lr=1e-3, warmup_steps=0, zero_stage=stage,
                            zero3_layer_gather=by_layer, deepspeed=small)
        ds = deepspeed_config(train, batch_plan(2 * world, 1, world), torch.float32)
        torch.manual_seed(0)
        with zero3_loading(ds):
            tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir)
        engine = build_engine(model.train(), train, ds)
        if compiled:
            fused.compile_layers(decoder_layers(engine))
        micro = micro_batches(tok, prompt, shared_data)
        layers = engine.module.model.layers
        got[name] = {"losses": [train_step(engine, micro, Objective(preset, lm_chunk=16), world)["loss"]
                                for _ in range(3)],
                     "leaves": [z3_leaf_module(m) for m in layers],
                     "partitioned": sum(hasattr(p, "ds_id") for p in engine.module.parameters()),
                     "prefetch": engine.zero_prefetch_bucket_size(),
                     "layer_numel": sum(p.ds_numel for p in layers[0].parameters()) if stage == 3 else None,
                     "hooked_linears": sum(bool(m._forward_pre_hooks) for m in layers.modules()
                                           if isinstance(m, torch.nn.Linear))}
    train = TrainConfig(global_batch=2 * world, micro_batch=1, deepspeed={"zero_optimization": {
        "stage3_prefetch_bucket_size": 12345}})  # the user's prefetch stays
    ds = deepspeed_config(train, batch_plan(2 * world, 1, world), torch.float32)
    with zero3_loading(ds):
        _, _, model, _ = load_tiny("released", tokenizer_dir, tiny_llama_dir)
    got["user_prefetch"] = build_engine(model.train(), train, ds).zero_prefetch_bucket_size()
    torch.save(got, out)


@pytest.mark.slow
def test_gathering_by_layer_or_zero2_trains_the_same(tmp_path, run_ranks, tokenizer_dir, tiny_llama_dir,
                                                     shared_data):
    """Two ranks. train.zero3_layer_gather: ZeRO-3 gathers each decoder layer at once (no hooks on the
    linears inside); train.zero_stage=2: nothing is partitioned nor hooked. Three optimizer steps give the
    losses of DeepSpeed's per-module gathering (the first bit for bit; then to fp32 rounding: the
    gradients reach their buckets in another grouping, so the norm sums in another order); and with
    each layer compiled whole over the weights ZeRO-3 gathers, to the compiled code's rounding."""
    run = run_ranks(_gathering_worker, 2, (tokenizer_dir, tiny_llama_dir, shared_data), tmp_path / "run.pt")
    module, layer, compiled, zero2 = (run[name] for name in GATHERINGS)
    assert module["leaves"] == [False] * len(module["leaves"]) and module["hooked_linears"] > 0
    assert layer["leaves"] == [True] * len(layer["leaves"]) and layer["hooked_linears"] == 0
    assert module["partitioned"] == layer["partitioned"] > 0 and zero2["partitioned"] == 0
    assert zero2["hooked_linears"] == 0 and not any(zero2["leaves"])
    # ZeRO-3 prefetches a whole layer ahead when it gathers by layer, else DeepSpeed's default (5e7)
    assert layer["prefetch"] == layer["layer_numel"] > 0 and module["prefetch"] == 50_000_000
    assert run["user_prefetch"] == 12345
    for other in (layer, zero2):
        assert other["losses"][0] == module["losses"][0]
        assert other["losses"] == pytest.approx(module["losses"], rel=1e-6, abs=0)
    assert compiled["losses"] == pytest.approx(module["losses"], rel=1e-5, abs=0)
    assert module["losses"][2] < module["losses"][0]  # and it trains


def test_layer_gather_refuses_a_model_without_layer_classes():
    from llara_dist.train.engine import gather_by_layer

    with pytest.raises(ValueError, match="train.zero3_layer_gather: Sequential names no decoder layer class"):
        gather_by_layer(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert gather_by_layer(torch.nn.Sequential(torch.nn.Linear(2, 2)), required=False) == []  # unset: per module


@pytest.mark.parametrize("lora", [False, True])
def test_forward_hidden_is_the_decoders_final_output(lora, tokenizer_dir, tiny_llama_dir, shared_data):
    """The decoder's output taken by a hook equals, bit for bit, the model's own last hidden state."""
    from llara_dist.kernels import registry
    from llara_dist.model.decoder import forward_hidden
    from llara_dist.train.engine import apply_lora

    tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir)
    if lora:  # through peft's wrappers
        model = apply_lora(model, TrainConfig(lora_r=4))
    b = micro_batches(tok, prompt, shared_data)[1]
    with torch.no_grad():
        h = forward_hidden(model, b)
        mask = registry.prepare("sdpa", b.doc, b.segment)
        every = model(input_ids=b.input_ids, position_ids=b.position, llara_mask=mask, use_cache=False,
                      logits_to_keep=1, output_hidden_states=True).hidden_states
    assert h.shape == b.input_ids.shape + (model.config.hidden_size,) and torch.equal(h, every[-1])
    assert not torch.equal(h, every[-2])  # the final norm's output, not the last layer's
