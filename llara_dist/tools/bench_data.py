"""Measure shards -> packed rows against the released LLaRA loader's way; prints one JSON line.

    llara-dist bench-data --shards DIR [--seq-len 1024] [--workers 1] [--rows 1024] [--micro-batch 8]

Ours: PackedLoader (token ids read from the shards, whole documents packed into rows).
Baseline, over the same documents in the same order: what the released code does
(FlagEmbedding research/LLARA/pretrain/data.py): raw JSON lines holding the text
(written out first from the shards' .txt members, untimed), the input tokenized per
example when fetched, the batch padded to its longest example and both target texts
tokenized in the collator, with the Hugging Face tokenizer.
tokens_per_s counts real text tokens (no prompts, no padding) per second; fill is the
non-pad fraction of the row slots, prompts included. Both are timed after their first
batch (worker start-up), in --repeat short alternating rounds (the baseline over the
same documents each round); reported are the median rates and the median of the
rounds' ratios, so that a busy shared machine slows both alike; and, steadier still
there, text tokens per CPU second of each loader's processes (cpu_tokens_per_s).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llara_dist.errors import UserError


def configure(p) -> None:
    p.add_argument("--shards", required=True, help="folder (or URL prefix) with manifest.json and shards")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per row")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (both loaders)")
    p.add_argument("--rows", type=int, default=1024, help="packed rows timed per round (after a warm-up batch)")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per batch")
    p.add_argument("--pack-buffer", type=int, default=64, help="packer look-ahead (documents)")
    p.add_argument("--preset", default="released", help="prompt preset: paper or released")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the manifest's)")
    p.add_argument("--baseline-docs", type=int, default=500, help="documents the baseline loads per round (at most)")
    p.add_argument("--repeat", type=int, default=7, help="rounds, ours then the baseline; medians are reported")


def run(args) -> int:
    from llara_dist.config import DataConfig, ObjectiveConfig
    from llara_dist.data.loader import PackedLoader
    from llara_dist.data.shards import read_manifest
    from llara_dist.prompts import add_special_tokens, prompt_tokens, resolve_preset
    from llara_dist.tokenizer import load_tokenizer, pad_id

    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        name = read_manifest(args.shards).get("tokenizer", {}).get("name_or_path")
        if not name or not Path(name).is_dir():
            raise UserError(f"{args.shards}: its manifest names the tokenizer {name!r}, which is not a folder "
                            f"here; pass --tokenizer DIR")
        tok = load_tokenizer(name)
    preset = resolve_preset(ObjectiveConfig(preset=args.preset))
    add_special_tokens(tok, preset)
    prompt = prompt_tokens(tok, preset)

    cfg = DataConfig(shards=args.shards, seq_len=args.seq_len, num_workers=args.workers,
                     pack_buffer=args.pack_buffer)
    loader = PackedLoader(cfg, prompt, micro_batch=args.micro_batch, rank=0, world=1, pad_id=pad_id(tok),
                          drop_ids=tuple(tok.all_special_ids))
    ours = iter(loader)
    keys = list(next(ours).keys)  # worker start-up and the first shard read are not throughput
    rounds, totals = [], {"text_tokens": 0, "real": 0, "slots": 0, "rows": 0, "seconds": 0.0, "cpu": 0.0}
    baseline = None
    for _ in range(args.repeat):  # ours and the baseline take turns: both see the same load on the box
        start, cpu, n = time.perf_counter(), _cpu_seconds(), dict.fromkeys(totals, 0)
        while n["rows"] < args.rows:
            b = next(ours)
            n["text_tokens"] += b.text_tokens()
            n["real"] += b.real_tokens()
            n["slots"] += b.input_ids.numel()
            n["rows"] += b.rows
            if len(keys) < args.baseline_docs:
                keys += b.keys
        n["seconds"], n["cpu"] = time.perf_counter() - start, _cpu_seconds() - cpu
        totals = {k: totals[k] + n[k] for k in totals}
        if baseline is None:
            if len(keys) < 2 * args.micro_batch:
                raise UserError(f"bench-data: the baseline needs at least {2 * args.micro_batch} documents "
                                 f"(two batches), {len(keys)} were read: raise --rows or --baseline-docs")
            baseline = _Baseline(args, loader.shards, keys[:args.baseline_docs], tok, prompt)
        rounds.append([n["text_tokens"] / n["seconds"], baseline.measure()])
    ours.close()
    baseline.close()

    rate, base_rate = (statistics.median(r[i] for r in rounds) for i in (0, 1))
    speedup = statistics.median(x / y for x, y in rounds)  # each round's pair ran side by side in time
    cpu_rate, base_cpu_rate = _per_cpu(totals["text_tokens"], totals["cpu"]), _per_cpu(baseline.tokens, baseline.cpu)
    out = {
        "tokens_per_s": round(rate),
        "fill": round(totals["real"] / totals["slots"], 4),
        "baseline_tokens_per_s": round(base_rate),
        "baseline_fill": round(baseline.fill, 4),
        "speedup": round(speedup, 1),
        "cpu_tokens_per_s": cpu_rate,
        "baseline_cpu_tokens_per_s": base_cpu_rate,
        "cpu_speedup": round(cpu_rate / base_cpu_rate, 1) if cpu_rate and base_cpu_rate else None,
        "rounds": [[round(x), round(y)] for x, y in rounds],
        "rows": totals["rows"], "text_tokens": totals["text_tokens"], "seconds": round(totals["seconds"], 3),
        "truncated_docs": loader.stats["truncated"], "baseline_docs": len(baseline.keys),
        "seq_len": args.seq_len, "workers": args.workers, "micro_batch": args.micro_batch,
        "pack_buffer": args.pack_buffer, "preset": args.preset, "prompt_overhead": prompt.overhead,
        "shards": args.shards,
    }
    print(json.dumps(out))
    return 0


def _cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants, DataLoader workers included (Linux /proc).

    On a shared machine wall-clock rates move with everyone else's load; tokens per CPU
    second of everything a loader ran do not, and are reported beside them.
    """
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system  # children: those already reaped
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[tuple[int, int]]] = {}  # parent -> (pid, CPU ticks) of each live process
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()  # fields after the command name
        except (OSError, IndexError):
            continue  # gone meanwhile
        # utime + stime, and cutime + cstime: its own children that ended (and were reaped by it)
        children.setdefault(int(f[1]), []).append((int(stat.parent.name), sum(int(x) for x in f[11:15])))
    todo = [os.getpid()]
    while todo:
        for pid, ticks in children.get(todo.pop(), []):
            total += ticks / tick
            todo.append(pid)
    return total


