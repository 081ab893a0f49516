"""The released LLaRA recipe's target sets, reproduced by prep's target options, document by document.

tests/golden/released_targets.json holds what FlagEmbedding's released pretraining code builds for the
toy data under the LLaMA-2 tokenizer (its own logic, run by tests/golden/make_released_targets.py): per
document the input ids and the two BoW target sets, for --cutoff_len 128 and 512, with and without
--remove_stop_words. Here the toy data goes through `llara-dist prep` with the matching options
(--stop-words nltk-english|none, --self-tokens and --next-tokens C - 1, no chunk limit), the shards are read
by the stream's reader, and batch.build_batch lays them out in rows of C tokens: its EBAE and EBAR sets and
its rows must be the released ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import refused

from llara_dist.data import shards, stopwords
from llara_dist.data.batch import build_batch
from llara_dist.data.prep import PrepSettings, prep
from llara_dist.data.stream import read_shard

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TOY = SHARED / "llara_toy_pretrain.jsonl"
LLAMA2 = SHARED / "llama2-tokenizer"
GOLDEN = json.loads((Path(__file__).parent / "golden" / "released_targets.json").read_text())
SETTINGS = {(s["cutoff_len"], s["remove_stop_words"]): s["docs"] for s in GOLDEN["settings"]}


@pytest.fixture(scope="module")
def llama2():
    """The LLaMA-2 tokenizer with the released preset's tokens, its prompt, and the ids training drops."""
    from llara_dist.config import ObjectiveConfig
    from llara_dist.prompts import add_special_tokens, prompt_tokens, resolve_preset
    from llara_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(str(LLAMA2))
    preset = resolve_preset(ObjectiveConfig(preset="released"))
    add_special_tokens(tok, preset)
    return prompt_tokens(tok, preset), tuple(sorted(set(tok.all_special_ids)))


def run_prep(out: Path, **options):
    return prep(PrepSettings(inputs=[str(TOY)], format="llara-jsonl", tokenizer=str(LLAMA2), out=str(out),
                             **options), progress=False)


def released_options(cutoff_len: int, remove_stop_words: bool) -> dict:
    """prep's options for the released code's --cutoff_len and --remove_stop_words (its cut counts its BOS)."""
    return {"stop_words": stopwords.NLTK if remove_stop_words else None,
            "self_tokens": cutoff_len - 1, "next_tokens": cutoff_len - 1}


def batch_of(folder: Path, llama2, seq_len: int):
    """The documents of a prep output through the stream's reader, one a row, as build_batch lays them out."""
    prompt, drop = llama2
    manifest = shards.read_manifest(str(folder))
    docs = [d for e in manifest["shards"] for d in read_shard(str(folder / e["name"]))]
    return build_batch([[d] for d in docs], prompt, seq_len, pad_id=0, drop_ids=drop)


def target_sets(batch) -> tuple[list[list[int]], list[list[int]]]:
    def split(ids, offsets):
        return [ids[offsets[d]:offsets[d + 1]].tolist() for d in range(batch.num_docs)]

    return split(batch.ebae_ids, batch.ebae_offsets), split(batch.ebar_ids, batch.ebar_offsets)


@pytest.mark.parametrize("cutoff_len,remove_stop_words,layout",
                         [(128, True, "block"), (128, False, "block"), (512, True, "block"), (512, False, "block"),
                          (128, True, "sample")])
def test_prep_options_give_the_released_target_sets(tmp_path, llama2, cutoff_len, remove_stop_words, layout):
    expected = SETTINGS[(cutoff_len, remove_stop_words)]
    r = run_prep(tmp_path / "out", layout=layout, **released_options(cutoff_len, remove_stop_words))
    batch = batch_of(r.out, llama2, cutoff_len)
    ebae, ebar = target_sets(batch)
    assert batch.num_docs == len(expected) == 11
    for d, (doc, key) in enumerate(zip(expected, batch.keys)):
        assert ebae[d] == doc["summarize"], f"EBAE set of {key}"
        assert ebar[d] == doc["predict"], f"EBAR set of {key}"
        # the row is the released input too: BOS, prefix, the text cut to fit, both prompts
        n = len(doc["input_ids"])
        assert batch.input_ids[d, :n].tolist() == doc["input_ids"], f"row of {key}"
    assert bool(batch.has_next.all())
    assert r.manifest["targets"] == {"stop_words": r.manifest["targets"]["stop_words"], "self_stored": True,
                                     "self_tokens": cutoff_len - 1, "next_tokens": cutoff_len - 1}
    assert (r.manifest["targets"]["stop_words"] or {}).get("words") == (179 if remove_stop_words else None)


def test_default_targets_are_not_the_released_ones(tmp_path, llama2):
    """Without the options the targets are the text's own ids (today's meaning): the released sets differ."""
    r = run_prep(tmp_path / "out")
    assert "targets" not in r.manifest
    ebae, ebar = target_sets(batch_of(r.out, llama2, 128))
    expected = SETTINGS[(128, False)]
    assert all(mine != doc["summarize"] for mine, doc in zip(ebae, expected))
    assert all(mine != doc["predict"] for mine, doc in zip(ebar, expected))
    # the EBAR set of the whole next chunk holds the released (first 127 tokens) one
    assert all(set(doc["predict"]) < set(mine) for mine, doc in zip(ebar, expected))


