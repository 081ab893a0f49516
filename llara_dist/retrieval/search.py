"""Exact dense retrieval (FAISS, through index.py) and its metrics (MRR@10, Recall@k, nDCG@10), BEIR-style.

Metric definitions follow trec_eval (as pytrec_eval, which BEIR uses, computes them):
a document is relevant when its qrel grade is > 0; nDCG uses the grade itself as the
gain and log2(rank + 1) as the discount; queries without a relevant document are left
out of every mean.

`llara-dist search --passages DIR --queries DIR --out run.trec [--k 100]` (configure, run): a
corpus's embedding shards searched with query embeddings, into a TREC run.

    llara-dist encode --model export/ --input corpus.jsonl --kind passage --out-dir emb/corpus
    llara-dist encode --model export/ --input queries.jsonl --kind query --out-dir emb/queries
    llara-dist search --passages emb/corpus --queries emb/queries --out run.trec --k 100

Both folders are what `encode --out-dir` writes (retrieval/embeddings.py), from the same model and
preset. The passages stream through an exact inner-product search one shard at a time
(retrieval/index.py: memory bounded by a shard and the queries, not the corpus); the queries are
held whole. The run lists each query's top k, best first, ties to the earlier passage.

With `--index pq` the search is approximate (index.FolderIndex): 4-bit product-quantization codes of
every passage, built once and saved beside the shards (`index.faiss`, `index.json`), propose
`--rerank` candidates per query, which are scored exactly from the shards. The recall@k of the
result against exact search, on a sample of the queries, is measured when the index is built, and
again when it is searched with another k, --rerank or --nprobe than the saved figure's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from llara_dist.errors import UserError, integer_at_least
from llara_dist.retrieval.index import exact_search

DEFAULT_POOL = 5000  # candidates re-ranked per query with --index pq (at least k)


def search(queries: torch.Tensor, passages: torch.Tensor, k: int,
           chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product, passages in chunks (index.exact_search, FAISS).

    queries [Q, H], passages [P, H] -> (scores [Q, k'], indices [Q, k']), k' = min(k, P), best first;
    equal scores by the lower passage index.
    """
    chunks = (passages[start:start + chunk].float().cpu().numpy() for start in range(0, passages.shape[0], chunk))
    scores, indices = exact_search(queries.float().cpu().numpy(), chunks, k)
    return torch.from_numpy(scores), torch.from_numpy(indices)


def evaluate_run(run: dict[str, list[str]], qrels: dict[str, dict[str, int]],
                 recall_at: tuple[int, ...] = (10, 100, 1000)) -> dict[str, float]:
    """run: query id -> ranked document ids (best first); qrels: query -> doc -> grade."""
    sums = {"mrr@10": 0.0, "ndcg@10": 0.0, **{f"recall@{k}": 0.0 for k in recall_at}}
    n = 0
    for qid, grades in qrels.items():
        relevant = {d for d, g in grades.items() if g > 0}
        if not relevant:
            continue
        n += 1
        ranked = run.get(qid, [])
        sums["mrr@10"] += next((1.0 / (r + 1) for r, d in enumerate(ranked[:10]) if d in relevant), 0.0)
        dcg = sum(grades.get(d, 0) / math.log2(r + 2) for r, d in enumerate(ranked[:10]) if grades.get(d, 0) > 0)
        ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:10]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        sums["ndcg@10"] += dcg / idcg
        for k in recall_at:
            sums[f"recall@{k}"] += len(relevant & set(ranked[:k])) / len(relevant)
    return {name: (v / n if n else 0.0) for name, v in sums.items()} | {"queries": n}


