"""`llara-dist mine-negatives`: fine-tuning lines' negatives replaced by passages the model ranks in
--range for their query, never a positive. Checked against a ranking computed here, independently,
from the same model's vectors (float64 scores, numpy's sort); the ranks of a launch are real
processes started as a launcher would (RANK, WORLD_SIZE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from helpers import refused

from llara_dist.cli import main
from llara_dist.retrieval.finetune_data import read_examples

NEGATIVES = 5
EPS = 1e-5  # float32 sums in another order than numpy's float64 ones: a tie within this may go either way


def plain_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def mine(*argv: str) -> None:
    """`llara-dist mine-negatives ARGV` in this process, which must succeed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.dict(os.environ, plain_env(), clear=True), pytest.raises(SystemExit) as e:
            main(["mine-negatives", *argv])
    finally:
        torch.set_num_threads(threads)
    assert e.value.code == 0


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, shared_data) -> Path:
    """The toy fine-tuning lines, each with a field of its own and FlagEmbedding's neg_scores."""
    out = tmp_path_factory.mktemp("mine") / "train.jsonl"
    records = [json.loads(line) for line in (shared_data / "llara_toy_finetune.jsonl").read_text().splitlines()]
    out.write_text("".join(json.dumps(r | {"source": f"toy-{i}", "neg_scores": [0.5] * len(r["neg"])}) + "\n"
                           for i, r in enumerate(records)))
    return out


@pytest.fixture(scope="module")
def ranking(encoder_dir, train_file):
    """Each line's candidates (the input's distinct pos and neg texts) with their float64 scores, best first."""
    from llara_dist.retrieval.encode import encode_texts, load_encoder

    examples = read_examples(train_file, group_size=1)
    pool = list(dict.fromkeys(t for ex in examples for t in (*ex.pos, *ex.neg)))
    encoder = load_encoder(encoder_dir)
    queries = encode_texts(*encoder, [ex.query for ex in examples], "query", 32, 64).astype(np.float64)
    passages = encode_texts(*encoder, pool, "passage", 32, 512).astype(np.float64)
    scores = queries @ passages.T
    out = []
    for ex, row in zip(examples, scores):
        order = np.argsort(-row, kind="stable")
        out.append((ex, [pool[i] for i in order], row[order]))
    return out


def test_negatives_are_drawn_from_the_range_and_are_never_positives(encoder_dir, train_file, ranking, tmp_path):
    out = tmp_path / "hn.jsonl"
    mine("--model", str(encoder_dir), "--input", str(train_file), "--out", str(out), "--range", "3-40",
         "--negatives", str(NEGATIVES))
    got = lines(out)
    assert len(got) == len(ranking) == 11
    for record, original, (ex, ranked, scores) in zip(got, lines(train_file), ranking):
        assert record["query"] == ex.query and record["pos"] == list(ex.pos)
        assert record["source"] == original["source"] and "neg_scores" not in record  # its own kept, stale dropped
        negs = record["neg"]
        assert len(negs) == NEGATIVES == len(set(negs))
        assert not set(negs) & {*ex.pos, ex.query}
        score_of = dict(zip(ranked, scores))
        # every negative ranks in [3:40], up to float ties at the edges, and they come hardest first
        assert all(scores[39] - EPS <= score_of[n] <= scores[2] + EPS for n in negs), record["source"]
        assert all(score_of[a] >= score_of[b] - EPS for a, b in zip(negs, negs[1:]))
    # the output is fine-tuning data with groups of 1 + NEGATIVES
    assert len(read_examples(out, group_size=NEGATIVES + 1)) == 11

    again, other_seed = tmp_path / "again.jsonl", tmp_path / "seed1.jsonl"
    mine("--model", str(encoder_dir), "--input", str(train_file), "--out", str(again), "--range", "3-40",
         "--negatives", str(NEGATIVES))
    mine("--model", str(encoder_dir), "--input", str(train_file), "--out", str(other_seed), "--range", "3-40",
         "--negatives", str(NEGATIVES), "--seed", "1")
    assert again.read_bytes() == out.read_bytes()
    assert other_seed.read_bytes() != out.read_bytes()


def test_a_short_range_is_filled_at_random_but_never_from_above_it(encoder_dir, train_file, ranking, tmp_path,
                                                                     capsys):
    out = tmp_path / "hn.jsonl"
    capsys.readouterr()
    mine("--model", str(encoder_dir), "--input", str(train_file), "--out", str(out), "--range", "40-42",
         "--negatives", str(NEGATIVES))
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    # 2 ranks for 5 negatives: every line takes at least 3 at random, all counted
    assert summary["lines_filled_at_random"] == 11 and summary["negatives_at_random"] >= 33
    assert summary["lines_short"] == 0
    for record, (ex, ranked, scores) in zip(lines(out), ranking):
        negs = record["neg"]
        assert len(negs) == NEGATIVES == len(set(negs)) and not set(negs) & {*ex.pos, ex.query}
        above = {t for t, s in zip(ranked, scores) if s > scores[39] + EPS}  # surely ranked in the top 40
        assert not above & set(negs)