def _per_cpu(tokens: int, cpu: float) -> int | None:
    """Tokens per CPU second; None when under 0.1 s of CPU was measured (clock ticks of 10 ms)."""
    return round(tokens / cpu) if cpu >= 0.1 else None


def _texts(shards) -> dict[str, str]:
    """key -> text of every document (the .txt audit members)."""
    from llara_dist.data.shards import samples_in
    from llara_dist.data.stream import shard_members

    texts = {}
    for i in range(len(shards)):
        for s in samples_in(shard_members(shards.url(i)), shards.url(i), fields=("txt",)):
            texts[s["__key__"]] = s["txt"].decode("utf-8")
    return texts


def _next_key(key: str) -> str:
    head, _, chunk = key.rpartition("-")
    return f"{head}-{int(chunk) + 1:0{len(chunk)}d}"


class _JsonLines(torch.utils.data.Dataset):
    """The released dataset (FlagEmbedding research/LLARA/pretrain/data.py): one raw JSON line
    per example; the input is tokenized when fetched, prefix and suffix ids are added."""

    def __init__(self, path, tok, prompt, seq_len: int):
        self.lines = Path(path).read_text(encoding="utf-8").splitlines()
        self.tok, self.max_text = tok, seq_len - prompt.overhead
        self.prefix, self.suffix = list(prompt.prefix), list(prompt.self_suffix + prompt.next_suffix)

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        ex = json.loads(self.lines[i])
        text = self.tok(ex["input"], truncation=True, max_length=self.max_text, add_special_tokens=False)["input_ids"]
        ids = self.prefix + text + self.suffix
        labels = [-100] * len(self.prefix) + text + [-100] * len(self.suffix)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, \
            ex["output_summarize"], ex["output_predict"]


class _ReleasedCollator:
    """The released collator: pad to the longest example, tokenize both target texts per batch."""

    def __init__(self, tok, seq_len: int):
        self.tok, self.seq_len = tok, seq_len

    def __call__(self, examples):
        inputs = [e[0] for e in examples]
        longest = max(len(x["labels"]) for x in inputs)
        for x in inputs:
            x["labels"] = x["labels"] + [-100] * (longest - len(x["labels"]))
        batch = self.tok.pad(inputs, padding=True, return_tensors="pt")
        for name, texts in (("output_summarize_ids", [e[1] for e in examples]),
                            ("output_predict_ids", [e[2] for e in examples])):
            batch[name] = self.tok(texts, padding=True, truncation=True, max_length=self.seq_len,
                                   return_tensors="pt")["input_ids"]
        return batch


class _Baseline:
    """The released way over fixed documents; `measure()` times one pass, start-up excluded."""

    def __init__(self, args, shards, keys, tok, prompt):
        from llara_dist.tokenizer import with_pad_token

        self.keys, self.workers = keys, args.workers
        with_pad_token(tok)  # the released run.py sets one (its unk) before its collator pads
        texts = _texts(shards)
        self.tmp = tempfile.TemporaryDirectory()
        path = Path(self.tmp.name, "pretrain.jsonl")
        with path.open("w", encoding="utf-8") as f:  # untimed: the released data file
            for k in keys:
                f.write(json.dumps({"input": texts[k], "output_summarize": texts[k],
                                    "output_predict": texts.get(_next_key(k), "")}) + "\n")
        self.data = _JsonLines(path, tok, prompt, args.seq_len)
        self.collate, self.batch = _ReleasedCollator(tok, args.seq_len), args.micro_batch
        self.tokens, self.cpu = 0, 0.0  # over all rounds

    def measure(self) -> float:
        loader = torch.utils.data.DataLoader(self.data, batch_size=self.batch, shuffle=False,
                                             num_workers=self.workers, collate_fn=self.collate)
        batches = iter(loader)
        self._count(next(batches), reset=True)  # worker start-up untimed, as for ours
        start, cpu = time.perf_counter(), _cpu_seconds()
        tokens = 0
        for b in batches:
            tokens += self._count(b)
        seconds = time.perf_counter() - start
        self.tokens, self.cpu = self.tokens + tokens, self.cpu + _cpu_seconds() - cpu
        return tokens / seconds

    def _count(self, b, reset=False) -> int:
        if reset:
            self.real = self.slots = 0
        self.real += int(b["attention_mask"].sum())
        self.slots += b["input_ids"].numel()
        return int((b["labels"] != -100).sum())

    @property
    def fill(self) -> float:
        return self.real / self.slots

    def close(self):
        self.tmp.cleanup()
