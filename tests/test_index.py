"""FAISS search over embedding shards against brute force; the IVF index's recall; the approximate
index kept beside a shard folder (recall reported at the pool it was measured at, reuse, rebuilt when
the shards change or its file is damaged, queries searched in blocks of bounded memory); the
search benchmark at tiny size; the metrics of search.evaluate_run against pytrec_eval (trec_eval
itself) on randomised runs and qrels."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from helpers import refused

from llara_dist.cli import main
from llara_dist.errors import UserError
from llara_dist.quiet import VERBOSE_ENV
from llara_dist.retrieval import embeddings
from llara_dist.retrieval.index import (
    BLOCK_ENTRIES,
    INDEX_FILE,
    INDEX_MANIFEST,
    FolderIndex,
    PQSettings,
    build_ivf,
    build_pq,
    exact_search,
    pq_candidates,
    query_blocks,
    recall_against_exact,
    rerank,
)
from llara_dist.retrieval.search import evaluate_run

REPO = Path(__file__).resolve().parents[1]


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


def unit(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_rerank_gives_the_exact_order_of_the_candidates():
    rng = np.random.default_rng(3)
    corpus, queries = unit(rng, 900, 32), unit(rng, 12, 32)
    candidates = np.stack([rng.choice(900, 60, replace=False) for _ in range(12)])
    candidates[0, 50:] = -1  # a query with fewer candidates than asked for
    shards = [corpus[a:a + 250] for a in range(0, 900, 250)]
    scores, rows = rerank(queries, candidates, shards, 55)
    assert rows.shape == (12, 55)
    for i in range(12):
        pool = candidates[i][candidates[i] >= 0]
        ref_scores, ref_order = brute_force(queries[i:i + 1], corpus[pool], 55)
        n = min(55, len(pool))
        assert rows[i, :n].tolist() == pool[ref_order[0, :n]].tolist()
        np.testing.assert_allclose(scores[i, :n], ref_scores[0, :n], atol=1e-5)
        assert (rows[i, n:] == -1).all() and np.isneginf(scores[i, n:]).all()
    # every row a candidate: the exact search itself, float16 shards as stored
    everything = np.tile(np.arange(900), (12, 1))
    half = [s.astype(np.float16) for s in shards]
    assert np.array_equal(rerank(queries, everything, half, 10)[1], exact_search(queries, half, 10)[1])
    with pytest.raises(UserError, match="row 900 of a corpus of 900 rows"):
        rerank(queries, np.full((12, 1), 900), shards, 1)


def test_pq_codes_with_a_larger_pool_recall_more():
    """On structureless data the codes alone rank poorly; exact re-ranking of a larger pool finds more
    of the true top-k, and two dimensions a code beat four."""
    rng = np.random.default_rng(5)
    corpus, queries = unit(rng, 6000, 64), unit(rng, 40, 64)
    shards = lambda: (corpus[a:a + 1000] for a in range(0, 6000, 1000))  # noqa: E731
    _, truth = exact_search(queries, shards(), 10)
    recall = {}
    for m in (16, 32):
        index, exact = build_pq(shards(), 64, PQSettings(m=m), check_queries=queries, check_k=10)
        assert index.ntotal == 6000 and np.array_equal(exact.result()[1], truth)
        for pool in (10, 100, 1000):
            rows = rerank(queries, pq_candidates(index, queries, pool), shards(), 10)[1]
            recall[m, pool] = recall_against_exact(rows, truth)
    assert recall[32, 10] < recall[32, 100] < recall[32, 1000] and recall[32, 1000] >= 0.95
    assert recall[16, 100] < recall[32, 100]
    ivf, _ = build_pq(shards(), 64, PQSettings(m=32, nlist=8))
    rows = rerank(queries, pq_candidates(ivf, queries, 1000, nprobe=8), shards(), 10)[1]
    assert recall_against_exact(rows, truth) >= 0.95  # every list probed
    with pytest.raises(UserError, match="12 sub-quantizers do not divide the dimension 64"):
        build_pq(shards(), 64, PQSettings(m=12))


def write_random_folder(folder: Path, vectors: np.ndarray, kind: str, shard_docs: int, tag: str = "v1") -> None:
    identity = {"model": "random", "preset": "released", "kind": kind, "max_tokens": 0, "shard_docs": shard_docs,
                "input": "random", "input_sha256": f"random-{tag}"}
    embeddings.write_folder(folder, ((([f"{kind[0]}{i}" for i in range(a, min(a + shard_docs, len(vectors)))]),
                                      vectors[a:a + shard_docs]) for a in range(0, len(vectors), shard_docs)), identity)


def search_cli(argv: list[str], capsys) -> tuple[dict, str]:
    with pytest.raises(SystemExit) as e:
        main(["search", *argv])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    return json.loads(out), err


def read_run(path: Path) -> dict[str, list[str]]:
    run: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        qid, _, doc, _, _, _ = line.split()
        run.setdefault(qid, []).append(doc)
    return run


def test_search_with_a_saved_pq_index(tmp_path, capsys):
    """`search --index pq`: the index is built beside the passage shards with its recall@k on sample
    queries (the recall of the very run it wrote), reused by a rerun, rebuilt when the shards change."""
    rng = np.random.default_rng(11)
    passages, queries = tmp_path / "p", tmp_path / "q"
    corpus = unit(rng, 5000, 64)
    write_random_folder(passages, corpus, "passage", 700)
    write_random_folder(queries, unit(rng, 30, 64), "query", 100)
    exact_run, pq_run = tmp_path / "exact.trec", tmp_path / "pq.trec"
    search_cli(["--passages", str(passages), "--queries", str(queries), "--out", str(exact_run), "--k", "10"], capsys)
    argv = ["--passages", str(passages), "--queries", str(queries), "--out", str(pq_run), "--k", "10", "--index",
            "pq", "--rerank", "40", "--pq-m", "16", "--check-queries", "30"]
    first, err = search_cli(argv, capsys)
    report = first["approximate"]
    assert report["built"] and f"{passages / INDEX_FILE}: building (no {INDEX_FILE}" in err
    assert "recall@10" in err and (passages / INDEX_MANIFEST).is_file()
    exact, approx = read_run(exact_run), read_run(pq_run)
    measured = np.mean([len(set(exact[q]) & set(approx[q])) / 10 for q in exact])
    assert report["recall"] == {"k": 10, "pool": 40, "nprobe": 1, "queries": 30, "value": pytest.approx(measured),
                                "measured": "now"}
    assert 0.3 < measured < 1  # a pool of 40 of 5000, 4 dimensions a code: some neighbours missed
    stamp = (passages / INDEX_FILE).stat().st_mtime_ns
    second, err = search_cli(argv, capsys)
    assert not second["approximate"]["built"] and "building" not in err
    assert (passages / INDEX_FILE).stat().st_mtime_ns == stamp and read_run(pq_run) == approx
    assert second["approximate"]["recall"] == report["recall"] | {"measured": "saved"}  # as when it was built
    # The same count and manifest, other vectors: caught by the shards' sha256 as they are re-ranked.
    changed = corpus.copy()
    changed[:700] = unit(rng, 700, 64)
    embeddings.write_shard(passages, 0, [f"p{i}" for i in range(700)], changed[:700])
    third, err = search_cli(argv, capsys)
    assert "built over other shards (their sha256 differs); rebuilding" in err and third["approximate"]["built"]
    _, truth = exact_search(embeddings.read_all(queries)[1], [changed.astype(np.float16)], 10)
    assert third["approximate"]["recall"]["value"] == pytest.approx(
        recall_against_exact(np.array([[int(d[1:]) for d in row] for row in read_run(pq_run).values()]), truth))
    # Other shards by their manifest (another count): rebuilt before searching, saying why.
    write_random_folder(passages, corpus[:4000], "passage", 700, tag="v2")
    fourth, err = search_cli(argv, capsys)
    assert "built over other shards (their count: 5000 != 4000)" in err and fourth["passages"] == 4000
    # Other settings: rebuilt too.
    fifth, err = search_cli([*argv[:-4], "--pq-m", "32"], capsys)
    assert "built with other settings" in err and fifth["approximate"]["built"]


def test_an_index_built_without_check_queries_is_reused(tmp_path, capsys):
    rng = np.random.default_rng(4)
    write_random_folder(tmp_path / "p", unit(rng, 400, 16), "passage", 150)
    write_random_folder(tmp_path / "q", unit(rng, 6, 16), "query", 100)
    argv = ["--passages", str(tmp_path / "p"), "--queries", str(tmp_path / "q"), "--out", str(tmp_path / "run"),
            "--k", "5", "--index", "pq", "--rerank", "400", "--check-queries", "0"]
    first, _ = search_cli(argv, capsys)
    second, _ = search_cli(argv, capsys)
    assert first["approximate"]["built"] and first["approximate"]["recall"] is None
    assert not second["approximate"]["built"] and second["approximate"]["recall"] is None
    assert "no recall was saved with the index" in second["approximate"]["recall_note"]


def recall_of_run(run: Path, exact: dict[str, list[str]]) -> float:
    approx = read_run(run)
    return float(np.mean([len(set(exact[q]) & set(approx[q])) / len(exact[q]) for q in exact]))


def test_a_reused_index_reports_the_recall_of_its_own_pool(tmp_path, capsys):
    """The recall goes with the pool it was measured at: searched again with a smaller pool, the
    saved index's recall is measured again (or, without check queries, not reported), and a recall
    lost to a crash before it was saved is measured by the next search."""
    rng = np.random.default_rng(12)
    passages, queries = tmp_path / "p", tmp_path / "q"
    write_random_folder(passages, unit(rng, 3000, 32), "passage", 700)
    write_random_folder(queries, unit(rng, 25, 32), "query", 100)
    exact_run, pq_run = tmp_path / "exact.trec", tmp_path / "pq.trec"
    search_cli(["--passages", str(passages), "--queries", str(queries), "--out", str(exact_run), "--k", "10"], capsys)
    exact = read_run(exact_run)
    base = ["--passages", str(passages), "--queries", str(queries), "--out", str(pq_run), "--k", "10", "--index",
            "pq", "--pq-m", "8"]
    built, _ = search_cli([*base, "--rerank", "200", "--check-queries", "25"], capsys)
    wide = built["approximate"]["recall"]
    assert wide["pool"] == 200 and wide["value"] == pytest.approx(recall_of_run(pq_run, exact))
    narrow, err = search_cli([*base, "--rerank", "10", "--check-queries", "25"], capsys)
    recall = narrow["approximate"]["recall"]
    assert not narrow["approximate"]["built"] and recall["pool"] == 10 and recall["measured"] == "now"
    assert recall["value"] == pytest.approx(recall_of_run(pq_run, exact)) and recall["value"] < wide["value"]
    assert "recall@10" in err and "pool 10" in err
    saved = json.loads((passages / INDEX_MANIFEST).read_text())
    assert saved["recall"] == {key: wide[key] for key in saved["recall"]}  # the build's figure is kept
    unmeasured, err = search_cli([*base, "--rerank", "10", "--check-queries", "0"], capsys)
    assert unmeasured["approximate"]["recall"] is None
    note = unmeasured["approximate"]["recall_note"]
    assert "measured at pool 200, nprobe 1, not at this search's k 10, pool 10, nprobe 1" in note
    assert "not measured" in err
    # A crash between writing the index and its recall leaves "recall": null: the next search measures it.
    saved["recall"] = None
    (passages / INDEX_MANIFEST).write_text(json.dumps(saved))
    again, _ = search_cli([*base, "--rerank", "200", "--check-queries", "25"], capsys)
    assert not again["approximate"]["built"] and again["approximate"]["recall"]["measured"] == "now"
    assert again["approximate"]["recall"]["value"] == pytest.approx(recall_of_run(pq_run, exact))
    assert json.loads((passages / INDEX_MANIFEST).read_text())["recall"]["value"] == pytest.approx(wide["value"])
    reused, _ = search_cli([*base, "--rerank", "200", "--check-queries", "25"], capsys)
    assert reused["approximate"]["recall"] == again["approximate"]["recall"] | {"measured": "saved"}


def test_queries_are_searched_in_blocks_of_bounded_memory(tmp_path):
    """Blocks of queries x pool give the same result as one block, with a peak of numpy memory
    (tracemalloc sees numpy's allocations) set by the block, not by the number of queries."""
    rng = np.random.default_rng(13)
    write_random_folder(tmp_path / "p", unit(rng, 3000, 16), "passage", 1000)
    queries = unit(rng, 2000, 16)
    index = FolderIndex(tmp_path / "p", PQSettings(m=8), log=lambda line: None)
    index.search(queries[:1], 10, 300, check_queries=0)  # built and saved: what follows only searches

    def peak_of(block_entries: int):
        tracemalloc.start()
        try:
            found = index.search(queries, 10, 300, check_queries=2000, block_entries=block_entries)
            return found, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    blocked, blocked_peak = peak_of(300 * 64)  # measures the recall missing from the saved index
    whole, whole_peak = peak_of(BLOCK_ENTRIES)
    assert whole.report["blocks"] == 1 and blocked.report["blocks"] == len(query_blocks(2000, 300, 300 * 64)) == 32
    assert np.array_equal(blocked.rows, whole.rows) and np.array_equal(blocked.scores, whole.scores)
    shards = (v for _, v in embeddings.iter_shards(tmp_path / "p"))
    truth = exact_search(queries, shards, 10)[1]
    assert blocked.report["recall"]["value"] == pytest.approx(recall_against_exact(blocked.rows, truth))
    assert whole.report["recall"] == blocked.report["recall"] | {"measured": "saved"}
    assert blocked_peak < whole_peak / 4, (blocked_peak, whole_peak)
    assert all((end - start) * 300 <= 300 * 64 for start, end in query_blocks(2000, 300, 300 * 64))


def test_a_damaged_index_file_is_rebuilt(tmp_path, capsys):
    rng = np.random.default_rng(14)
    write_random_folder(tmp_path / "p", unit(rng, 500, 16), "passage", 200)
    write_random_folder(tmp_path / "q", unit(rng, 5, 16), "query", 100)
    argv = ["--passages", str(tmp_path / "p"), "--queries", str(tmp_path / "q"), "--out", str(tmp_path / "run"),
            "--k", "5", "--index", "pq", "--rerank", "50", "--pq-m", "8"]
    first, _ = search_cli(argv, capsys)
    path = tmp_path / "p" / INDEX_FILE
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    second, err = search_cli(argv, capsys)
    assert f"{path}: building (unreadable: read error" in err and "Traceback" not in err
    assert second["approximate"]["built"] and second["approximate"]["recall"] == first["approximate"]["recall"]
    assert not search_cli(argv, capsys)[0]["approximate"]["built"]  # the rebuilt file is whole
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if p.name.endswith(".tmp")) == []


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "index.faiss"
    target.write_bytes(b"before")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        embeddings.write_renamed(target, fail, "index.faiss.1.tmp")
    assert target.read_bytes() == b"before" and [p.name for p in tmp_path.iterdir()] == ["index.faiss"]


