"""Peak memory of one inference forward (no_grad): forward_hidden's hook vs output_hidden_states.

    python bench/hidden_memory.py --variant hook             # forward_hidden as it is
    python bench/hidden_memory.py --variant hidden_states    # the former way: every layer's output returned
    python bench/hidden_memory.py --variant hook --device cuda

Run each variant in a fresh process: on CPU the figure is the growth of the process's resident
high-water mark (getrusage) over the forward, which a process never lowers (the script restarts
itself with MALLOC_MMAP_THRESHOLD_=65536, so that glibc maps every tensor apart and returns it to
the system when freed: the high-water mark then follows the live tensors); on CUDA it is
torch.cuda.max_memory_allocated over the forward. A random LLaMA (--layers of hidden --hidden)
runs --rows packed rows of --seq-len tokens (~4 documents each, released-shaped prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import numpy as np
import torch

from llara_dist.data.batch import build_batch
from llara_dist.data.shards import Doc
from llara_dist.kernels import registry
from llara_dist.model.decoder import forward_hidden, set_attention
from llara_dist.model.tiny import tiny_llama_config
from llara_dist.prompts import PromptTokens

PROMPT = PromptTokens(prefix=(5,) * 2, self_suffix=(6,) * 19, next_suffix=(7,) * 18, num_emb_tokens=8)


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # read by glibc at process start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=["hook", "hidden_states"], required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = tiny_llama_config(2000, hidden=args.hidden, layers=args.layers, heads=8,
                               intermediate=args.hidden * 8 // 3, max_positions=args.seq_len)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    set_attention(model, "sdpa", device)
    rng = np.random.default_rng(0)
    text = (args.seq_len - 4 * PROMPT.overhead) // 4
    rows = [[Doc(f"{r}-{i}", rng.integers(10, 2000, text).astype(np.int32), None) for i in range(4)]
            for r in range(args.rows)]
    batch = build_batch(rows, PROMPT, args.seq_len, 0).to(device)

    def forward() -> torch.Tensor:  # [R, L, H]
        if args.variant == "hook":
            return forward_hidden(model, batch)
        mask = registry.prepare("sdpa", batch.doc, batch.segment)
        return model(input_ids=batch.input_ids, position_ids=batch.position, llara_mask=mask, use_cache=False,
                     logits_to_keep=1, output_hidden_states=True).hidden_states[-1]

    with torch.no_grad():
        if device.type == "cuda":
            forward()  # warm-up (the CPU figure has none: the high-water mark would keep its peak)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        before = rss_peak_mib()
        h = forward()
    out = {"variant": args.variant, "device": device.type, "layers": args.layers, "hidden": args.hidden,
           "rows": args.rows, "seq_len": args.seq_len, "hidden_mib": h.numel() * h.element_size() / 2**20}
    if device.type == "cuda":
        out["forward_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        out["rss_peak_before_mib"], out["rss_peak_after_mib"] = before, rss_peak_mib()
        out["forward_peak_growth_mib"] = out["rss_peak_after_mib"] - before
    print(json.dumps(out))


if __name__ == "__main__":
    main()
