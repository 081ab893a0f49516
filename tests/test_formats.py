"""Input readers and the chunker: formats, compression, bad input, sentence-end cuts."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter

import pytest

from llara_dist.data.chunking import MAX_WORD_CHARS, Chunker, count_words, units
from llara_dist.data.formats import WRONG_FORMAT_AFTER, InputError, Reader, expand_inputs


def read(paths, fmt, min_words=2):
    r = Reader([str(p) for p in paths], fmt, min_words)
    return list(r), r.stats


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# -- sentence ends -------------------------------------------------------------------------

def test_units_end_at_sentences_not_abbreviations():
    text = ('Dr. Smith met J. Doe in St. Louis. It rained! Was it cold? "Yes," he said. '
            'The H. gammarus lobster , a crustacean . It is blue .\n\nNew paragraph without a stop\n'
            'a wrapped line. e.g. lower case goes on. 東京は大きい。次の文。')
    got = [text[a:b] for a, b in units(text)]
    assert got == [
        "Dr. Smith met J. Doe in St. Louis.", "It rained!", "Was it cold?", '"Yes," he said.',
        "The H. gammarus lobster , a crustacean .", "It is blue .",
        "New paragraph without a stop\na wrapped line. e.g. lower case goes on.", "東京は大きい。", "次の文。"]


def article(n_sentences: int, words_per_sentence: int = 9) -> str:
    return " ".join(f"Sentence {i} " + " ".join(f"w{i}x{j}" for j in range(words_per_sentence - 2)) + "."
                    for i in range(n_sentences))


def test_word_chunks_whole_sentences_title_first():
    text = article(40)  # 40 sentences of 9 words
    counts = Counter()
    chunks = Chunker(max_words=50).chunk(text, title="My Title", counts=counts)
    assert chunks[0].startswith("My Title Sentence 0 ")
    assert not counts  # no forced cut: every chunk ends at a sentence end
    for c in chunks:
        assert c.endswith(".") and count_words(c) <= 50
    # 50 words: the title (2) + 5 sentences, then 5 sentences per chunk
    assert [count_words(c) for c in chunks] == [2 + 45] + [45] * 7
    assert " ".join(chunks)[len("My Title "):].split() == text.split()  # nothing lost, in order


def test_over_long_sentence_and_word_are_cut_and_counted():
    long_sentence = " ".join(f"w{i}" for i in range(130)) + "."
    blob = "x" * (5 * MAX_WORD_CHARS)  # one 'word' of 500 characters, no space
    counts = Counter()
    chunks = Chunker(max_words=50).chunk(f"Short one. {long_sentence} {blob} End here.", counts=counts)
    assert all(count_words(c) <= 50 for c in chunks)
    assert counts["hard_cut_sentence"] == 2  # the 131-word sentence: cut after 50 (with 'Short one.') and 100
    assert "".join(chunks).replace(" ", "").count("x") == 5 * MAX_WORD_CHARS
    few = Chunker(max_words=2).chunk(blob, counts=counts)
    assert [len(c) for c in few] == [2 * MAX_WORD_CHARS, 2 * MAX_WORD_CHARS, MAX_WORD_CHARS]
    assert counts["hard_cut_word"] == 2


def test_token_chunks_fit_exactly(tokenizer_dir, shared_data):
    from llara_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    (art, *_), _ = read([shared_data / "wikitext2_valid.txt"], "wikitext")
    counts = Counter()
    chunker = Chunker(max_tokens=100, tokenizer=tok)
    chunks = chunker.chunk(art.text, art.title, counts)
    lengths = [len(x) for x in chunker.encode(chunks)]
    assert max(lengths) <= 100 and sum(lengths) / len(lengths) > 70  # never over, well filled (sentences ~30)
    ends = {art.text[b - 1] for _, b in units(art.text)}
    cut_inside = sum(c[-1] not in ends for c in chunks)
    assert cut_inside <= counts["hard_cut_sentence"] + counts["hard_cut_word"]
    assert " ".join(chunks).split() == (art.title + " " + art.text).split()
    # one word longer than the limit: cut by characters, still within it
    blob = Chunker(max_tokens=5, tokenizer=tok).chunk("z" * 300 + "qj" * 40, counts=counts)
    assert max(len(x) for x in chunker.encode(blob)) <= 5 and "".join(blob) == "z" * 300 + "qj" * 40


# -- formats -------------------------------------------------------------------------------

def test_wiki_jsonl(tmp_path):
    p = write(tmp_path / "w.jsonl", jsonl([{"title": "A", "text": "One two. Three."},
                                           {"id": "7", "title": "B", "text": "Four five six."}]))
    arts, stats = read([p], "wiki-jsonl")
    assert [(a.title, a.text, a.line) for a in arts] == [("A", "One two. Three.", 1), ("B", "Four five six.", 2)]
    assert not stats.skipped


def test_llara_jsonl_pairs_and_summarize_check(tmp_path, shared_data):
    arts, stats = read([shared_data / "llara_toy_pretrain.jsonl"], "llara-jsonl")
    rows = [json.loads(x) for x in (shared_data / "llara_toy_pretrain.jsonl").read_text().splitlines()]
    assert len(arts) == 11 and [a.chunks for a in arts] == [[r["input"]] for r in rows]
    assert [a.next_text for a in arts] == [r["output_predict"] for r in rows]
    assert not stats.handled and not stats.skipped  # input == output_summarize throughout
    p = write(tmp_path / "l.jsonl", jsonl([{"input": "a b c", "output_summarize": "x y", "output_predict": "d e"},
                                           {"input": "a b c", "output_predict": ""}]))
    arts, stats = read([p], "llara-jsonl")
    assert stats.handled == {"summarize_differs": 1} and arts[1].next_text is None


def test_dpr_tsv_groups_articles(tmp_path):
    p = write(tmp_path / "psgs.tsv", "id\ttext\ttitle\n"
              '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet."\tAaron\n'
              "2\tHe was the brother of Moses.\tAaron\n"
              "3\tAbba was a band.\tABBA\n"
              "4\tx\tABBA\n")
    arts, stats = read([p], "dpr-tsv")
    assert [(a.title, a.chunks, a.chunk_lines) for a in arts] == [
        ("Aaron", ['Aaron Aaron ( or ; "Ahärôn") is a prophet.', "He was the brother of Moses."], [2, 3]),
        ("ABBA", ["Abba was a band."], [4])]
    assert stats.skipped == {"too_short": 1} and stats.first == {"skipped.too_short": f"{p}:5"}


def test_wikitext_and_text(tmp_path):
    p = write(tmp_path / "wt.txt", " \n = Lobster = \n \n Lobsters are big . \n \n = = Diet = = \n \n"
              " They eat crabs . \n = Crab = \n Crabs walk sideways . \n")
    arts, _ = read([p], "wikitext")
    assert [(a.title, a.text, a.line) for a in arts] == [
        ("Lobster", "Lobsters are big .\nDiet\nThey eat crabs .", 2), ("Crab", "Crabs walk sideways .", 9)]
    p = write(tmp_path / "plain.txt", "First doc line one\nline two.\n\n\nSecond doc.\n  \nThird doc here\n")
    arts, _ = read([p], "text")
    assert [(a.text, a.line) for a in arts] == [("First doc line one\nline two.", 1), ("Second doc.", 5),
                                                ("Third doc here", 7)]


def test_compressed_and_globs(tmp_path):
    import zstandard

    rows = jsonl([{"title": f"T{i}", "text": f"Text number {i}."} for i in range(3)]).encode()
    write(tmp_path / "a.jsonl.gz", gzip.compress(rows, mtime=0))
    write(tmp_path / "b.jsonl.zst", zstandard.ZstdCompressor().compress(rows))
    write(tmp_path / "c.jsonl", rows)
    paths = expand_inputs([str(tmp_path / "*.jsonl*")])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.jsonl.gz", "b.jsonl.zst", "c.jsonl"]
    # the same file under other names (by name after a glob, a relative path, a link) is read once
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "c.jsonl")
    relative = os.path.relpath(tmp_path / "c.jsonl")
    assert expand_inputs([str(tmp_path / "*.jsonl*"), str(tmp_path / "c.jsonl"), relative]) == paths
    assert expand_inputs([relative, str(tmp_path / "link.jsonl"), str(tmp_path / "c.jsonl")]) == [relative]
    arts, _ = read(paths, "wiki-jsonl")
    assert [a.title for a in arts] == ["T0", "T1", "T2"] * 3
    # compression is recognised by content, not by name
    write(tmp_path / "misnamed.txt", gzip.compress(rows))
    assert len(read([tmp_path / "misnamed.txt"], "wiki-jsonl")[0]) == 3


# -- bad input -------------------------------------------------------------------------------

def test_bad_records_are_counted_by_reason(tmp_path):
    good = json.dumps({"title": "Good", "text": "A fine article."}).encode()
    lines = [
        good,
        b'{"title": "Broken", "text": "no closing brace"',  # bad_json
        json.dumps([1, 2]).encode(),  # bad_json (not an object)
        json.dumps({"title": "No text"}).encode(),  # missing_field
        json.dumps({"title": "T", "text": 5}).encode(),  # missing_field (not a string)
        json.dumps({"title": "Empty", "text": "  "}).encode(),  # empty
        json.dumps({"title": "One", "text": "word"}).encode(),  # too_short
        b'{"title": "Latin-1", "text": "caf\xe9 au lait is fine."}',  # invalid_utf8: repaired, kept
        b"",  # a blank line holds no record
        good,
    ]
    p = write(tmp_path / "mixed.jsonl", b"\n".join(lines) + b"\n")
    arts, stats = read([p], "wiki-jsonl")
    assert [a.title for a in arts] == ["Good", "Latin-1", "Good"]
    assert arts[1].text == "caf\ufffd au lait is fine."
    assert stats.skipped == {"bad_json": 2, "missing_field": 2, "empty": 1, "too_short": 1}
    assert stats.handled == {"invalid_utf8": 1}
    assert stats.first["skipped.bad_json"] == f"{p}:2" and stats.first["handled.invalid_utf8"] == f"{p}:8"


def test_wrong_format_stops_with_file_and_line(tmp_path):
    tsv = write(tmp_path / "psgs.tsv", "".join(f"{i}\tPassage {i} text.\tTitle\n" for i in range(1, 30)))
    with pytest.raises(InputError, match=rf"psgs.tsv:1: not wiki-jsonl input: none of the first "
                                         rf"{WRONG_FORMAT_AFTER} record\(s\) parse \(invalid JSON.*Is --format right"):
        read([tsv], "wiki-jsonl")
    wiki = write(tmp_path / "w.jsonl", jsonl([{"title": "A", "text": "b c"}] * 3))
    with pytest.raises(InputError, match=r"w.jsonl:1: not llara-jsonl input.*'input' missing"):
        read([wiki], "llara-jsonl")  # valid JSON, wrong fields: also the wrong format
    with pytest.raises(InputError, match=r"w.jsonl:1: not dpr-tsv input.*1 tab-separated column"):
        read([wiki], "dpr-tsv")
    with pytest.raises(InputError, match=r"w.jsonl:1: not wikitext input: text before the first"):
        read([wiki], "wikitext")


def test_unreadable_inputs_stop_with_the_file(tmp_path):
    with pytest.raises(InputError, match=r"nope.jsonl: no such file"):
        expand_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(InputError, match=r"\*.zst: no file matches"):
        expand_inputs([str(tmp_path / "*.zst")])
    with pytest.raises(InputError, match="is a folder"):
        expand_inputs([str(tmp_path)])
    rows = jsonl([{"title": f"T{i}", "text": "x " * 50} for i in range(2000)]).encode()
    cut = write(tmp_path / "cut.jsonl.gz", gzip.compress(rows)[:-2000])  # truncated download
    with pytest.raises(InputError, match=r"cut.jsonl.gz:\d+: cannot read: truncated or corrupt gzip data "
                                         r"\(Compressed file ended"):
        read([cut], "wiki-jsonl")


def varied_rows(n: int) -> bytes:
    """n wiki-jsonl lines of seeded random words: text that compresses too little to fit one zstd block."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    return jsonl([{"title": f"T{i}", "text": " ".join(rng.choices(words, k=40)) + "."} for i in range(n)]).encode()


