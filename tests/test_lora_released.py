"""LoRA with the released preset (LM loss through the frozen head) under the real ZeRO-3 engine.

Regression: the LM-loss chunks used torch.utils.checkpoint, whose recompute keeps a frozen
parameter by reference; ZeRO-3 had released the head's weight by then (CheckpointError,
recomputed shape [0]). The objective now computes the head's gradients in its forward
(objective.head_nll), frozen or not.
Two optimizer steps of 1 ZeRO-3 rank (gloo, fp32, CPU) are compared to plain PyTorch on the
unchunked loss (all [T, V] logits at once, one autograd graph).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import load_tiny, make_docs

from llara_dist.config import TrainConfig
from llara_dist.data.batch import build_batch, lm_targets
from llara_dist.model import objective
from llara_dist.model.decoder import forward_hidden

TRAIN = dict(global_batch=2, micro_batch=1, steps=2, lr=1e-3, warmup_steps=0, decay="constant", grad_clip=0.5,
             adam_eps=1e-4, lora_r=4, activation_checkpointing=True)
LM_CHUNK = 16  # several chunks per micro-batch
LENGTHS = [23, 9, 14, 5, 17, 7]


def micro_batches(tok, prompt, shared_data):
    docs = make_docs(tok, shared_data, LENGTHS)
    drop = tuple(sorted(set(tok.all_special_ids)))
    return [build_batch([d], prompt, 3 * prompt.overhead + 60, tok.pad_token_id, drop) for d in (docs[:3], docs[3:])]


def unchunked_sums(model, batch, preset) -> dict[str, torch.Tensor]:
    """The objective's BoW sums, and the LM sum from all [T, V] logits at once (no chunks, no checkpoint)."""
    sums = objective.loss_sums(model, batch, dataclasses.replace(preset, lm_weight=0.0))
    where = lm_targets(batch).reshape(-1).nonzero().squeeze(1)  # [T]
    hidden = forward_hidden(model, batch)
    logits = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[where]).float()  # [T, V]
    sums["lm"] = F.cross_entropy(logits, batch.input_ids.reshape(-1)[where + 1], reduction="sum")
    return sums


def _worker(rank, port, paths, out):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from llara_dist.train.distributed import batch_plan, dist_env, init_distributed
    from llara_dist.train.engine import build_engine, deepspeed_config, full_state_dict, zero3_loading
    from llara_dist.train.pretrain import train_step

    init_distributed(dist_env(), timeout_s=60)
    train = TrainConfig(**TRAIN)
    ds = deepspeed_config(train, batch_plan(2, 1, 1), torch.float32)
    torch.manual_seed(0)
    tokenizer_dir, tiny_llama_dir, shared_data = paths
    with zero3_loading(ds):
        tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir)
    engine = build_engine(model.train(), train, ds)
    before = full_state_dict(engine.module)
    chunked = objective.Objective(preset, lm_chunk=LM_CHUNK)
    micro = micro_batches(tok, prompt, shared_data)
    steps = []
    for _ in range(TRAIN["steps"]):
        result = train_step(engine, micro, chunked, 1)
        steps.append((result["loss"], result["lm"], float(engine.get_global_grad_norm())))
    torch.save({"before": before, "after": full_state_dict(engine.module), "steps": steps}, out)


def reference(paths, init: dict):
    """Plain PyTorch + peft, same weights: unchunked loss, backward, clip, torch AdamW, twice."""
    from llara_dist.train.engine import apply_lora

    tokenizer_dir, tiny_llama_dir, shared_data = paths
    tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir)
    model = apply_lora(model.train(), TrainConfig(**TRAIN))
    model.load_state_dict(init)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=TRAIN["lr"], eps=TRAIN["adam_eps"], weight_decay=0.0)
    micro = micro_batches(tok, prompt, shared_data)
    counts = {t: sum(objective.batch_counts(b, preset)[t] for b in micro) for t in objective.TERMS}
    steps = []
    for _ in range(TRAIN["steps"]):
        opt.zero_grad()
        loss, lm = 0.0, 0.0
        for b in micro:
            part, terms = objective.combine(unchunked_sums(model, b, preset), counts, preset)
            loss, lm = loss + part, lm + terms["lm"]
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, TRAIN["grad_clip"]))
        opt.step()
        steps.append((float(loss.detach()), lm, norm))
    return steps, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_lora_released_trains_under_zero3_like_the_unchunked_loss(tmp_path, tokenizer_dir, tiny_llama_dir,
                                                                  shared_data):
    paths = (tokenizer_dir, tiny_llama_dir, shared_data)
    mp.spawn(_worker, args=(0, paths, tmp_path / "run.pt"), nprocs=1)  # port 0: one rank binds any free port
    run = torch.load(tmp_path / "run.pt", weights_only=False)
    want, weights = reference(paths, run["before"])
    for (loss, lm, norm), (ref_loss, ref_lm, ref_norm) in zip(run["steps"], want):
        assert lm > 0 and loss == pytest.approx(ref_loss, rel=1e-6) and lm == pytest.approx(ref_lm, rel=1e-6)
        assert norm == pytest.approx(ref_norm, rel=1e-5)  # the backward, not only the forward
    assert run["steps"][1][0] < run["steps"][0][0]  # it learns
    trained = [n for n in weights if "lora_" in n]
    assert len(trained) == 4 * 7  # A and B of 7 target modules in 2 layers
    for name, ref in weights.items():
        # the adapters move ~2e-3 in two Adam steps; fp32 summation-order noise, which Adam's
        # second step amplifies, reaches ~1.2e-7: 1e-6 is 0.05% of the move
        torch.testing.assert_close(run["after"][name], ref, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(ref, run["before"][name]) == ("lora_" not in name), name  # only the adapters moved


def test_frozen_head_gives_the_trainable_heads_sum_and_gradients(tokenizer_dir, tiny_llama_dir, shared_data):
    """Plain PyTorch: the LM sum and every other parameter's gradient are the same whether the head
    trains or not (head_nll computes W's gradient only where it trains)."""
    tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir)
    batch = micro_batches(tok, prompt, shared_data)[0]
    grads = []
    for frozen in (False, True):
        model.lm_head.weight.requires_grad_(not frozen)
        model.zero_grad()
        lm = objective.loss_sums(model, batch, preset, lm_chunk=LM_CHUNK)["lm"]
        lm.backward()
        grads.append((float(lm), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None and "lm_head" not in n}))
    (lm_ckpt, g_ckpt), (lm_frozen, g_frozen) = grads
    assert lm_frozen == pytest.approx(lm_ckpt, rel=1e-6)
    assert g_ckpt.keys() == g_frozen.keys() and len(g_ckpt) > 10
    for name, g in g_ckpt.items():
        torch.testing.assert_close(g_frozen[name], g, rtol=1e-5, atol=1e-7, msg=name)
