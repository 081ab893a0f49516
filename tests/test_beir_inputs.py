"""BEIR sets as `eval`, `make-beir` and `search` read them: what a user's file can get wrong is refused
with the file, the line and the field (exit 2, no traceback), before any work; outputs never replace
inputs; and what is valid runs through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import refused

from llara_dist.cli import main
from llara_dist.retrieval.beir import load_beir, read_qrels

QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n"


def write_beir(folder: Path, corpus: list, queries: list, qrels: str = QRELS) -> Path:
    """A BEIR folder from records (dicts, or raw lines as str) and a qrels file's text."""
    (folder / "qrels").mkdir(parents=True)
    for name, records in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        (folder / name).write_text("".join(line + "\n" for line in lines))
    (folder / "qrels" / "test.tsv").write_text(qrels)
    return folder


DOCS = [{"_id": "d1", "title": "Alpha", "text": "Alpha is the first letter."},
        {"_id": "d2", "text": "Beta is the second letter."},
        {"_id": "d3", "text": "Gamma is the third letter."}]
QUERIES = [{"_id": "q1", "text": "what is alpha"}, {"_id": "q2", "text": "what is beta"}]


def eval_argv(model, beir, *extra) -> list[str]:
    return ["eval", "--model", str(model), "--beir", str(beir), *extra]


def test_duplicate_ids_are_refused_naming_both_lines(encoder_dir, tmp_path, capsys):
    beir = write_beir(tmp_path / "dup_doc", [*DOCS, {"_id": "d1", "text": "Another d1."}], QUERIES)
    for extra in ([], ["--emb-dir", str(tmp_path / "emb"), "--trec", str(tmp_path / "r.trec")]):
        err = refused(eval_argv(encoder_dir, beir, *extra), capsys)
        assert f"{beir / 'corpus.jsonl'}:4: document id 'd1' again (first at line 1)" in err
    assert not (tmp_path / "emb").exists() and not (tmp_path / "r.trec").exists()  # refused before any work

    beir = write_beir(tmp_path / "dup_query", DOCS, ["", *QUERIES, {"_id": "q2", "text": "beta?"}])
    err = refused(eval_argv(encoder_dir, beir), capsys)
    assert f"{beir / 'queries.jsonl'}:4: document id 'q2' again (first at line 3)" in err

    # a number and its string are the same id once read
    beir = write_beir(tmp_path / "dup_number", [*DOCS, {"_id": 7, "text": "x"}, {"_id": "7", "text": "y"}], QUERIES)
    assert f"{beir / 'corpus.jsonl'}:5: document id '7' again (first at line 4)" in refused(
        eval_argv(encoder_dir, beir), capsys)


@pytest.mark.parametrize("bad_id, said", [(None, 'field "_id" is null'), (["d9"], 'field "_id" is a list'),
                                          ({"id": "d9"}, 'field "_id" is an object'),
                                          (True, 'field "_id" is a boolean'),
                                          (1.5, 'field "_id" is a number with a fraction'),
                                          ("", "document id '' is empty")])
def test_ids_that_are_not_strings_or_integers_are_refused(encoder_dir, tmp_path, capsys, bad_id, said):
    beir = write_beir(tmp_path / "b", [*DOCS, {"_id": bad_id, "text": "t"}], QUERIES)
    assert f"{beir / 'corpus.jsonl'}:4: {said}" in refused(eval_argv(encoder_dir, beir), capsys)
    beir = write_beir(tmp_path / "q", DOCS, [{"_id": bad_id, "text": "t"}, *QUERIES])
    assert f"{beir / 'queries.jsonl'}:1: {said}" in refused(eval_argv(encoder_dir, beir), capsys)


@pytest.mark.parametrize("record, field", [
    ({"text": None}, "text"),
    ({"title": 5, "text": "t"}, "title"),
    ({"text": ["a", "b"]}, "text"),
    ({"title": "T", "text": None}, "text"),
    ({"title": ["T"], "text": "t"}, "title"),
])
def test_fields_of_the_wrong_type_are_refused(encoder_dir, tmp_path, capsys, record, field):
    beir = write_beir(tmp_path / "c", [*DOCS[:2], {"_id": "d3", **record}], QUERIES)
    err = refused(eval_argv(encoder_dir, beir), capsys)
    assert f"{beir / 'corpus.jsonl'}:3: field \"{field}\" is " in err and "not a string" in err
    beir = write_beir(tmp_path / "q", DOCS, [QUERIES[0], {"_id": "q2", **record}])
    err = refused(eval_argv(encoder_dir, beir), capsys)
    assert f"{beir / 'queries.jsonl'}:2: field \"{field}\" is " in err and "not a string" in err