def test_zstd_frames_read_whole_and_a_cut_frame_stops(tmp_path):
    import struct

    import zstandard

    rows = varied_rows(3000)
    frame = zstandard.ZstdCompressor().compress(rows)
    # as pzstd writes: each frame after a skippable frame (magic 0x184D2A50) holding its size
    skippable = struct.pack("<II", 0x184D2A50, 4) + struct.pack("<I", len(frame))
    whole = write(tmp_path / "frames.jsonl.zst", frame + frame + skippable + frame)
    assert len(read([whole], "wiki-jsonl")[0]) == 3 * 3000
    assert len(read([write(tmp_path / "p.jsonl.zst", skippable + frame)], "wiki-jsonl")[0]) == 3000
    # a download cut in half: its first half decompresses, then the frame stops short
    cut = write(tmp_path / "half.jsonl.zst", frame[:len(frame) // 2])
    with pytest.raises(InputError, match=r"half.jsonl.zst:\d+: cannot read: truncated or corrupt zstd data "
                                         r"\(the file ends inside a zstd frame\)"):
        read([cut], "wiki-jsonl")
    cut = write(tmp_path / "cut.jsonl.zst", frame + frame[:-10])  # the second frame cut short
    with pytest.raises(InputError, match=r"cut.jsonl.zst:\d+: cannot read: truncated or corrupt zstd"):
        read([cut], "wiki-jsonl")


def corrupt_gzip(rows: bytes) -> bytes:
    """A gzip file of `rows`, then a second member whose deflate data are garbage (invalid block type)."""
    return gzip.compress(rows, mtime=0) + b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 64


def test_corrupt_gzip_stops_with_the_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl.gz", corrupt_gzip(varied_rows(50)))
    with pytest.raises(InputError, match=r"bad.jsonl.gz:51: cannot read: truncated or corrupt gzip data "
                                         r"\(Error -3 while decompressing data: invalid block type\)"):
        read([bad], "wiki-jsonl")
