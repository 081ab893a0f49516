"""Packed inference against padded batches, same texts, same model, same run.

    python bench/encode_bench.py --tokenizer ../shared/data/llama2-tokenizer --corpus ../shared/data/wikitext2_valid.txt

Three ways to embed the same texts, in turn, for --rounds rounds:
  packed          several texts a row (embed.encode_packed), --batch rows a forward
  sorted-padded   one text a row, batches of --batch texts of similar length, padded to the
                  batch's longest (the released code's way: FlagEmbedding sorts by length)
  padded          one text a row, batches of --batch texts in input order, padded
Two workloads from the corpus's words: MS MARCO-like passages (60-80 words) and BEIR-like mixed
lengths (10-400 words, cut at --max-tokens). The model is a random LLaMA of --hidden/--layers
(on CPU a small one; on a GPU pass 4096/4 for 7B-shaped layers). Prints one JSON line per
workload and way: docs/s and tokens/s (median of the rounds, with min and max), peak GPU memory,
and for the padded ways the share of their slots that padding takes (the most packing can save).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def workloads(corpus: str, n: int, seed: int = 0) -> dict[str, list[str]]:
    words = open(corpus, encoding="utf-8").read().split()
    rng = np.random.default_rng(seed)

    def texts(lo: int, hi: int) -> list[str]:
        out = []
        for length in rng.integers(lo, hi + 1, n):
            start = int(rng.integers(0, len(words) - length))
            out.append(" ".join(words[start:start + length]))
        return out

    return {"msmarco-like": texts(60, 80), "beir-like": texts(10, 400)}


def padding_share(lengths: list[int], overhead: int, batch: int, by_length: bool) -> float:
    """The share of the slots that padding takes when texts of these token counts go one a row, `batch`
    rows a batch padded to the longest (sorted by length first, or in input order): the most that
    packing can save against that way (as encode_texts batches, up to sorting by characters)."""
    rows = [n + overhead for n in (sorted(lengths) if by_length else lengths)]
    slots = sum(len(rows[i:i + batch]) * max(rows[i:i + batch]) for i in range(0, len(rows), batch))
    return 1 - sum(rows) / slots


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--corpus", required=True, help="a text file whose words make the passages")
    p.add_argument("--docs", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--preset", default="released")
    p.add_argument("--attn", default="sdpa")
    args = p.parse_args()

    from llara_dist.config import ModelConfig, ObjectiveConfig
    from llara_dist.model.decoder import default_device, load_model
    from llara_dist.model.embed import encode, encode_packed
    from llara_dist.model.tiny import tiny_config
    from llara_dist.prompts import prompt_tokens, resolve_preset
    from llara_dist.retrieval.encode import encode_texts
    from llara_dist.tokenizer import load_tokenizer

    device = default_device()
    tok = load_tokenizer(args.tokenizer)
    preset = resolve_preset(ObjectiveConfig(preset=args.preset))
    config = tiny_config("llama", len(tok), hidden=args.hidden, layers=args.layers, heads=max(args.hidden // 64, 2),
                         kv_heads=max(args.hidden // 64, 2), intermediate=args.hidden * 3)
    path = f"/tmp/encode_bench_{args.hidden}x{args.layers}.json"
    config.to_json_file(path)
    torch.manual_seed(0)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    model = load_model(ModelConfig(path=path, attn=args.attn, dtype=dtype, fused_ops=False), tok, preset, device)
    model = model.to(device).eval()
    ways = {
        "packed": lambda t: encode_packed(model, tok, preset, t, "passage", args.max_tokens, rows_per_batch=args.batch),
        "sorted-padded": lambda t: torch.from_numpy(encode_texts(model, tok, preset, t, "passage", args.batch,
                                                                 args.max_tokens, packed=False)),
        "padded": lambda t: encode(model, tok, preset, t, "passage", args.max_tokens, batch_size=args.batch),
    }
    for name, texts in workloads(args.corpus, args.docs).items():
        lengths = [min(len(x), args.max_tokens) for x in tok(texts, add_special_tokens=False)["input_ids"]]
        tokens = sum(lengths)
        overhead = prompt_tokens(tok, preset).overhead
        padding = {"sorted-padded": padding_share(lengths, overhead, args.batch, by_length=True),
                   "padded": padding_share(lengths, overhead, args.batch, by_length=False)}
        seconds = {way: [] for way in ways}
        vectors = {}
        peak = {}
        for _ in range(args.rounds):
            for way, run in ways.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                vectors[way] = run(texts).float().cpu()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peak[way] = torch.cuda.max_memory_allocated() / 2 ** 30
                seconds[way].append(time.perf_counter() - start)
        gap = max(float((vectors[w] - vectors["padded"]).abs().max()) for w in ways)
        for way, times in seconds.items():
            med = statistics.median(times)
            print(json.dumps({
                "workload": name, "way": way, "docs": len(texts), "text_tokens": tokens,
                "docs_per_s": round(len(texts) / med, 1), "docs_per_s_min": round(len(texts) / max(times), 1),
                "docs_per_s_max": round(len(texts) / min(times), 1), "tokens_per_s": round(tokens / med),
                "speedup_vs_sorted_padded": round(statistics.median(seconds["sorted-padded"]) / med, 2),
                "padding_share": round(padding[way], 3) if way in padding else None,
                "peak_gib": round(peak[way], 2) if way in peak else None, "max_vector_gap": gap,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "model": f"llama hidden {args.hidden} x {args.layers} layers", "rounds": args.rounds}), flush=True)


if __name__ == "__main__":
    main()
