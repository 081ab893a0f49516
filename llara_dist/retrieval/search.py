"""Exact dense retrieval (FAISS, through index.py) and its metrics (MRR@10, Recall@k, nDCG@10), BEIR-style.

Metric definitions follow trec_eval (as pytrec_eval, which BEIR uses, computes them):
a document is relevant when its qrel grade is > 0; nDCG uses the grade itself as the
gain and log2(rank + 1) as the discount; queries without a relevant document are left
out of every mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llara_dist.retrieval.index import exact_search


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
