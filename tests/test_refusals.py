"""One error path for every command: a refusal is one message naming the file, record and reason,
exit 2, no traceback (tests/helpers.refused); a traceback only with --debug. Each case is what a new
user typed and got a traceback or a misleading message for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import refused

from llara_dist.cli import DEBUG_ENV, REFUSED_EXIT, main

LATIN1 = "caf\xe9".encode("latin-1")  # not UTF-8: a lone 0xe9


@pytest.fixture
def exported(tmp_path, tiny_llama_dir, tokenizer_dir):
    """A model folder as export writes it: weights, tokenizer and llara.json."""
    import shutil

    out = tmp_path / "exported"
    shutil.copytree(tiny_llama_dir, out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    (out / "llara.json").write_text(json.dumps({"objective": {"preset": "released"}}))
    return out


def test_no_arguments_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == REFUSED_EXIT and "usage: llara-dist" in capsys.readouterr().err


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"llara-dist {version('llara-dist')}"


def test_encode_refusals(tmp_path, exported, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "' + LATIN1 + b'"}\n')
    err = refused(["encode", "--model", str(exported), "--input", str(bad), "--kind", "passage",
                   "--out", str(tmp_path / "o.npy")], capsys)
    assert f"{bad}:2: not UTF-8 text (byte 0xe9 at column 14)" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    err = refused(["encode", "--model", str(exported), "--input", str(empty), "--kind", "query",
                   "--out", str(tmp_path / "o.npy")], capsys)
    assert f"{empty}: no texts to encode" in err and not (tmp_path / "o.npy").exists()
    err = refused(["encode", "--model", str(tmp_path / "nope"), "--input", str(empty), "--kind", "query",
                   "--out", str(tmp_path / "o.npy")], capsys)
    assert f"{tmp_path / 'nope'}: no such model folder" in err and "Repo id" not in err


def test_make_beir_and_eval_refusals(tmp_path, exported, capsys):
    bad = tmp_path / "ft.jsonl"
    bad.write_bytes(b'{"query": "q", "pos": ["' + LATIN1 + b'"], "neg": ["n"]}\n')
    assert f"{bad}:1: not UTF-8 text" in refused(["make-beir", "--finetune", str(bad), "--out", str(tmp_path / "b")],
                                                 capsys)
    missing = tmp_path / "missing.jsonl"
    assert f"{missing}: no such" in refused(["make-beir", "--finetune", str(missing), "--out", str(tmp_path / "b")],
                                            capsys)
    err = refused(["eval", "--model", str(exported), "--beir", str(tmp_path / "nobeir")], capsys)
    assert f"{tmp_path / 'nobeir' / 'corpus.jsonl'}: missing" in err
    err = refused(["eval", "--model", str(tmp_path / "nomodel"), "--beir", str(tmp_path)], capsys)
    assert "no such model folder" in err and "Repo id" not in err


def test_doctor_and_bench_data_refusals(tmp_path, capsys):
    err = refused(["doctor", "--model", str(tmp_path / "nope")], capsys)
    assert f"{tmp_path / 'nope'}: no such model folder" in err and "Repo id" not in err
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [], "tokenizer": {"name_or_path": "gone"}}))
    err = refused(["bench-data", "--shards", str(tmp_path), "--tokenizer", str(tmp_path / "nope")], capsys)
    assert f"{tmp_path / 'nope'}: no such tokenizer folder" in err and "manifest" not in err


def test_count_options_below_their_minimum_are_refused_by_name(tmp_path, capsys):
    for argv, option in ((["convert-checkpoint", str(tmp_path), "--to-world", "0"], "--to-world"),
                         (["convert-checkpoint", str(tmp_path), "--workers", "-1"], "--workers"),
                         (["mine-negatives", "--model", "m", "--input", "i", "--out", "o", "--negatives", "0"],
                          "--negatives"),
                         (["mine-negatives", "--model", "m", "--input", "i", "--out", "o", "--batch-size", "x"],
                          "--batch-size")):
        assert f"error: argument {option}: " in refused(argv, capsys)


def test_finetune_data_not_utf8(tmp_path, tokenizer_dir, tiny_llama_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"query": "q", "pos": ["p"], "neg": ["n"]}\n{"query": "' + LATIN1 + b'", "pos": ["p"]}\n')
    err = refused(["finetune", f"run_dir={tmp_path / 'run'}", f"model.path={tiny_llama_dir}",
                   f"train.tokenizer={tokenizer_dir}", f"finetune.data={data}"], capsys)
    assert f"{data}:2: not UTF-8 text (byte 0xe9" in err and not (tmp_path / "run").exists()


def test_train_refusals_name_what_is_missing(tmp_path, tiny_llama_dir, tokenizer_dir, capsys):
    err = refused(["train", f"run_dir={tmp_path / 'run'}"], capsys)  # no config at all
    assert "model.path: not set" in err and "data.shards: not set" in err and "looked in" not in err
    err = refused(["train", f"model.path={tmp_path / 'nope'}", f"data.shards={tmp_path}"], capsys)
    assert f"model.path={tmp_path / 'nope'}: no such folder or file" in err
    err = refused(["train", f"model.path={tiny_llama_dir}", f"data.shards={tmp_path / 'none'}",
                   f"run_dir={tmp_path / 'run'}"], capsys)
    assert f"{tmp_path / 'none'}" in err and "manifest" in err
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": []}))
    err = refused(["train", f"model.path={tiny_llama_dir}", f"data.shards={tmp_path}", "model.attn=flex",
                   f"train.tokenizer={tokenizer_dir}"], capsys)
    assert "attention path 'flex' is not available on cpu" in err and "sdpa" in err
    assert not (tmp_path / "run").exists()


def test_config_problems_all_at_once_with_suggestions(capsys):
    err = refused(["train", "data.seq_len=abc", "train.lr_rate=1e-5", "train.warmup=10", "trian.steps=3",
                   "train.global_batch=-1"], capsys)
    assert "data.seq_len: expected an integer, got 'abc'" in err
    assert "train.lr_rate: unknown key (did you mean train.lr?)" in err
    assert "train.warmup: unknown key (did you mean train.warmup_steps?)" in err
    assert "trian: unknown key (did you mean train?)" in err
    assert "global_batch" in err.split("trian")[-1] or "train.global_batch" in err


def test_fewer_shards_than_readers_names_a_shard_size(wikitext_shards, tiny_llama_dir, tmp_path, capsys):
    manifest = json.loads((wikitext_shards / "manifest.json").read_text())
    shards, docs = len(manifest["shards"]), sum(s["docs"] for s in manifest["shards"])
    workers = shards + 1
    err = refused(["train", f"model.path={tiny_llama_dir}", f"data.shards={wikitext_shards}",
                   f"run_dir={tmp_path / 'run'}", f"data.num_workers={workers}", "train.global_batch=2",
                   "train.micro_batch=1", "model.dtype=fp32"], capsys)
    assert f"{shards} shard(s) for {workers} readers" in err
    assert f"prep again with --shard-docs {docs // workers} or fewer" in err


def test_warmup_longer_than_the_run_warns(tmp_path, tiny_llama_dir, capsys):
    from llara_dist.config import RunConfig, load_config
    from llara_dist.train.trainer import caveats

    cfg = load_config(RunConfig, None, ["train.steps=20", "train.warmup_steps=100", "train.lr=1e-4",
                                        "train.ckpt_every=5"])
    (warning,) = caveats(cfg)
    assert "train.warmup_steps=100 >= train.steps=20" in warning and "never reaches train.lr=0.0001" in warning
    assert "ends at 2e-05" in warning  # the last step's lr: 20 / 101 of the peak, rounded
    cfg = load_config(RunConfig, None, ["train.steps=20", "train.warmup_steps=5", "train.ckpt_every=5"])
    assert caveats(cfg) == []


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "llara_dist", "doctor", "--model", str(tmp_path / "nope")]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    loud = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, DEBUG_ENV: "1"})
    assert quiet.returncode == REFUSED_EXIT and "Traceback" not in quiet.stderr
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "UserError" in loud.stderr


def test_deepspeed_local_rank_flag_is_accepted(tmp_path, capsys, monkeypatch):
    """`deepspeed --module llara_dist train` runs `python -m llara_dist --local_rank=N train ...`."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    err = refused(["--local_rank=1", "train", f"run_dir={tmp_path}"], capsys)
    assert "unrecognized arguments" not in err and "model.path: not set" in err
    assert __import__("os").environ["LOCAL_RANK"] == "1"


def test_a_closed_pipe_ends_quietly(wikitext_shards):
    """`llara-dist ... | head`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "llara_dist", "verify-shards", str(wikitext_shards)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes: its first write finds no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
