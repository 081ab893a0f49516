"""End-to-end training benchmark: ours against the released LLaRA recipe, same documents, one process.

    # one H100 (part of bench/gpu_check.sh): LLaMA-2-7B-shaped layers, bf16
    python bench/train_bench.py --device cuda --layers 8 --micro-batch 16 --docs dpr --out bench_out
    # CPU smoke run of the whole harness (every row, both rounds), tiny shape, under a minute on 2 cores
    DS_ACCELERATOR=cpu python bench/train_bench.py --smoke --out /tmp/train_bench
    # real documents instead of drawn lengths (a prep output folder; ids must fit the vocabulary)
    python bench/train_bench.py --shards path/to/shards ...
    # how the engine holds the weights: ZeRO-3 by decoder layer (the trainer's default), by module,
    # or ZeRO-2; `--shape host` (no arithmetic to speak of) times the host alone: bench/host_overhead.py
    python bench/train_bench.py --no-zero3-layer-gather ... | --zero-stage 2 ...

Every configuration runs full training steps (forward, backward, AdamW step) through a real
DeepSpeed engine (world 1), and every one is fed the same documents, so each step is equal work:

  released-recipe   the released recipe as its README runs it (FlagEmbedding research/LLARA): one example
            per GPU (per_device_train_batch_size 1: one document a micro-batch, the step's
            documents accumulated), HF gradient checkpointing (the Trainer's flag, HF's default
            kind), DeepSpeed ZeRO-1 (its stage1.json), each example padded to a multiple of 8 (the
            recipe pads on the left; which side holds the padding changes no arithmetic), the
            recipe's loss (below). Its own engine, built first from the same starting weights.
  baseline  the recipe's loss and layout at OUR batch shape, on the engine every other row shares
            (ZeRO-3, world 1, no checkpointing): one document per sequence, each micro-batch of
            45-90 documents padded to its longest, a dense [B, 1, L, L] joint mask through SDPA,
            full-vocabulary fp32 logits at every position for the LM and BoW terms
            (`baseline_loss_sums`, written here from the released code's formula). A stronger
            opponent than the recipe users run.
  sdpa / flex / varlen   ours: documents packed into rows of --seq-len by the real packer
            (data.pack.Packer + batch.build_batch), the LM head only where a loss needs it,
            each attention path that can train on the device
  two-pass  ours, packed, without the joint prompt: each row twice (SELF pass, NEXT pass), one call
  <config>+fused     the same with model.fused_ops (llara_dist.model.fused patched into the engine's
            modules, taken off again after): baseline+fused, and <path>+fused on the fastest of our
            paths (the trainer's default on a GPU)
  <path>+ckpt, +compiled, +dswait   on the fastest path of the first workload: activation
            checkpointing (non-reentrant, every decoder layer), model.compile_layers (each decoder
            layer's forward compiled whole; only where no ZeRO-3 hook is inside a layer), and on CUDA
            DeepSpeed's own host wait at each one-rank gather (what patches.skip_local_gather_syncs saves)

Each ratio compares two configurations that differ only in what it claims to measure (the `x` column
names the other one): a path against the baseline (no fused ops on either side), <path>+fused against
baseline+fused, two-pass against the joint prompt on the kernel two-pass runs (registry.inner_kernel),
a variant against its path (+compiled against <path>+fused). `x released` compares with what a user
of the released code runs today, where everything differs by design.

Documents (`--docs`): `dpr`, 100-word passages with titles, token lengths ~ Normal(150, 25)
clipped to [40, 400]; `chunks`, 480-word chunks, ~ Normal(650, 60) clipped to [200, 1000];
both as articles of 8 consecutive chunks whose last chunk is the rest of the article, its
length uniform in [low, mean] (a chunk's EBAR target is the next chunk's id set; an article's
last chunk has none), ids uniform over the base vocabulary. The prompt has the
released preset's shape under the LLaMA-2 tokenizer: 2 + 19 + 18 tokens, 8 + 8 new tokens.

Timing: --rounds rounds (2) of every configuration of a workload in turn (interleaved: the machine's
drift reaches every configuration alike; the released recipe's rounds run back to back on its own
engine, which does not fit beside the shared one at 8 layers on an 80 GB GPU), each --warmup steps
(which also compile) then --steps timed steps (5). Per configuration: the median, min and max step
time over all timed steps; a ratio whose two configurations' [min, max] overlap is reported as
"within spread", never as a gain. Then real text tokens/s (document text, no prompts or padding),
documents/s, peak GPU memory (torch.cuda.max_memory_allocated, weights and optimizer states
included; n/a on CPU), and MFU = model FLOPs / step time over the device's bf16 dense peak (989
TFLOP/s on H100; metrics.peak_flops) and over a matmul peak measured here. Model FLOPs are counted
where the objective applies them (metrics.flop_rates: 6 per weight of the decoder layers per real
token, the LM head only at the positions the objective applies it to: metrics.head_positions, and
the attention pairs the joint mask allows), the same count for every configuration: what the
baseline computes beyond it (the head at every position) is not credited. The summary states the
bound on any ratio against the same-shape baseline (1 / its MFU) at both peaks. Host syncs of one
more, untimed step (count_syncs: the no-sync claim checked on the device; n/a on CPU).

Before any step, every configuration's loss on the step's documents is evaluated at the same
starting weights: they must agree (same documents, same objective), else the run fails; a fused
configuration's loss with and without its compiled code at the same weights must agree too (else
that row fails). Each result counts the graphs torch.compile made during it (`graphs_compiled`):
compiled layers should share theirs. Output: bench.json and bench.md in --out, rewritten after every
configuration (a run cut short keeps what it measured), the table on stdout; with --profile a
torch.profiler top-25 operator table per configuration of the first workload's first round (all in
profile.txt), each headed by the profiled step's wall time and the device's busy time in it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass, replace
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
from llara_dist.patches import torch_linear
from llara_dist.prompts import PRESETS, PromptTokens
from llara_dist.train.distributed import BatchPlan, dist_env, init_distributed
from llara_dist.train.engine import build_engine, deepspeed_config, zero3_loading
from llara_dist.train.metrics import attention_pairs, flop_rates, head_positions, peak_flops
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
    released: list  # one micro-batch per document, padded to a multiple of 8: the released recipe


PAD_MULTIPLE = 8  # the released recipe's collator: pad_to_multiple_of=8
RECIPE = "released-recipe"  # the row of the released recipe as its README runs it


def make_workload(name: str, stream, prompt, seq_len: int, rows: int, micro_batch: int,
                  buffer: int = 64) -> Workload:
    """The step's documents: those of the first `rows` rows the real packer makes from the stream
    (look-ahead buffer of `buffer` documents, as the loader's default). The packed and padded layouts
    are split into the same number of micro-batches; the released recipe's has one per document."""
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
    # the recipe: the text cut where the others cut it, then padded up to a multiple of 8
    cut = [replace(d, ids=d.ids[:max_text]) for d in docs]
    released = [build_batch([[d]], prompt, -(-(len(d.ids) + prompt.overhead) // PAD_MULTIPLE) * PAD_MULTIPLE, 0, drop)
                for d in cut]
    return Workload(name, docs, packed, padded, released)


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


@dataclass(frozen=True)
class Config:
    """One row of the report: what runs, on which micro-batches, and the row its `x` ratio is against."""

    name: str
    path: str  # attention path
    layout: str  # the Workload's micro-batches: packed, padded or released
    objective: Objective
    checkpointing: bool = False  # ours, non-reentrant, switched on the shared engine
    fused: str = ""  # "ops" (model.fused_ops), "layers" (model.compile_layers) or "" (HF's own forwards)
    dswait: bool = False  # DeepSpeed's own host wait at each one-rank gather
    recipe: bool = False  # the released recipe's own engine (ZeRO-1, HF checkpointing set at its build)
    ref: str | None = None  # the configuration this one differs from in one thing only


def plain_configs(paths: list, objs: dict, fused: bool, inner: str) -> list[Config]:
    """The baseline (and baseline+fused), then each of our paths; two-pass against the joint prompt
    on the kernel two-pass runs (`inner`)."""
    out = [Config("baseline", "sdpa", "padded", objs["baseline"])]
    if fused:
        out.append(Config("baseline+fused", "sdpa", "padded", objs["baseline"], fused="ops", ref="baseline"))
    for p in paths:
        ref = "baseline" if p != "two-pass" else (inner if inner in paths else None)
        out.append(Config(p, p, "packed", objs["ours"], ref=ref))
    return out


def fused_config(path: str, objs: dict) -> Config:
    return Config(f"{path}+fused", path, "packed", objs["ours"], fused="ops", ref="baseline+fused")


def variant_configs(path: str, objs: dict, dswait: bool, ckpt: bool, compiled: bool, fused: bool) -> list[Config]:
    """On the fastest path of the first workload: DeepSpeed's gather wait, checkpointing, compiled layers."""
    ours = objs["ours"]
    out = []
    if dswait:
        out.append(Config(f"{path}+dswait", path, "packed", ours, dswait=True, ref=path))
    if ckpt:
        out.append(Config(f"{path}+ckpt", path, "packed", ours, checkpointing=True, ref=path))
    if compiled:  # compiled whole layers against the fused ops they would replace
        out.append(Config(f"{path}+compiled", path, "packed", ours, fused="layers",
                          ref=f"{path}+fused" if fused else path))
    return out


def run_config(engine, cfg: Config, micro: list, args, device, first: bool, profile: Path | None = None) -> dict:
    """One round of a configuration: warm-up steps, then --steps timed optimizer steps over the same
    micro-batches. The first round also checks fused code against eager, profiles and counts host syncs."""
    graphs = dynamo_counters["stats"]["unique_graphs"]  # torch.compile's graphs made since: recompiles show
    set_attention(engine, cfg.path, device)
    fused_gap = None
    if not cfg.recipe:  # the recipe's engine keeps what its build set
        set_checkpointing(engine, cfg.checkpointing)
        set_fused(engine, "")
        if cfg.fused and first:
            fused_gap = fused_loss_gap(engine, micro, cfg.objective, args.loss_rtol, cfg.fused)
        elif cfg.fused:
            set_fused(engine, cfg.fused)
    with deepspeed_gather_waits() if cfg.dswait else contextlib.nullcontext():
        for _ in range(args.warmup):
            train_step(engine, micro, cfg.objective, 1)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            result = train_step(engine, micro, cfg.objective, 1)
            sync(device)
            times.append(time.perf_counter() - t)
        if profile:
            profile_step(engine, micro, cfg.objective, device, profile, cfg.name)
        syncs = count_syncs(engine, micro, cfg.objective, device) if first else None
    return {"times": times, "loss": result["loss"], "fused_loss_gap": fused_gap, "sync_sites": syncs,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
            "graphs_compiled": dynamo_counters["stats"]["unique_graphs"] - graphs}


def work(cfg: Config, micro: list) -> dict:
    """What a configuration's step processes, counted from its micro-batches."""
    return {"config": cfg.name, "path": cfg.path, "ref": cfg.ref, "engine": "recipe" if cfg.recipe else "shared",
            "checkpointing": cfg.checkpointing or cfg.recipe, "fused_ops": cfg.fused == "ops",
            "compiled_layers": cfg.fused == "layers", "micro_batches": len(micro), "rows": sum(b.rows for b in micro),
            "docs": sum(b.num_docs for b in micro), "docs_hash": docs_hash(micro),
            "text_tokens": sum(b.text_tokens() for b in micro), "real_tokens": sum(b.real_tokens() for b in micro),
            "slots": sum(b.input_ids.numel() for b in micro), "pairs": sum(attention_pairs(b) for b in micro),
            "head_positions": sum(head_positions(b, cfg.objective.preset) for b in micro)}


def measure(engine, docs: str, cfg: Config, micro: list, args, device, start, row: dict | None, first: bool,
            profile: Path | None = None) -> dict:
    """A round of `cfg` merged into its row (None: the first round): the times of every round, the
    largest peak memory, the first round's checks. A failure becomes the row's error: one failing
    configuration must not lose the others'."""
    if row is not None and "error" in row:
        return row
    try:
        if isinstance(start, str):
            raise RuntimeError(start)
        got = run_config(engine, cfg, micro, args, device, first, profile)
    except Exception as e:  # noqa: BLE001 - reported in the table
        traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**work(cfg, micro), "error": f"{type(e).__name__}: {e}"}
    if row is None:
        row = {**work(cfg, micro), "loss_at_start": start, "step_s_all": [], "step_s_rounds": [],
               "peak_mem_gib": None, "graphs_compiled": 0, "fused_loss_gap": got["fused_loss_gap"],
               "sync_sites": got["sync_sites"],
               "syncs_per_step": None if got["sync_sites"] is None else sum(got["sync_sites"].values())}
    row["step_s_all"] += got["times"]
    row["step_s_rounds"].append(statistics.median(got["times"]))
    row["graphs_compiled"] += got["graphs_compiled"]
    if got["peak_mem_gib"] is not None:
        row["peak_mem_gib"] = max(row["peak_mem_gib"] or 0.0, got["peak_mem_gib"])
    row["loss"] = got["loss"]
    times = row["step_s_all"]
    row.update(step_s=statistics.median(times), step_s_min=min(times), step_s_max=max(times))
    row.update(text_tokens_per_s=row["text_tokens"] / row["step_s"], docs_per_s=row["docs"] / row["step_s"])
    sites = sorted((got["sync_sites"] or {}).items(), key=lambda kv: -kv[1])
    print(f"{docs} {cfg.name} round {len(row['step_s_rounds'])}: {statistics.median(got['times']):.3f} s/step"
          + (f"; host syncs {dict(sites)}" if sites else ""), file=sys.stderr, flush=True)
    return row


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


def start_losses(engine, w: Workload, configs: list, device, rtol: float, recipe_start=None) -> dict:
    """Each configuration's loss on the step's documents at the same (starting) weights; they must agree.

    A fused configuration starts from its eager counterpart's (its own is checked against that one's at
    its first round); `recipe_start`: the released recipe's, evaluated on its own engine before its steps.
    A configuration that fails here gets its error message instead of a loss."""
    losses = {}
    for cfg in configs:
        if cfg.fused:
            continue
        try:
            set_attention(engine, cfg.path, device)
            losses[cfg.name] = eval_loss(engine, getattr(w, cfg.layout), cfg.objective)
        except Exception as e:  # noqa: BLE001 - reported per configuration
            traceback.print_exc()
            losses[cfg.name] = f"{type(e).__name__}: {e}"
    ref = losses["baseline"]
    if isinstance(ref, str):
        raise RuntimeError(f"{w.name}: the baseline failed: {ref}")
    if recipe_start is not None:
        losses[RECIPE] = recipe_start
    bad = {c: v for c, v in losses.items() if not isinstance(v, str) and not abs(v - ref) <= rtol * abs(ref)}
    if bad:
        raise RuntimeError(f"{w.name}: the configurations disagree on the same documents' loss at the same "
                           f"weights: baseline {ref:.6f}, {bad} (rtol {rtol})")
    for cfg in configs:
        if cfg.fused:
            losses[cfg.name] = losses.get(cfg.name.split("+", 1)[0], ref)
    return losses


def overlaps(a: dict, b: dict) -> bool:
    """Whether two configurations' step times, [min, max] over every timed step, overlap: then their
    difference is within the spread, not a gain."""
    return a["step_s_min"] <= b["step_s_max"] and b["step_s_min"] <= a["step_s_max"]


def ratio(fast: dict, slow: dict) -> str:
    """slow's median step time over fast's, said to be within spread where their ranges overlap."""
    return f"{slow['step_s'] / fast['step_s']:.2f}x" + (" (within spread)" if overlaps(fast, slow) else "")


def finish(results: list, name: str, rates, table_peak: float | None, matmul_peak: float) -> None:
    """Check that every configuration did the same work; add FLOPs, MFU, fill and the ratios."""
    ok = [r for r in results if "error" not in r]
    by = {r["config"]: r for r in ok}
    same = ("docs_hash", "text_tokens", "real_tokens", "pairs", "head_positions")
    for r in ok:
        if any(r[k] != ok[0][k] for k in same):
            raise AssertionError(f"{name}: {r['config']} did not process {ok[0]['config']}'s documents: "
                                 f"{ {k: r[k] for k in same} } vs { {k: ok[0][k] for k in same} }")
        r["flops"] = rates.step(r["real_tokens"], r["pairs"], r["head_positions"])
        r["mfu_table"] = r["flops"] / r["step_s"] / table_peak if table_peak else None
        r["mfu_measured"] = r["flops"] / r["step_s"] / matmul_peak
        r["fill"] = r["real_tokens"] / r["slots"]
        for key, other in (("x_ref", by.get(r["ref"])), ("x_released", by.get(RECIPE))):
            r[key] = other["step_s"] / r["step_s"] if other is not None and other is not r else None
            r[f"{key}_within_spread"] = overlaps(r, other) if r[key] is not None else None


def fastest_ours(results: list) -> dict | None:
    """The packed joint-prompt configuration (not baseline, two-pass or a <path>+variant) with most text tokens/s."""
    ours = [r for r in results if "error" not in r and "+" not in r["config"]
            and r["config"] not in (RECIPE, "baseline", "two-pass")]
    return max(ours, key=lambda r: r["text_tokens_per_s"], default=None)


def gathering(report: dict) -> str:
    if report.get("zero_stage", 3) != 3:
        return f"ZeRO-{report['zero_stage']} (nothing gathered)"
    return f"ZeRO-3 gathers by {'decoder layer' if report.get('zero3_layer_gather') else 'module'}"


VARIANTS = {"ckpt": "activation checkpointing", "fused": "fused ops",  # <config>+variant rows
            "compiled": "compiled layers", "dswait": "DeepSpeed's host wait at each gather"}
TARGETS = {"recipe": 5.0, "fused": 1.3, "two_pass": 1.6, "mfu": 0.55, "graphs": (1, 2)}


def markdown(report: dict) -> str:
    """The report as a Markdown table, one row per (documents, configuration), then its claims."""
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    lines = [f"{report['device']}, torch {report['torch']}, {report['dtype']}, "
             f"{report['shape']['layers']} layers of hidden {report['shape']['hidden']} "
             f"(vocab {report['shape']['vocab']}), rows of {report['seq_len']}, {report['micro_batches']} "
             f"micro-batches of {report['micro_batch']} packed rows per step; {report.get('rounds', 1)} "
             f"interleaved rounds of {report['steps']} timed steps after {report['warmup']} warm-up; "
             f"{gathering(report)}; matmul peak measured {report['matmul_peak_tflops']:.1f} TFLOP/s", "",
             f"{RECIPE}: the released recipe as its README runs it (one document a micro-batch, gradient "
             "checkpointing, ZeRO-1); baseline: its loss and layout at our batch shape, without checkpointing, "
             "on the shared engine (a stronger opponent); x: against the configuration named, which differs only "
             "in what the ratio claims", "",
             "| docs | config | step s | min-max | text tok/s | x (against) | x released | fill | peak GiB "
             "| MFU (table peak) | MFU (measured peak) | syncs/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def x_cell(r, key, against):
        if r.get(key) is None:
            return "-"
        notes = ", ".join(filter(None, (against, "within spread" if r[f"{key}_within_spread"] else "")))
        return f"{r[key]:.2f}" + (f" ({notes})" if notes else "")

    for w in report["workloads"]:
        for r in w["results"]:
            if "error" in r:
                lines.append(f"| {w['docs']} | {r['config']} | failed: {r['error'][:80]} |||||||||| ")
                continue
            mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            lines.append(f"| {w['docs']} ({r['docs']}) | {r['config']} | {r['step_s']:.3f} | "
                         f"{r['step_s_min']:.3f}-{r['step_s_max']:.3f} | {r['text_tokens_per_s']:,.0f} | "
                         f"{x_cell(r, 'x_ref', r['ref'])} | {x_cell(r, 'x_released', '')} | "
                         f"{r['fill']:.2f} | {mem} | {pct(r['mfu_table'])} | {pct(r['mfu_measured'])} | "
                         f"{'n/a' if r.get('syncs_per_step') is None else r['syncs_per_step']} |")
    lines.append("")
    for w in report["workloads"]:
        lines += claims(w["docs"], w["results"], report)
    return "\n".join(lines) + "\n"


def claims(docs: str, results: list, report: dict) -> list[str]:
    """The summary: each ratio between configurations that differ only in what it claims, against its
    target, "within spread" where the two step-time ranges overlap; MFU; the bound at both peaks."""
    by = {r["config"]: r for r in results if "error" not in r and "flops" in r}
    best = fastest_ours(list(by.values()))
    if best is None:
        return []
    ours = by.get(f"{best['config']}+fused", best)  # as the trainer runs on a GPU: fused ops by default
    out = []
    if RECIPE in by:
        out.append(f"- {docs}: ours as the trainer runs it ({ours['config']}) against the released recipe as its "
                   f"README runs it: {ratio(ours, by[RECIPE])} (target >= {TARGETS['recipe']:g})")
    if ours is not best and "baseline+fused" in by:
        out.append(f"- {docs}: same shape, fused ops on both sides: {ours['config']} "
                   f"{ratio(ours, by['baseline+fused'])} baseline+fused (target >= {TARGETS['fused']:g})")
    if "baseline" in by:
        out.append(f"- {docs}: same shape, no fused ops on either side: {best['config']} "
                   f"{ratio(best, by['baseline'])} baseline")
    two = by.get("two-pass")
    if two is not None and two.get("ref") in by:
        out.append(f"- {docs}: joint prompt on {two['ref']} {ratio(by[two['ref']], two)} two-pass "
                   f"(target >= {TARGETS['two_pass']:g})")
    table = report.get("table_peak_tflops")
    if ours["mfu_table"] is not None:
        out.append(f"- {docs}: MFU of {ours['config']} (FLOPs where applied) {ours['mfu_table']:.1%} of the "
                   f"{table:g} TFLOP/s table peak (target >= {TARGETS['mfu']:.0%}), {ours['mfu_measured']:.1%} "
                   f"of the measured matmul peak")
    for name in ("baseline+fused", "baseline"):
        r = by.get(name)
        if r is not None:  # the same model FLOPs for every configuration: no ratio against r beats 1 / its MFU
            at_table = f"{1 / r['mfu_table']:.2f}x at the {table:g} TFLOP/s table peak" if r["mfu_table"] \
                else "no table peak on this device"
            out.append(f"- {docs}: bound on any ratio against {name} at this shape (1 / its MFU): "
                       f"{1 / r['mfu_measured']:.2f}x at the measured matmul peak "
                       f"({report['matmul_peak_tflops']:.1f} TFLOP/s), {at_table}")
    gib = lambda x: "n/a" if x is None else f"{x:.1f} GiB"  # noqa: E731
    for r in by.values():
        if "+" not in r["config"] or r.get("ref") not in by:
            continue
        base, variant = r["config"].split("+", 1)
        plain = by.get(base)
        if plain is None:
            continue
        line = (f"- {docs}: {VARIANTS[variant]} on {base}: {r['step_s'] / plain['step_s']:.2f}x the step time"
                + (" (within spread)" if overlaps(r, plain) else "")
                + f", peak memory {gib(r['peak_mem_gib'])} (without: {gib(plain['peak_mem_gib'])})")
        if r.get("compiled_layers") and r["ref"] != base:  # against the fused ops they replace
            line += f"; {r['step_s'] / by[r['ref']]['step_s']:.2f}x {r['ref']}'s" \
                    + (" (within spread)" if overlaps(r, by[r["ref"]]) else "")
        if r.get("fused_loss_gap") is not None:
            line += f"; loss {r['fused_loss_gap']:.1e} from eager's"
        if r.get("compiled_layers"):
            lo, hi = TARGETS["graphs"]
            line += f"; {r['graphs_compiled']} graphs compiled for {report['shape']['layers']} layers " \
                    f"(target {lo}-{hi})"
        elif r.get("graphs_compiled"):
            line += f"; {r['graphs_compiled']} graphs compiled"
        out.append(line)
    return out


def model_config(args, vocab: int):
    """The benchmarked model: a random LLaMA of the chosen shape, the released preset's tokens added."""
    shape = SHAPES[args.shape]
    return tiny_llama_config(vocab + NEW_TOKENS, hidden=shape["hidden"], layers=args.layers or shape["layers"],
                             heads=shape["heads"], intermediate=shape["intermediate"],
                             max_positions=max(args.seq_len, 1024))


def build(args, device, dtype, n_micro: int, config, weights: dict | None = None):
    """The shared engine (ZeRO-3 by default, world 1) for every configuration but the recipe's; its
    weights `weights` (the recipe engine's starting ones), else drawn under --seed."""
    shape = SHAPES[args.shape]
    # small shapes: ZeRO-3 partitions what it partitions at 7B (every matrix; vectors stay whole), not
    # everything under its default persistence threshold of 1e5 elements, which is every tiny matrix
    small = {} if args.shape == "7b" else {"zero_optimization": {"stage3_param_persistence_threshold": shape["hidden"]}}
    train = TrainConfig(global_batch=args.micro_batch * n_micro, micro_batch=args.micro_batch, lr=1e-5,
                        warmup_steps=0, decay="constant", zero_stage=args.zero_stage,
                        zero3_layer_gather=args.zero3_layer_gather, deepspeed=small)
    ds = deepspeed_config(train, BatchPlan(train.global_batch, args.micro_batch, n_micro, 1), dtype)
    torch.manual_seed(args.seed)
    with zero3_loading(ds):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if weights is not None:
        load_weights(model, weights)
    return build_engine(model, train, ds)


def build_recipe_engine(args, device, dtype, config, n_docs: int):
    """The released recipe's engine, as its README runs it: DeepSpeed ZeRO-1 (stage1.json), one example
    per micro-batch and the step's documents accumulated, HF gradient checkpointing as the Trainer's
    --gradient_checkpointing sets it. Weights drawn under --seed on the device."""
    train = TrainConfig(global_batch=n_docs, micro_batch=1, lr=1e-5, warmup_steps=0, decay="constant",
                        zero_stage=2, zero3_layer_gather=False)
    ds = deepspeed_config(train, BatchPlan(n_docs, 1, n_docs, 1), dtype)
    ds["zero_optimization"] = {"stage": 1}
    torch.manual_seed(args.seed)
    with zero3_loading(ds), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # no kwargs, as the Trainer passes none (transformers 5.24 names it activation_checkpointing_*, 5.17 gradient_*)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = False
    return build_engine(model, train, ds)


def whole_weights(engine) -> dict:
    """A plain (not ZeRO-3) engine's weights, copied to the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in engine.module.named_parameters()}


def load_weights(model, weights: dict) -> None:
    """Copy `weights` into a model built under ZeRO-3 (each gathered, set, partitioned again) or plainly."""
    from deepspeed import zero

    with torch.no_grad():
        for n, p in model.named_parameters():
            with zero.GatheredParameters([p], modifier_rank=0):
                p.copy_(weights[n].to(p.device))


def release(probe, device) -> dict:
    """After the engine's destroy() and its last reference dropped: whether its weights were freed (the
    next engine needs the memory), and what the device still holds."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"freed": probe() is None,
            "device_gib_after": torch.cuda.memory_allocated() / 2 ** 30 if device.type == "cuda" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="the whole harness on a CPU at a tiny shape, every row and both rounds, in seconds: "
                        "--shape tiny --device cpu --seq-len 256 --rows 4 --micro-batch 2 --warmup 0 --steps 2 "
                        "--compare-fused --compare-compiled (its speeds say nothing)")
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
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration and round (compiles)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the configurations, interleaved")
    p.add_argument("--released-recipe", action=argparse.BooleanOptionalAction, default=True,
                   help="the released recipe as its README runs it, on its own ZeRO-1 engine (first)")
    p.add_argument("--compare-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="run the fastest of our paths on the first workload once more with activation checkpointing")
    p.add_argument("--compare-fused", action=argparse.BooleanOptionalAction, default=None,
                   help="baseline+fused and <fastest path>+fused, with model.fused_ops "
                        "(default: on CUDA only; on CPU compiling costs tens of seconds)")
    p.add_argument("--compare-compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="and the fastest path once more with model.compile_layers (default: on CUDA only, where no "
                        "ZeRO-3 hook is inside a layer: gathering by layer or ZeRO-2)")
    p.add_argument("--compare-dswait", action=argparse.BooleanOptionalAction, default=None,
                   help="and once more with DeepSpeed's own host wait at each one-rank gather (CUDA only; default on)")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step of each configuration of the first workload (profile.txt)")
    p.add_argument("--loss-rtol", type=float, default=0.0, help="loss agreement bound (0: 1e-4 fp32, 2e-2 bf16)")
    p.add_argument("--zero3-layer-gather", action=argparse.BooleanOptionalAction, default=True,
                   help="train.zero3_layer_gather (the trainer's default): ZeRO-3 gathers each decoder layer at "
                        "once; --no-zero3-layer-gather: DeepSpeed's gathering per module (every configuration)")
    p.add_argument("--zero-stage", type=int, choices=(2, 3), default=3,
                   help="train.zero_stage of the shared engine: 2 keeps the weights whole and gathers nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.seq_len, args.rows, args.micro_batch = "tiny", "cpu", 256, 4, 2
        args.warmup, args.steps = 0, 2
        args.compare_fused = True if args.compare_fused is None else args.compare_fused
        args.compare_compiled = True if args.compare_compiled is None else args.compare_compiled
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1")
    tiny = args.shape == "tiny"
    args.rows = args.rows or (8 if tiny else 32)
    args.micro_batch = args.micro_batch or (4 if tiny else 8)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    paths = args.paths or [p for p in registry.PATHS if registry.why_unavailable(p, device, True, dtype) is None]
    for path in paths:
        registry.check_path(path, device, backward=True, dtype=dtype)
    cuda = device.type == "cuda"
    fused_on = cuda if args.compare_fused is None else args.compare_fused
    compiled_on = (cuda if args.compare_compiled is None else args.compare_compiled) \
        and (args.zero3_layer_gather or args.zero_stage == 2)  # model.compile_layers traces no ZeRO-3 hook
    dswait_on = cuda and args.compare_dswait is not False
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
    init_distributed(dist_env())
    config = model_config(args, vocab)
    matmul_peak = measure_matmul_peak(device, dtype)
    table_peak = peak_flops()
    objs = objectives(preset)
    rtol = args.loss_rtol = args.loss_rtol or (1e-4 if dtype == torch.float32 else 2e-2)  # run_config: +fused
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    report = {"device": name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "shape": {**SHAPES[args.shape], "layers": config.num_hidden_layers, "vocab": config.vocab_size},
              "seq_len": args.seq_len, "micro_batch": args.micro_batch, "micro_batches": n_micro,
              "zero_stage": args.zero_stage, "zero3_layer_gather": args.zero3_layer_gather and args.zero_stage == 3,
              "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
              "matmul_peak_tflops": matmul_peak / 1e12, "table_peak_tflops": table_peak / 1e12 if table_peak else None,
              "workloads": [{"docs": w.name, "documents": len(w.docs), "results": []} for w in loads]}
    rows: dict[str, dict] = {w.name: {} for w in loads}  # workload -> config name -> its row, in run order
    rates = None

    def save() -> None:
        """Ratios and checks of the results so far, then bench.json and bench.md rewritten."""
        for entry in report["workloads"]:
            entry["results"] = list(rows[entry["docs"]].values())
            finish(entry["results"], entry["docs"], rates, table_peak, matmul_peak)
        (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "bench.md").write_text(markdown(report))

    weights, recipe_starts = None, {}
    if args.released_recipe:  # first: its engine and the shared one do not fit on one GPU together
        recipe = build_recipe_engine(args, device, dtype, config, len(loads[0].released))
        rates = flop_rates(recipe)
        weights = whole_weights(recipe)  # every configuration starts from these
        cfg = Config(RECIPE, "sdpa", "released", objs["baseline"], recipe=True)
        with torch_linear():  # torch's own F.linear, which a ZeRO-3 model built earlier would have replaced
            for w in loads:  # at the starting weights, before any step
                try:
                    set_attention(recipe, cfg.path, device)
                    recipe_starts[w.name] = eval_loss(recipe, w.released, cfg.objective)
                except Exception as e:  # noqa: BLE001 - reported as the row's error
                    traceback.print_exc()
                    recipe_starts[w.name] = f"{type(e).__name__}: {e}"
            for w in loads:
                recipe.set_train_batch_size(len(w.released))  # one document a micro-batch
                for rnd in range(args.rounds):
                    rows[w.name][RECIPE] = measure(recipe, w.name, cfg, w.released, args, device,
                                                       recipe_starts[w.name], rows[w.name].get(RECIPE), rnd == 0)
                    save()
        probe = weakref.ref(next(recipe.module.parameters()))
        recipe.destroy()
        del recipe
        report["recipe_engine_released"] = release(probe, device)

    engine = build(args, device, dtype, n_micro, config, weights)
    rates = rates or flop_rates(engine)
    inner = registry.inner_kernel("two-pass", device, dtype)
    variants = None  # decided on the first workload's first round: on its fastest path
    every_start = {}  # at the starting weights, before any step
    for w in loads:
        recipe_start = recipe_starts.get(w.name)
        every_start[w.name] = start_losses(engine, w, plain_configs(paths, objs, fused_on, inner), device, rtol,
                                           None if isinstance(recipe_start, str) else recipe_start)
    for i, w in enumerate(loads):
        configs = plain_configs(paths, objs, fused_on, inner)
        starts = every_start[w.name]
        if variants is not None:
            configs += variants
        for rnd in range(args.rounds):
            todo = list(configs)
            while todo:
                cfg = todo.pop(0)
                prof = out / "profile.txt" if args.profile and i == 0 and rnd == 0 else None
                rows[w.name][cfg.name] = measure(engine, w.name, cfg, getattr(w, cfg.layout), args, device,
                                                 starts.get(cfg.name, starts["baseline"]), rows[w.name].get(cfg.name),
                                                 rnd == 0, prof)
                save()
                if variants is None and not todo:  # the plain configurations of the first round are done
                    fastest = fastest_ours(list(rows[w.name].values()))
                    variants = [] if fastest is None else (
                        ([fused_config(fastest["path"], objs)] if fused_on else [])
                        + variant_configs(fastest["path"], objs, dswait_on, args.compare_checkpointing,
                                          compiled_on, fused_on))
                    for v in variants:
                        starts[v.name] = starts.get(v.path, starts["baseline"])
                    configs += variants
                    todo += variants
        if i == 0 and variants:  # later workloads: the fastest path with fused ops only
            variants = [v for v in variants if v.fused == "ops"]
    set_fused(engine, "")  # the engine as it was
    failed = any("error" in r for w in report["workloads"] for r in w["results"])
    print(markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