def write_trec_run(path: str | Path, run_scores: dict[str, list[tuple[str, float]]], tag: str = "llara") -> None:
    """TREC run format: `qid Q0 docid rank score tag`, one line per retrieved document."""
    with open(path, "w") as f:
        for qid, ranked in run_scores.items():
            for rank, (doc, score) in enumerate(ranked, 1):
                f.write(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n")


def prepare_outputs(outputs: dict[str, str | None], inputs: list) -> None:
    """Before any work, so that neither an input nor hours of encoding are lost to an output file
    (option -> path; None: not asked for): refuse one that is an input or lies in an input folder
    (where it could replace an input file, or be mixed in with them), that two options share, or that
    is a folder; make the folder it goes in, as `--out-dir` folders are made."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if not path:
            continue
        target = Path(path).resolve()
        for given in inputs:
            if Path(given).resolve() in (target, *target.parents):
                raise UserError(f"{option} {path}: is or lies in the input {given}; write it elsewhere")
        if target in seen:
            raise UserError(f"{option} {path}: is also {seen[target]}'s file; give them different files")
        if target.is_dir():
            raise UserError(f"{option} {path}: is a folder, not a file")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{option} {path}: its folder cannot be made (a file is in the way)") from None
        seen[target] = option


# -- `llara-dist search` ---------------------------------------------------------------------

def add_index_arguments(parser) -> None:
    """The search's options shared by `search` and `eval --emb-dir`."""
    parser.add_argument("--index", choices=("exact", "pq"), default="exact",
                        help="exact: every passage scored (default); pq: an approximate index of 4-bit product-"
                             "quantization codes, saved beside the passage shards and reused, proposes --rerank "
                             "candidates per query, scored exactly from the shards")
    parser.add_argument("--pq-m", type=integer_at_least(1), metavar="M",
                        help="--index pq: sub-quantizers, M/2 bytes a vector (default: dimension / 2)")
    parser.add_argument("--nlist", type=integer_at_least(1), default=1,
                        help="--index pq: IVF lists over the codes (default: %(default)s, every code scanned; "
                             "random-like data gains nothing from lists)")
    parser.add_argument("--nprobe", type=integer_at_least(1), default=16, help="--index pq: lists scanned per query")
    parser.add_argument("--rerank", type=integer_at_least(1), metavar="POOL",
                        help=f"--index pq: candidates re-ranked per query (default: the larger of {DEFAULT_POOL} "
                             "and --k)")
    parser.add_argument("--check-queries", type=integer_at_least(0), default=100,
                        help="--index pq: queries whose recall@k against exact search is measured when the index "
                             "is built, or searched with another --k, --rerank or --nprobe than its saved recall's "
                             "(default: %(default)s)")
    parser.add_argument("--rebuild-index", action="store_true", help="--index pq: build the index even if saved")


def search_folder(args, passages_dir, queries, k: int) -> tuple:
    """(scores, rows, doc ids, report) of `queries` against the passage shards in `passages_dir`, as
    add_index_arguments' options say; report is None for the exact search."""
    import numpy as np

    from llara_dist.retrieval import embeddings
    from llara_dist.retrieval.index import FolderIndex, PQSettings, default_pq_m

    if args.index == "exact":
        doc_ids: list[str] = []

        def shards():
            for ids, vectors in embeddings.iter_shards(passages_dir):
                doc_ids.extend(ids)
                yield vectors

        scores, rows = exact_search(np.asarray(queries, np.float32), shards(), k)
        return scores, rows, doc_ids, None
    pool = args.rerank if args.rerank is not None else max(DEFAULT_POOL, k)
    dim = (embeddings.read_manifest(passages_dir) or {}).get("dim", queries.shape[1])
    settings = PQSettings(m=args.pq_m or default_pq_m(dim), nlist=args.nlist)
    found = FolderIndex(passages_dir, settings).search(queries, k, pool, args.nprobe, args.check_queries,
                                                       rebuild=args.rebuild_index)
    return found.scores, found.rows, found.doc_ids, found.report


def configure(parser) -> None:
    parser.add_argument("--passages", required=True, metavar="DIR", help="embedding shards of the corpus")
    parser.add_argument("--queries", required=True, metavar="DIR", help="embedding shards of the queries")
    parser.add_argument("--out", required=True, help="TREC run file to write")
    parser.add_argument("--k", type=integer_at_least(1), default=100, help="passages per query (default: %(default)s)")
    add_index_arguments(parser)


def run(args) -> int:
    import numpy as np

    from llara_dist.retrieval import embeddings

    prepare_outputs({"--out": args.out}, [args.passages, args.queries])
    passages, queries = (embeddings.read_manifest(p) for p in (args.passages, args.queries))
    for folder, manifest, kind in ((args.passages, passages, "passage"), (args.queries, queries, "query")):
        if manifest is None:
            raise UserError(f"{folder}: not an embeddings folder (llara-dist encode --out-dir writes one)")
        if manifest["kind"] != kind:
            raise UserError(f"{folder}: embeddings of kind {manifest['kind']!r}, not {kind!r} (encode --kind)")
    differ = [key for key in ("model", "preset", "dim") if passages[key] != queries[key]]
    if differ:
        raise UserError(f"{args.passages} and {args.queries} come from different encodings ("
                        + ", ".join(f"{k} {passages[k]!r} vs {queries[k]!r}" for k in differ) + ")")
    qids, q = embeddings.read_all(args.queries)
    scores, rows, doc_ids, report = search_folder(args, args.passages, np.asarray(q, np.float32), args.k)
    write_trec_run(args.out, {qid: [(doc_ids[r], float(s)) for r, s in zip(rows[i], scores[i]) if r >= 0]
                              for i, qid in enumerate(qids)})
    print(json.dumps({"out": args.out, "queries": len(qids), "passages": len(doc_ids), "k": int(rows.shape[1]),
                      "index": args.index} | ({"approximate": report} if report else {})))
    return 0