def test_a_titled_corpus_never_gives_a_positive_back(encoder_dir, train_file, tmp_path, capsys):
    """A corpus that holds the positives with a title line: the titled text is still the positive.
    With the range over the whole corpus and more negatives asked than it has, a line's negatives are
    every passage but its positives, and the shortfall is counted."""
    examples = read_examples(train_file, group_size=1)
    pool = list(dict.fromkeys(t for ex in examples for t in (*ex.pos, *ex.neg)))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": f"Title {i}", "text": t}) + "\n"
                              for i, t in enumerate(pool)))
    out = tmp_path / "hn.jsonl"
    capsys.readouterr()
    mine("--model", str(encoder_dir), "--input", str(train_file), "--out", str(out), "--corpus", str(corpus),
         "--range", f"0-{len(pool)}", "--negatives", str(len(pool)))
    captured = capsys.readouterr()
    summary = json.loads(captured.out.splitlines()[-1])
    assert summary["lines_short"] == 11 and f"11 still have fewer than {len(pool)}" in captured.err
    for record, ex in zip(lines(out), examples):
        bodies = [n.partition("\n")[2] for n in record["neg"]]
        assert all(n.startswith("Title ") for n in record["neg"])
        assert sorted(bodies) == sorted(set(pool) - set(ex.pos))


def test_ranks_share_the_corpus_encoding_and_mine_as_one_process(encoder_dir, train_file, tmp_path, capsys):
    examples = read_examples(train_file, group_size=1)
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("".join(f"p{i}\t{t}\n" for i, t in enumerate(
        dict.fromkeys(t for ex in examples for t in (*ex.pos, *ex.neg)))))
    args = ["--model", str(encoder_dir), "--input", str(train_file), "--corpus", str(corpus), "--range", "2-30",
            "--negatives", str(NEGATIVES), "--shard-docs", "100"]
    one = tmp_path / "one.jsonl"
    mine(*args, "--out", str(one), "--emb-dir", str(tmp_path / "emb-one"))

    two = tmp_path / "two.jsonl"
    ranks = [subprocess.Popen([sys.executable, "-m", "llara_dist", "mine-negatives", *args, "--out", str(two),
                               "--emb-dir", str(tmp_path / "emb-two")], env=plain_env(RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [p.communicate(timeout=300) for p in ranks]
    for p, (_, stderr) in zip(ranks, results):
        assert p.returncode == 0, stderr[-3000:]
    assert json.loads(results[1][0].splitlines()[-1])["written"] == 2  # shards 1 and 3 of 4
    assert two.read_bytes() == one.read_bytes()

    # a rerun reuses the folder: nothing encoded again, the same lines
    again = tmp_path / "again.jsonl"
    capsys.readouterr()
    mine(*args, "--out", str(again), "--emb-dir", str(tmp_path / "emb-one"))
    assert "0 shards to encode of 4" in capsys.readouterr().err
    assert again.read_bytes() == one.read_bytes()


def test_refusals(encoder_dir, train_file, tmp_path, capsys):
    base = ["mine-negatives", "--model", str(encoder_dir), "--out", str(tmp_path / "out.jsonl")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"]}\n{"pos": ["p"]}\n')
    assert f"{bad}:2: 'query' must be a non-empty string" in refused([*base, "--input", str(bad)], capsys)
    for value in ("40-10", "ten"):
        err = refused([*base, "--input", str(train_file), "--range", value], capsys)
        assert f"--range {value}: " in err and "0 <= A < B" in err
    err = refused([*base, "--input", str(train_file), "--negatives", "0"], capsys)
    assert "argument --negatives: 0: must be at least 1" in err
    err = refused([*base[:-2], "--out", str(train_file), "--input", str(train_file)], capsys)
    assert f"--out {train_file}: is or lies in the input {train_file}" in err
    assert "name the corpus with --corpus" in refused([*base, "--input", str(train_file), "--emb-dir",
                                                       str(tmp_path / "emb")], capsys)
    assert "name one with --emb-dir" in refused([*base, "--input", str(train_file), "--index", "pq"], capsys)
    inside = ["mine-negatives", "--model", str(encoder_dir), "--input", str(train_file), "--out",
              str(encoder_dir / "hn.jsonl")]
    assert f"--out {encoder_dir / 'hn.jsonl'}: is or lies in the input {encoder_dir}" in refused(inside, capsys)
    assert not (tmp_path / "out.jsonl").exists()
    assert "argument --seed: -1: must be at least 0" in refused([*base, "--input", str(train_file), "--seed", "-1"],
                                                                 capsys)

    # an embedding folder of another encoding (queries, not passages) is refused, not overwritten
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one passage\nanother passage\n")
    emb = tmp_path / "emb"
    with pytest.raises(SystemExit):
        main(["encode", "--model", str(encoder_dir), "--input", str(corpus), "--kind", "query", "--out-dir", str(emb)])
    before = {p.name: p.read_bytes() for p in emb.iterdir()}
    err = refused([*base, "--input", str(train_file), "--corpus", str(corpus), "--emb-dir", str(emb)], capsys)
    assert f"{emb / 'manifest.json'}: embeddings of another encoding (kind: 'query' != 'passage')" in err
    assert {p.name: p.read_bytes() for p in emb.iterdir()} == before
