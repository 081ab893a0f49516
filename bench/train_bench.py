"""End-to-end training benchmark: ours against the released LLaRA way, same documents, one process.

    # one H100 (part of bench/gpu_check.sh): LLaMA-2-7B-shaped layers, bf16, ~3 minutes
    python bench/train_bench.py --device cuda --out bench_out
    # CPU dry run of the same harness, tiny shape, under a minute on 2 cores
    DS_ACCELERATOR=cpu python bench/train_bench.py --shape tiny --device cpu --out /tmp/train_bench
    # real documents instead of drawn lengths (a prep output folder; ids must fit the vocabulary)
    python bench/train_bench.py --shards path/to/shards ...
    # how the engine holds the weights: ZeRO-3 by decoder layer (the trainer's default), by module,
    # or ZeRO-2; `--shape host` (no arithmetic to speak of) times the host alone: bench/host_overhead.py
    python bench/train_bench.py --no-zero3-layer-gather ... | --zero-stage 2 ...

Every configuration runs full training steps (forward, backward, AdamW step) through the
real DeepSpeed ZeRO-3 engine (world 1) of ONE model, and every one is fed the same
documents in the same number of micro-batches, so each step is equal work:

  baseline  the released LLaRA way: one document per sequence, each micro-batch padded to
            its longest document, a dense [B, 1, L, L] joint mask through SDPA, and
            full-vocabulary fp32 logits at every position for the LM and BoW terms
            (`baseline_loss_sums`, written here from the released code's formula)
  sdpa / flex / varlen   ours: documents packed into rows of --seq-len by the real packer
            (data.pack.Packer + batch.build_batch), the LM head only where a loss needs it,
            each attention path that can train on the device
  two-pass  ours, packed, without the joint prompt: each row twice (SELF pass, NEXT pass), one call

Documents (`--docs`): `dpr`, 100-word passages with titles, token lengths ~ Normal(150, 25)
clipped to [40, 400]; `chunks`, 480-word chunks, ~ Normal(650, 60) clipped to [200, 1000];
both as articles of 8 consecutive chunks whose last chunk is the rest of the article, its
length uniform in [low, mean] (a chunk's EBAR target is the next chunk's id set; an article's
last chunk has none), ids uniform over the base vocabulary. The prompt has the
released preset's shape under the LLaMA-2 tokenizer: 2 + 19 + 18 tokens, 8 + 8 new tokens.

Per configuration: median step time over --steps timed steps (after --warmup steps, which
also compile), real text tokens/s (document text, no prompts or padding), documents/s,
peak GPU memory (torch.cuda.max_memory_allocated, weights and optimizer states included;
n/a on CPU), MFU = model FLOPs of the real tokens (metrics.train_flops: 6N per token plus
the attention pairs the joint mask allows) per second over the device's bf16 dense peak
(989 TFLOP/s on H100; metrics.peak_flops) and over a matmul peak measured here, and each
figure's ratio to the baseline, and the host syncs of one more, untimed step (count_syncs: the
no-sync claim checked on the device; n/a on CPU). Before any step, every configuration's loss on the step's
documents is evaluated at the same starting weights: they must agree (same documents, same
objective), else the run fails. Last, the fastest of our paths on the first workload runs again:
on CUDA with DeepSpeed's own host wait at each one-rank gather (`<path>+dswait`: what
patches.skip_local_gather_syncs saves), then with activation checkpointing (non-reentrant, every decoder layer; config `<path>+ckpt`):
its step time and peak memory against the same path without. Then, on CUDA by default (on CPU with
--compare-fused: compiling takes a while there), the same path with model.fused_ops (config
`<path>+fused`: llara_dist.model.fused patched into the engine's modules, taken off again after): its
loss with and without the fused ops at the same weights must agree (else that row fails), then its
step time and peak memory, the first step compiling (a warm-up step). The same again with
model.compile_layers (`<path>+compiled`: each decoder layer's forward compiled whole; --compare-compiled
on CPU; only where no ZeRO-3 hook is inside a layer). Each result counts the graphs torch.compile
made during it (`graphs_compiled`): compiled layers should share theirs. Output: bench.json and bench.md in
--out, rewritten after every configuration (a run cut short keeps what it measured), the table
on stdout; with --profile a torch.profiler top-25 operator table per configuration of the first
workload (all in profile.txt), each headed by the profiled step's wall time and the device's
busy time in it (kernels and copies).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters as dynamo_counters
from transformers import AutoModelForCausalLM

from llara_dist.config import TrainConfig
from llara_dist.data.batch import build_batch, lm_targets
from llara_dist.data.pack import Packer
from llara_dist.data.shards import Doc
from llara_dist.kernels import registry
from llara_dist.model import fused
from llara_dist.model.decoder import decoder_layers, set_attention
from llara_dist.model.objective import Objective, _set_nll_sum
from llara_dist.model.tiny import tiny_llama_config
from llara_dist.prompts import PRESETS, PromptTokens
from llara_dist.train.distributed import BatchPlan, dist_env, init_distributed
from llara_dist.train.engine import build_engine, deepspeed_config, zero3_loading
from llara_dist.train.metrics import attention_pairs, peak_flops, train_flops
from llara_dist.train.pretrain import train_step

# model shapes: LLaMA-2-7B's layers cut to a few; tiny for CPU runs; host: the same modules with
# next to no arithmetic, so a step's time is the host's own work (bench/host_overhead.py)
SHAPES = {
    "7b": dict(hidden=4096, heads=32, intermediate=11008, vocab=32000, layers=2),
    "tiny": dict(hidden=128, heads=4, intermediate=344, vocab=2000, layers=2),
    "host": dict(hidden=32, heads=2, intermediate=64, vocab=2000, layers=2),
}
NEW_TOKENS = 16  # <s1>..<s16> of the released preset
DOC_LENGTHS = {  # name -> (mean, std, low, high) tokens per document
    "dpr": (150, 25, 40, 400),
    "chunks": (650, 60, 200, 1000),
}
CHUNKS_PER_ARTICLE = 8
TARGETS = {"dpr": 4.0, "chunks": 2.0}  # targets: best path's real tokens/s over the baseline


def released_prompt(vocab: int):
    """PromptTokens shaped like the released preset under LLaMA-2's tokenizer (BOS + '"'; 11 + 8; 10 + 8)."""
    rng = np.random.default_rng(1234)
    words = lambda n: tuple(int(x) for x in rng.integers(3, vocab, n))  # noqa: E731
    new = tuple(range(vocab, vocab + NEW_TOKENS))
    return PromptTokens(prefix=(1,) + words(1), self_suffix=words(11) + new[:8],
                        next_suffix=words(10) + new[8:], num_emb_tokens=8)


