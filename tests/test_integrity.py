"""Nothing wrong trains silently: shards checked against their manifest, the tokenizer against the
shards', token ids against the vocabulary, and corpus text never read as special tokens."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import refused

from llara_dist.data import shards as sh
from llara_dist.data.chunking import TEXT_ONLY
from llara_dist.data.prep import PrepSettings, prep
from llara_dist.data.stream import ShardSet, _plain_tar_members
from llara_dist.data.verify import check_before_training, verify
from llara_dist.prompts import PRESETS, add_special_tokens
from llara_dist.tokenizer import load_tokenizer, train_tokenizer

RELEASED = PRESETS["released"].new_tokens


def run_prep(out: Path, tokenizer, inputs, **kw):
    return prep(PrepSettings(inputs=[str(p) for p in inputs], format="wikitext", tokenizer=str(tokenizer),
                             out=str(out), **kw), progress=False)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, shared_data) -> Path:
    """Another tokenizer of the same kind: a 1000-token BPE on the same text."""
    out = tmp_path_factory.mktemp("tok1000")
    train_tokenizer((shared_data / "wikitext2_valid.txt").read_text(encoding="utf-8").splitlines(), out, 1000)
    return out


@pytest.fixture
def shards_copy(tmp_path, wikitext_shards) -> Path:
    return Path(shutil.copytree(wikitext_shards, tmp_path / "copy"))


def manifest(folder: Path) -> dict:
    return json.loads((folder / sh.MANIFEST).read_text())


def rewrite(folder: Path, name: str, samples: list, record: bool) -> None:
    """Write shard `name` anew from raw samples; with `record`, the manifest takes its new size and hash
    (so that only what is inside the shard is wrong)."""
    path = folder / name
    sh.write_shard(path, samples)
    if record:
        m = manifest(folder)
        entry = next(e for e in m["shards"] if e["name"] == name)
        entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        sh.write_manifest(folder, m)


def samples_of(path: Path) -> list[dict]:
    return sh.samples_in(_plain_tar_members(path.read_bytes()), str(path))


def forget(folder: Path, *fields: str, tokenizer_fields: tuple = ()) -> None:
    """Make the manifest look like one written before `fields` were recorded."""
    m = manifest(folder)
    for e in m["shards"]:
        for f in fields:
            e.pop(f, None)
    for f in tokenizer_fields:
        m["tokenizer"].pop(f, None)
    sh.write_manifest(folder, m)


# -- what prep records ---------------------------------------------------------------------

def test_manifest_records_sizes_and_the_tokenizer(wikitext_shards, tokenizer_dir):
    m, tok = manifest(wikitext_shards), load_tokenizer(tokenizer_dir)
    assert len(m["shards"]) == 5
    for e in m["shards"]:
        assert e["bytes"] == (wikitext_shards / e["name"]).stat().st_size
    t = m["tokenizer"]
    assert t["vocab_size"] == 2000 and t["vocab_sha256"] == sh.vocab_sha256(tok, 2000)
    assert t["special_tokens"] == {"unk": ["<unk>", 0], "bos": ["<s>", 1], "eos": ["</s>", 2], "pad": ["<pad>", 3]}
    assert m["special_tokens_in_text"] == "text"
    report, problems = verify(str(wikitext_shards))
    assert problems == 0 and report.startswith(f"verify-shards {wikitext_shards}: 5 shard(s), {m['docs']:,} documents")
    assert report.splitlines()[0].endswith("(ids below 2,000): OK") and "note" not in report


# -- literal <unk>, <s>, </s> in the text ----------------------------------------------------

def test_literal_specials_in_wikitext_are_text_under_the_test_bpe(wikitext_shards, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    docs = [(s["txt"].decode(), sh.decode_sample(s, "x"))
            for e in manifest(wikitext_shards)["shards"] for s in samples_of(wikitext_shards / e["name"])]
    with_unk = [(text, d) for text, d in docs if "<unk>" in text]
    assert len(with_unk) > 100  # WikiText's rare words
    specials = set(tok.all_special_ids)
    for text, d in docs:
        assert not specials & set(d.ids.tolist()) and not specials & set(d.next_set.tolist() if d.has_next else [])
    text, d = with_unk[0]
    assert d.ids.tolist() == tok(text, **TEXT_ONLY)["input_ids"]
    assert tok.unk_token_id in tok(text, add_special_tokens=False)["input_ids"]  # what the default call would do


def test_literal_specials_are_sentencepiece_text_under_llama2(tmp_path, shared_data):
    """The LLaMA-2 tokenizer as SentencePiece reads user text: "<unk>" is the pieces ▁< unk >, never id 0.
    (Its ids equal SentencePiece's on all of WikiText when specials are split: llama2-tokenizer/LICENSE-NOTE.md.)"""
    llama = shared_data / "llama2-tokenizer"
    tok = load_tokenizer(llama)
    part = tmp_path / "part.txt"
    part.write_text("".join((shared_data / "wikitext2_valid.txt").read_text(encoding="utf-8")
                            .splitlines(keepends=True)[:200]) + " = Tail = \n\n A literal <s> and </s> here .\n",
                    encoding="utf-8")
    r = run_prep(tmp_path / "out", llama, [part], chunk_tokens=300)
    assert r.manifest["tokenizer"]["special_tokens"] == {"bos": ["<s>", 1], "eos": ["</s>", 2],
                                                         "unk": ["<unk>", 0], "pad": None}
    unk, bos, eos = [529, 2960, 29958], [529, 29879, 29958], [1533, 29879, 29958]  # ▁< unk >, ▁< s >, ▁</ s >
    assert tok.convert_ids_to_tokens(unk) == ["▁<", "unk", ">"]
    seen = {"<unk>": 0, "<s>": 0, "</s>": 0}
    for e in r.manifest["shards"]:
        for s in samples_of(r.out / e["name"]):
            text, ids = s["txt"].decode(), sh.decode_sample(s, e["name"]).ids.tolist()
            assert not {0, 1, 2} & set(ids), text[:80]
            assert ids == tok(text, **TEXT_ONLY)["input_ids"]
            windows = [ids[i:i + 3] for i in range(len(ids))]
            for literal, pieces in (("<unk>", unk), ("<s>", bos), ("</s>", eos)):
                n = text.count(f" {literal} ") + text.startswith(f"{literal} ")
                assert windows.count(pieces) >= n
                seen[literal] += n
    assert seen["<unk>"] > 50 and seen["<s>"] == seen["</s>"] == 1


# -- the tokenizer at train start-up ---------------------------------------------------------

def test_another_tokenizer_is_refused_naming_both(wikitext_shards, tokenizer_dir, other_tokenizer, shared_data):
    assert check_before_training(str(wikitext_shards), str(tokenizer_dir), RELEASED) == 2000
    with pytest.raises(ValueError) as e:
        check_before_training(str(wikitext_shards), str(other_tokenizer), RELEASED)
    msg = str(e.value)
    assert f"made with tokenizer {tokenizer_dir} (" in msg and f"this run's tokenizer is {other_tokenizer} (" in msg
    assert "vocabulary size 2000 != 1000" in msg and "re-run `llara-dist prep`" in msg
    with pytest.raises(ValueError) as e:  # LLaMA-2: another vocabulary, and no pad token
        check_before_training(str(wikitext_shards), str(shared_data / "llama2-tokenizer"), RELEASED)
    msg = str(e.value)
    assert "vocabulary size 2000 != 32000" in msg and "vocabulary sha256" in msg
    assert "pad token '<pad>' (id 3) != none" in msg


def test_same_vocabulary_in_another_folder_or_with_the_preset_tokens_trains(tmp_path, wikitext_shards,
                                                                           tokenizer_dir):
    """A model folder trained before holds the same tokenizer re-saved, plus the preset's tokens: accepted;
    any other added token is not."""
    tok = load_tokenizer(tokenizer_dir)
    add_special_tokens(tok, PRESETS["released"])
    tok.save_pretrained(tmp_path / "resaved")
    assert check_before_training(str(wikitext_shards), str(tmp_path / "resaved"), RELEASED) == 2000
    with pytest.raises(ValueError, match=r"vocabulary size 2000 != 2016 \(tokens beyond the shards' vocabulary: "
                                         r"<s1>, <s2>, <s3>, <s4>, <s5> and 11 more\)"):
        check_before_training(str(wikitext_shards), str(tmp_path / "resaved"), PRESETS["paper"].new_tokens)


def test_older_manifests_compare_what_they_record(shards_copy, tmp_path, tokenizer_dir, other_tokenizer):
    forget(shards_copy, tokenizer_fields=("vocab_sha256", "special_tokens"))
    assert check_before_training(str(shards_copy), str(tokenizer_dir), RELEASED) == 2000
    tok = load_tokenizer(tokenizer_dir)
    add_special_tokens(tok, PRESETS["released"])
    tok.save_pretrained(tmp_path / "resaved")  # other files: without a vocabulary fingerprint, refused
    with pytest.raises(ValueError, match="sha256 of the tokenizer files .* predates vocabulary fingerprints"):
        check_before_training(str(shards_copy), str(tmp_path / "resaved"), RELEASED)
    forget(shards_copy, tokenizer_fields=("sha256", "vocab_size"))  # a manifest naming only a path: nothing to compare
    assert check_before_training(str(shards_copy), str(other_tokenizer), RELEASED) == 1000


def test_train_refuses_before_any_step(wikitext_shards, tokenizer_dir, other_tokenizer, tiny_llama_dir, tmp_path,
                                       capsys):
    """`llara-dist train` itself: exit 2 and the message, no run folder; a train.tokenizer that does not exist
    is refused, not passed over for another tokenizer."""
    run_dir = tmp_path / "run"
    common = [f"run_dir={run_dir}", f"data.shards={wikitext_shards}", f"model.path={tiny_llama_dir}",
              "model.dtype=fp32", "data.seq_len=256", "data.num_workers=0", "train.global_batch=2",
              "train.micro_batch=1", "train.steps=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "llara_dist", "train", *common, f"train.tokenizer={other_tokenizer}"],
                          env=dict(env, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "llara-dist train:" in proc.stderr and "vocabulary size 2000 != 1000" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()

    for missing, why in ((tmp_path / "nope", "no such folder"), (tmp_path, "holds no tokenizer")):
        err = refused(["train", *common, f"train.tokenizer={missing}"], capsys)
        assert f"llara-dist train: train.tokenizer={missing}: {why}" in err
    assert not run_dir.exists()


def test_train_refuses_a_truncated_shard(shards_copy, tokenizer_dir, tiny_llama_dir, tmp_path, capsys):
    path = shards_copy / sh.shard_name(3)
    path.write_bytes(path.read_bytes()[:200_000])
    err = refused(["train", f"run_dir={tmp_path / 'run'}", f"data.shards={shards_copy}", f"model.path={tiny_llama_dir}",
                   f"train.tokenizer={tokenizer_dir}", "train.global_batch=2", "train.micro_batch=1"], capsys)
    assert f"{path}: 200,000 bytes but the manifest says" in err and "truncated" in err


# -- shards checked at start-up, without reading them -----------------------------------------

def test_startup_check_finds_missing_truncated_and_resized_shards(shards_copy, tokenizer_dir):
    names = [e["name"] for e in manifest(shards_copy)["shards"]]
    first = shards_copy / names[0]
    first.write_bytes(first.read_bytes()[:100_000])  # cut inside a member
    (shards_copy / names[1]).unlink()
    rewrite(shards_copy, names[2], samples_of(shards_copy / names[2])[:90], record=False)  # 10 documents short
    with pytest.raises(ValueError) as e:
        check_before_training(str(shards_copy), str(tokenizer_dir), RELEASED)
    msg = str(e.value)
    assert "3 shard(s) do not match the manifest" in msg and f"verify-shards {shards_copy}" in msg
    assert f"{first}: 100,000 bytes but the manifest says" in msg
    assert f"{shards_copy / names[1]}: missing" in msg
    assert f"{shards_copy / names[2]}: " in msg and names[3] not in msg
    # a manifest from before byte sizes: the document counts, from the tar headers
    forget(shards_copy, "bytes")
    with pytest.raises(ValueError) as e:
        check_before_training(str(shards_copy), str(tokenizer_dir), RELEASED)
    msg = str(e.value)
    assert f"{first}: ends " in msg and "(100,000 bytes): truncated shard" in msg
    assert f"{shards_copy / names[2]}: holds 90 documents but the manifest says 100" in msg


# -- shards checked as they are read -----------------------------------------------------------

def test_first_read_checks_the_sha256_once_per_process(shards_copy):
    path = shards_copy / sh.shard_name(1)
    recorded = manifest(shards_copy)["shards"][1]["sha256"]
    original = path.read_bytes()
    data = bytearray(original)
    data[data.index(b" the ") + 1] ^= 0x20  # "the" -> "The" in a text: same size, a valid tar, only the hash tells
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    shards = ShardSet.open(str(shards_copy))
    assert shards.read(0)  # an intact shard
    with pytest.raises(ValueError, match=f"{path}: sha256 {actual} but the manifest says {recorded}"):
        shards.read(1)
    path.write_bytes(original)  # repaired
    assert len(shards.read(1)) == 100 and shards.verified == {0, 1}
    path.write_bytes(bytes(data))  # damaged again after this process verified it: not hashed a second time
    assert len(shards.read(1)) == 100
    with pytest.raises(ValueError, match="sha256"):
        ShardSet.open(str(shards_copy)).read(1)  # a fresh reader (another process) hashes it again


def test_a_shard_changed_after_prep_stops_training_with_one_message(shards_copy, tokenizer_dir, tiny_llama_dir,
                                                                    tmp_path):
    """Found only when a DataLoader worker first reads it, after the start-up checks: still a refusal (exit 2),
    its message without the worker's traceback that torch puts into the error it re-raises."""
    for e in manifest(shards_copy)["shards"]:  # every shard: whichever the worker reads first
        path = shards_copy / e["name"]
        data = bytearray(path.read_bytes())
        data[data.index(b" the ") + 1] ^= 0x20
        path.write_bytes(bytes(data))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "llara_dist", "train", f"run_dir={tmp_path / 'run'}",
                           f"data.shards={shards_copy}", f"model.path={tiny_llama_dir}", f"train.tokenizer={tokenizer_dir}",
                           "model.dtype=fp32", "data.seq_len=256", "data.num_workers=1", "train.global_batch=2",
                           "train.micro_batch=1", "train.steps=2"],
                          env=dict(env, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"llara-dist train: {re.escape(str(shards_copy))}/\S+: sha256 \w+ but the manifest says \w+: "
                        r"the shard changed after prep.*", last), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr


def test_ids_out_of_range_name_the_shard_and_the_document(shards_copy, tokenizer_dir):
    """Through the trainer's loader: not an IndexError deep in the embedding."""
    from llara_dist.config import DataConfig
    from llara_dist.data.loader import PackedLoader
    from llara_dist.prompts import prompt_tokens

    name = sh.shard_name(2)
    samples = samples_of(shards_copy / name)
    key = samples[5]["__key__"]
    ids = np.frombuffer(samples[5]["ids"], sh.ID_DTYPE).copy()
    ids[3] = 2005
    samples[5]["ids"] = ids.tobytes()
    rewrite(shards_copy, name, samples, record=True)
    tok = load_tokenizer(tokenizer_dir)
    add_special_tokens(tok, PRESETS["released"])  # ids 2000..2015 now exist, but are not text
    cfg = DataConfig(shards=str(shards_copy), seq_len=256, num_workers=0, pack_buffer=8)
    loader = PackedLoader(cfg, prompt_tokens(tok, PRESETS["released"]), micro_batch=2, rank=0, world=1, pad_id=3,
                          vocab_size=2000)
    with pytest.raises(ValueError) as e:
        for _ in itertools.islice(loader, 400):  # an epoch is ~250 batches
            pass
    assert str(e.value) == (f"{shards_copy / name}: document {key!r} holds token id 2005 in its .ids, outside the "
                            "vocabulary (0..1999): made with another tokenizer, or damaged")
    report, problems = verify(str(shards_copy))  # verify-shards finds it too, by the manifest's vocabulary
    assert problems == 1 and f"document {key!r} holds token id 2005" in report


# -- verify-shards ------------------------------------------------------------------------------

def test_verify_shards_lists_every_problem(shards_copy, capsys):
    from llara_dist.cli import main

    names = [e["name"] for e in manifest(shards_copy)["shards"]]
    with pytest.raises(SystemExit) as e:
        main(["verify-shards", str(shards_copy)])
    assert e.value.code == 0 and capsys.readouterr().out.splitlines()[0].endswith("OK")

    cut = shards_copy / names[0]
    cut.write_bytes(cut.read_bytes()[:150_000])
    (shards_copy / names[1]).unlink()
    short = samples_of(shards_copy / names[2])
    rewrite(shards_copy, names[2], short[:97], record=True)  # hash and size recorded: the count tells
    bad = samples_of(shards_copy / names[3])
    for s in bad[:25]:  # 25 documents with an id past the vocabulary: 20 listed, the rest counted
        s["next"] = np.append(np.frombuffer(s.get("next", b""), sh.ID_DTYPE), 4000).astype(sh.ID_DTYPE).tobytes()
    rewrite(shards_copy, names[3], bad, record=True)
    (shards_copy / "shard-000099.tar").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(["verify-shards", str(shards_copy)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and f"llara-dist verify-shards: 29 problem(s) in {shards_copy}" in err
    lines = out.splitlines()
    assert lines[0].endswith(": 29 problem(s)")
    assert f"  {cut}: 150,000 bytes but the manifest says" in lines[1]
    assert lines[2] == f"  {shards_copy / names[1]}: missing (the manifest lists it)"
    assert lines[3].startswith(f"  {shards_copy / names[2]}: holds 97 documents but the manifest says 100")
    assert lines[4].startswith(f"  {shards_copy / names[2]}: holds ") and "text tokens but the manifest" in lines[4]
    listed = [x for x in lines if "holds token id 4000 in its .next" in x]
    assert len(listed) == 20 and f"document {bad[0]['__key__']!r}" in listed[0]
    assert f"{shards_copy / names[3]}: ... and 5 more problem(s) in this shard" in out
    assert "note: 1 shard file(s) not in the manifest (never read): shard-000099.tar" in out


def test_verify_shards_unreadable_manifest(tmp_path, capsys):
    from llara_dist.cli import main

    with pytest.raises(SystemExit) as e:
        main(["verify-shards", str(tmp_path)])
    assert e.value.code == 2 and "cannot read the shard manifest" in capsys.readouterr().err
