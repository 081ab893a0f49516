"""`llara-dist encode --out-dir`: a corpus streamed into float16 shards with their ids, by any number
of ranks, resumable. Ranks are real processes started as a launcher would (RANK, WORLD_SIZE); the
folders they write are compared byte for byte with the folder of one uninterrupted process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from helpers import refused

from llara_dist.cli import main
from llara_dist.retrieval import embeddings
from llara_dist.retrieval.encode import STOP_AFTER_SHARDS_ENV, iter_documents

DOCS = 230
SHARD_DOCS = 50  # 5 shards, the last one of 30
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_STEP_NUM_TASKS", STOP_AFTER_SHARDS_ENV)


def plain_env(**extra: str) -> dict:
    """This environment without any launcher's variables; one thread, as every run here (so that a
    process's sums are those of any other)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


@contextmanager
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def encode_here(*argv: str) -> None:
    """`llara-dist encode ARGV` through the command line's entry point, in this process, as one process."""
    with mock.patch.dict(os.environ, plain_env(), clear=True), one_thread(), pytest.raises(SystemExit) as e:
        main(["encode", *argv])
    assert e.value.code == 0


def encode_process(*argv: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llara_dist", "encode", *argv], env=plain_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data) -> tuple[Path, list[str]]:
    """A BEIR corpus.jsonl of DOCS short WikiText passages (every third with a title) and its ids."""
    lines = [ln.strip() for ln in (shared_data / "wikitext2_valid.txt").read_text(encoding="utf-8").splitlines()]
    texts = [" ".join(ln.split()[:12 + i % 20]) for i, ln in enumerate(ln for ln in lines if ln and ln[0] != "=")]
    ids = [f"w{i:04d}" for i in range(DOCS)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": d, "title": "A title" if i % 3 == 0 else "", "text": texts[i]}) + "\n"
                            for i, d in enumerate(ids)))
    return path, ids


def encode_args(encoder_dir: Path, corpus_path: Path, out_dir: Path, kind: str = "passage") -> list[str]:
    return ["--model", str(encoder_dir), "--input", str(corpus_path), "--kind", kind, "--out-dir", str(out_dir),
            "--shard-docs", str(SHARD_DOCS), "--batch-size", "16"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, encoder_dir, corpus) -> Path:
    """The folder of one uninterrupted process: what every other way of encoding must write."""
    out = tmp_path_factory.mktemp("one_process") / "emb"
    encode_here(*encode_args(encoder_dir, corpus[0], out))
    return out


def test_the_folder_holds_the_corpus_in_input_order(one_process, encoder_dir, corpus, tmp_path):
    corpus_path, ids = corpus
    manifest = embeddings.read_manifest(one_process)
    assert manifest["count"] == DOCS and manifest["dim"] == 64 and manifest["dtype"] == "float16"
    assert manifest["input_sha256"] and manifest["preset"] == "released" and manifest["kind"] == "passage"
    sizes = [len(shard_ids) for shard_ids, _ in embeddings.iter_shards(one_process)]
    assert sizes == [50, 50, 50, 50, 30]
    got_ids, vectors = embeddings.read_all(one_process)
    assert got_ids == ids and vectors.dtype == np.float16
    # the same texts through the one-file mode (all in one batch order): each id's row is its own text's
    encode_here("--model", str(encoder_dir), "--input", str(corpus_path), "--kind", "passage",
                "--out", str(tmp_path / "all.npy"))
    np.testing.assert_allclose(vectors.astype(np.float32), np.load(tmp_path / "all.npy"), atol=2e-3)


def test_two_ranks_write_the_files_of_one_process(one_process, encoder_dir, corpus, tmp_path):
    out = tmp_path / "emb"
    ranks = [encode_process(*encode_args(encoder_dir, corpus[0], out), RANK=str(r), WORLD_SIZE="2") for r in (0, 1)]
    results = [p.communicate(timeout=300) for p in ranks]
    for p, (stdout, stderr) in zip(ranks, results):
        assert p.returncode == 0, stderr[-3000:]
    summaries = [json.loads(stdout.splitlines()[-1]) for stdout, _ in results]
    assert [s["written"] for s in summaries] == [3, 2]  # shards 0, 2, 4 and 1, 3
    assert "docs/s" in results[0][1] and "ETA" in results[0][1] and "docs/s" not in results[1][1]  # rank 0 reports
    assert folder_bytes(out) == folder_bytes(one_process)