def drawn_docs(kind: str, vocab: int, seed: int):
    """An endless stream of documents of `kind`: articles of CHUNKS_PER_ARTICLE chunks."""
    mean, std, low, high = DOC_LENGTHS[kind]
    rng = np.random.default_rng(seed)

    def text(last: bool):  # an article's last chunk is what is left: uniform in [low, mean]
        n = int(rng.integers(low, mean + 1)) if last else int(np.clip(round(rng.normal(mean, std)), low, high))
        return rng.integers(3, vocab, n).astype(np.int32)  # [n]

    article = 0
    while True:
        texts = [text(c + 1 == CHUNKS_PER_ARTICLE) for c in range(CHUNKS_PER_ARTICLE)]
        for c, ids in enumerate(texts):
            nxt = np.unique(texts[c + 1]).astype(np.int32) if c + 1 < len(texts) else None
            yield Doc(f"{kind}/a{article}/c{c}", ids, nxt)
        article += 1


def shard_docs(location: str, vocab: int):
    """The documents of real shards, in manifest order; ids must fit the model's base vocabulary."""
    from llara_dist.data.stream import ShardSet, read_shard

    shards = ShardSet.open(location)
    for i in range(len(shards)):
        for d in read_shard(shards.url(i)):
            top = max(int(d.ids.max(initial=0)), int(d.next_set.max(initial=0)) if d.has_next else 0)
            if top >= vocab:
                raise ValueError(f"{shards.url(i)}: document {d.key} has token id {top} >= the model's "
                                 f"base vocabulary {vocab}: shards of another tokenizer")
            yield d


@dataclass
class Workload:
    name: str
    docs: list  # shards.Doc, the step's documents in arrival order
    packed: list  # micro-batches (PackedBatch) of packed rows: ours
    padded: list  # micro-batches of one document per row, each padded to its longest: the baseline


