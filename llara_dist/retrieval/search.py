"""Exact dense retrieval and its metrics (MRR@10, Recall@k, nDCG@10), BEIR-style.

Metric definitions follow trec_eval (as pytrec_eval, which BEIR uses, computes them):
a document is relevant when its qrel grade is > 0; nDCG uses the grade itself as the
gain and log2(rank + 1) as the discount; queries without a relevant document are left
out of every mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def search(queries: torch.Tensor, passages: torch.Tensor, k: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product, passages in chunks.

    queries [Q, H], passages [P, H] -> (scores [Q, k'], indices [Q, k']), k' = min(k, P), best first.
    """
    k = min(k, passages.shape[0])
    best_s = torch.full((queries.shape[0], 0), float("-inf"), dtype=torch.float32)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.int64)
    for start in range(0, passages.shape[0], chunk):
        block = passages[start:start + chunk]
        s = (queries.float() @ block.float().T).cpu()  # [Q, c]
        s_top, i_top = s.topk(min(k, s.shape[1]), dim=1)
        cand_s = torch.cat([best_s, s_top], 1)
        cand_i = torch.cat([best_i, i_top + start], 1)
        best_s, order = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_i = cand_i.gather(1, order)
    return best_s, best_i


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