def test_a_stopped_encode_resumes_to_the_files_of_an_uninterrupted_one(one_process, encoder_dir, corpus, tmp_path,
                                                                      capsys):
    out = tmp_path / "emb"
    stopped = encode_process(*encode_args(encoder_dir, corpus[0], out), **{STOP_AFTER_SHARDS_ENV: "2"})
    _, stderr = stopped.communicate(timeout=300)
    assert stopped.returncode != 0, stderr[-3000:]
    assert [embeddings.shard_complete(out, i) for i in range(5)] == [True, True, False, False, False]
    assert "count" not in embeddings.read_manifest(out)
    with pytest.raises(ValueError, match="has not finished"):
        embeddings.read_all(out)
    # what a kill between a shard's two renames, or during a write, leaves: neither counts as a shard
    (out / embeddings.emb_name(2)).write_bytes(b"half a shard")
    (out / (embeddings.ids_name(3) + embeddings.TMP_SUFFIX)).write_text("w9999\n")
    capsys.readouterr()
    encode_here(*encode_args(encoder_dir, corpus[0], out))
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (summary["written"], summary["skipped"], summary["complete"]) == (3, 2, True)
    assert folder_bytes(out) == folder_bytes(one_process)


def test_a_folder_of_another_encoding_is_refused_unless_overwrite(one_process, encoder_dir, corpus, tmp_path, capsys):
    out = tmp_path / "emb"
    shutil.copytree(one_process, out)
    err = refused(["encode", *encode_args(encoder_dir, corpus[0], out, kind="query")], capsys)
    assert f"{out / 'manifest.json'}: written by another encoding (kind: 'passage' != 'query')" in err
    assert folder_bytes(out) == folder_bytes(one_process)
    other_input = tmp_path / "other.jsonl"
    other_input.write_text(corpus[0].read_text()[:-3] + '!"}\n')  # one character more in the last text
    err = refused(["encode", *encode_args(encoder_dir, other_input, out)], capsys)
    assert "(input_sha256: " in err and "kind:" not in err

    encode_here(*encode_args(encoder_dir, corpus[0], out, kind="query"), "--overwrite")
    assert embeddings.read_manifest(out)["kind"] == "query"
    ids, queries = embeddings.read_all(out)
    assert ids == corpus[1] and not np.array_equal(queries, embeddings.read_all(one_process)[1])

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("mine\n")
    err = refused(["encode", *encode_args(encoder_dir, corpus[0], mixed)], capsys)
    assert f"{mixed}: holds files (notes.txt) but no manifest.json" in err


def test_input_formats_give_their_ids(tmp_path):
    beir = tmp_path / "corpus.jsonl"
    beir.write_text('{"_id": "doc-a", "title": "Title", "text": "first"}\n\n{"_id": 7, "text": "second"}\n')
    assert list(iter_documents(beir)) == [("doc-a", "Title\nfirst"), ("7", "second")]
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"id": "q1", "text": "what"}\n{"text": "no id"}\n')
    assert list(iter_documents(queries)) == [("q1", "what"), ("2", "no id")]  # no id: the line number
    msmarco = tmp_path / "collection.tsv"
    msmarco.write_text("0\tThe presence of communication\n1\ttext with\ta tab\n")
    assert list(iter_documents(msmarco)) == [("0", "The presence of communication"), ("1", "text with\ta tab")]
    plain = tmp_path / "texts.txt"
    plain.write_text("one {\n\n  \nfour\n")
    assert list(iter_documents(plain)) == [("1", "one {"), ("4", "four")]