def make_workload(name: str, stream, prompt, seq_len: int, rows: int, micro_batch: int,
                  buffer: int = 64) -> Workload:
    """The step's documents: those of the first `rows` rows the real packer makes from the stream
    (look-ahead buffer of `buffer` documents, as the loader's default). Both layouts are split
    into the same number of micro-batches."""
    packer, packed_rows, order = Packer(seq_len, prompt.overhead, capacity=buffer), [], {}
    while len(packed_rows) < rows:
        while not packer.full:
            d = next(stream, None)
            if d is None:
                break
            order[d.key] = len(order)
            packer.add(d)
        if not len(packer):
            raise ValueError(f"{name}: the documents ran out after {len(packed_rows)} of {rows} rows")
        packed_rows.append(packer.pop_row())
    drop = (0, 1, 2)  # released: ids <= 2 are not BoW targets
    packed = [build_batch(packed_rows[i:i + micro_batch], prompt, seq_len, 0, drop)
              for i in range(0, rows, micro_batch)]
    docs = sorted((d for row in packed_rows for d in row), key=lambda d: order[d.key])
    per = math.ceil(len(docs) / len(packed))  # the baseline: the same documents in as many passes
    max_text = seq_len - prompt.overhead
    padded = []
    for i in range(0, len(docs), per):
        group = docs[i:i + per]
        longest = max(min(len(d.ids), max_text) for d in group) + prompt.overhead
        padded.append(build_batch([[d] for d in group], prompt, longest, 0, drop))
    if len(padded) != len(packed):
        raise AssertionError(f"{name}: {len(padded)} baseline micro-batches for {len(packed)} packed ones")
    return Workload(name, docs, packed, padded)


def baseline_loss_sums(model, batch, preset) -> dict:
    """The released LLaRA loss, plainly: full-vocabulary fp32 logits at every position.

    logits = fp32 lm_head(h) [B, L, V];  lm = sum of cross-entropy at the text's next-token
    positions;  BoW: max over each task's 8 embedding positions' logits, log-softmax, minus the
    mean log-probability of the document's target ids (EBAE: its own text's unique ids > 2,
    EBAR: the next chunk's; the set mean is objective's). Sums over the micro-batch;
    objective.combine divides by the global counts (released: (mean EBAE + mean EBAR) / 2 / 10
    + mean LM). Two departures from FlagEmbedding research/LLARA/pretrain/modeling.py, both of which
    can only make the baseline faster: its per-document Python loop (torch.unique per document)
    is vectorised here, and its additive float mask is the same dense mask in bool.
    """
    mask = registry.prepare("sdpa", batch.doc, batch.segment)  # [B, 1, L, L] bool
    out = model(input_ids=batch.input_ids, position_ids=batch.position, llara_mask=mask, use_cache=False)
    logits = out.logits.float()  # [B, L, V]
    V = logits.shape[-1]
    targets = torch.full_like(batch.input_ids, -100)  # [B, L]
    where = lm_targets(batch)  # position i predicts token i + 1
    targets[:, :-1][where[:, :-1]] = batch.input_ids[:, 1:][where[:, :-1]]
    lm = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100, reduction="sum")
    flat = logits.reshape(-1, V)
    sums = {"lm": lm}
    for term, emb, ids, offsets, use in (
            ("ebae", batch.self_emb, batch.ebae_ids, batch.ebae_offsets, torch.ones_like(batch.has_next)),
            ("ebar", batch.next_emb, batch.ebar_ids, batch.ebar_offsets, batch.has_next)):
        logp = torch.log_softmax(flat[emb].amax(1), -1)  # [D, k, V] -> max over k -> [D, V]
        # sum over documents of -mean log p[target set] (an empty set counts 0)
        sums[term] = logits.sum() * 0.0 + _set_nll_sum(logp, ids, offsets, use.to(logp.dtype))
    return sums


class BaselineObjective(Objective):
    """The same objective, its sums computed as the released code does (baseline_loss_sums)."""

    def sums(self, model, batch) -> dict:
        return baseline_loss_sums(model, batch, self.preset)


def objectives(preset) -> dict:
    """config name -> the Objective that pretrain.train_step computes the loss with."""
    return {"baseline": BaselineObjective(preset), "ours": Objective(preset)}


def eval_loss(engine, micro: list, objective) -> float:
    """The step's loss without a backward: what train_step would report."""
    counts = {t: 0 for t in objective.TERMS}
    for b in micro:
        for t, c in objective.counts(b).items():
            counts[t] += c
    with torch.no_grad():
        return sum(float(objective.combine(objective.sums(engine, b.to(engine.device)), counts)[0]) for b in micro)