def test_product_quantizer_training_is_quiet_unless_verbose(capfd, monkeypatch):
    """300 training rows for 16-centroid sub-quantizers: FAISS would warn once per sub-quantizer."""
    rng = np.random.default_rng(15)
    corpus = unit(rng, 300, 32)
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    build_pq([corpus], 32, PQSettings(m=16))
    assert "WARNING clustering" not in capfd.readouterr().err
    monkeypatch.setenv(VERBOSE_ENV, "1")
    build_pq([corpus], 32, PQSettings(m=16))
    assert capfd.readouterr().err.count("WARNING clustering 300 points to 16 centroids") == 16


def test_pq_search_refusals(tmp_path, capsys):
    rng = np.random.default_rng(2)
    write_random_folder(tmp_path / "p", unit(rng, 300, 24), "passage", 100)
    write_random_folder(tmp_path / "q", unit(rng, 5, 24), "query", 100)
    base = ["search", "--passages", str(tmp_path / "p"), "--queries", str(tmp_path / "q"), "--out",
            str(tmp_path / "run"), "--index", "pq"]
    assert "--rerank 50 is below --k 100" in refused([*base, "--rerank", "50"], capsys)
    assert "5 sub-quantizers do not divide the dimension 24" in refused([*base, "--pq-m", "5"], capsys)
    err = refused(["eval", "--model", str(tmp_path), "--beir", str(tmp_path), "--index", "pq"], capsys)
    assert "--index pq searches the shard folders of --emb-dir" in err


def test_search_bench_runs_at_tiny_size(tmp_path):
    """bench/search_bench.py end to end at a tiny size: its figures come from the runs it wrote."""
    work = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "search_bench.py"), "--docs", "3000", "--dim", "32",
                           "--queries", "20", "--k", "10", "--shard-docs", "1000", "--rerank", "300", "--dir",
                           str(work)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["docs"] == 3000 and result["exact"]["peak_rss_mib"] > 0
    assert 0.5 <= result["pq_build"]["recall@10"] <= 1 and result["pq_reuse"]["index_built"] is False
    assert not work.exists()  # the vectors are deleted unless --keep


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
