"""The whole pipeline on an embedded tiny default, on CPU, with nothing to download.

    make demo                              # = llara-dist demo --out demo_out
    llara-dist demo --out /tmp/demo        # anywhere else

The corpus is built at run time from the prose of Python's own documentation topics
(`pydoc_data.topics`, in every Python install), a byte-level BPE tokenizer is trained
on it, and `prep` turns it into shards. The demo is a list of stages run in order over
one `Demo` context; later stages (pack, train, export, evaluate) append themselves to
STAGES and read what earlier ones left in the context.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Demo:
    """What the stages share: settings, and the outputs each stage leaves for the next."""

    out: Path
    seq_len: int = 512  # packed row length of the demo's later stages
    preset: str = "released"
    vocab_size: int = 4000
    corpus: Path | None = None  # wiki-jsonl file (stage corpus)
    tokenizer: Path | None = None  # Hugging Face tokenizer folder (stage tokenizer)
    shards: Path | None = None  # prep output: shards + manifest.json (stage prep)
    manifest: dict = field(default_factory=dict)
    shard_docs: int = 48  # documents per shard: several shards, so that each training rank reads its own
    run_dir: Path | None = None  # training run folder (stage train)
    export: Path | None = None  # exported model folder (stage export)


def _prose(text: str) -> tuple[str, str]:
    """A pydoc topic to (title, prose): its heading, and its paragraphs unwrapped, without
    code blocks (indented), grammar productions or heading underlines."""
    lines = text.strip("\n").splitlines()
    title = lines[0].strip() if len(lines) > 1 and re.fullmatch(r"[*=\-~^]+", lines[1].strip()) else ""
    paragraphs, cur = [], []
    for line in lines:
        if not line.strip() or line.startswith((" ", "\t")) or re.fullmatch(r"\s*[*=\-~^]{3,}\s*", line):
            if cur:
                paragraphs.append(" ".join(cur))
                cur = []
            continue
        cur.append(line.strip())
    if cur:
        paragraphs.append(" ".join(cur))
    if title and paragraphs and paragraphs[0] == title:
        paragraphs = paragraphs[1:]
    return title, "\n".join(p for p in paragraphs if len(p.split()) > 1)


def stage_corpus(d: Demo) -> str:
    """One wiki-jsonl article per pydoc topic."""
    from pydoc_data.topics import topics

    d.corpus = d.out / "corpus" / "pydoc_topics.jsonl"
    d.corpus.parent.mkdir(parents=True, exist_ok=True)
    words = 0
    with open(d.corpus, "w", encoding="utf-8") as f:
        for name in sorted(topics):
            title, text = _prose(topics[name])
            words += len(text.split())
            f.write(json.dumps({"title": title or name, "text": text}, ensure_ascii=False) + "\n")
    return f"{len(topics)} articles, {words:,} words of prose from pydoc_data.topics -> {d.corpus}"


def stage_tokenizer(d: Demo) -> str:
    """A byte-level BPE trained on the corpus (LLaMA-like specials)."""
    from llara_dist.tokenizer import train_tokenizer

    d.tokenizer = d.out / "tokenizer"
    texts = [json.loads(line)["text"] for line in d.corpus.read_text(encoding="utf-8").splitlines()]
    tok = train_tokenizer(texts, d.tokenizer, vocab_size=d.vocab_size)
    return f"vocabulary {len(tok)} -> {d.tokenizer}"


def stage_prep(d: Demo) -> str:
    """Chunks sized for the demo's rows (seq_len minus the prompts), tokenized into shards."""
    from llara_dist.data.prep import PrepSettings, prep

    d.shards = d.out / "shards"
    result = prep(PrepSettings(inputs=[str(d.corpus)], format="wiki-jsonl", tokenizer=str(d.tokenizer),
                               out=str(d.shards), seq_len=d.seq_len, preset=d.preset, overwrite=True,
                               shard_docs=d.shard_docs),
                  progress=False)
    d.manifest = result.manifest
    return result.summary


STAGES: list[tuple[str, Callable[[Demo], str]]] = [
    ("corpus", stage_corpus),
    ("tokenizer", stage_tokenizer),
    ("prep", stage_prep),
]


