"""`llara-dist finetune`: data groups and cursor, the contrastive loss against a direct
computation, 2-rank cross-device negatives == 1 rank == plain PyTorch, and the command
itself (the loss falls; preempted and resumed == uninterrupted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import metrics, refused

from llara_dist.cli import INTERRUPTED_EXIT
from llara_dist.config import (
    ConfigError,
    FinetuneConfig,
    FinetuneRunConfig,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
    load_config,
)
from llara_dist.retrieval.finetune_data import GroupLoader, read_examples
from llara_dist.train.distributed import batch_plan
from llara_dist.train.preempt import PREEMPT_AT_STEP_ENV, PREEMPT_SIGNALS_ENV, PREEMPTED_EXIT

TOY = "llara_toy_finetune.jsonl"
GROUP, QUERIES = 3, 8  # passages per query; queries per optimizer step
# adam_eps above fp32 noise on near-zero gradients (test_train_exact)
TRAIN = dict(global_batch=QUERIES, steps=1, lr=1e-3, warmup_steps=0, decay="constant", grad_clip=0.5,
             weight_decay=0.01, adam_eps=1e-4, lora_r=4, lora_dropout=0.0)


def ft_config(shared_data, **kw) -> FinetuneConfig:
    base = dict(data=str(shared_data / TOY), group_size=GROUP, query_max_len=16, passage_max_len=40)
    return FinetuneConfig(**{**base, **kw})


def make_loader(tokenizer_dir, cfg: FinetuneConfig, micro: int, world: int, rank: int, preset_name="released"):
    from llara_dist.prompts import add_special_tokens, prompt_tokens, resolve_preset
    from llara_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    preset = resolve_preset(ObjectiveConfig(preset=preset_name))
    add_special_tokens(tok, preset)
    plan = batch_plan(QUERIES, micro, world)
    loader = GroupLoader(read_examples(cfg.data, cfg.group_size), tok, prompt_tokens(tok, preset), cfg, plan,
                         rank, tok.pad_token_id)
    return loader, tok, preset


# --- data ------------------------------------------------------------------------------


def test_bad_lines_name_file_and_line(tmp_path):
    good = {"query": "q", "pos": ["p"], "neg": ["n"]}
    cases = [("{not json", "not valid JSON"), (json.dumps({**good, "query": ""}), "'query'"),
             (json.dumps({**good, "pos": []}), "'pos' is empty"), (json.dumps({**good, "neg": ["", "x"]}), "'neg'"),
             (json.dumps({**good, "neg": []}), "'neg' is empty but group_size 2")]
    for bad, reason in cases:
        path = tmp_path / "ft.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"ft.jsonl:3: .*{reason}"):
            read_examples(path, group_size=2)
    assert len(read_examples(path, group_size=1)) == 2  # no negatives needed for a group of 1
    # one LoRA configuration, train.lora_*, with the released recipe's defaults for fine-tuning
    ft = load_config(FinetuneRunConfig, None, ["finetune.data=x", "train.lr=3e-4"])
    assert (ft.train.lora_r, ft.train.lora_dropout, ft.train.lr) == (64, 0.1, 3e-4)
    assert load_config(FinetuneRunConfig, None, ["finetune.data=x", "train.lora_r=8"]).train.lora_r == 8
    with pytest.raises(ConfigError, match="finetune.lora_r: unknown key"):
        load_config(FinetuneRunConfig, None, ["finetune.data=x", "finetune.lora_r=8"])
    with pytest.raises(ConfigError, match="train.zero3_layer_gather: fine-tuning runs each decoder layer twice"):
        load_config(FinetuneRunConfig, None, ["finetune.data=x", "train.zero3_layer_gather=true"])
    from llara_dist.retrieval.finetune import engine_train_config

    assert engine_train_config(load_config(FinetuneRunConfig, None, ["finetune.data=x"])).zero3_layer_gather is False


def test_groups_are_deterministic_split_by_rank_and_resume(shared_data, tokenizer_dir):
    cfg = ft_config(shared_data, group_size=40)  # the toy examples have 30 negatives: drawn with replacement
    one, _, _ = make_loader(tokenizer_dir, cfg, micro=4, world=1, rank=0)
    ex, passages = one.group(3)
    assert passages[0] in ex.pos and len(passages) == 40 and set(passages[1:]) <= set(ex.neg)
    assert len(set(passages[1:])) < 39  # repeats, since 39 > 30

    first = [next(it) for it in [iter(one)] for _ in range(6)]  # 3 steps of 2 micro-batches of 4
    keys = [k for b in first for k in b.keys]
    n = len(one.examples)
    assert sorted(keys[:n]) == sorted(e.key for e in one.examples)  # an epoch is a permutation
    assert keys[n:2 * n] != keys[:n]  # the next epoch has its own order
    assert first[0].passages.num_docs == 4 * 40 and first[0].queries.num_docs == 4

    # two ranks: micro-step a of both ranks is the 1-rank micro-batch a, split in rank order
    ranks = [iter(make_loader(tokenizer_dir, cfg, micro=2, world=2, rank=r)[0]) for r in range(2)]
    for b in first[:2]:
        parts = [next(it) for it in ranks]
        assert parts[0].keys + parts[1].keys == b.keys
        assert torch.equal(torch.cat([p.passages.input_ids[:, :8] for p in parts]), b.passages.input_ids[:, :8])

    # a fresh loader from the saved cursor continues with the same batches
    again, _, _ = make_loader(tokenizer_dir, cfg, micro=4, world=1, rank=0)
    it = iter(again)
    for _ in range(4):
        next(it)
    state = again.state_dict()
    resumed, _, _ = make_loader(tokenizer_dir, cfg, micro=4, world=1, rank=0)
    resumed.load_state_dict(state)
    for want, got in zip(first[4:], iter(resumed)):
        assert got.keys == want.keys and torch.equal(got.passages.input_ids, want.passages.input_ids)
    with pytest.raises(ValueError, match="seed"):
        make_loader(tokenizer_dir, ft_config(shared_data, seed=1), 4, 1, 0)[0].load_state_dict(state)


# --- the loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset_name", ["paper", "released"])
def test_loss_equals_direct_computation(shared_data, tokenizer_dir, tiny_llama_dir, preset_name):
    """Training-time embeddings and loss == inference embeddings (embed.encode) + a hand-written softmax."""
    from llara_dist.model.decoder import load_model
    from llara_dist.model.embed import embed_batch as embed
    from llara_dist.model.embed import encode
    from llara_dist.retrieval.finetune import contrastive_sums

    cfg = ft_config(shared_data)
    loader, tok, preset = make_loader(tokenizer_dir, cfg, micro=4, world=1, rank=0, preset_name=preset_name)
    model = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="fp32"), tok, preset, device="cpu")
    batch = next(iter(loader))
    groups = [loader.group(n) for n in range(4)]
    assert [ex.key for ex, _ in groups] == batch.keys

    with torch.no_grad():
        q = embed(model, batch.queries, "query", preset)
        p = embed(model, batch.passages, "passage", preset)
        loss, hits = contrastive_sums(q, p, cfg.temperature, GROUP, 0)
        q_ref = encode(model, tok, preset, [ex.query for ex, _ in groups], "query", max_text_tokens=16)
        p_ref = encode(model, tok, preset, [t for _, ps in groups for t in ps], "passage", max_text_tokens=40)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-5)
    want, want_hits = 0.0, 0
    for i in range(4):
        scores = [float(q_ref[i] @ p_ref[j]) / cfg.temperature for j in range(4 * GROUP)]
        top = max(scores)
        log_z = top + torch.tensor([s - top for s in scores], dtype=torch.float64).exp().sum().log().item()
        want += log_z - scores[i * GROUP]
        want_hits += int(max(range(len(scores)), key=scores.__getitem__) == i * GROUP)
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert hits == want_hits
    assert float(loss) > 1.0  # an untrained model: the check is not vacuous


# --- cross-device negatives: 2 ranks == 1 rank == plain PyTorch ---------------------------------


def _worker(rank, world, port, paths, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from llara_dist.model.decoder import load_model
    from llara_dist.retrieval.finetune import engine_train_config, finetune_step
    from llara_dist.train.distributed import dist_env, init_distributed
    from llara_dist.train.engine import build_engine, deepspeed_config, full_state_dict, zero3_loading

    shared_data, tokenizer_dir, tiny_llama_dir = paths
    init_distributed(dist_env(), timeout_s=60)
    micro = 2  # x accum 2 x 2 ranks: the step's 8 queries in 2 micro-steps of 4 (as the 1-rank reference)
    cfg = FinetuneRunConfig(train=TrainConfig(micro_batch=micro, **TRAIN), finetune=ft_config(shared_data))
    loader, tok, preset = make_loader(tokenizer_dir, cfg.finetune, micro, world, rank)
    plan = loader.plan
    ds = deepspeed_config(cfg.train, plan, torch.float32)
    torch.manual_seed(0)  # the resized embedding rows are drawn at random
    with zero3_loading(ds):
        model = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="fp32"), tok, preset, device="cpu")
    torch.manual_seed(1)  # the LoRA adapters' initial values, the same on every rank
    engine = build_engine(model, engine_train_config(cfg), ds)
    before = full_state_dict(engine.module)
    it = iter(loader)
    result = finetune_step(engine, [next(it) for _ in range(plan.grad_accum)], preset, world,
                           cfg.finetune.temperature, cross_device=True)
    after = full_state_dict(engine.module)
    if rank == 0:
        torch.save({"before": before, "after": after, "result": result,
                    "grad_norm": float(engine.get_global_grad_norm())}, out)


def reference(paths, init: dict):
    """One process, plain PyTorch: each 4-query slice scored against its 12 passages, / 8, backward, clip, AdamW."""
    from llara_dist.model.decoder import load_model
    from llara_dist.model.embed import embed_batch as embed
    from llara_dist.retrieval.finetune import contrastive_sums, engine_train_config
    from llara_dist.train.engine import apply_lora

    shared_data, tokenizer_dir, tiny_llama_dir = paths
    cfg = FinetuneRunConfig(train=TrainConfig(micro_batch=4, **TRAIN), finetune=ft_config(shared_data))
    loader, tok, preset = make_loader(tokenizer_dir, cfg.finetune, 4, 1, 0)
    model = apply_lora(load_model(ModelConfig(path=str(tiny_llama_dir), dtype="fp32"), tok, preset, device="cpu"),
                       engine_train_config(cfg))
    model.load_state_dict(init)
    it = iter(loader)
    loss = 0.0
    for b in (next(it), next(it)):
        q, p = embed(model, b.queries, "query", preset), embed(model, b.passages, "passage", preset)
        loss = loss + contrastive_sums(q, p, cfg.finetune.temperature, GROUP, 0)[0] / QUERIES
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = float(torch.nn.utils.clip_grad_norm_(trainable, TRAIN["grad_clip"]))
    torch.optim.AdamW(trainable, lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"], eps=TRAIN["adam_eps"]).step()
    return float(loss), norm, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_cross_device_two_ranks_equal_one_rank(tmp_path, shared_data, tokenizer_dir, tiny_llama_dir, run_ranks):
    """2 ranks x 2 queries x accum 2 (cross-device negatives) == the 1-rank computation over the same groups."""
    paths = (shared_data, tokenizer_dir, tiny_llama_dir)
    two = run_ranks(_worker, 2, paths, tmp_path / "two.pt")
    loss, norm, weights = reference(paths, two["before"])
    assert two["result"]["loss"] == pytest.approx(loss, rel=1e-6)
    assert two["grad_norm"] == pytest.approx(norm, rel=1e-5)  # a factor of world or accum would show here
    assert norm > TRAIN["grad_clip"]  # clipping is active: the gradient's scale matters for the update
    moved = 0
    for name, ref in weights.items():
        torch.testing.assert_close(two["after"][name], ref, rtol=0, atol=1e-7, msg=f"2 ranks vs 1 rank: {name}")
        moved += int("lora_B" in name and not torch.equal(ref, two["before"][name]))
    assert moved == 2 * 7  # every adapter B matrix (2 layers x 7 projections) learned


# --- the command ------------------------------------------------------------------------------


def launch(run_dir: Path, shared_data, tokenizer_dir, tiny_llama_dir, *args,
           env: dict | None = None) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    # one rank: MASTER_PORT=0, its store binds any free port itself
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "llara_dist", "finetune", f"run_dir={run_dir}", f"model.path={tiny_llama_dir}",
           "model.dtype=fp32", f"train.tokenizer={tokenizer_dir}", f"finetune.data={shared_data / TOY}",
           "train.global_batch=4", "train.micro_batch=2", "train.steps=12", "train.lr=1e-3", "train.warmup_steps=2",
           "train.ckpt_every=100", "finetune.group_size=4", "finetune.passage_max_len=64",
           "train.collective_timeout_s=30", *args]
    return subprocess.Popen(cmd, env=env, stdout=open(run_dir / "log.txt", "a"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_command_lowers_loss_and_resumes_exactly(tmp_path, shared_data, tokenizer_dir, tiny_llama_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    args = (tmp_path, shared_data, tokenizer_dir, tiny_llama_dir)
    ref = tmp_path / "ref"
    assert launch(ref, *args[1:]).wait(timeout=240) == 0, (ref / "log.txt").read_text()
    losses = [m["loss"] for m in metrics(ref)]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4  # 12 steps x 4 queries: ~5 passes over the 10 examples

    run = tmp_path / "run"
    stop_at = 5  # no checkpoint before (ckpt_every 100): the save of the first Ctrl-C is the one resumed
    proc = launch(run, *args[1:], env={PREEMPT_AT_STEP_ENV: str(stop_at), PREEMPT_SIGNALS_ENV: "SIGINT"})
    assert proc.wait(timeout=240) == PREEMPTED_EXIT, (run / "log.txt").read_text()
    assert [m["step"] for m in metrics(run)] == list(range(1, stop_at + 1))
    log = (run / "log.txt").read_text()
    assert f"Ctrl-C: saved step {stop_at}; the same command resumes from it" in log and "Traceback" not in log
    # Ctrl-C twice: out at once, nothing saved; the step-5 checkpoint stays the latest
    proc = launch(run, *args[1:], env={PREEMPT_AT_STEP_ENV: "7", PREEMPT_SIGNALS_ENV: "SIGINT,SIGINT"})
    assert proc.wait(timeout=240) == INTERRUPTED_EXIT, (run / "log.txt").read_text()
    log = (run / "log.txt").read_text()
    assert log.endswith("llara-dist finetune: interrupted\n") and "Traceback" not in log
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{stop_at:08d}"
    assert launch(run, *args[1:]).wait(timeout=240) == 0, (run / "log.txt").read_text()
    assert f"step{stop_at:08d} at step {stop_at}" in (run / "log.txt").read_text()
    assert [m["loss"] for m in metrics(run)] == losses  # dropout and the data cursor resumed exactly

    def weights(d):
        return get_fp32_state_dict_from_zero_checkpoint(str(d / "checkpoints"), tag="step00000012")

    w_run, w_ref = weights(run), weights(ref)
    assert w_run.keys() == w_ref.keys() and any("lora_B" in k for k in w_ref)
    assert all(torch.equal(w_run[k], w_ref[k]) for k in w_ref)
    check_export(ref, w_ref, tmp_path)


def check_export(run_dir, weights, tmp_path):
    """A LoRA fine-tuning run exports merged (plain transformers loads it) or as a peft adapter."""
    from transformers import AutoModelForCausalLM

    from llara_dist.retrieval.export import export_run, load_run_config

    merged = AutoModelForCausalLM.from_pretrained(export_run(run_dir, tmp_path / "merged", dtype="fp32"))
    lora = load_run_config(run_dir).train
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = weights[f"{stem}.lora_A.default.weight"], weights[f"{stem}.lora_B.default.weight"]
    want = weights[f"{stem}.base_layer.weight"] + (b @ a) * (lora.lora_alpha / lora.lora_r)
    torch.testing.assert_close(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"], want)
    adapter = export_run(run_dir, tmp_path / "adapter", dtype="fp32", lora="adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "llara.json").is_file()



def test_command_refuses_bad_data_before_starting(tmp_path, tokenizer_dir, tiny_llama_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n{"query": "q", "pos": "p"}\n')
    argv = ["finetune", f"run_dir={tmp_path / 'run'}", f"model.path={tiny_llama_dir}", f"train.tokenizer={tokenizer_dir}",
            f"finetune.data={bad}"]
    assert f"llara-dist finetune: {bad}:2: 'pos' must be a list" in refused(argv, capsys)
    assert not (tmp_path / "run").exists()

    model = tmp_path / "exported"  # a model folder adapted with the paper preset (llara.json as export writes it)
    model.mkdir()
    (model / "llara.json").write_text(json.dumps({"objective": {"preset": "paper"}}))
    argv[-1] = f"finetune.data={bad.with_name('good.jsonl')}"
    bad.with_name("good.jsonl").write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
    argv.append(f"model.path={model}")
    assert "set objective.preset=paper" in refused(argv, capsys)  # the default objective.preset is released
