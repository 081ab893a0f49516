"""Retrieval evaluation on a BEIR-layout folder: `llara-dist eval`.

    llara-dist eval --model out/export --beir data/scifact [--split test] [--out metrics.json] [--trec run.trec]
    llara-dist eval --model out/export --beir data/msmarco --emb-dir emb/msmarco     # a corpus at scale

Encodes corpus (SELF prompt) and queries (NEXT prompt), exact top-k search, and prints
MRR@10, Recall@{10,100,1000} and nDCG@10 as JSON (definitions in search.py). In memory by
default; with --emb-dir, encode -> search -> metrics through shard folders (DIR/corpus and
DIR/queries, as `encode --out-dir` writes them): a rerun, or a preempted run started again,
reuses the shards already written, the ranks of a launcher share the encoding, rank 0 searches
the shards as they stream (memory: one shard) and reports. Vectors are then float16. With
--emb-dir, `--index pq` makes the search approximate, through an index saved beside the corpus's
shards and reused (search.add_index_arguments); the metrics JSON then has its recall and timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from llara_dist.errors import UserError, existing_path, integer_at_least
from llara_dist.retrieval.beir import RetrievalSet, load_beir
from llara_dist.retrieval.encode import encode_texts, load_encoder
from llara_dist.retrieval.search import (
    add_index_arguments,
    evaluate_run,
    prepare_outputs,
    search,
    search_folder,
    write_trec_run,
)


def evaluate_model(model, tokenizer, preset, beir_dir, split: str = "test", k: int = 1000,
                   batch_size: int = 32, max_tokens: int = 512, trec: str | None = None) -> dict:
    """The metrics of `beir_dir` (a BEIR folder, or the RetrievalSet read from one) under the model."""
    data = beir_dir if isinstance(beir_dir, RetrievalSet) else load_beir(beir_dir, split)
    doc_ids, qids = list(data.corpus), [q for q in data.queries if q in data.qrels]
    progress = sys.stderr.isatty()
    p = encode_texts(model, tokenizer, preset, [data.corpus[d] for d in doc_ids], "passage",
                     batch_size, max_tokens, progress)
    q = encode_texts(model, tokenizer, preset, [data.queries[i] for i in qids], "query",
                     batch_size, max_tokens, progress)
    scores, index = search(torch.from_numpy(q), torch.from_numpy(p), k)
    return scored_run(qids, doc_ids, scores.numpy(), index.numpy(), data.qrels, trec)


def scored_run(qids: list[str], doc_ids: list[str], scores, rows, qrels: dict, trec: str | None) -> dict:
    """The metrics of a search's top-k (rows index doc_ids), its TREC run written where asked."""
    ranked = {qid: [(doc_ids[j], float(s)) for j, s in zip(rows[n].tolist(), scores[n].tolist()) if j >= 0]
              for n, qid in enumerate(qids)}
    if trec:
        write_trec_run(trec, ranked)
    return evaluate_run({qid: [d for d, _ in r] for qid, r in ranked.items()}, qrels)


FOLDER_WAIT_S = 24 * 3600  # rank 0 waits this long for the other ranks' shards


def evaluate_folders(args) -> dict | None:
    """encode -> search -> metrics through the shard folders under args.emb_dir; None on ranks > 0."""
    import numpy as np

    from llara_dist.retrieval import embeddings
    from llara_dist.retrieval.encode import encode_to_folder

    data = load_beir(args.beir, args.split)  # a bad folder is refused before the model loads
    encoder = load_encoder(args.model, attn=args.attn)
    folders = {}
    for kind, name in (("passage", "corpus"), ("query", "queries")):
        folders[kind] = Path(args.emb_dir) / name
        done = encode_to_folder(argparse.Namespace(
            model=args.model, input=str(Path(args.beir) / f"{name}.jsonl"), kind=kind, out_dir=str(folders[kind]),
            shard_docs=args.shard_docs, overwrite=False, batch_size=args.batch_size, max_tokens=args.max_tokens,
            attn=args.attn, preset=None, packed=False), encoder)
    if done["rank"] != 0:
        return None
    deadline = time.monotonic() + FOLDER_WAIT_S
    while any("count" not in embeddings.read_manifest(f) for f in folders.values()):  # other ranks' shards
        if time.monotonic() > deadline:
            raise UserError(f"{args.emb_dir}: the other ranks' shards did not come within {FOLDER_WAIT_S} s")
        time.sleep(2.0)
    all_qids, q = embeddings.read_all(folders["query"])
    keep = [i for i, qid in enumerate(all_qids) if qid in data.qrels]
    scores, rows, doc_ids, report = search_folder(args, folders["passage"], np.asarray(q[keep], np.float32), args.k)
    metrics = scored_run([all_qids[i] for i in keep], doc_ids, scores, rows, data.qrels, args.trec)
    return metrics | ({"approximate": report} if report else {})


def configure(parser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (with llara.json)")
    parser.add_argument("--beir", required=True, help="folder with corpus.jsonl, queries.jsonl, qrels/")
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", type=integer_at_least(1), default=1000, help="documents retrieved per query")
    parser.add_argument("--batch-size", type=integer_at_least(1), default=32)
    parser.add_argument("--max-tokens", type=integer_at_least(1), default=512)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--out", help="write the metrics JSON here too")
    parser.add_argument("--trec", help="write the ranking in TREC run format")
    parser.add_argument("--emb-dir", metavar="DIR",
                        help="encode into shard folders DIR/corpus and DIR/queries, resumable and shared by the "
                             "ranks of a launcher, and search them shard by shard (default: all in memory)")
    parser.add_argument("--shard-docs", type=integer_at_least(1), default=10000,
                        help="documents per shard with --emb-dir")
    add_index_arguments(parser)


def run(args) -> int:
    existing_path(args.model, "model folder")  # a mistyped model folder is named first, as encode names it
    # before any work: an output written over an input would be found only after hours of encoding, the input lost
    emb_folders = [Path(args.emb_dir) / name for name in ("corpus", "queries")] if args.emb_dir else []
    prepare_outputs({"--out": args.out, "--trec": args.trec}, [args.beir, args.model, *emb_folders])
    if args.emb_dir:
        metrics = evaluate_folders(args)
        if metrics is None:  # not rank 0: its shards are written, rank 0 reports
            return 0
    else:
        if args.index != "exact":
            raise UserError(f"--index {args.index} searches the shard folders of --emb-dir; the in-memory "
                            "evaluation searches exactly")
        data = load_beir(args.beir, args.split)  # a bad folder is refused before the model loads
        model, tokenizer, preset = load_encoder(args.model, attn=args.attn)
        metrics = evaluate_model(model, tokenizer, preset, data, args.split, args.k, args.batch_size,
                                 args.max_tokens, args.trec)
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
