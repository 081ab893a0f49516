"""Retrieval metrics against hand-computed cases; exact search; BEIR conversion of real data."""

import math

import pytest
import torch

from llara_dist.retrieval.beir import finetune_to_beir, load_beir
from llara_dist.retrieval.search import evaluate_run, search, write_trec_run


def test_metrics_hand_computed():
    qrels = {
        "q1": {"a": 1, "b": 2},  # graded
        "q2": {"x": 1},
        "q3": {"z": 0},  # no relevant document: left out of every mean
    }
    run = {
        "q1": ["c", "b", "d", "a"],  # first relevant at rank 2
        "q2": ["y"] * 0 + [f"n{i}" for i in range(10)] + ["x"],  # relevant at rank 11
    }
    m = evaluate_run(run, qrels, recall_at=(1, 10, 100))
    assert m["queries"] == 2
    assert m["mrr@10"] == pytest.approx((1 / 2 + 0) / 2)
    dcg_q1 = 2 / math.log2(3) + 1 / math.log2(5)
    idcg_q1 = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx((dcg_q1 / idcg_q1 + 0) / 2)
    assert m["recall@1"] == pytest.approx(0.0)
    assert m["recall@10"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["recall@100"] == pytest.approx((1.0 + 1.0) / 2)


def test_search_exact_in_chunks():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g)
    s, i = search(q, p, k=5, chunk=8)  # chunks smaller than k's candidates pool
    ref_s, ref_i = (q @ p.T).topk(5, dim=1)
    assert torch.equal(i, ref_i)
    assert torch.allclose(s, ref_s)
    s_all, i_all = search(q, p, k=1000, chunk=13)
    assert i_all.shape == (7, 50)


def test_finetune_to_beir_roundtrip(shared_data, tmp_path):
    built = finetune_to_beir(shared_data / "llara_toy_finetune.jsonl", tmp_path)
    loaded = load_beir(tmp_path)
    assert loaded.queries == built.queries and loaded.qrels == built.qrels
    rows = [l for l in (shared_data / "llara_toy_finetune.jsonl").read_text().splitlines() if l.strip()]
    assert len(loaded.queries) == len(rows)
    assert all(len(d) >= 1 for d in loaded.qrels.values())
    assert len(loaded.corpus) == len(set(loaded.corpus.values()))  # deduplicated passages
    write_trec_run(tmp_path / "run.trec", {"q1": [("d0", 1.5), ("d1", 0.5)]})
    assert (tmp_path / "run.trec").read_text().splitlines()[1] == "q1 Q0 d1 2 0.500000 llara"


def test_bad_qrels_named(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "t"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "t"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td9\t1\n")
    with pytest.raises(ValueError, match=r"test.tsv:2: corpus id 'd9'"):
        load_beir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1"}\n')
    with pytest.raises(ValueError, match=r'corpus.jsonl:1: no "text" field'):
        load_beir(tmp_path)


def test_qrels_in_beir_trec_and_ms_marco_layouts(tmp_path):
    from llara_dist.retrieval.beir import read_qrels

    want = {"q1": {"d1": 1, "d7": 0}, "1048585": {"7187158": 1}, "q2": {"d2": 2}}
    layouts = {
        "beir.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td7\t0\n1048585\t7187158\t1\nq2\td2\t2\n",
        "trec.txt": "q1 0 d1 1\nq1 0 d7 0\n1048585 0 7187158 1\nq2 Q0 d2 2\n",
        "qrels.dev.small.tsv": "q1\t0\td1\t1\nq1\t0\td7\t0\n1048585\t0\t7187158\t1\nq2\t0\td2\t2\n",
    }
    for name, text in layouts.items():
        (tmp_path / name).write_text(text)
        assert read_qrels(tmp_path / name) == want, name
    (tmp_path / "bad.txt").write_text("q1 0 d1 1\nq1 d1\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected .* or `query iteration document grade`"):
        read_qrels(tmp_path / "bad.txt")


def test_make_beir_command(shared_data, tmp_path):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "llara_dist", "make-beir", "--finetune",
                           str(shared_data / "llara_toy_finetune.jsonl"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["queries"] == len(load_beir(tmp_path).queries) > 0