def stage_train(d: Demo) -> str:
    """A tiny LLaMA trained for a few dozen steps on 2 CPU ranks (torchrun, DeepSpeed ZeRO-3, gloo)."""
    import os
    import shutil
    import subprocess
    import sys

    from llara_dist.model.tiny import save_tiny_llama
    from llara_dist.tokenizer import load_tokenizer

    model = save_tiny_llama(d.out / "model", vocab_size=len(load_tokenizer(d.tokenizer)))
    d.run_dir = d.out / "run"
    # a run folder that holds a run resumes it (the trainer's rule): a demo run again trains afresh
    fresh = ""
    if d.run_dir.exists():
        shutil.rmtree(d.run_dir)
        fresh = f"the previous demo run in {d.run_dir} removed: training afresh\n"
    world = 2 if len(d.manifest.get("shards", [])) >= 2 else 1  # every rank needs a shard
    steps = 40
    config = {
        "run_dir": str(d.run_dir),
        "data": {"shards": str(d.shards), "seq_len": d.seq_len, "num_workers": 0},
        "model": {"path": str(model), "dtype": "fp32"},
        "objective": {"preset": d.preset},
        "train": {"global_batch": 8, "micro_batch": 2, "steps": steps, "lr": 3e-3, "warmup_steps": 4,
                  "ckpt_every": 20, "keep_checkpoints": 2, "tokenizer": str(d.tokenizer)},
    }
    d.out.joinpath("train.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "llara_dist", "train", "--config", str(d.out / "train.yaml")]
    log = d.out / "train.log"
    with open(log, "w") as f:
        # OMP_NUM_THREADS: torchrun sets 1 itself, with a banner saying so
        env = {"OMP_NUM_THREADS": "1", **os.environ, "DS_ACCELERATOR": "cpu"}
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"training failed with status {rc}; see {log}")
    records = [json.loads(line) for line in (d.run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = "  ".join(f"{r['step']}:{r['loss']:.3f}" for r in records[::max(1, len(records) // 8)])
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    return (f"{fresh}{world} ranks x ZeRO-3, {steps} steps of 8 rows x {d.seq_len} tokens; loss (step:loss) {curve}\n"
            f"mean loss of the first 5 steps {first:.3f} -> last 5 steps {last:.3f}; "
            f"{records[-1]['tokens_per_s']:.0f} tokens/s; run folder {d.run_dir} (config.yaml, metrics.jsonl, "
            f"checkpoints/, tokenizer/); log {log}")


STAGES.append(("train", stage_train))


def stage_export(d: Demo) -> str:
    """The latest checkpoint as a Hugging Face model folder (safetensors, tokenizer, llara.json)."""
    from llara_dist.retrieval.export import export_run

    d.export = export_run(d.run_dir, d.out / "export", dtype="fp32", overwrite=True)  # a rerun replaces it
    files = sorted(p.name for p in d.export.iterdir())
    return f"{d.export}: {', '.join(files)}"


def _retrieval_set(d: Demo) -> Path:
    """Queries = topic titles; passages = ~100-word pieces of every topic; relevant = the topic's pieces."""
    beir = d.out / "retrieval"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    with open(beir / "corpus.jsonl", "w") as corpus, open(beir / "queries.jsonl", "w") as queries, \
            open(beir / "qrels" / "test.tsv", "w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for a, line in enumerate(d.corpus.read_text(encoding="utf-8").splitlines()):
            article = json.loads(line)
            words = article["text"].split()
            queries.write(json.dumps({"_id": f"q{a}", "text": article["title"]}) + "\n")
            for c in range(0, len(words), 100):
                corpus.write(json.dumps({"_id": f"d{a}-{c}", "title": "", "text": " ".join(words[c:c + 100])}) + "\n")
                qrels.write(f"q{a}\td{a}-{c}\t1\n")
    return beir


def stage_evaluate(d: Demo) -> str:
    """Retrieval metrics of the trained model next to its untrained starting point, same run."""
    from llara_dist.config import ModelConfig, ObjectiveConfig
    from llara_dist.model.decoder import load_model
    from llara_dist.prompts import resolve_preset
    from llara_dist.retrieval.encode import load_encoder
    from llara_dist.retrieval.evaluate import evaluate_model
    from llara_dist.tokenizer import load_tokenizer

    beir = _retrieval_set(d)
    model, tokenizer, preset = load_encoder(d.export)
    trained = evaluate_model(model, tokenizer, preset, beir, k=100)
    base_tok = load_tokenizer(d.tokenizer)
    base_preset = resolve_preset(ObjectiveConfig(preset=d.preset))
    untrained = load_model(ModelConfig(path=str(d.out / "model"), dtype="fp32"), base_tok, base_preset, "cpu")
    baseline = evaluate_model(untrained.eval(), base_tok, base_preset, beir, k=100)
    names = ("mrr@10", "ndcg@10", "recall@10", "recall@100")
    rows = ["model       " + "  ".join(f"{n:>10}" for n in names)]
    for label, m in (("untrained", baseline), ("trained", trained)):
        rows.append(f"{label:<11} " + "  ".join(f"{m[n]:>10.4f}" for n in names))
    return (f"{trained['queries']} queries (topic titles) over the topics' 100-word pieces ({beir})\n"
            + "\n".join(rows))


STAGES += [("export", stage_export), ("evaluate", stage_evaluate)]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default demo_out)")


def run(args: argparse.Namespace) -> int:
    d = Demo(out=Path(args.out))
    d.out.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    for i, (name, stage) in enumerate(STAGES, 1):
        print(f"[{i}/{len(STAGES)}] {name}: {stage.__doc__.splitlines()[0]}", flush=True)
        t0 = time.monotonic()
        report = stage(d)
        print("    " + report.replace("\n", "\n    "), flush=True)
        print(f"    ({time.monotonic() - t0:.1f} s)", flush=True)
    print(f"demo: done in {time.monotonic() - t_all:.1f} s; outputs under {d.out}/")
    return 0
