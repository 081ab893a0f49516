"""FAISS search over embedding shards against brute force; the IVF index's recall; the metrics
of search.evaluate_run against pytrec_eval (trec_eval itself) on randomised runs and qrels."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import pytrec_eval

from llara_dist.errors import UserError
from llara_dist.retrieval.index import build_ivf, exact_search, recall_against_exact
from llara_dist.retrieval.search import evaluate_run


def brute_force(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every score computed in float64, ordered by score then by the lower row index."""
    scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
    rows = np.broadcast_to(np.arange(corpus.shape[0]), scores.shape)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("k", [1, 10, 150, 1000])  # 150: FAISS selects by reservoir from k = 100 on
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_exact_search_over_shards_is_brute_force(k, dtype):
    rng = np.random.default_rng(k)
    sizes = [50, 3, 0, 120, 7, 64]  # an empty shard, shards smaller than k
    shards = [rng.standard_normal((n, 32)).astype(dtype) for n in sizes]
    queries = rng.standard_normal((13, 32)).astype(np.float32)
    scores, ids = exact_search(queries, shards, k)
    corpus = np.concatenate(shards).astype(np.float32)
    ref_scores, ref_ids = brute_force(queries, corpus, k)
    assert scores.shape == ids.shape == (13, min(k, sum(sizes)))
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    # Each row returned holds the score of its rank, no row twice; where two true scores lie closer
    # than float32 rounding the order may differ, everywhere else the rows are the reference's.
    true = np.take_along_axis(queries.astype(np.float64) @ corpus.astype(np.float64).T, ids, axis=1)
    np.testing.assert_allclose(true, ref_scores, rtol=0, atol=1e-5)
    assert all(len(set(row)) == len(row) for row in ids.tolist())
    gaps = np.abs(np.diff(ref_scores, axis=1))
    clear = np.ones(ref_scores.shape, bool)
    clear[:, 1:] &= gaps > 1e-5
    clear[:, :-1] &= gaps > 1e-5
    assert clear.mean() > 0.5 and np.array_equal(ids[clear], ref_ids[clear])


@pytest.mark.parametrize("k", [3, 20, 130])
def test_equal_scores_come_out_by_the_lower_global_index(k):
    """Small integer vectors: every inner product is exact in float32, so duplicates tie exactly,
    within a shard and across shards, at the top-k boundary too."""
    rng = np.random.default_rng(k)
    corpus = rng.integers(-2, 3, (400, 8)).astype(np.float32)[rng.integers(0, 12, 400)]  # 12 distinct rows
    queries = rng.integers(-2, 3, (25, 8)).astype(np.float32)
    cuts = [0, 90, 91, 250, 400]
    scores, ids = exact_search(queries, (corpus[a:b] for a, b in zip(cuts, cuts[1:])), k)
    ref_scores, ref_ids = brute_force(queries, corpus, k)
    assert np.array_equal(scores, ref_scores.astype(np.float32))
    assert np.array_equal(ids, ref_ids)
    again = exact_search(queries, [corpus[:17], corpus[17:]], k)  # other shard boundaries, same answer
    assert np.array_equal(again[1], ids)


def test_shards_from_a_generator_are_held_one_at_a_time():
    rng = np.random.default_rng(0)
    alive, most_alive_before_loading = set(), []

    def shards():
        for n in range(6):
            most_alive_before_loading.append(len(alive))
            shard = rng.standard_normal((200, 16)).astype(np.float32)
            alive.add(n)
            weakref.finalize(shard, alive.discard, n)
            yield shard
            del shard  # the generator's own reference: only the consumer's may remain

    queries = rng.standard_normal((4, 16)).astype(np.float32)
    scores, ids = exact_search(queries, shards(), 5)
    assert most_alive_before_loading == [0] * 6
    assert ids.shape == (4, 5) and ids.max() < 1200


def test_a_shard_of_the_wrong_width_is_named():
    queries = np.zeros((2, 16), np.float32)
    with pytest.raises(UserError, match=r"shard 1: vectors of dimension 8, expected 16"):
        exact_search(queries, [np.zeros((4, 16), np.float32), np.zeros((4, 8), np.float32)], 3)