def test_options_off_write_the_default_bytes(tmp_path):
    """--stop-words none and no caps are the defaults: the same shards and manifest, byte for byte."""
    a = run_prep(tmp_path / "a")
    b = run_prep(tmp_path / "b", stop_words="none")
    for name in [e["name"] for e in a.manifest["shards"]] + [shards.MANIFEST]:
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes(), name


def test_a_file_of_stop_words_works_like_the_named_list(tmp_path, llama2):
    words = tmp_path / "stop.txt"
    words.write_text("# NLTK's English list, upper case\n\n" + "\n".join(w.upper() for w in stopwords.NLTK_ENGLISH)
                     + "\n", encoding="utf-8")
    named = run_prep(tmp_path / "named", stop_words=stopwords.NLTK)
    listed = run_prep(tmp_path / "listed", stop_words=str(words))
    assert listed.manifest["targets"]["stop_words"]["list"] == str(words)
    assert target_sets(batch_of(named.out, llama2, 128)) == target_sets(batch_of(listed.out, llama2, 128))
    # only the EBAR cap: EBAE stays the row's text, and is stored nowhere
    capped = run_prep(tmp_path / "capped", next_tokens=5)
    assert capped.manifest["targets"]["self_stored"] is False
    docs = read_shard(str(capped.out / capped.manifest["shards"][0]["name"]))
    assert all(d.self_set is None and 0 < len(d.next_set) <= 5 for d in docs)


def test_bad_target_options_are_refused(tmp_path, capsys):
    base = ["prep", "--input", str(TOY), "--format", "llara-jsonl", "--tokenizer", str(LLAMA2)]
    err = refused(base + ["--out", str(tmp_path / "a"), "--stop-words", str(tmp_path / "nope.txt")], capsys)
    assert "nope.txt: no such file" in err and "nltk-english" in err
    (tmp_path / "two.txt").write_text("the\nof the\n")
    err = refused(base + ["--out", str(tmp_path / "b"), "--stop-words", str(tmp_path / "two.txt")], capsys)
    assert "two.txt:2: 'of the' is not one word" in err
    err = refused(base + ["--out", str(tmp_path / "c"), "--next-tokens", "0"], capsys)
    assert "--next-tokens must be >= 1" in err


def test_rechunked_articles_pair_filtered_chunks_whatever_the_workers(tmp_path):
    """Re-chunked text: a chunk's EBAR set is its successor's EBAE set (both filtered, uncapped), a cap
    keeps a subset of it, and the shards do not depend on --workers."""
    wiki = dict(inputs=[str(SHARED / "wikitext2_valid.txt")], format="wikitext", tokenizer=str(LLAMA2),
                chunk_words=100, stop_words=stopwords.NLTK)
    whole = prep(PrepSettings(out=str(tmp_path / "whole"), **wiki), progress=False)
    one = prep(PrepSettings(out=str(tmp_path / "one"), next_tokens=20, **wiki), progress=False)
    two = prep(PrepSettings(out=str(tmp_path / "two"), next_tokens=20, workers=2, **wiki), progress=False)
    for e in one.manifest["shards"]:
        assert (one.out / e["name"]).read_bytes() == (two.out / e["name"]).read_bytes()
    docs = [d for e in whole.manifest["shards"] for d in read_shard(str(whole.out / e["name"]))]
    capped = [d for e in one.manifest["shards"] for d in read_shard(str(one.out / e["name"]))]
    pairs = [(d, following, c) for d, following, c in zip(docs, docs[1:], capped) if d.has_next]
    assert len(pairs) > 1000 and whole.manifest["docs_without_next"] == 60
    for d, following, c in pairs:
        assert d.next_set.tolist() == following.self_set.tolist(), d.key
        assert set(c.next_set.tolist()) <= set(d.next_set.tolist()) and 0 < len(c.next_set) <= 20, d.key
        assert c.self_set.tolist() == d.self_set.tolist() and c.ids.tolist() == d.ids.tolist(), d.key
    # the filter took words out: the EBAE sets are not the text's own ids
    assert sum(d.self_set.tolist() != sorted(set(d.ids.tolist())) for d in docs) > 0.9 * len(docs)


def test_a_chunk_of_stop_words_only_has_an_empty_set_and_is_counted(tmp_path, llama2):
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. It was there and then it was not. Dogs bark loudly at night.\n")
    r = prep(PrepSettings(inputs=[str(text)], format="text", tokenizer=str(LLAMA2), out=str(tmp_path / "out"),
                          chunk_words=10, stop_words=stopwords.NLTK), progress=False)
    assert r.manifest["docs"] == 3
    assert r.manifest["handled"] == {"empty_target_set": 2}  # the middle chunk's EBAE, the first's EBAR
    assert r.manifest["first_seen"]["handled.empty_target_set"] == f"{text}:1"
    ebae, ebar = target_sets(batch_of(r.out, llama2, 128))
    assert [len(s) > 0 for s in ebae] == [True, False, True] and [len(s) > 0 for s in ebar] == [False, True, False]