def test_records_are_read_as_encode_reads_them(encoder_dir, tmp_path, capsys):
    """A title goes on a line before the text, of a query too; an empty text is a document: as `encode`
    reads them, so that eval in memory and eval --emb-dir encode the same texts."""
    from llara_dist.retrieval.encode import iter_documents

    docs = [{"_id": "d1", "text": "Alpha is the first letter."}, DOCS[1],
            {"_id": "d3", "title": "  ", "text": ""}, {"_id": 4, "title": "Delta", "text": "Fourth."}]
    queries = [{"_id": "q1", "title": "Alpha", "text": "what is it"}, QUERIES[1]]
    beir = write_beir(tmp_path / "b", docs, queries)
    data = load_beir(beir)
    assert data.corpus == {"d1": "Alpha is the first letter.", "d2": "Beta is the second letter.",
                           "d3": "", "4": "Delta\nFourth."}
    assert data.queries == {"q1": "Alpha\nwhat is it", "q2": "what is beta"}
    assert data.corpus == dict(iter_documents(beir / "corpus.jsonl"))
    assert data.queries == dict(iter_documents(beir / "queries.jsonl"))
    nulled = write_beir(tmp_path / "null_title", [{**DOCS[0], "title": None}, *DOCS[1:]], QUERIES)
    assert load_beir(nulled).corpus["d1"] == "Alpha is the first letter."  # a null title: none
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(eval_argv(encoder_dir, beir, "--k", "3", "--batch-size", "2"))
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    assert json.loads(out)["queries"] == 2


