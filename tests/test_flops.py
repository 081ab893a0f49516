"""The model FLOPs a step is credited with (metrics.flop_rates, metrics.head_positions) against torch's own
count (torch.utils.flop_counter.FlopCounterMode) of one forward and backward of the LLaRA objective over a
packed micro-batch, for each preset, with every weight training and under LoRA.

The comparison is of the matmul FLOPs torch counts (aten mm, addmm, bmm: the linear layers, the LM head,
LoRA's adapters and base layers), exactly. Two things are left out of the credited side, each for a
stated reason:
- attention: the joint mask's SDPA call runs SDPA's fused CPU kernel, which torch's counter has no
  formula for (on a GPU it would count every (query, key) slot of the row, whatever the mask allows);
  the credited attention FLOPs are per pair the joint mask allows, checked against a brute-force count
  of the mask in test_step_counts.py, and against torch's count of a plain causal model there;
- the model call's own LM head at each row's last position (decoder.forward_hidden asks for one
  position's logits, which nothing uses): a forward of hidden x vocab per row, no backward, not credited
  as model FLOPs. It is added to the formula's side below, so the equality stays exact.
"""

from __future__ import annotations

import pytest
import torch
from helpers import full_training_rates, load_tiny, micro_batches
from torch.utils.flop_counter import FlopCounterMode

from llara_dist.config import TrainConfig
from llara_dist.model.objective import batch_counts, combine, loss_sums
from llara_dist.train.engine import apply_lora
from llara_dist.train.metrics import flop_rates, head_positions

MATMULS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)  # a linear over [rows, L, H] is one of them


def counted_linear_flops(model, batch, preset) -> int:
    """torch's count of the matmul FLOPs of one forward and backward of the objective."""
    with FlopCounterMode(display=False) as counter:
        sums = loss_sums(model, batch, preset)
        loss, _ = combine(sums, batch_counts(batch, preset), preset)
        loss.backward()
    ops = counter.get_flop_counts()["Global"]
    # attention goes through SDPA's CPU kernel here, which torch does not count (nor as a matmul): were it to
    # fall back to SDPA's math path, its bmm would show as a surplus below, not pass unseen
    return sum(v for op, v in ops.items() if op in MATMULS)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("preset_name", ["paper", "released"])
def test_credited_flops_are_the_linear_layers_torch_counts(preset_name, lora, tokenizer_dir, tiny_llama_dir,
                                                           shared_data):
    tok, preset, model, prompt = load_tiny(preset_name, tokenizer_dir, tiny_llama_dir)
    if lora:  # the default targets: every linear of every layer; the head, embeddings and norms frozen
        model = apply_lora(model, TrainConfig(lora_r=4))
    batch = micro_batches(tok, prompt, shared_data)[0]
    head = model.get_output_embeddings().weight
    rates = flop_rates(model)
    where = head_positions(batch, preset)
    discarded_head = 2 * head.numel() * batch.rows  # forward_hidden's unused last-position logits
    credited = rates.per_token * batch.input_ids.numel() + rates.per_head_position * where
    assert counted_linear_flops(model, batch, preset) == credited + discarded_head

    # what the positions are: 2 x k per document, plus the text tokens where the preset has an LM loss
    k = prompt.num_emb_tokens
    text = int((batch.text_len - len(prompt.prefix)).clamp(min=0).sum())
    assert where == 2 * k * batch.num_docs + (text if preset.lm_weight else 0)
    full = full_training_rates(model.config)
    if not lora:
        assert rates == full
    else:  # frozen weights cost 4 (2 for the first layer's q, k, v), the adapters 6 (their A there 4)
        assert rates.per_head_position == full.per_head_position * 4 // 6
        assert full.per_token * 2 // 6 < rates.per_token < full.per_token * 5 // 6


def test_lora_on_the_head_counts_its_frozen_base(tokenizer_dir, tiny_llama_dir, shared_data):
    """A LoRA-wrapped head (lm_head among the targets): the bag-of-words head runs through it (the LM loss
    refuses it), and its base weight and adapters are head FLOPs, not per-token ones."""
    tok, preset, model, prompt = load_tiny("paper", tokenizer_dir, tiny_llama_dir)
    model = apply_lora(model, TrainConfig(lora_r=4, lora_targets=["q_proj", "lm_head"]))
    batch = micro_batches(tok, prompt, shared_data)[1]
    rates = flop_rates(model)
    head = model.get_output_embeddings()
    assert type(head) is not torch.nn.Linear
    weights = sum(m.weight.numel() for m in head.modules() if isinstance(m, torch.nn.Linear))  # base, A, B
    assert counted_linear_flops(model, batch, preset) == (rates.per_token * batch.input_ids.numel()
                                                          + rates.per_head_position * head_positions(batch, preset)
                                                          + 2 * weights * batch.rows)


def _train_step_worker(rank, world, port, paths, out):
    """pretrain.train_step on a ZeRO-3 engine (world 1) under torch's FLOP counter, every weight training
    and under LoRA: what it counted, the step's result, and the rates of the engine (partitioned weights)."""
    import os

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from llara_dist.model.objective import Objective
    from llara_dist.train.distributed import BatchPlan, dist_env, init_distributed
    from llara_dist.train.engine import build_engine, deepspeed_config, zero3_loading
    from llara_dist.train.pretrain import train_step

    tokenizer_dir, tiny_llama_dir, shared_data = paths
    init_distributed(dist_env())
    runs = {}
    for lora in (False, True):
        # gathering per module: gathering by layer needs the first layer's input to require a gradient, which
        # LoRA's frozen embeddings give only under activation checkpointing (whose recomputation would count)
        train = TrainConfig(global_batch=2, micro_batch=1, lr=1e-3, warmup_steps=0, lora_r=4 if lora else 0,
                            zero3_layer_gather=False)
        ds = deepspeed_config(train, BatchPlan(2, 1, 2, 1), torch.float32)
        with zero3_loading(ds):
            tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir)
        engine = build_engine(model.train(), train, ds)
        micro = micro_batches(tok, prompt, shared_data)
        with FlopCounterMode(display=False) as counter:
            result = train_step(engine, micro, Objective(preset), 1)
        ops = counter.get_flop_counts()["Global"]
        head = engine.module.get_output_embeddings()
        runs["lora" if lora else "full"] = {
            "counted": sum(v for op, v in ops.items() if op in MATMULS), "result": result,
            "rates": flop_rates(engine), "rows": sum(b.rows for b in micro),
            "head_weights": sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in head.modules()
                                if isinstance(m, torch.nn.Linear))}
    torch.save(runs, out)


def test_train_step_reports_where_the_head_ran(run_ranks, tokenizer_dir, tiny_llama_dir, shared_data, tmp_path):
    """The step result's head_positions and the rates of a ZeRO-3 engine (its weights partitioned: their
    sizes are DeepSpeed's) account for every matmul of a real training step, with and without LoRA."""
    runs = run_ranks(_train_step_worker, 1, (tokenizer_dir, tiny_llama_dir, shared_data), tmp_path / "runs.pt")
    for name, run in runs.items():
        result, rates = run["result"], run["rates"]
        assert result["head_positions"] > 0 and result["slots"] > result["real_tokens"]  # the rows have padding
        discarded_head = 2 * run["head_weights"] * run["rows"]
        assert run["counted"] == (rates.per_token * result["slots"] + rates.per_head_position * result["head_positions"]
                                  + discarded_head), name
    assert runs["lora"]["rates"].per_token < runs["full"]["rates"].per_token
