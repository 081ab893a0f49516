"""What `llara-dist encode` reads besides the text: the input's ids and layout, its count options, the
model folder (llara.json, weights, tokenizer) and the embedding folders written for search. Bad input
is refused before the model loads, with the file, the record and the reason (exit 2, no traceback)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import refused
from test_encode_shards import encode_here

from llara_dist.retrieval import embeddings
from llara_dist.retrieval.encode import iter_documents
from llara_dist.textfiles import read_json_lines, read_lines

BOM = "\ufeff"


def encode_argv(model, path, tmp_path, *more: str) -> list[str]:
    return ["encode", "--model", str(model), "--input", str(path), "--kind", "passage",
            "--out", str(tmp_path / "v.npy"), *more]


def model_copy(encoder_dir, tmp_path, name="model"):
    """A writable copy of the read-only encoder folder (a few hundred KB)."""
    return shutil.copytree(encoder_dir, tmp_path / name)


def test_a_byte_order_mark_starts_no_record(tmp_path):
    """A BOM at the start of a file is dropped for every reader: JSON lines (also under a .txt name,
    which is told by its first line), a .tsv's first id; one further down is text and stays."""
    beir = tmp_path / "corpus.jsonl"
    beir.write_text(BOM + '{"_id": "a", "text": "first"}\n{"_id": "b", "text": "second"}\n', encoding="utf-8")
    assert [obj["_id"] for _, obj in read_json_lines(beir)] == ["a", "b"]
    assert list(iter_documents(beir)) == [("a", "first"), ("b", "second")]
    sniffed = tmp_path / "corpus.txt"
    sniffed.write_bytes(beir.read_bytes())
    assert list(iter_documents(sniffed)) == [("a", "first"), ("b", "second")]
    tsv = tmp_path / "collection.tsv"
    tsv.write_text(BOM + "1\tone\n2\ttwo\n", encoding="utf-8")
    assert list(iter_documents(tsv)) == [("1", "one"), ("2", "two")]
    plain = tmp_path / "texts.txt"
    plain.write_text(BOM + "one\n" + BOM + "two\n", encoding="utf-8")
    assert list(read_lines(plain)) == [(1, "one"), (2, BOM + "two")]


@pytest.mark.parametrize("record, field, said", [
    ('{"_id": null, "text": "x"}', "_id", "is null"),
    ('{"_id": 1.0, "text": "x"}', "_id", "a number with a fraction"),
    ('{"id": [1], "text": "x"}', "id", "a list"),
    ('{"_id": {"a": 1}, "text": "x"}', "_id", "an object"),
    ('{"_id": true, "text": "x"}', "_id", "a boolean"),
    ('{"_id": "b", "text": null}', "text", "is null, not a string"),
    ('{"_id": "b", "text": 5}', "text", "is an integer, not a string"),
    ('{"_id": "b", "text": ["x"]}', "text", "is a list, not a string"),
    ('{"_id": "b", "title": 3, "text": "x"}', "title", "is an integer, not a string"),
    ('{"_id": "b", "title": ["T"], "text": "x"}', "title", "is a list, not a string (or null)"),
])
def test_json_fields_of_the_wrong_type_are_refused_with_file_line_and_field(
        encoder_dir, tmp_path, capsys, record, field, said):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"_id": "a", "text": "fine"}\n' + record + "\n")
    err = refused(encode_argv(encoder_dir, path, tmp_path), capsys)
    assert f'{path}:2: field "{field}" ' in err and said in err, err
    assert not (tmp_path / "v.npy").exists()


def test_integer_ids_are_kept_and_a_duplicate_id_is_refused_with_both_lines(encoder_dir, tmp_path, capsys):
    fine = tmp_path / "fine.jsonl"
    fine.write_text('{"_id": 7, "text": "x"}\n{"_id": "8", "title": null, "text": "y"}\n')
    assert list(iter_documents(fine)) == [("7", "x"), ("8", "y")]  # a null title is none
    # 1 and "1" are one id once stored (ids files hold text): refused, as is the same string twice
    inputs = {"a.jsonl": ['{"_id": 1, "text": "x"}', '{"_id": "2", "text": "y"}', '{"_id": "1", "text": "z"}'],
              "b.tsv": ["d1\tx", "d2\ty", "d1\tz"]}
    for name, lines in inputs.items():
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        doc_id = "1" if name == "a.jsonl" else "d1"
        argv = ["encode", "--model", str(encoder_dir), "--input", str(path), "--kind", "passage"]
        err = refused([*argv, "--out-dir", str(tmp_path / "emb")], capsys)  # its ids files name the vectors
        assert f"{path}:3: document id {doc_id!r} again (first at line 1)" in err, err
        assert not (tmp_path / "emb").exists()  # refused before the folder is made
        encode_here(*argv[1:], "--out", str(tmp_path / f"{name}.npy"))  # a .npy keeps no ids: the input's order
        assert np.load(tmp_path / f"{name}.npy").shape[0] == 3