def test_qrels_without_a_relevant_document_and_empty_files_are_refused(encoder_dir, tmp_path, capsys):
    beir = write_beir(tmp_path / "none", DOCS, QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\t0\n")
    err = refused(eval_argv(encoder_dir, beir), capsys)
    assert f"{beir / 'qrels' / 'test.tsv'}: no query with a relevant document" in err
    beir = write_beir(tmp_path / "no_queries", DOCS, [], "")
    assert f"{beir / 'queries.jsonl'}: no queries" in refused(eval_argv(encoder_dir, beir), capsys)
    beir = write_beir(tmp_path / "no_docs", ["  "], QUERIES, "")
    assert f"{beir / 'corpus.jsonl'}: no documents" in refused(eval_argv(encoder_dir, beir), capsys)


def test_a_qrels_header_may_follow_blank_lines(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("\n  \nquery-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert read_qrels(path) == {"q1": {"d1": 1}}
    path.write_text("\nq1\td1\t1\nquery-id\tcorpus-id\tscore\n")  # a header after the first record is not one
    with pytest.raises(ValueError, match=r"test.tsv:3: expected"):
        read_qrels(path)


@pytest.mark.parametrize("line, reason", [
    ('{"query": "what is alpha", "pos": "Alpha is the first letter."}', "'pos' must be a list of non-empty strings"),
    ('{"query": null, "pos": ["Alpha."]}', "'query' must be a non-empty string"),
    ('{"query": "q", "pos": [5, null]}', "'pos' must be a list of non-empty strings"),
    ('{"query": "q", "pos": ["Alpha."], "neg": [""]}', "'neg' must be a list of non-empty strings"),
    ('{"query": "q", "pos": []}', "'pos' is empty"),
])
def test_make_beir_checks_its_input_as_finetune_does(tmp_path, capsys, line, reason):
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "what is beta", "pos": ["Beta is the second letter."]}\n' + line + "\n")
    out = tmp_path / "beir"
    err = refused(["make-beir", "--finetune", str(data), "--out", str(out)], capsys)
    assert f"{data}:2: {reason}" in err
    assert not out.exists()  # nothing written before every line is checked


def test_make_beir_does_not_overwrite_a_set_or_its_input(shared_data, tmp_path, capsys):
    toy = shared_data / "llara_toy_finetune.jsonl"
    out = tmp_path / "beir"
    main_ok(["make-beir", "--finetune", str(toy), "--out", str(out), "--split", "dev"], capsys)
    corpus = (out / "corpus.jsonl").read_bytes()
    small = tmp_path / "small.jsonl"
    small.write_text('{"query": "what is beta", "pos": ["Beta is the second letter."]}\n')
    err = refused(["make-beir", "--finetune", str(small), "--out", str(out)], capsys)
    assert f"--out {out}: already holds corpus.jsonl, queries.jsonl, qrels" in err and "--overwrite" in err
    assert (out / "corpus.jsonl").read_bytes() == corpus

    main_ok(["make-beir", "--finetune", str(small), "--out", str(out), "--overwrite"], capsys)
    assert sorted(p.name for p in (out / "qrels").iterdir()) == ["test.tsv"]  # the earlier dev split is gone
    assert len(load_beir(out).corpus) == 1

    # the input inside --out: refused even with --overwrite, the input left as it was
    inside = tmp_path / "x"
    inside.mkdir()
    (inside / "corpus.jsonl").write_bytes(small.read_bytes())
    for extra in ([], ["--overwrite"]):
        err = refused(["make-beir", "--finetune", str(inside / "corpus.jsonl"), "--out", str(inside), *extra], capsys)
        assert f"--out {inside}: would overwrite the input {inside / 'corpus.jsonl'}" in err
    assert (inside / "corpus.jsonl").read_bytes() == small.read_bytes()
    assert "exists and is not a folder" in refused(["make-beir", "--finetune", str(toy), "--out", str(small)], capsys)


def main_ok(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    return out


def test_outputs_that_would_replace_inputs_are_refused(encoder_dir, tmp_path, capsys):
    beir = write_beir(tmp_path / "beir", DOCS, QUERIES)
    before = {p: p.read_bytes() for p in beir.rglob("*") if p.is_file()}
    cases = [(["--out", str(beir / "corpus.jsonl")], "--out"),
             (["--trec", str(beir / "qrels" / "test.tsv")], "--trec"),
             (["--trec", str(beir / "run.trec")], "--trec"),  # a new file mixed into the set
             (["--out", str(encoder_dir / "config.json")], "--out"),
             (["--emb-dir", str(tmp_path / "emb"), "--out", str(tmp_path / "emb" / "corpus" / "m.json")], "--out")]
    for extra, option in cases:
        err = refused(eval_argv(encoder_dir, beir, *extra), capsys)
        assert f"{option} {extra[-1]}: is or lies in the input " in err
    err = refused(eval_argv(encoder_dir, beir, "--out", str(tmp_path / "m"), "--trec", str(tmp_path / "m")), capsys)
    assert f"--trec {tmp_path / 'm'}: is also --out's file" in err
    (tmp_path / "a_file").write_text("x")
    err = refused(eval_argv(encoder_dir, beir, "--out", str(tmp_path / "a_file" / "m.json")), capsys)
    assert "its folder cannot be made (a file is in the way)" in err
    assert before == {p: p.read_bytes() for p in beir.rglob("*") if p.is_file()}
    assert not (tmp_path / "emb").exists()

    passages, queries = tmp_path / "p", tmp_path / "q"
    for folder in (passages, queries):
        folder.mkdir()
        (folder / "manifest.json").write_text("{}\n")
    for out in (passages / "manifest.json", queries / "run.trec"):
        err = refused(["search", "--passages", str(passages), "--queries", str(queries), "--out", str(out)], capsys)
        assert f"--out {out}: is or lies in the input " in err
    assert (passages / "manifest.json").read_text() == "{}\n" and not (queries / "run.trec").exists()


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--max-tokens", "0"), ("--max-tokens", "-5"),
                                           ("--k", "0"), ("--shard-docs", "0"), ("--nprobe", "0"),
                                           ("--rerank", "0"), ("--pq-m", "0"), ("--nlist", "0"),
                                           ("--check-queries", "-1")])
def test_count_options_below_their_least_are_refused(encoder_dir, tmp_path, capsys, option, value):
    beir = write_beir(tmp_path / "beir", DOCS, QUERIES)
    err = refused(eval_argv(encoder_dir, beir, "--emb-dir", str(tmp_path / "emb"), option, value), capsys)
    assert f"argument {option}: {value}: must be at least" in err
    if option not in ("--batch-size", "--max-tokens", "--shard-docs"):  # search has these too
        err = refused(["search", "--passages", str(tmp_path), "--queries", str(tmp_path), "--out",
                       str(tmp_path / "r.trec"), option, value], capsys)
        assert f"argument {option}: {value}: must be at least" in err