def clustered(rng, centers: np.ndarray, n: int) -> np.ndarray:
    """Unit vectors around the centers, the noise as wide per dimension as the centers' spread, so
    that many true neighbours lie in another IVF list than their query's."""
    points = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, centers.shape[1]))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_recall_against_exact():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, 64))
    corpus, queries = clustered(rng, centers, 20000), clustered(rng, centers, 200)
    shards = lambda: (corpus[a:a + 4000] for a in range(0, 20000, 4000))  # noqa: E731
    built = build_ivf(shards(), dim=64, nlist=128, nprobe=8, check_queries=queries, check_k=10)
    assert built.rows == 20000
    _, exact_ids = exact_search(queries, shards(), 10)
    _, approx_ids = built.search(queries, 10)
    assert built.recall == pytest.approx(recall_against_exact(approx_ids, exact_ids))
    assert built.recall >= 0.9
    # The measure can fail: one list probed out of 128 on structureless data misses most neighbours.
    flat = rng.standard_normal((20000, 64)).astype(np.float32)
    poor = build_ivf([flat], dim=64, nlist=128, nprobe=1, check_queries=rng.standard_normal((100, 64)), check_k=10)
    assert poor.recall < 0.6


def random_case(rng) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """A run (query -> doc -> score) and qrels: graded or binary, scores often tied, queries
    missing from the run or from the qrels, queries with no relevant document."""
    docs = [f"d{j}" for j in rng.choice(1000, size=rng.integers(1, 60), replace=False)]
    grades = [0, 1] if rng.random() < 0.5 else [0, 1, 2, 3]
    tied = rng.random() < 0.5
    run, qrels = {}, {}
    for q in range(rng.integers(1, 8)):
        qid = f"q{q}"
        if rng.random() < 0.85:
            judged = rng.choice(docs, size=rng.integers(1, len(docs) + 1), replace=False)
            qrels[qid] = {str(d): int(rng.choice(grades)) for d in judged}
        if rng.random() < 0.85:
            retrieved = rng.choice(docs, size=rng.integers(1, len(docs) + 1), replace=False)
            run[qid] = {str(d): float(rng.integers(0, 4)) if tied else float(rng.standard_normal())
                        for d in retrieved}
    return run, qrels


def trec_order(scored: dict[str, float]) -> list[str]:
    """The ranking trec_eval reads from a run: score descending, equal scores by doc id descending."""
    return [d for d, _ in sorted(scored.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def test_metrics_equal_pytrec_eval():
    """MRR@10 is trec_eval's recip_rank on the run cut at 10, nDCG@10 its ndcg_cut_10, recall@k its
    recall_k. evaluate_run scores a ranking as given, so it gets the run in trec_eval's order.
    Means: over the queries with a relevant document; one missing from the run counts 0 (trec_eval -c)."""
    recall_at = (1, 5, 10, 15, 20, 30, 100)
    rng = np.random.default_rng(0)
    compared = 0
    for case in range(300):
        run, qrels = random_case(rng)
        ranked = {qid: trec_order(scored) for qid, scored in run.items()}
        top10 = {qid: {d: run[qid][d] for d in docs[:10]} for qid, docs in ranked.items()}
        measures = {"ndcg_cut_10", *(f"recall_{k}" for k in recall_at)}
        reference = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall." + ",".join(map(str, recall_at))})
        per_query = reference.evaluate(run)
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
        counted = [qid for qid, g in qrels.items() if any(v > 0 for v in g.values())]
        expected = {}
        for qid in counted:
            values = {m: per_query[qid][m] for m in measures} if qid in run else dict.fromkeys(measures, 0.0)
            values["recip_rank"] = rr[qid]["recip_rank"] if qid in run else 0.0
            ours = evaluate_run({qid: ranked[qid]} if qid in run else {}, {qid: qrels[qid]}, recall_at)
            assert ours["queries"] == 1
            for name, theirs in [("mrr@10", values["recip_rank"]), ("ndcg@10", values["ndcg_cut_10"]),
                                 *((f"recall@{k}", values[f"recall_{k}"]) for k in recall_at)]:
                assert ours[name] == pytest.approx(theirs, abs=1e-9), (case, qid, name, run.get(qid), qrels[qid])
                expected[name] = expected.get(name, 0.0) + theirs / len(counted)
            compared += 1
        means = evaluate_run(ranked, qrels, recall_at)
        assert means["queries"] == len(counted)
        for name, value in expected.items():
            assert means[name] == pytest.approx(value, abs=1e-9), (case, name)
    assert compared > 500