def test_bad_input_is_refused_with_its_file_and_line_as_it_is_reached(tmp_path):
    cases = {
        "c.tsv": (b"0\tfine\n1 no tab\n", "c.tsv:2: no tab"),
        "d.tsv": (b"0\tfine\n1\tcaf\xe9\n", "d.tsv:2: not UTF-8 text (byte 0xe9 at column 6)"),
        "e.jsonl": (b'{"_id": "a", "text": "fine"}\n{"_id": "b", "text": \n', "e.jsonl:2: not valid JSON"),
        "f.jsonl": (b'{"_id": "a", "text": "fine"}\n{"_id": "b", "body": "x"}\n', 'f.jsonl:2: no "text" field'),
        "g.jsonl": (b'{"_id": "a", "text": "fine"}\n{"_id": "b\\nc", "text": "x"}\n', "g.jsonl:2: document id 'b\\nc'"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        documents = iter_documents(path)
        assert next(documents)[1] == "fine"  # streamed: the first record comes before the bad line is read
        with pytest.raises(ValueError) as e:
            next(documents)
        assert str(e.value).startswith(str(tmp_path / message)), e.value


def test_search_over_the_shards_writes_the_exact_top_k(one_process, encoder_dir, corpus, tmp_path, capsys):
    """`llara-dist search`: the corpus's shards streamed through FAISS against the query shards give each
    query's exact top k (the in-memory search of the same vectors), as a TREC run; mismatched folders refused."""
    import torch

    from llara_dist.retrieval import embeddings
    from llara_dist.retrieval.search import search

    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                               for i, t in enumerate(["the river and the town", "a song of the war", "football"])))
    q_dir = tmp_path / "q"
    encode_here(*encode_args(encoder_dir, queries, q_dir, kind="query"))
    run = tmp_path / "run.trec"
    with pytest.raises(SystemExit) as e:
        main(["search", "--passages", str(one_process), "--queries", str(q_dir), "--out", str(run), "--k", "7"])
    assert e.value.code == 0, capsys.readouterr().err
    got = {}
    for line in run.read_text().splitlines():
        qid, q0, doc, rank, score, tag = line.split()
        got.setdefault(qid, []).append((int(rank), doc, float(score)))
    ids, p = embeddings.read_all(one_process)
    qids, q = embeddings.read_all(q_dir)
    scores, rows = search(torch.from_numpy(q.astype(np.float32)), torch.from_numpy(p.astype(np.float32)), 7)
    assert list(got) == qids
    for i, qid in enumerate(qids):
        assert [r for r, _, _ in got[qid]] == list(range(1, 8))
        assert [d for _, d, _ in got[qid]] == [ids[j] for j in rows[i].tolist()]
        np.testing.assert_allclose([s for _, _, s in got[qid]], scores[i].numpy(), atol=1e-6)
    with pytest.raises(SystemExit) as e:  # the roles swapped: refused, naming the folder
        main(["search", "--passages", str(q_dir), "--queries", str(one_process), "--out", str(run)])
    assert e.value.code == 2 and f"{q_dir}: embeddings of kind 'query', not 'passage'" in capsys.readouterr().err


def test_eval_through_shard_folders_reuses_them(encoder_dir, shared_data, tmp_path, capsys):
    """`eval --emb-dir`: encode -> search -> metrics through shard folders; the metrics are those of the exact
    search of the shards' vectors, and a second run reuses every shard (nothing encoded again)."""
    import torch

    from llara_dist.retrieval import embeddings
    from llara_dist.retrieval.beir import finetune_to_beir, load_beir
    from llara_dist.retrieval.search import evaluate_run, search

    beir = tmp_path / "beir"
    finetune_to_beir(shared_data / "llara_toy_finetune.jsonl", beir)
    emb = tmp_path / "emb"
    argv = ["eval", "--model", str(encoder_dir), "--beir", str(beir), "--emb-dir", str(emb), "--shard-docs", "13",
            "--k", "20"]
    runs = []
    for _ in range(2):
        with mock.patch.dict(os.environ, plain_env(), clear=True), one_thread(), pytest.raises(SystemExit) as e:
            main(argv)
        out, err = capsys.readouterr()
        assert e.value.code == 0, err
        runs.append((json.loads(out), err))
    assert runs[0][0] == runs[1][0]
    assert "0 shards to encode" in runs[1][1] and "0 shards to encode" not in runs[0][1]
    data = load_beir(beir)
    ids, p = embeddings.read_all(emb / "corpus")
    qids, q = embeddings.read_all(emb / "queries")
    keep = [i for i, qid in enumerate(qids) if qid in data.qrels]
    _, rows = search(torch.from_numpy(q[keep].astype(np.float32)), torch.from_numpy(p.astype(np.float32)), 20)
    want = evaluate_run({qids[i]: [ids[j] for j in rows[n].tolist()] for n, i in enumerate(keep)}, data.qrels)
    assert runs[0][0] == want and len(ids) == len(data.corpus) > 13  # several shards