def test_a_tsv_header_line_is_skipped_and_no_document(tmp_path):
    for header in ("id\ttext", "ID\tPassage", "_id\tquery", "docid\ttext", "pid\tpassage", "qid\tquery",
                   "query_id\ttext", "id\ttext\ttitle"):
        path = tmp_path / "collection.tsv"
        path.write_text(f"{header}\n1\tone\n2\ttwo\n")
        assert list(iter_documents(path)) == [("1", "one"), ("2", "two")], header
    path.write_text("1\tone\nid\ttext\n")  # only the first line can be a header
    assert list(iter_documents(path)) == [("1", "one"), ("id", "text")]
    path.write_text("id\tsome passage\n")  # not column names: a document whose id is "id"
    assert list(iter_documents(path)) == [("id", "some passage")]


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--max-tokens", "0"),
                                           ("--max-tokens", "-3"), ("--shard-docs", "0")])
def test_count_options_below_one_are_refused(encoder_dir, tmp_path, capsys, option, value):
    path = tmp_path / "texts.txt"
    path.write_text("one\ntwo\n")
    argv = ["encode", "--model", str(encoder_dir), "--input", str(path), "--kind", "passage",
            "--out-dir", str(tmp_path / "emb"), option, value]
    err = refused(argv, capsys)
    assert f"argument {option}: {value}: must be at least 1" in err, err
    assert not (tmp_path / "emb").exists()


def test_presets_must_exist_and_llara_json_must_be_readable(encoder_dir, tmp_path, capsys):
    from llara_dist.config import ObjectiveConfig
    from llara_dist.errors import UserError
    from llara_dist.prompts import PRESETS, resolve_preset

    path = tmp_path / "texts.txt"
    path.write_text("one\ntwo\n")
    err = refused(encode_argv(encoder_dir, path, tmp_path, "--preset", "bogus"), capsys)
    assert "argument --preset: invalid choice: 'bogus'" in err, err
    model = tmp_path / "model"
    model.mkdir()
    meta = model / "llara.json"
    for text, said in [('{"objective": {"preset": "relesed"}}', "preset: 'relesed' is not one of paper, released"),
                       ("{}", 'no "objective" object'), ('{"objective": "paper"}', 'no "objective" object'),
                       ("", "not valid JSON"), ("{oops", "not valid JSON")]:
        meta.write_text(text)
        err = refused(encode_argv(model, path, tmp_path), capsys)
        assert f"{meta}: " in err and said in err, (text, err)
    # the same refusal wherever the fallback could be reached: an objective of an unknown preset
    with pytest.raises(UserError, match="preset 'relesed' is not one of paper, released, custom"):
        resolve_preset(ObjectiveConfig(preset="relesed"))
    assert resolve_preset(ObjectiveConfig(preset="custom", lm_weight=0.5)) == resolve_preset(
        ObjectiveConfig(preset="paper", lm_weight=0.5))  # custom: paper's values for every unset field
    assert resolve_preset(ObjectiveConfig(preset="released")) == PRESETS["released"]
    # no llara.json: encode (which has --preset) suggests it; eval (which has none) does not
    meta.unlink()
    err = refused(encode_argv(model, path, tmp_path), capsys)
    assert f"{meta}: missing" in err and "--preset" in err, err
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "one"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "what"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    err = refused(["eval", "--model", str(model), "--beir", str(beir)], capsys)
    assert f"{meta}: missing" in err and "--preset" not in err, err


