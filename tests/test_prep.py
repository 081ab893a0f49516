"""`llara-dist prep` end to end: every format, bad input counted, determinism, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import refused
from test_formats import corrupt_gzip, varied_rows

from llara_dist.data import shards
from llara_dist.data.chunking import TEXT_ONLY
from llara_dist.data.prep import PrepError, PrepSettings, prep
from llara_dist.tokenizer import load_tokenizer


def run_prep(tmp_path, tokenizer_dir, inputs, fmt, name="out", **kw):
    s = PrepSettings(inputs=[str(p) for p in inputs], format=fmt, tokenizer=str(tokenizer_dir),
                     out=str(tmp_path / name), **kw)
    return prep(s, progress=False)


def read_shards(folder: Path) -> list[dict]:
    """Every sample of a prep output, in order, as {ext: bytes} plus __key__."""
    out = []
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    for entry in manifest["shards"]:
        with tarfile.open(folder / entry["name"]) as tf:  # tarfile, not our reader: what any tool would see
            out += shards.samples_in([(m.name, tf.extractfile(m).read()) for m in tf.getmembers()], entry["name"])
    return out


def check_output(folder: Path, tok) -> tuple[dict, list[dict]]:
    """Shards agree with the manifest, ids are the text's tokens, .next the next chunk's set."""
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    samples = read_shards(folder)
    assert len(samples) == manifest["docs"] == sum(e["docs"] for e in manifest["shards"])
    for e in manifest["shards"]:
        assert hashlib.sha256((folder / e["name"]).read_bytes()).hexdigest() == e["sha256"]
        assert (folder / e["name"]).stat().st_size == e["bytes"]
    docs = [shards.decode_sample(s) for s in samples]
    assert sum(len(d.ids) for d in docs) == manifest["tokens"]
    assert sum(not d.has_next for d in docs) == manifest["docs_without_next"]
    metas = [json.loads(s["json"]) for s in samples]
    texts = [s["txt"].decode() for s in samples]
    for d, text in zip(docs, tok(texts, **TEXT_ONLY)["input_ids"]):  # literal "<unk>" as text
        assert d.ids.tolist() == text
    for i, (d, meta) in enumerate(zip(docs, metas)):
        following = metas[i + 1] if i + 1 < len(metas) else None
        same_article = following is not None and following["article"] == meta["article"]
        if same_article:  # EBAR target: the unique ids of the next chunk of the same article
            assert following["chunk"] == meta["chunk"] + 1
            assert np.array_equal(d.next_set, np.unique(docs[i + 1].ids))
        elif manifest["format"] != "llara-jsonl":
            assert not d.has_next  # an article's last chunk: recorded, not invented
    return manifest, samples


def test_wikitext_shared(tmp_path, tokenizer_dir, shared_data):
    tok = load_tokenizer(tokenizer_dir)
    r = run_prep(tmp_path, tokenizer_dir, [shared_data / "wikitext2_valid.txt"], "wikitext", shard_docs=100)
    m, samples = check_output(r.out, tok)
    assert m["articles"] == 60 and m["docs_without_next"] == 60 and len(m["shards"]) == m["docs"] // 100 + 1
    assert m["chunking"]["chunk_words"] == 480 and m["chunking"]["rechunked"]
    assert m["tokenizer"]["sha256"] == hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest() \
        or m["tokenizer"]["hashed"] == ["tokenizer.json"]
    texts = [s["txt"].decode() for s in samples]
    assert texts[0].startswith("Homarus gammarus Homarus gammarus , known as")  # title + first chunk
    words = [len(t.split()) for t in texts]
    assert max(words) <= 480 and np.mean(words) > 350
    ended = sum(t.endswith((".", "!", "?", '"', ")")) for t in texts) + sum(m["handled"].values())
    assert ended >= len(texts) - m["articles"]  # every cut at a sentence end, unless counted
    assert "docs without EBAR target (last chunk of an article): 60" in r.summary


def test_block_layout_is_compact_and_reads_as_the_sample_layout(tmp_path, tokenizer_dir, shared_data):
    """100-word passages: a block of documents per tar member costs little beyond the documents' own bytes,
    where a member per field cost a 512-byte header and padding each; both read back to the same documents."""
    from llara_dist.data.stream import ShardSet

    written = {layout: run_prep(tmp_path, tokenizer_dir, [shared_data / "wikitext2_valid.txt"], "wikitext",
                                name=layout, chunk_words=100, shard_docs=500, layout=layout)
               for layout in shards.LAYOUTS}
    payload = sum(len(s[f]) for s in read_shards(written["block"].out) for f in shards.FIELDS if f in s)
    on_disk = {layout: sum(e["bytes"] for e in r.manifest["shards"]) for layout, r in written.items()}
    assert on_disk["block"] <= 1.3 * payload < 1.3 * on_disk["sample"] / 2  # was more than twice the payload
    assert written["block"].manifest["layout"] == "block" and written["sample"].manifest["layout"] == "sample"
    docs = {layout: [(d.key, d.ids.tolist(), None if d.next_set is None else d.next_set.tolist())
                     for i in range(len(r.manifest["shards"])) for d in ShardSet.open(str(r.out)).read(i)]
            for layout, r in written.items()}
    assert docs["block"] == docs["sample"] and len(docs["block"]) == written["block"].manifest["docs"]
    assert read_shards(written["block"].out) == read_shards(written["sample"].out)  # text and metadata too


def test_a_damaged_block_is_refused_naming_shard_and_member(tmp_path, write_test_shards):
    from llara_dist.data.stream import read_shard

    folder = write_test_shards(tmp_path / "s", [(f"t-{i:09d}-00000", [5, 6, 7], None, "x") for i in range(3)], 1)
    path = folder / shards.shard_name(0)
    data = bytearray(path.read_bytes())
    at = data.index(shards.BLOCK_MAGIC) + len(shards.BLOCK_MAGIC) + 4
    data[at:at + 1] = b"["  # the index is no longer a JSON object
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}: t-000000000-00000\.docs: damaged document block"):
        read_shard(str(path))


def test_llara_jsonl_shared(tmp_path, tokenizer_dir, shared_data):
    tok = load_tokenizer(tokenizer_dir)
    path = shared_data / "llara_toy_pretrain.jsonl"
    r = run_prep(tmp_path, tokenizer_dir, [path], "llara-jsonl")
    m, samples = check_output(r.out, tok)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert m["docs"] == 11 and m["docs_without_next"] == 0 and not m["chunking"]["rechunked"]
    for s, row in zip(samples, rows):
        assert s["txt"].decode() == row["input"]
        nxt = np.frombuffer(s["next"], dtype=shards.ID_DTYPE)
        assert nxt.tolist() == sorted(set(tok(row["output_predict"], **TEXT_ONLY)["input_ids"]))
    # sized for 300-token rows: chunks arrive whole, so they are truncated (at sentence ends), counted
    r = run_prep(tmp_path, tokenizer_dir, [path], "llara-jsonl", name="short", seq_len=300, preset="paper")
    m, samples = check_output(r.out, tok)
    limit = m["chunking"]["chunk_tokens"]
    assert limit == 300 - m["chunking"]["prompt_overhead"] and m["truncated"] == {"chunk_tokens": 11}
    assert all(len(shards.decode_sample(s).ids) <= limit for s in samples)
    assert all(s["txt"].decode().endswith(".") for s in samples)


SMALL = {
    "wiki-jsonl": "".join(json.dumps({"title": f"Art {i}", "text": " ".join(
        f"Sentence {j} of article {i} has some words." for j in range(30 * i + 5))}) + "\n" for i in range(4)),
    "dpr-tsv": "id\ttext\ttitle\n" + "".join(f"{k}\tPassage {k} says something quite short.\tT{k // 3}\n"
                                             for k in range(1, 13)),
    "text": "\n\n".join("Doc %d. " % i + "More text here. " * (i * 60) for i in range(1, 5)) + "\n",
}


@pytest.mark.parametrize("fmt", sorted(SMALL))
@pytest.mark.parametrize("compress", ["", ".gz", ".zst"])
def test_small_formats(tmp_path, tokenizer_dir, fmt, compress):
    import zstandard

    raw = SMALL[fmt].encode()
    data = {"": raw, ".gz": gzip.compress(raw, mtime=0), ".zst": zstandard.ZstdCompressor().compress(raw)}[compress]
    (tmp_path / "in").mkdir()
    for part in ("a", "b"):  # two files through one glob
        (tmp_path / "in" / f"{part}.data{compress}").write_bytes(data)
    limits = {} if fmt == "dpr-tsv" else {"chunk_words": 100}  # passages are never re-chunked
    r = run_prep(tmp_path, tokenizer_dir, [tmp_path / "in" / "*"], fmt, **limits)
    m, samples = check_output(r.out, load_tokenizer(tokenizer_dir))
    per_file = {"wiki-jsonl": 4, "dpr-tsv": 5, "text": 4}[fmt]
    assert m["articles"] == 2 * per_file and m["docs_without_next"] == m["articles"]
    assert len(m["inputs"]) == 2 and not m["skipped"]
    if fmt == "dpr-tsv":  # passages are the chunks: one document each, never re-cut
        assert m["docs"] == 24 and samples[1]["txt"] == b"Passage 2 says something quite short."
    else:
        assert m["docs"] > m["articles"] and max(len(s["txt"].split()) for s in samples) <= 100


def test_bad_input_counted_in_manifest_and_summary(tmp_path, tokenizer_dir):
    lines = [json.dumps({"title": "Good", "text": "A fine article with words. " * 40}).encode(),
             b'{"title": "Broken"',
             json.dumps({"text": "no title here"}).encode(),
             json.dumps({"title": "Empty", "text": ""}).encode(),
             json.dumps({"title": "One", "text": "word"}).encode(),
             b'{"title": "Bytes", "text": "bad \xff\xfe bytes in a sentence."}']
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    r = run_prep(tmp_path, tokenizer_dir, [p], "wiki-jsonl", chunk_words=50)
    m = r.manifest
    assert m["skipped"] == {"bad_json": 1, "missing_field": 1, "empty": 1, "too_short": 1}
    assert m["handled"] == {"invalid_utf8": 1} and m["articles"] == 2
    assert m["first_seen"]["skipped.bad_json"] == f"{p}:2"
    for text in ("bad_json=1 (first at", "missing_field=1", "empty=1", "too_short=1", "invalid_utf8=1"):
        assert text in r.summary
    with pytest.raises(PrepError, match="--chunk-words does not apply to dpr-tsv"):
        run_prep(tmp_path, tokenizer_dir, [p], "dpr-tsv", name="dpr", chunk_words=100)
    # a file with nothing usable is an error, not an empty dataset
    q = tmp_path / "empty.jsonl"
    q.write_text(json.dumps({"title": "One", "text": "word"}) + "\n")
    with pytest.raises(PrepError, match=r"no documents: all 0 article\(s\) skipped \(too_short=1\)"):
        run_prep(tmp_path, tokenizer_dir, [q], "wiki-jsonl", name="none")
    assert not (tmp_path / "none" / shards.MANIFEST).exists()


def test_ten_megabyte_article(tmp_path, tokenizer_dir):
    """A 10 MB article without one sentence end, and one long run without spaces."""
    common = "the of and in to a was is for on as with by at from his that it an".split()
    body = " ".join(common[i % len(common)] for i in range(3_000_000))  # ~10 MB, no '.'
    blob = "q" * 20_000
    p = tmp_path / "huge.jsonl"
    p.write_text(json.dumps({"title": "Huge", "text": body}) + "\n"
                 + json.dumps({"title": "Blob", "text": blob + " end"}) + "\n")
    assert p.stat().st_size > 10_000_000
    r = run_prep(tmp_path, tokenizer_dir, [p], "wiki-jsonl", chunk_words=2000, shard_docs=100_000)
    m = r.manifest
    # words: the title's and the text's; the blob counts one word per 100 characters
    assert m["docs"] == -(-3_000_001 // 2000) + 1 and m["docs_without_next"] == 2
    assert m["handled"] == {"hard_cut_sentence": m["docs"] - 2}  # every cut forced, and counted
    # by tokens too: 1 MB of it, and the blob (cut by characters)
    p.write_text(json.dumps({"title": "Huge", "text": body[:1_000_000]}) + "\n"
                 + json.dumps({"title": "Blob", "text": blob + " end"}) + "\n")
    r = run_prep(tmp_path, tokenizer_dir, [p], "wiki-jsonl", name="tokens", chunk_tokens=1000)
    lengths = [len(shards.decode_sample(s).ids) for s in read_shards(r.out)]
    assert max(lengths) <= 1000 and r.manifest["tokens"] == sum(lengths)
    assert sum(r.manifest["handled"].values()) >= len(lengths) - 2 and np.mean(lengths) > 900


def test_determinism_across_workers_and_reruns(tmp_path, tokenizer_dir, shared_data):
    lines = (shared_data / "wikitext2_valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    part = tmp_path / "part.txt"
    part.write_text("".join(lines[:1200]), encoding="utf-8")  # the first ~20 articles
    outs = []
    for name, workers in (("w1", 1), ("w2", 2), ("w1again", 1)):
        r = run_prep(tmp_path, tokenizer_dir, [part], "wikitext", name=name, workers=workers,
                     chunk_tokens=200, shard_docs=250)
        outs.append({p.name: p.read_bytes() for p in sorted(r.out.iterdir())})
    assert len(outs[0]) >= 4  # three shards or more, and the manifest
    assert outs[0] == outs[1] == outs[2]


def test_seq_len_sizes_chunks_and_out_is_protected(tmp_path, tokenizer_dir, shared_data):
    from llara_dist.prompts import PRESETS, add_special_tokens, prompt_tokens

    tok = load_tokenizer(tokenizer_dir)
    add_special_tokens(tok, PRESETS["released"])
    overhead = prompt_tokens(tok, PRESETS["released"]).overhead
    args = dict(seq_len=256, preset="released", shard_docs=100000)
    r = run_prep(tmp_path, tokenizer_dir, [shared_data / "wikitext2_valid.txt"], "wikitext", **args)
    m = r.manifest
    assert m["chunking"]["chunk_tokens"] == 256 - overhead and m["chunking"]["chunk_words"] is None
    lengths = [len(shards.decode_sample(s).ids) for s in read_shards(r.out)]
    assert max(lengths) <= 256 - overhead and np.mean(lengths) > 0.75 * (256 - overhead)
    with pytest.raises(PrepError, match="already holds manifest.json and 1 more from an earlier prep; "
                                        "pass --overwrite"):
        run_prep(tmp_path, tokenizer_dir, [shared_data / "wikitext2_valid.txt"], "wikitext", **args)
    with pytest.raises(PrepError, match="leaves no room for text"):
        run_prep(tmp_path, tokenizer_dir, [shared_data / "wikitext2_valid.txt"], "wikitext", name="x",
                 seq_len=10, preset="released")


def cli() -> list[str]:
    script = Path(sys.executable).parent / "llara-dist"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llara_dist"]


def test_cli(tmp_path, tokenizer_dir, shared_data, capsys):
    missing = tmp_path / "missing.jsonl"
    p = subprocess.run(cli() + ["prep", "--input", str(missing), "--format", "wiki-jsonl", "--tokenizer",
                                str(tokenizer_dir), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2 and f"llara-dist prep: {missing}: no such file" in p.stderr
    assert "Traceback" not in p.stderr
    from llara_dist.cli import main  # the same entry point, in this process (no second import of transformers)

    with pytest.raises(SystemExit) as e:
        main(["prep", "--input", str(shared_data / "wikitext2_valid.txt"), "--format", "wiki-jsonl",
              "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "wikitext2_valid.txt:2: not wiki-jsonl input" in err, err
    assert not list((tmp_path / "o").glob("shard-*"))


def prep_argv(inputs, out, tokenizer_dir, fmt="wiki-jsonl") -> list[str]:
    return ["prep", "--input", *map(str, inputs), "--format", fmt, "--tokenizer", str(tokenizer_dir),
            "--out", str(out)]


def test_damaged_compressed_input_is_refused_and_nothing_kept(tmp_path, tokenizer_dir, capsys):
    import zstandard

    rows = varied_rows(3000)
    frame = zstandard.ZstdCompressor().compress(rows)
    half = tmp_path / "half.jsonl.zst"
    half.write_bytes(frame[:len(frame) // 2])  # a download cut in half
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(corrupt_gzip(rows))
    for path, damage in ((half, "truncated or corrupt zstd data"), (bad, "truncated or corrupt gzip data")):
        out = tmp_path / f"out-{path.name}"
        err = refused(prep_argv([path], out, tokenizer_dir) + ["--shard-docs", "100"], capsys)
        assert f"{path}:" in err and f": cannot read: {damage}" in err, err
        # as for any refusal: the shards written before the damage are removed, no manifest written
        assert not list(out.glob("shard-*")) and not (out / shards.MANIFEST).exists()
    assert f"{bad}:3001: " in err  # the line after the last whole one


def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path, tokenizer_dir, capsys):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps({"title": "A", "text": "A fine article with words."}) + "\n")
    before = p.read_bytes()
    err = refused(prep_argv([p], p, tokenizer_dir), capsys)  # --out the input itself
    assert f"{p}: is a file, not a folder" in err and p.read_bytes() == before
    err = refused(prep_argv([p], p / "sub", tokenizer_dir), capsys)
    assert f"{p / 'sub'}: cannot create the output folder" in err and p.read_bytes() == before


def test_empty_input_is_refused_naming_the_files(tmp_path, tokenizer_dir, capsys):
    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n  \n\n")
    err = refused(prep_argv([empty], tmp_path / "o", tokenizer_dir), capsys)
    assert f"{empty}: no documents: no article found (empty or blank input)" in err, err
    err = refused(prep_argv([blank, empty], tmp_path / "o", tokenizer_dir, fmt="text"), capsys)
    assert f"{blank}, {empty}: no documents: no article found" in err, err


def test_demo_data_stages(tmp_path):
    from llara_dist import demo

    d = demo.Demo(out=tmp_path)
    names = [name for name, _ in demo.STAGES]
    for name, stage in demo.STAGES[:names.index("prep") + 1]:
        assert stage(d)
    m = d.manifest
    assert m["articles"] == 79 and m["docs"] > 79 and m["tokenizer"]["vocab_size"] == 4000
    assert m["chunking"]["chunk_tokens"] == d.seq_len - m["chunking"]["prompt_overhead"]