def write_prep_folder(folder: Path, records: list[tuple[str, str]]) -> Path:
    """A folder as `prep` writes it: the first half of the records in a block-layout shard, the rest in
    a sample-layout one (shards of earlier versions), with sizes and sha256 in manifest.json."""
    import hashlib

    from llara_dist.data import shards

    folder.mkdir(parents=True)
    half = len(records) // 2
    entries = []
    for i, (part, layout) in enumerate(((records[:half], "block"), (records[half:], "sample"))):
        path = folder / shards.shard_name(i)
        shards.write_shard(path, [shards.encode_sample(key, [1, 2, 3], None, text, {"article": n, "chunk": 0,
                                                                                     "source": "t"})
                                  for n, (key, text) in enumerate(part)], layout=layout)
        data = path.read_bytes()
        entries.append({"name": path.name, "docs": len(part), "tokens": 3 * len(part), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    shards.write_manifest(folder, {"version": 1, "shards": entries, "docs": len(records), "tokens": 3 * len(records),
                                   "tokenizer": {}, "chunking": {}, "format": "test", "inputs": [], "skipped": {},
                                   "truncated": {}})
    return folder


def test_prep_shards_as_input_give_their_keys_and_stored_texts(encoder_dir, shared_data, tmp_path, capsys):
    """`encode --input PREP_FOLDER`: documents in manifest order, the shard key as id and the stored text
    (both layouts); the folder of vectors is the one the same records give as a .tsv."""
    lines = [ln.strip() for ln in (shared_data / "wikitext2_valid.txt").read_text(encoding="utf-8").splitlines()]
    texts = [" ".join(ln.split()[:8 + i % 15]) for i, ln in enumerate(ln for ln in lines if ln and ln[0] != "=")]
    records = [(f"wiki-{i:09d}-{i % 3:05d}", texts[i]) for i in range(23)]
    prep_dir = write_prep_folder(tmp_path / "prep", records)
    assert list(iter_documents(prep_dir)) == records
    tsv = tmp_path / "same.tsv"
    tsv.write_text("".join(f"{key}\t{text}\n" for key, text in records))
    args = ["--model", str(encoder_dir), "--kind", "passage", "--shard-docs", "8", "--batch-size", "4"]
    encode_here(*args, "--input", str(prep_dir), "--out-dir", str(tmp_path / "from_prep"))
    encode_here(*args, "--input", str(tsv), "--out-dir", str(tmp_path / "from_tsv"))
    ids, vectors = embeddings.read_all(tmp_path / "from_prep")
    assert ids == [key for key, _ in records] and vectors.shape[0] == 23
    assert np.array_equal(vectors, embeddings.read_all(tmp_path / "from_tsv")[1])
    # A shard changed after prep is refused by name before the model loads; so is a folder without manifest.
    shard = prep_dir / "shard-000001.tar"
    damaged = bytearray(shard.read_bytes())
    damaged[700] ^= 0xFF  # a byte of the first member's data
    shard.write_bytes(bytes(damaged))
    err = refused(["encode", *args, "--input", str(prep_dir), "--out-dir", str(tmp_path / "x")], capsys)
    assert f"{shard}: sha256 " in err and "the shard changed after prep" in err
    (tmp_path / "plain").mkdir()
    err = refused(["encode", *args, "--input", str(tmp_path / "plain"), "--out-dir", str(tmp_path / "y")], capsys)
    assert f"{tmp_path / 'plain'}: a folder, but no manifest.json" in err


def test_eval_with_a_pq_index_re_ranking_every_passage_is_the_exact_eval(encoder_dir, shared_data, tmp_path, capsys):
    """`eval --emb-dir --index pq`: with a pool as large as the corpus the re-ranking scores every
    passage, so the metrics are the exact search's; the index is saved beside the corpus's shards, its
    recall measured (1.0) when built, and reused by a rerun."""
    from llara_dist.retrieval.beir import finetune_to_beir

    beir = tmp_path / "beir"
    finetune_to_beir(shared_data / "llara_toy_finetune.jsonl", beir)
    emb = tmp_path / "emb"
    argv = ["eval", "--model", str(encoder_dir), "--beir", str(beir), "--emb-dir", str(emb), "--shard-docs", "13",
            "--k", "20"]
    results = []
    for extra in ([], ["--index", "pq", "--rerank", "100000"], ["--index", "pq", "--rerank", "100000"]):
        with mock.patch.dict(os.environ, plain_env(), clear=True), one_thread(), pytest.raises(SystemExit) as e:
            main([*argv, *extra])
        out, err = capsys.readouterr()
        assert e.value.code == 0, err
        results.append(json.loads(out))
    exact, built, reused = results
    assert built.pop("approximate")["built"] and not reused["approximate"]["built"]
    assert reused.pop("approximate")["recall"]["value"] == 1.0
    assert built == reused == pytest.approx(exact, abs=1e-9)
    assert (emb / "corpus" / "index.faiss").is_file()
