"""Attention microbenchmark of the joint-prompt kernel paths: one layer, forward + backward.

    python bench/attn_bench.py --device cuda                       # LLaMA-2-7B heads (32 x 128), bf16
    python bench/attn_bench.py --device cpu --rows 2 --seq-len 256 --heads 2 --head-dim 16 --iters 2

Rows of --seq-len tokens hold ~5 or ~1.5 documents, each laid out with a released-shaped
prompt (2 + 19 + 18 tokens, 8 embedding tokens). Paths: `sdpa` (dense mask), `flex`
(BlockMask), `varlen` (two sequences per document), `two-pass` (two document-causal
passes, no joint mask), and `causal`: plain causal flash attention over the same rows,
ignoring documents and the joint mask: the speed ceiling. `prep` is the time to build a
micro-batch's mask or layout (once per micro-batch, shared by all layers). Every path's
output is first checked against `sdpa` (max abs error printed). On CPU: forward only
(FlexAttention has no CPU backward) and varlen runs its layout through per-sequence SDPA.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from llara_dist.data.batch import SEG_NEXT, build_batch
from llara_dist.data.shards import Doc
from llara_dist.kernels import flex, sdpa, varlen
from llara_dist.model.decoder import pass_mask
from llara_dist.prompts import PromptTokens

PROMPT = PromptTokens(prefix=(5,) * 2, self_suffix=(6,) * 19, next_suffix=(7,) * 18, num_emb_tokens=8)


def rows_of_docs(rows: int, seq_len: int, docs_per_row: float, rng) -> list[list[Doc]]:
    """~docs_per_row documents per row (1.5: rows of 1 and 2 alternate), filling most of the row."""
    out = []
    for r in range(rows):
        n = int(docs_per_row) + (r % 2 if docs_per_row % 1 else 0)
        room = seq_len - n * PROMPT.overhead
        cuts = np.sort(rng.integers(0, int(room * 0.95), n - 1))
        lengths = np.diff(np.concatenate([[0], cuts, [int(room * 0.95)]])).clip(min=1)
        out.append([Doc(f"r{r}d{i}", np.full(int(x), 9, np.int32), None) for i, x in enumerate(lengths)])
    return out


def timed(fn, device, iters: int) -> float:
    """Median milliseconds of fn() after one warm-up (which also compiles)."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def paths(batch, device):
    """name -> (prepare() -> state, attend(q, k, v, state) -> out). The masks and layouts are built
    the way training builds them (modeling.pass_mask: the varlen layout from the batch's host copy;
    two-pass: both passes as one call over the rows twice)."""
    seg = batch.segment
    kernel = None if device.type == "cuda" else varlen.reference

    def prep(name, two_pass=False):
        return lambda: pass_mask(batch, name, two_pass).payload

    def two_pass(q, k, v, layout):
        a, b = varlen.attend(*(torch.cat([t, t]) for t in (q, k, v)), layout, None, kernel=kernel).chunk(2)
        return torch.where((seg == SEG_NEXT)[:, None, :, None], b, a)

    def causal(q, k, v, _):
        if device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return {
        "sdpa": (prep("sdpa"), lambda q, k, v, m: sdpa.attend(q, k, v, m, None)),
        "flex": (prep("flex"), lambda q, k, v, m: flex.attend(q, k, v, m, None)),
        "varlen": (prep("varlen"), lambda q, k, v, m: varlen.attend(q, k, v, m, None, kernel=kernel)),
        "two-pass": (prep("varlen", two_pass=True), two_pass),
        "causal": (lambda: None, causal),
    }


def bench(args, docs_per_row: float, device, dtype) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    batch = build_batch(rows_of_docs(args.rows, args.seq_len, docs_per_row, rng), PROMPT, args.seq_len, 0).to(device)
    R, L, H, D = args.rows, args.seq_len, args.heads, args.head_dim
    g = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v, dout = (torch.randn(R, H, L, D, generator=g, device=device, dtype=dtype) for _ in range(4))
    backward = device.type == "cuda"
    for t in (q, k, v):
        t.requires_grad_(backward)
    real = (batch.doc >= 0)[:, None, :, None]
    results, ref = [], None
    for name, (prepare, attend) in paths(batch, device).items():
        state = prepare()
        with torch.no_grad():
            out = attend(q, k, v, state)
        if name == "sdpa":
            ref = out
        err = float(((out - ref).float() * real).abs().max()) if name != "causal" else float("nan")

        def step():
            o = attend(q, k, v, state)
            if backward:
                o.backward(dout)

        ms = timed(step, device, args.iters)
        prep_ms = timed(prepare, device, args.iters) if name != "causal" else 0.0
        results.append(dict(docs=docs_per_row, path=name, ms=ms, prep=prep_ms, err=err))
    return results


def report(results: list[dict], backward: bool) -> None:
    what = "fwd+bwd" if backward else "fwd"
    print(f"{'docs/row':>8} {'path':9} {what + ' ms':>10} {'x causal':>9} {'sdpa / x':>9} "
          f"{'prep ms':>8} {'max err':>9}")
    for r in results:
        same = [x for x in results if x["docs"] == r["docs"]]
        ceiling = next(x["ms"] for x in same if x["path"] == "causal")
        dense = next(x["ms"] for x in same if x["path"] == "sdpa")
        print(f"{r['docs']:>8} {r['path']:9} {r['ms']:10.3f} {r['ms'] / ceiling:9.2f} {dense / r['ms']:9.2f} "
              f"{r['prep']:8.3f} {r['err']:9.2e}")
    for docs in sorted({r["docs"] for r in results}):
        same = {x["path"]: x["ms"] for x in results if x["docs"] == docs}
        print(f"targets at {docs} docs/row: flex {same['flex'] / same['causal']:.2f}x causal (target <= 1.1), "
              f"{same['sdpa'] / same['flex']:.2f}x faster than sdpa (target >= 5 at ~5 docs/row)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="", help="bf16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--rows", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--docs", type=float, nargs="+", default=[5.0, 1.5], help="documents per row")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {args.rows} x {args.seq_len} tokens, "
          f"{args.heads} heads x {args.head_dim}, {dtype}, median of {args.iters}")
    results = [r for docs in args.docs for r in bench(args, docs, device, dtype)]
    report(results, device.type == "cuda")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
