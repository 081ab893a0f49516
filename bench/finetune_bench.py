"""Fine-tuning step memory and time against the batch size, with and without GradCache (finetune.grad_cache_chunk).

    # CPU, tiny model, a few minutes on 2 cores
    DS_ACCELERATOR=cpu python bench/finetune_bench.py --queries 2 4 8 16 --chunks 0 8 --out /tmp/ft_bench
    # one GPU: a larger model and batch (bf16)
    python bench/finetune_bench.py --device cuda --hidden 2048 --layers 8 --queries 16 64 256 --chunks 0 64

Each (queries, chunk) runs in a fresh process: one micro-batch of Q queries, each with its group
of --group passages (the toy examples of ../shared/data, drawn as the trainer draws them),
through finetune.finetune_step on a real DeepSpeed engine (ZeRO-3, world 1, LoRA r 8 with
dropout 0.1) over a random LLaMA of --hidden/--layers with the LLaMA-2 tokenizer. One warm-up
step, then --rounds timed steps: min, median and max step time.

Memory: on CUDA torch.cuda.max_memory_allocated over the steps, less what was allocated before
them. On CPU the growth of the process's resident high-water mark (getrusage) from before the
first step; the process restarts itself with MALLOC_MMAP_THRESHOLD_=65536 so that glibc maps every
tensor apart and returns it when freed, and the high-water mark follows the live tensors. Both
include the first step's optimizer states (the same for every row: the LoRA weights'). With
GradCache the peak should stay flat as the batch grows; without it, it grows with the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> dict:
    """One configuration in this process: the engine, a warm-up step, args.rounds timed steps."""
    import torch

    from llara_dist.config import FinetuneConfig, FinetuneRunConfig, ModelConfig, ObjectiveConfig, TrainConfig
    from llara_dist.model.decoder import load_model
    from llara_dist.model.tiny import tiny_llama_config
    from llara_dist.prompts import add_special_tokens, prompt_tokens, resolve_preset
    from llara_dist.retrieval.finetune import engine_train_config, finetune_step
    from llara_dist.retrieval.finetune_data import GroupLoader, read_examples
    from llara_dist.tokenizer import load_tokenizer, pad_id
    from llara_dist.train.distributed import batch_plan, dist_env, init_distributed
    from llara_dist.train.engine import build_engine, deepspeed_config, zero3_loading

    queries = args.queries[0]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    init_distributed(dist_env(), timeout_s=120)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tok = load_tokenizer(args.tokenizer)
    preset = resolve_preset(ObjectiveConfig(preset="released"))
    base_vocab = len(tok)
    add_special_tokens(tok, preset)
    ft = FinetuneConfig(data=args.data, group_size=args.group, query_max_len=32, passage_max_len=args.passage_len,
                        grad_cache_chunk=args.chunk)
    train = TrainConfig(global_batch=queries, micro_batch=queries, steps=100, lr=1e-4, warmup_steps=0,
                        lora_r=8, lora_dropout=0.1)
    cfg = FinetuneRunConfig(train=train, finetune=ft)
    plan = batch_plan(queries, queries, 1)
    examples = read_examples(args.data, args.group)
    loader = GroupLoader(examples, tok, prompt_tokens(tok, preset), ft, plan, 0, pad_id(tok))
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        tiny_llama_config(base_vocab, hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64),
                          intermediate=args.hidden * 8 // 3).to_json_file(config)
        ds = deepspeed_config(train, plan, dtype)
        torch.manual_seed(0)
        with zero3_loading(ds):
            model = load_model(ModelConfig(path=str(config), dtype="fp32" if dtype == torch.float32 else "bf16"),
                               tok, preset, device=device)
    engine = build_engine(model, engine_train_config(cfg), ds)
    batches = iter(loader)

    def step() -> float:
        batch = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        finetune_step(engine, [batch], preset, 1, ft.temperature, cross_device=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    before = rss_peak_mib()
    step()  # warm-up: its peak counts (the CPU high-water mark cannot be reset), its time does not
    times = [step() for _ in range(args.rounds)]
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else rss_peak_mib() - before
    return {"queries": queries, "group": args.group, "texts": queries * (1 + args.group),
            "chunk": args.chunk, "peak_mib": round(peak, 1), "step_s_min": round(min(times), 3),
            "step_s_median": round(statistics.median(times), 3), "step_s_max": round(max(times), 3),
            "rounds": args.rounds, "device": device.type, "hidden": args.hidden, "layers": args.layers}


def table(rows: list[dict]) -> str:
    lines = ["| queries | texts | GradCache chunk | peak memory MiB | step s median (min-max) |",
             "|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['queries']} | {r['texts']} | {r['chunk'] or 'off'} | {r['peak_mib']:.0f} | "
                     f"{r['step_s_median']:.2f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, nargs="+", default=[2, 4, 8, 16], help="queries per step (batch sizes)")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 8], help="finetune.grad_cache_chunk values (0: off)")
    p.add_argument("--group", type=int, default=4, help="passages per query")
    p.add_argument("--passage-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timed steps after the warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=str(SHARED / "llama2-tokenizer"))
    p.add_argument("--data", default=str(SHARED / "llara_toy_finetune.jsonl"))
    p.add_argument("--out", help="folder for bench.json and bench.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # read by glibc at process start
            os.execve(sys.executable, [sys.executable, *sys.argv],
                      {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        print(json.dumps(child(args)))
        return
    shared = ["--group", str(args.group), "--passage-len", str(args.passage_len), "--hidden", str(args.hidden),
              "--layers", str(args.layers), "--rounds", str(args.rounds), "--device", args.device,
              "--tokenizer", args.tokenizer, "--data", args.data]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    rows = []
    for chunk in args.chunks:
        for queries in args.queries:
            cmd = [sys.executable, __file__, "--child", "--queries", str(queries), "--chunk", str(chunk), *shared]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "bench.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