def measure_matmul_peak(device, dtype) -> float:
    """FLOP/s of a large square matmul on the device (bf16 8192^3 on GPU, 1024^3 on CPU)."""
    n, iters = (8192, 20) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def docs_hash(batches: list) -> str:
    keys = sorted(k for b in batches for k in b.keys)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def run_config(engine, name: str, path: str, micro: list, objective, args, device,
               profile: Path | None = None, checkpointing: bool = False, fused: str = "") -> dict:
    """Warm-up steps, then --steps timed optimizer steps over the same micro-batches."""
    graphs = dynamo_counters["stats"]["unique_graphs"]  # torch.compile's graphs made since: recompiles show
    set_attention(engine, path, device)
    set_checkpointing(engine, checkpointing)
    set_fused(engine, "")
    fused_gap = fused_loss_gap(engine, micro, objective, args.loss_rtol, fused) if fused else None
    for _ in range(args.warmup):
        train_step(engine, micro, objective, 1)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        result = train_step(engine, micro, objective, 1)
        sync(device)
        times.append(time.perf_counter() - t)
    if profile:
        profile_step(engine, micro, objective, device, profile, name)
    syncs = count_syncs(engine, micro, objective, device)
    step_s = statistics.median(times)
    text = sum(b.text_tokens() for b in micro)
    real = sum(b.real_tokens() for b in micro)
    return {
        "config": name, "path": path, "micro_batches": len(micro), "rows": sum(b.rows for b in micro),
        "docs": sum(b.num_docs for b in micro), "docs_hash": docs_hash(micro), "text_tokens": text,
        "real_tokens": real, "slots": sum(b.input_ids.numel() for b in micro),
        "pairs": sum(attention_pairs(b) for b in micro), "step_s": step_s, "step_s_all": times,
        "text_tokens_per_s": text / step_s, "docs_per_s": sum(b.num_docs for b in micro) / step_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
        "loss": result["loss"], "checkpointing": checkpointing,
        "fused_ops": fused == "ops", "compiled_layers": fused == "layers", "fused_loss_gap": fused_gap,
        "syncs_per_step": None if syncs is None else sum(syncs.values()), "sync_sites": syncs,
        "graphs_compiled": dynamo_counters["stats"]["unique_graphs"] - graphs,
    }


