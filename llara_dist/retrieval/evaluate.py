"""Retrieval evaluation on a BEIR-layout folder: `llara-dist eval`.

    llara-dist eval --model out/export --beir data/scifact [--split test] [--out metrics.json] [--trec run.trec]

Encodes corpus (SELF prompt) and queries (NEXT prompt), exact top-k search, and prints
MRR@10, Recall@{10,100,1000} and nDCG@10 as JSON (definitions in retrieval.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llara_dist.retrieval.beir import load_beir
from llara_dist.retrieval.encode import encode_texts, load_encoder
from llara_dist.retrieval.search import evaluate_run, search, write_trec_run


def evaluate_model(model, tokenizer, preset, beir_dir, split: str = "test", k: int = 1000,
                   batch_size: int = 32, max_tokens: int = 512, trec: str | None = None) -> dict:
    data = load_beir(beir_dir, split)
    doc_ids, qids = list(data.corpus), [q for q in data.queries if q in data.qrels]
    progress = sys.stderr.isatty()
    p = encode_texts(model, tokenizer, preset, [data.corpus[d] for d in doc_ids], "passage",
                     batch_size, max_tokens, progress)
    q = encode_texts(model, tokenizer, preset, [data.queries[i] for i in qids], "query",
                     batch_size, max_tokens, progress)
    scores, index = search(torch.from_numpy(q), torch.from_numpy(p), k)
    ranked = {qid: [(doc_ids[j], float(s)) for j, s in zip(index[n].tolist(), scores[n].tolist())]
              for n, qid in enumerate(qids)}
    if trec:
        write_trec_run(trec, ranked)
    return evaluate_run({qid: [d for d, _ in r] for qid, r in ranked.items()}, data.qrels)


def configure(parser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (with llara.json)")
    parser.add_argument("--beir", required=True, help="folder with corpus.jsonl, queries.jsonl, qrels/")
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", type=int, default=1000, help="documents retrieved per query")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--out", help="write the metrics JSON here too")
    parser.add_argument("--trec", help="write the ranking in TREC run format")


def run(args) -> int:
    model, tokenizer, preset = load_encoder(args.model, attn=args.attn)
    metrics = evaluate_model(model, tokenizer, preset, args.beir, args.split, args.k, args.batch_size,
                             args.max_tokens, args.trec)
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
