"""GradCache (finetune.grad_cache_chunk): the loader's sub-batches hold the micro-batch's texts, and one
fine-tuning step through DeepSpeed with sub-batches of 2 texts equals the plain full-batch step.

The DeepSpeed test runs, in one launch of 1 or 2 gloo ranks, several engines: ZeRO-3 with LoRA
(dropout 0.1) and with all weights trained, ZeRO-2 with LoRA, over 2 micro-batches (gradient
accumulation) with cross-device negatives; with 2 ranks also ranks holding unequal numbers of
texts (padded sub-batches). Each is compared with one plain-PyTorch process that computes the
whole loss in one graph and back-propagates it once. Dropout draws from each rank's RNG
stream; the reference draws the same masks by embedding the same sub-batches in the same order.
Last, the command with GradCache (LoRA dropout 0.1) preempted and resumed equals the uninterrupted run.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import metrics
from test_finetune import GROUP, QUERIES, TRAIN, ft_config, launch, make_loader

from llara_dist.config import ConfigError, FinetuneRunConfig, ModelConfig, TrainConfig, config_help, load_config
from llara_dist.train.preempt import PREEMPT_AT_STEP_ENV, PREEMPT_SIGNALS_ENV, PREEMPTED_EXIT

CHUNK = 2  # texts per sub-batch: 2 queries are 1 sub-batch, their 6 passages 3
DROPOUT_SEED = 7  # the RNG state at the start of the step, on every rank
CASES = {  # name: (ZeRO stage, LoRA rank (0: all weights), LoRA dropout)
    "zero3-lora": (3, 4, 0.1),
    "zero3-full": (3, 0, 0.0),  # no LoRA, no dropout layer: the model itself has none
    "zero2-lora": (2, 4, 0.1),
}
UNEQUAL = [range(0, 3), range(3, 4)]  # 2 ranks: examples per rank, 7 and 3 sub-batches


def test_sub_batches_hold_the_micro_batch(shared_data, tokenizer_dir):
    whole, _, _ = make_loader(tokenizer_dir, ft_config(shared_data), micro=4, world=1, rank=0)
    cut, _, _ = make_loader(tokenizer_dir, ft_config(shared_data, grad_cache_chunk=3), micro=4, world=1, rank=0)
    want, got = next(iter(whole)), next(iter(cut))
    assert not want.query_chunks and not want.passage_chunks
    assert got.queries is None and got.passages is None  # laid out as sub-batches only
    assert got.keys == want.keys and (got.num_queries, got.num_passages) == (want.num_queries, want.num_passages)
    for full, chunks in ((want.queries, got.query_chunks), (want.passages, got.passage_chunks)):
        sizes = [c.num_docs for c in chunks]
        assert sum(sizes) == full.num_docs and set(sizes[:-1]) <= {3} and 0 < sizes[-1] <= 3
        row = 0
        for c in chunks:
            L = c.input_ids.shape[1]
            assert (c.segment[:, -1] != -1).any()  # as long as its longest text, no longer
            assert torch.equal(c.input_ids, full.input_ids[row:row + c.rows, :L])
            assert (full.segment[row:row + c.rows, L:] == -1).all()  # what it left out is padding
            row += c.rows
        assert row == full.rows

    assert "finetune.grad_cache_chunk (int, default 0)" in config_help(FinetuneRunConfig)  # finetune --help
    with pytest.raises(ConfigError, match="grad_cache_chunk: -1 must be >= 0"):
        load_config(FinetuneRunConfig, None, ["finetune.data=x", "finetune.grad_cache_chunk=-1"])


# --- one step through DeepSpeed == the plain full-batch step ---------------------------------------


def case_config(shared_data, name: str, micro: int) -> FinetuneRunConfig:
    stage, lora_r, dropout = CASES[name]
    train = TrainConfig(micro_batch=micro, **{**TRAIN, "zero_stage": stage, "lora_r": lora_r, "lora_dropout": dropout})
    return FinetuneRunConfig(train=train, finetune=ft_config(shared_data, grad_cache_chunk=CHUNK))


def _worker(rank, world, port, paths, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from llara_dist.model.decoder import load_model
    from llara_dist.retrieval.finetune import contrastive_sums, engine_train_config, finetune_step, grad_cache_backward
    from llara_dist.train.distributed import dist_env, init_distributed
    from llara_dist.train.engine import build_engine, deepspeed_config, full_state_dict, zero3_loading

    shared_data, tokenizer_dir, tiny_llama_dir = paths
    init_distributed(dist_env(), timeout_s=60)
    micro = QUERIES // 2 // world  # 2 micro-batches a step
    results = {}
    for name in [*CASES, "unequal"] if world == 2 else CASES:
        cfg = case_config(shared_data, "zero3-lora" if name == "unequal" else name, micro)
        loader, tok, preset = make_loader(tokenizer_dir, cfg.finetune, micro, world, rank)
        ds = deepspeed_config(cfg.train, loader.plan, torch.float32)
        torch.manual_seed(0)  # the resized embedding rows are drawn at random
        with zero3_loading(ds):
            model = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="fp32"), tok, preset, device="cpu")
        torch.manual_seed(1)  # the LoRA adapters' initial values, the same on every rank
        engine = build_engine(model, engine_train_config(cfg), ds)
        dropouts = [m for m in engine.module.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        assert all(m.training for m in dropouts) and len(dropouts) == (2 * 7 if cfg.train.lora_dropout else 0)
        before = full_state_dict(engine.module)
        torch.manual_seed(DROPOUT_SEED)
        if name == "unequal":  # one micro-batch, local negatives, ranks with 3 and 1 queries
            b = loader.batch(UNEQUAL[rank])
            chunks = [("query", c) for c in b.query_chunks] + [("passage", c) for c in b.passage_chunks]
            n = len(b.query_chunks)

            def local_loss(e, n=n):
                ce, hit = contrastive_sums(torch.cat(e[:n]), torch.cat(e[n:]), cfg.finetune.temperature, GROUP, 0)
                return ce / UNEQUAL[-1].stop, hit

            loss = grad_cache_backward(engine, preset, chunks, local_loss, scale=world, boundary=True)[0]
            engine.step()
            torch.distributed.all_reduce(loss)  # each rank's share of the 4 queries' mean
            result = {"loss": float(loss)}
        else:
            it = iter(loader)
            result = finetune_step(engine, [next(it) for _ in range(loader.plan.grad_accum)], preset, world,
                                   cfg.finetune.temperature, cross_device=True)
        results[name] = {"before": before, "after": full_state_dict(engine.module), "result": result,
                         "grad_norm": float(engine.get_global_grad_norm())}
    if rank == 0:
        torch.save(results, out)


def reference(paths, name: str, world: int, init: dict):
    """One process, plain PyTorch: every rank's sub-batches embedded in that rank's order from its RNG
    state, the whole step's loss in one graph, one backward, clip, AdamW."""
    from llara_dist.model.decoder import load_model
    from llara_dist.model.embed import embed_batch
    from llara_dist.retrieval.finetune import contrastive_sums, engine_train_config
    from llara_dist.train.engine import apply_lora

    shared_data, tokenizer_dir, tiny_llama_dir = paths
    micro = QUERIES // 2 // world
    cfg = case_config(shared_data, "zero3-lora" if name == "unequal" else name, micro)
    loaders = [make_loader(tokenizer_dir, cfg.finetune, micro, world, r) for r in range(world)]
    tok, preset = loaders[0][1:]
    model = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="fp32"), tok, preset, device="cpu")
    if cfg.train.lora_r:
        model = apply_lora(model, engine_train_config(cfg))
    model.load_state_dict(init)
    model.train()
    if name == "unequal":
        micro_batches = [[loader.batch(UNEQUAL[r])] for r, (loader, _, _) in enumerate(loaders)]
    else:
        micro_batches = [[b for it in [iter(loader)] for b in (next(it), next(it))] for loader, _, _ in loaders]

    embedded = []  # [rank][micro-batch] = (queries [M, H], passages [M x G, H])
    most = max(len(b.query_chunks) + len(b.passage_chunks) for rank in micro_batches for b in rank)
    for rank in micro_batches:
        torch.manual_seed(DROPOUT_SEED)
        embedded.append([])
        for b in rank:
            q = torch.cat([embed_batch(model, c, "query", preset) for c in b.query_chunks])
            p = torch.cat([embed_batch(model, c, "passage", preset) for c in b.passage_chunks])
            embedded[-1].append((q, p))
            with torch.no_grad():  # the padding sub-batches draw from the RNG too
                for _ in range(most - len(b.query_chunks) - len(b.passage_chunks)):
                    embed_batch(model, b.query_chunks[0], "query", preset)
    loss = 0.0
    if name == "unequal":  # local negatives, over the 4 queries of both ranks
        for (q, p), in embedded:
            loss = loss + contrastive_sums(q, p, cfg.finetune.temperature, GROUP, 0)[0] / UNEQUAL[-1].stop
    else:  # at each micro-step, every rank's queries against all ranks' passages
        for a in range(2):
            passages = torch.cat([embedded[r][a][1] for r in range(world)])
            for r in range(world):
                q = embedded[r][a][0]
                ce = contrastive_sums(q, passages, cfg.finetune.temperature, GROUP, r * q.shape[0])[0]
                loss = loss + ce / QUERIES
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # what no loss reads (the LM head) has a zero gradient under ZeRO: weight decay moves it
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = float(torch.nn.utils.clip_grad_norm_(trainable, TRAIN["grad_clip"]))
    torch.optim.AdamW(trainable, lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"], eps=TRAIN["adam_eps"]).step()
    return float(loss), norm, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_grad_cache_step_equals_the_full_batch_step(tmp_path, shared_data, tokenizer_dir, tiny_llama_dir, run_ranks,
                                                    world):
    paths = (shared_data, tokenizer_dir, tiny_llama_dir)
    runs = run_ranks(_worker, world, paths, tmp_path / "run.pt")
    assert set(runs) == set(CASES) | ({"unequal"} if world == 2 else set())
    for name, run in runs.items():
        loss, norm, weights = reference(paths, name, world, run["before"])
        assert run["result"]["loss"] == pytest.approx(loss, rel=1e-6), name
        assert run["grad_norm"] == pytest.approx(norm, rel=1e-5), name
        assert norm > TRAIN["grad_clip"]  # clipping is active: the gradient's scale matters for the update
        moved = 0
        for key, ref in weights.items():
            torch.testing.assert_close(run["after"][key], ref, rtol=0, atol=1e-6, msg=f"{name}: {key}")
            moved += int(not torch.equal(ref, run["before"][key]))
        assert moved >= 2 * 7, name  # at least every adapter B matrix, or every layer's projections, learned


@pytest.mark.slow
def test_command_with_grad_cache_resumes_exactly(tmp_path, shared_data, tokenizer_dir, tiny_llama_dir):
    """4 steps of 2 queries x group 4 in sub-batches of 3 texts, LoRA dropout 0.1 (the default): a run
    stopped after step 2 and restarted logs the uninterrupted run's losses and ends with its weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    paths = (shared_data, tokenizer_dir, tiny_llama_dir)
    grad_cache = ("finetune.grad_cache_chunk=3", "train.steps=4")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert launch(ref, *paths, *grad_cache).wait(timeout=240) == 0, (ref / "log.txt").read_text()
    assert "grad_cache_chunk: 3" in (ref / "config.yaml").read_text()
    stopped = launch(run, *paths, *grad_cache, env={PREEMPT_AT_STEP_ENV: "2", PREEMPT_SIGNALS_ENV: "SIGINT"})
    assert stopped.wait(timeout=240) == PREEMPTED_EXIT, (run / "log.txt").read_text()
    assert launch(run, *paths, *grad_cache).wait(timeout=240) == 0, (run / "log.txt").read_text()
    losses = [m["loss"] for m in metrics(ref)]
    assert len(losses) == 4 and [m["loss"] for m in metrics(run)] == losses

    def weights(d):
        return get_fp32_state_dict_from_zero_checkpoint(str(d / "checkpoints"), tag="step00000004")

    w_run, w_ref = weights(run), weights(ref)
    assert w_run.keys() == w_ref.keys() and any("lora_B" in k for k in w_ref)
    assert all(torch.equal(w_run[k], w_ref[k]) for k in w_ref)