def count_syncs(engine, micro, objective, device) -> dict | None:
    """One more (untimed) step under torch.cuda.set_sync_debug_mode("warn"): where the host waited for
    the device, {"folder/file:line" of the first caller outside torch: count}; None on CPU. torch warns
    on reads back, blocking copies and stream waits (item, .cpu(), Stream.synchronize, ...), not on
    torch.cuda.synchronize(); DeepSpeed's count too."""
    if device.type != "cuda":
        return None
    sync(device)
    sites: dict[str, int] = {}

    def note(message, *_args, **_kwargs):
        if "called a synchronizing CUDA operation" in str(message):
            where = sync_caller(traceback.extract_stack()[:-1])
            sites[where] = sites.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every one, not once per call site
        warnings.showwarning = note  # catch_warnings puts the original back
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(engine, micro, objective, 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def sync_caller(stack) -> str:
    """The innermost frame of `stack` outside torch and warnings, as folder/file:line."""
    torch_dir = Path(torch.__file__).parent
    for frame in reversed(stack):
        path = Path(frame.filename)
        if not path.is_relative_to(torch_dir) and path.name != "warnings.py":
            return f"{path.parent.name}/{path.name}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def deepspeed_gather_waits():
    """DeepSpeed's own waits in its one-rank gathers (a host sync each), instead of ours."""
    from deepspeed.runtime.zero import partition_parameters as pp

    ours = {cls: cls.wait for cls in (pp.NoGatherHandle, pp.NoGatherCoalescedHandle)}
    try:
        for cls, wait in ours.items():
            cls.wait = wait.original
        yield
    finally:
        for cls, wait in ours.items():
            cls.wait = wait


def set_checkpointing(engine, on: bool) -> None:
    """Activation checkpointing (non-reentrant) of every decoder layer, switched on a built engine.

    HF decoder layers check the flag at each call, so the same ZeRO-3 engine and optimizer serve
    both ways. transformers 5.24 has activation_checkpointing_* (its gradient_* warn), 5.17 only gradient_*."""
    core = engine.module
    if on:
        enable = getattr(core, "activation_checkpointing_enable", None) or core.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    else:
        (getattr(core, "activation_checkpointing_disable", None) or core.gradient_checkpointing_disable)()


def set_fused(engine, what: str) -> None:
    """Compiled forwards switched on a built engine, like checkpointing (llara_dist.model.fused): "ops"
    (model.fused_ops), "layers" (model.compile_layers), or "" (none: HF's own forwards)."""
    fused.unpatch(engine)
    if what == "ops":
        fused.patch(engine)
    elif what == "layers":
        fused.compile_layers(decoder_layers(engine))


def fused_loss_gap(engine, micro, objective, rtol: float, what: str) -> float:
    """Switch `what` (set_fused) on, checked: the step's loss with and without at the current weights
    (same documents) must agree within rtol. Returns their relative gap."""
    eager = eval_loss(engine, micro, objective)
    set_fused(engine, what)
    got = eval_loss(engine, micro, objective)
    gap = abs(got - eager) / abs(eager)
    if not gap <= rtol:
        raise RuntimeError(f"compiled {what} changed the loss at the same weights: {got:.6f}, eager {eager:.6f} "
                           f"(rtol {rtol})")
    return gap


def profile_step(engine, micro, objective, device, path: Path, title: str) -> None:
    """One more step under torch.profiler; the top operators by self time appended to `path` under
    a `== title` line (one file for all configurations: the device run brings back 8 files at most)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        start = time.perf_counter()
        train_step(engine, micro, objective, 1)
        sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # both torch 2.11 and 2.13
    ops = prof.key_averages()
    # device busy: kernel and copy time over the profiled step's wall time (the profiler slows the host)
    busy = sum(e.self_device_time_total for e in ops if e.device_type != DeviceType.CPU  # as the table's total
               and not getattr(e, "is_user_annotation", False)) / 1e3 if device.type == "cuda" else None
    head = f"profiled step {wall_ms:.1f} ms" + (f", device busy {busy:.1f} ms ({busy / wall_ms:.0%})" if busy else "")
    with path.open("a") as f:
        f.write(f"== {title}: {head}\n{ops.table(sort_by=key, row_limit=25)}\n\n")
        if busy:  # where the host's time goes when the device waits for it
            f.write(f"== {title}: host side\n{ops.table(sort_by='self_cpu_time_total', row_limit=15)}\n\n")


def build(args, device, dtype, n_micro: int, vocab: int):
    """One ZeRO-3 engine (world 1) over a random-init LLaMA of the chosen shape, for every configuration."""
    init_distributed(dist_env())
    shape = SHAPES[args.shape]
    # small shapes: ZeRO-3 partitions what it partitions at 7B (every matrix; vectors stay whole), not
    # everything under its default persistence threshold of 1e5 elements, which is every tiny matrix
    small = {} if args.shape == "7b" else {"zero_optimization": {"stage3_param_persistence_threshold": shape["hidden"]}}
    train = TrainConfig(global_batch=args.micro_batch * n_micro, micro_batch=args.micro_batch, lr=1e-5,
                        warmup_steps=0, decay="constant", zero_stage=args.zero_stage,
                        zero3_layer_gather=args.zero3_layer_gather, deepspeed=small)
    ds = deepspeed_config(train, BatchPlan(train.global_batch, args.micro_batch, n_micro, 1), dtype)
    config = tiny_llama_config(vocab + NEW_TOKENS, hidden=shape["hidden"], layers=args.layers or shape["layers"],
                               heads=shape["heads"], intermediate=shape["intermediate"],
                               max_positions=max(args.seq_len, 1024))
    torch.manual_seed(args.seed)
    with zero3_loading(ds):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return build_engine(model, train, ds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's default, 2)")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="", help="bf16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=0, help="packed rows of documents per optimizer step "
                   "(0: 32, tiny shape 8)")
    p.add_argument("--micro-batch", type=int, default=0, help="packed rows per micro-batch (0: 8, tiny shape 4)")
    p.add_argument("--docs", nargs="+", choices=sorted(DOC_LENGTHS), default=["dpr", "chunks"])
    p.add_argument("--shards", default="", help="real shards (a prep output folder) instead of --docs")
    p.add_argument("--paths", nargs="+", default=[], help="our attention paths (default: all that train here)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration (compiles)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per configuration (0: 3, tiny shape 2)")
    p.add_argument("--compare-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="run the fastest of our paths on the first workload once more with activation checkpointing")
    p.add_argument("--compare-fused", action=argparse.BooleanOptionalAction, default=None,
                   help="run the fastest of our paths on the first workload once more with model.fused_ops "
                        "(default: on CUDA only; on CPU compiling costs about a minute)")
    p.add_argument("--compare-compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="and once more with model.compile_layers (default: on CUDA only, where no ZeRO-3 hook "
                        "is inside a layer: gathering by layer or ZeRO-2)")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step of each configuration of the first workload (profile.txt)")
    p.add_argument("--loss-rtol", type=float, default=0.0, help="loss agreement bound (0: 1e-4 fp32, 2e-2 bf16)")
    p.add_argument("--zero3-layer-gather", action=argparse.BooleanOptionalAction, default=True,
                   help="train.zero3_layer_gather (the trainer's default): ZeRO-3 gathers each decoder layer at "
                        "once; --no-zero3-layer-gather: DeepSpeed's gathering per module (every configuration)")
    p.add_argument("--zero-stage", type=int, choices=(2, 3), default=3,
                   help="train.zero_stage: 2 keeps the weights whole on every rank and gathers nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    tiny = args.shape == "tiny"
    args.rows = args.rows or (8 if tiny else 32)
    args.micro_batch = args.micro_batch or (4 if tiny else 8)
    args.steps = args.steps or (2 if tiny else 3)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    paths = args.paths or [p for p in registry.PATHS if registry.why_unavailable(p, device, True, dtype) is None]
    for path in paths:
        registry.check_path(path, device, backward=True, dtype=dtype)
    preset = PRESETS["released"]
    vocab = SHAPES[args.shape]["vocab"]
    prompt = released_prompt(vocab)
    if args.shards:
        streams = {"shards": shard_docs(args.shards, vocab)}
    else:
        streams = {kind: drawn_docs(kind, vocab, args.seed) for kind in args.docs}
    loads = [make_workload(name, stream, prompt, args.seq_len, args.rows, args.micro_batch)
             for name, stream in streams.items()]
    n_micro = len(loads[0].packed)  # ceil(rows / micro_batch) for every workload

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").unlink(missing_ok=True)  # profile_step appends
    engine = build(args, device, dtype, n_micro, vocab)
    hf_config = engine.module.config
    matmul_peak = measure_matmul_peak(device, dtype)
    table_peak = peak_flops()
    objs = objectives(preset)
    configs = [("baseline", "sdpa", "padded", objs["baseline"])]
    configs += [(path, path, "packed", objs["ours"]) for path in paths]
    rtol = args.loss_rtol = args.loss_rtol or (1e-4 if dtype == torch.float32 else 2e-2)  # run_config: +fused
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "shape": {**SHAPES[args.shape], "layers": hf_config.num_hidden_layers, "vocab": hf_config.vocab_size},
              "seq_len": args.seq_len, "micro_batch": args.micro_batch, "micro_batches": n_micro,
              "zero_stage": args.zero_stage, "zero3_layer_gather": args.zero3_layer_gather and args.zero_stage == 3,
              "warmup": args.warmup, "steps": args.steps, "matmul_peak_tflops": matmul_peak / 1e12,
              "table_peak_tflops": table_peak / 1e12 if table_peak else None,
              "workloads": []}

    for i, w in enumerate(loads):
        starts = start_losses(engine, w, configs, device, rtol)
        results = []
        report["workloads"].append({"docs": w.name, "documents": len(w.docs), "results": results})
        for cname, path, layout, obj in configs:
            prof = out / "profile.txt" if args.profile and i == 0 else None
            results.append(measure(engine, w.name, cname, path, getattr(w, layout), obj, args, device,
                                   starts[cname], prof))
            save(report, results, w.name, hf_config, table_peak, matmul_peak, out)
    first, fastest = report["workloads"][0]["results"], fastest_ours(report["workloads"][0]["results"])
    if device.type == "cuda" and fastest is not None:  # what patches.skip_local_gather_syncs saves
        with deepspeed_gather_waits():
            first.append(measure(engine, loads[0].name, f"{fastest['config']}+dswait", fastest["path"],
                                 loads[0].packed, objs["ours"], args, device, fastest["loss_at_start"]))
        save(report, first, loads[0].name, hf_config, table_peak, matmul_peak, out)
    if args.compare_checkpointing and fastest is not None:  # last: what it costs comes after every other figure
        first.append(measure(engine, loads[0].name, f"{fastest['config']}+ckpt", fastest["path"], loads[0].packed,
                             objs["ours"], args, device, fastest["loss_at_start"], checkpointing=True))
        save(report, first, loads[0].name, hf_config, table_peak, matmul_peak, out)
    hookless_layers = args.zero3_layer_gather or args.zero_stage == 2  # model.compile_layers can trace them
    for variant, what, wanted in (("fused", "ops", args.compare_fused), ("compiled", "layers", args.compare_compiled)):
        if (device.type == "cuda" if wanted is None else wanted) and fastest is not None \
                and (what != "layers" or hookless_layers):
            first.append(measure(engine, loads[0].name, f"{fastest['config']}+{variant}", fastest["path"],
                                 loads[0].packed, objs["ours"], args, device, fastest["loss_at_start"],
                                 fused=what, profile=out / "profile.txt" if args.profile else None))
            set_fused(engine, "")  # the engine as it was
            save(report, first, loads[0].name, hf_config, table_peak, matmul_peak, out)
    failed = any("error" in r for w in report["workloads"] for r in w["results"])
    print(markdown(report))
    return 1 if failed else 0


def measure(engine, docs: str, cname: str, path: str, micro: list, obj, args, device, start,
            profile: Path | None = None, checkpointing: bool = False, fused: str = "") -> dict:
    """run_config's result, or {config, path, error} if it failed: one failing path must not lose the others'."""
    try:
        if isinstance(start, str):
            raise RuntimeError(start)
        r = run_config(engine, cname, path, micro, obj, args, device, profile, checkpointing, fused)
    except Exception as e:  # noqa: BLE001 - reported in the table
        traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"config": cname, "path": path, "checkpointing": checkpointing, "fused_ops": fused == "ops",
                "compiled_layers": fused == "layers", "error": f"{type(e).__name__}: {e}"}
    sites = sorted((r["sync_sites"] or {}).items(), key=lambda kv: -kv[1])
    print(f"{docs} {cname}: {r['step_s']:.3f} s/step" + (f"; host syncs {dict(sites)}" if sites else ""),
          file=sys.stderr, flush=True)
    return {**r, "loss_at_start": start}


def save(report: dict, results: list, name: str, hf_config, table_peak, matmul_peak, out: Path) -> None:
    """Ratios and checks of the results so far, then bench.json and bench.md rewritten."""
    finish(results, name, hf_config, table_peak, matmul_peak)
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(report))


VARIANTS = {"ckpt": "activation checkpointing", "fused": "fused ops",  # <path>+variant rows
            "compiled": "compiled layers", "dswait": "DeepSpeed's host wait at each gather"}


def fastest_ours(results: list) -> dict | None:
    """The packed joint-prompt configuration (not baseline, two-pass or a <path>+variant) with most text tokens/s."""
    ours = [r for r in results if "error" not in r and "+" not in r["config"]
            and r["config"] not in ("baseline", "two-pass")]
    return max(ours, key=lambda r: r["text_tokens_per_s"], default=None)


def start_losses(engine, w: Workload, configs: list, device, rtol: float) -> dict:
    """Each configuration's loss on the step's documents at the same (starting) weights; they must agree.

    A configuration that fails here gets its error message instead of a loss."""
    losses = {}
    for cname, path, layout, obj in configs:
        try:
            set_attention(engine, path, device)
            losses[cname] = eval_loss(engine, getattr(w, layout), obj)
        except Exception as e:  # noqa: BLE001 - reported per configuration
            traceback.print_exc()
            losses[cname] = f"{type(e).__name__}: {e}"
    ref = losses["baseline"]
    if isinstance(ref, str):
        raise RuntimeError(f"{w.name}: the baseline failed: {ref}")
    bad = {c: v for c, v in losses.items() if not isinstance(v, str) and not abs(v - ref) <= rtol * abs(ref)}
    if bad:
        raise RuntimeError(f"{w.name}: the configurations disagree on the same documents' loss at the same "
                           f"weights: baseline {ref:.6f}, {bad} (rtol {rtol})")
    return losses


def finish(results: list, name: str, hf_config, table_peak: float | None, matmul_peak: float) -> None:
    """Check that every configuration did the baseline's work; add FLOPs, MFU, speed-up and fill."""
    base = results[0]
    same = ("docs_hash", "text_tokens", "real_tokens", "pairs")
    for r in results:
        if "error" in r:
            continue
        if any(r[k] != base[k] for k in same):
            raise AssertionError(f"{name}: {r['config']} did not process the baseline's documents: "
                                 f"{ {k: r[k] for k in same} } vs { {k: base[k] for k in same} }")
        r["flops"] = train_flops(hf_config, r["real_tokens"], r["pairs"])
        r["mfu_table"] = r["flops"] / r["step_s"] / table_peak if table_peak else None
        r["mfu_measured"] = r["flops"] / r["step_s"] / matmul_peak
        r["speedup"] = base["step_s"] / r["step_s"]
        r["fill"] = r["real_tokens"] / r["slots"]


def gathering(report: dict) -> str:
    if report.get("zero_stage", 3) != 3:
        return f"ZeRO-{report['zero_stage']} (nothing gathered)"
    return f"ZeRO-3 gathers by {'decoder layer' if report.get('zero3_layer_gather') else 'module'}"


def markdown(report: dict) -> str:
    """The report as a Markdown table, one row per (documents, configuration), and the targets."""
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    lines = [f"{report['device']}, torch {report['torch']}, {report['dtype']}, "
             f"{report['shape']['layers']} layers of hidden {report['shape']['hidden']} "
             f"(vocab {report['shape']['vocab']}), rows of {report['seq_len']}, {report['micro_batches']} "
             f"micro-batches of {report['micro_batch']} packed rows per step, median of {report['steps']} "
             f"steps; {gathering(report)}; "
             f"matmul peak measured {report['matmul_peak_tflops']:.1f} TFLOP/s", "",
             "| docs | config | step s | text tok/s | docs/s | x baseline | fill | peak GiB | MFU (table peak) "
             "| MFU (measured peak) | syncs/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in report["workloads"]:
        for r in w["results"]:
            if "error" in r:
                lines.append(f"| {w['docs']} | {r['config']} | failed: {r['error'][:80]} ||||||||| ")
                continue
            mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            lines.append(f"| {w['docs']} ({r['docs']}) | {r['config']} | {r['step_s']:.3f} | "
                         f"{r['text_tokens_per_s']:,.0f} | {r['docs_per_s']:,.1f} | {r['speedup']:.2f} | "
                         f"{r['fill']:.2f} | {mem} | {pct(r['mfu_table'])} | {pct(r['mfu_measured'])} | "
                         f"{'n/a' if r.get('syncs_per_step') is None else r['syncs_per_step']} |")
    lines.append("")
    for w in report["workloads"]:
        by = {r["config"]: r for r in w["results"] if "error" not in r}
        best = fastest_ours(w["results"])
        if best is None:
            continue
        line = f"- {w['docs']}: best path {best['config']} {best['speedup']:.2f}x the baseline"
        if w["docs"] in TARGETS:
            line += f" (target >= {TARGETS[w['docs']]:g})"
        if "two-pass" in by:
            line += f"; joint prompt {by['two-pass']['step_s'] / best['step_s']:.2f}x two-pass (target >= 1.6)"
        if best["mfu_table"] is not None:
            line += f"; MFU {best['mfu_table']:.1%} (target >= 50%)"
            top = max((r for r in by.values() if "+" in r["config"] and r["mfu_table"] is not None),
                      key=lambda r: r["mfu_table"], default=None)  # fused ops are the GPU default
            if top is not None and top["mfu_table"] > best["mfu_table"]:
                line += f", {top['config']} {top['mfu_table']:.1%}"
        lines.append(line)
        for r in by.values():
            plain = by.get(r["path"]) if "+" in r["config"] else None
            if plain is not None:
                gib = lambda x: "n/a" if x is None else f"{x:.1f} GiB"  # noqa: E731
                what = VARIANTS[r["config"].split("+", 1)[1]]
                lines.append(f"- {w['docs']}: {what} on {r['path']}: "
                             f"{r['step_s'] / plain['step_s']:.2f}x the step time, peak memory "
                             f"{gib(r['peak_mem_gib'])} (without: {gib(plain['peak_mem_gib'])})"
                             + (f"; loss {r['fused_loss_gap']:.1e} from eager's"
                                if r.get("fused_loss_gap") is not None else "")
                             + (f"; {r['graphs_compiled']} graphs compiled" if r.get("graphs_compiled") else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