def test_a_folder_without_a_model_or_with_a_broken_tokenizer_is_refused_by_name(
        encoder_dir, shared_data, tmp_path, capsys):
    path = tmp_path / "texts.txt"
    path.write_text("one\ntwo\n")
    tokenizer_only = shared_data / "llama2-tokenizer"
    err = refused(encode_argv(tokenizer_only, path, tmp_path, "--preset", "released"), capsys)
    assert f"{tokenizer_only}: no config.json" in err, err
    broken_config = model_copy(encoder_dir, tmp_path, "broken_config")
    (broken_config / "config.json").write_text('{"model_type": "no-such-model"}')
    err = refused(encode_argv(broken_config, path, tmp_path), capsys)
    assert f"{broken_config}: cannot load the model" in err, err
    broken_weights = model_copy(encoder_dir, tmp_path, "broken_weights")
    weights = broken_weights / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    err = refused(encode_argv(broken_weights, path, tmp_path), capsys)
    assert f"{broken_weights}: cannot load the model (SafetensorError" in err, err
    broken_tokenizer = model_copy(encoder_dir, tmp_path, "broken_tokenizer")
    (broken_tokenizer / "tokenizer.json").write_text('{"version": ')
    err = refused(encode_argv(broken_tokenizer, path, tmp_path), capsys)
    assert f"{broken_tokenizer}: cannot load a tokenizer" in err, err
    assert not (tmp_path / "v.npy").exists()


def test_a_prep_manifest_with_bad_shard_entries_is_refused(encoder_dir, tmp_path, capsys):
    """The manifest check verify-shards makes: entries that are not objects, or lack "docs"."""
    for name, shards in {"numbers": [1], "no_docs": [{"name": "shard-000000.tar"}]}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"version": 1, "shards": shards}))
        argv = ["encode", "--model", str(encoder_dir), "--input", str(folder), "--kind", "passage",
                "--out-dir", str(tmp_path / f"emb_{name}")]
        err = refused(argv, capsys)
        assert f"{folder}: manifest shard entries need 'name' and 'docs'" in err, err


def test_a_damaged_embedding_shard_is_refused_by_name(tmp_path, capsys):
    rng = np.random.default_rng(0)
    identity = {"model": "m", "preset": "released", "kind": "passage", "max_tokens": 512, "shard_docs": 4,
                "input": "in", "input_sha256": "0"}
    vectors = rng.standard_normal((6, 8)).astype(np.float32)
    ids = [f"d{i}" for i in range(6)]
    for kind, folder in (("passage", tmp_path / "corpus"), ("query", tmp_path / "queries")):
        embeddings.write_folder(folder, [(ids[:4], vectors[:4]), (ids[4:], vectors[4:])], {**identity, "kind": kind})
    emb = tmp_path / "corpus" / embeddings.emb_name(1)
    np.save(emb, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle: never loaded
    argv = ["search", "--passages", str(tmp_path / "corpus"), "--queries", str(tmp_path / "queries"),
            "--out", str(tmp_path / "run.trec")]
    err = refused(argv, capsys)
    assert f"{emb}: damaged, not a .npy array" in err and "ids-000001.txt" in err, err
    emb.write_bytes(b"\x93NUMPY garbage")
    err = refused(argv, capsys)
    assert f"{emb}: damaged, not a .npy array" in err, err


def test_out_writes_the_file_it_names(encoder_dir, tmp_path, capsys):
    path = tmp_path / "texts.txt"
    path.write_text("one\ntwo\n")
    out = tmp_path / "enc" / "qvecs"  # no .npy suffix, in a folder not made yet
    capsys.readouterr()
    encode_here("--model", str(encoder_dir), "--input", str(path), "--kind", "query", "--out", str(out),
                "--batch-size", "2")
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and report["count"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["qvecs"]
    assert np.load(out).shape == (2, report["dim"])
    # a file where a folder is needed, or the input itself as --out: refused, the file left as it is
    argv = ["encode", "--model", str(encoder_dir), "--input", str(path), "--kind", "query"]
    assert "its folder cannot be made (a file is in the way)" in refused([*argv, "--out", str(out / "v.npy")], capsys)
    assert f"{out}: is a file; the embedding shards need a folder" in refused([*argv, "--out-dir", str(out)], capsys)
    assert f"--out {path}: is or lies in the input {path}" in refused([*argv, "--out", str(path)], capsys)
    assert path.read_text() == "one\ntwo\n" and np.load(out).shape == (2, report["dim"])
