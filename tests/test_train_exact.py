"""Exact loss averaging: 2 ranks x grad-accum 2 == 1 rank x grad-accum 4 == plain PyTorch.

The same 8 packed rows (documents spread unevenly over rows, so micro-batches and ranks
hold different numbers of documents) go through one optimizer step of the real DeepSpeed
ZeRO-3 engine (gloo, fp32, CPU) with 1 and with 2 ranks, and through a plain PyTorch
reference: the loss of all documents at once, backward, clip, torch AdamW. Adam hides a
constant factor on the gradient, so the gradient norm is compared as well as the weights.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from llara_dist.config import ModelConfig, ObjectiveConfig, TrainConfig
from llara_dist.data.batch import build_batch
from llara_dist.data.shards import Doc

pytestmark = pytest.mark.slow

ROWS, MICRO, SEQ = 8, 2, 256
TRAIN = dict(global_batch=ROWS, micro_batch=MICRO, steps=1, lr=1e-3, warmup_steps=0, decay="constant",
             grad_clip=0.5, weight_decay=0.01, adam_eps=1e-4)
# eps well above the rounding noise of the gradients: Adam's first step divides by |g| + eps,
# which would blow fp32 summation-order noise on near-zero gradients up to a full lr step


def setup(tokenizer_dir, tiny_llama_dir, wiki_docs):
    """Tokenizer, preset, loaded model (plain) and the 8 rows as micro-batches."""
    from llara_dist.model.decoder import load_model
    from llara_dist.prompts import prompt_tokens, resolve_preset
    from llara_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    preset = resolve_preset(ObjectiveConfig(preset="released"))
    model = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="fp32"), tok, preset, device="cpu")
    prompt = prompt_tokens(tok, preset)
    # rows of 1 to 4 documents of 10..90 tokens; some without a next chunk
    rng = np.random.default_rng(0)
    rows, i = [], 0
    for r in range(ROWS):
        row, used = [], 0
        for _ in range(1 + r % 4):
            key, ids, nxt, _ = wiki_docs[i]
            n = int(rng.integers(10, 90))
            if used + n + prompt.overhead > SEQ:
                break
            row.append(Doc(key, np.asarray(ids[:n], np.int32),
                           None if nxt is None or i % 3 == 0 else np.unique(np.asarray(nxt, np.int32))))
            used += n + prompt.overhead
            i += 1
        rows.append(row)
    drop = tuple(sorted(set(tok.all_special_ids)))
    micro = [build_batch(rows[j:j + MICRO], prompt, SEQ, tok.pad_token_id, drop) for j in range(0, ROWS, MICRO)]
    return model, preset, micro


def _worker(rank, world, port, paths, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from llara_dist.model import objective
    from llara_dist.train.distributed import batch_plan, dist_env, init_distributed
    from llara_dist.train.engine import build_engine, deepspeed_config, full_state_dict, zero3_loading
    from llara_dist.train.pretrain import train_step

    init_distributed(dist_env(), timeout_s=60)
    train = TrainConfig(**TRAIN)
    plan = batch_plan(ROWS, MICRO, world)
    ds = deepspeed_config(train, plan, torch.float32)
    torch.manual_seed(0)
    with zero3_loading(ds):
        model, preset, micro = setup(*paths)
    engine = build_engine(model, train, ds)
    before = full_state_dict(engine.module)
    mine = micro[rank * plan.grad_accum:(rank + 1) * plan.grad_accum]
    result = train_step(engine, mine, objective.Objective(preset), world)
    after = full_state_dict(engine.module)
    if rank == 0:
        torch.save({"before": before, "after": after, "result": result,
                    "grad_norm": float(engine.get_global_grad_norm())}, out)


def reference(paths, init: dict):
    """Plain PyTorch: mean over all documents of the 8 rows, one backward, clip, AdamW."""
    from llara_dist.model import objective

    model, preset, micro = setup(*paths)
    model.load_state_dict(init)
    counts = {t: sum(objective.batch_counts(b, preset)[t] for b in micro) for t in objective.TERMS}
    loss = sum(objective.combine(objective.loss_sums(model, b, preset), counts, preset)[0] for b in micro)
    loss.backward()
    loss = loss.detach()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"]))
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"],
                            eps=TRAIN["adam_eps"])
    opt.step()
    return float(loss), norm, {n: p.detach() for n, p in model.named_parameters()}, counts


def test_two_ranks_equal_one_rank_and_reference(tmp_path, tokenizer_dir, tiny_llama_dir, wiki_docs, run_ranks):
    paths = (tokenizer_dir, tiny_llama_dir, wiki_docs)
    one = run_ranks(_worker, 1, paths, tmp_path / "one.pt")
    two = run_ranks(_worker, 2, paths, tmp_path / "two.pt")
    for name, w in one["before"].items():
        assert torch.equal(w, two["before"][name]), f"{name}: initial weights differ between world sizes"

    loss, norm, weights, counts = reference(paths, one["before"])
    _, _, micro = setup(*paths)
    per_rank_docs = [sum(b.num_docs for b in micro[r * 2:(r + 1) * 2]) for r in range(2)]
    assert per_rank_docs[0] != per_rank_docs[1], "the test needs an uneven spread of documents over ranks"
    for run in (one, two):
        assert run["result"]["counts"] == counts
        assert run["result"]["loss"] == pytest.approx(loss, rel=1e-6)
        assert run["grad_norm"] == pytest.approx(norm, rel=1e-5)  # a factor of 2 (world, accum) would show here
        assert norm > TRAIN["grad_clip"]  # clipping is active, so the norm's scale matters for the update
    moved = 0
    for name, ref in weights.items():
        start = one["before"][name]
        torch.testing.assert_close(one["after"][name], ref, rtol=0, atol=1e-7, msg=f"1 rank vs reference: {name}")
        torch.testing.assert_close(two["after"][name], one["after"][name], rtol=0, atol=1e-7,
                                   msg=f"2 ranks vs 1 rank: {name}")
        moved += int(not torch.equal(ref, start))
    assert moved == len(weights)  # every weight took part in the step
