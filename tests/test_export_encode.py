"""Export a real ZeRO-3 checkpoint, load it with plain transformers, encode and evaluate.

The exported folder must give the embeddings of the training-time weights (DeepSpeed's
own consolidation of the same checkpoint), load with AutoModelForCausalLM without
missing keys, and drive `encode`/`eval` without flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Valkyria Chronicles is a tactical role-playing game.",
         "A short one.", "Tropical storms form over warm water and move west in the trade winds."]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer_dir, tiny_llama_dir, wiki_docs, write_test_shards):
    root = tmp_path_factory.mktemp("export")
    shards = write_test_shards(root / "shards", wiki_docs[:120], 2, str(tokenizer_dir))
    run_dir = root / "run"
    cmd = [sys.executable, "-m", "llara_dist", "train", f"run_dir={run_dir}", f"data.shards={shards}",
           f"model.path={tiny_llama_dir}", f"train.tokenizer={tokenizer_dir}", "model.dtype=fp32",
           "data.seq_len=256", "data.num_workers=0", "train.global_batch=2", "train.micro_batch=1",
           "train.steps=2", "train.lr=1e-3", "objective.preset=released"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def saved_dtypes(folder) -> set:
    """The dtypes of every tensor in a folder's safetensors files, read from the files themselves."""
    from safetensors import safe_open

    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            dtypes |= {f.get_tensor(name).dtype for name in f.keys()}
    return dtypes


def test_export_matches_training_weights(trained_run, tmp_path, shared_data):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from llara_dist.config import ModelConfig, ObjectiveConfig
    from llara_dist.model.decoder import load_model
    from llara_dist.model.embed import encode
    from llara_dist.prompts import resolve_preset
    from llara_dist.retrieval.encode import encode_texts, load_encoder
    from llara_dist.retrieval.evaluate import evaluate_model
    from llara_dist.retrieval.export import export_run
    from llara_dist.tokenizer import load_tokenizer

    umask = os.umask(0o077)  # as on a cluster that keeps new files private: the export still shares its own
    try:
        out = export_run(trained_run, tmp_path / "export", max_shard_size="200KB")  # the run's dtype: fp32
    finally:
        os.umask(umask)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert saved_dtypes(out) == {torch.float32} and json.loads((out / "config.json").read_text())["dtype"] == "float32"
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644} and out.stat().st_mode & 0o777 == 0o755, modes

    plain = AutoModelForCausalLM.from_pretrained(out)  # no flags, no custom code
    tok = load_tokenizer(out)
    assert len(tok) == plain.get_input_embeddings().num_embeddings
    assert tok.convert_tokens_to_ids("<s16>") != tok.unk_token_id

    # the training-time weights, consolidated by DeepSpeed itself (eager path)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(trained_run / "checkpoints"))
    exported = plain.state_dict()
    for name, value in reference.items():
        assert torch.equal(exported[name], value), name

    preset = resolve_preset(ObjectiveConfig(preset="released"))
    base_tok = load_tokenizer(trained_run / "tokenizer")
    train_model = load_model(ModelConfig(path=str(out), dtype="fp32"), base_tok, preset, device="cpu")
    train_model.load_state_dict(reference, strict=False)
    want = encode(train_model.eval(), base_tok, preset, TEXTS, kind="passage").numpy()

    model, tokenizer, p = load_encoder(out)  # preset from llara.json
    assert p == preset
    got = encode_texts(model, tokenizer, p, TEXTS, "passage", batch_size=3)  # batched by length, reordered
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    q = encode_texts(model, tokenizer, p, TEXTS, "query")
    assert not np.allclose(q, got)  # the NEXT prompt gives other vectors

    from llara_dist.retrieval.beir import finetune_to_beir

    beir = finetune_to_beir(shared_data / "llara_toy_finetune.jsonl", tmp_path / "beir")
    metrics = evaluate_model(model, tokenizer, p, tmp_path / "beir", k=1000, trec=str(tmp_path / "run.trec"))
    assert metrics["queries"] == len(beir.queries)
    assert all(0.0 <= metrics[m] <= 1.0 for m in ("mrr@10", "ndcg@10", "recall@10", "recall@100"))
    assert len(beir.corpus) < 1000 and metrics["recall@1000"] == 1.0  # every passage ranked
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert len(lines) == len(beir.queries) * len(beir.corpus)


def test_cli_encode_and_missing_checkpoint(trained_run, tmp_path):
    from llara_dist.retrieval.export import export_run

    out = export_run(trained_run, tmp_path / "export", dtype="fp32")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    proc = subprocess.run([sys.executable, "-m", "llara_dist", "encode", "--model", str(out), "--input", str(inp),
                           "--kind", "query", "--out", str(tmp_path / "q.npy")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.load(tmp_path / "q.npy").shape[0] == len(TEXTS)
    proc = subprocess.run([sys.executable, "-m", "llara_dist", "export", "--run", str(trained_run), "--out",
                           str(tmp_path / "x"), "--tag", "step99999999"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no checkpoint step99999999" in proc.stderr


def test_export_refuses_a_folder_with_files_and_overwrite_replaces_only_its_own(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "data"
    out.mkdir()
    (out / "corpus.jsonl").write_text('{"text": "mine"}\n')
    cmd = [sys.executable, "-m", "llara_dist", "export", "--run", str(trained_run), "--out", str(out), "--dtype", "fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--out {out}: the folder is not empty" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["corpus.jsonl"]  # nothing written
    # a shard size that is no size: refused before anything is read or written
    proc = subprocess.run(cmd + ["--overwrite", "--max-shard-size", "5XB"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--max-shard-size 5XB: not a size in bytes" in proc.stderr, proc.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == ["corpus.jsonl"]

    # an earlier, sharded export's files: the new one writes a single file and no index
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    proc = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "corpus.jsonl").read_text() == '{"text": "mine"}\n'  # not an export's file: left alone
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "llara.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)  # the stale index would have pointed it at the stale shard

    (tmp_path / "file").write_text("")
    proc = subprocess.run(cmd[:-4] + ["--out", str(tmp_path / "file")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "exists and is not a folder" in proc.stderr and "Traceback" not in proc.stderr


def test_export_dtype_follows_the_run_unless_overridden(trained_run, tmp_path):
    """--dtype overrides; without it, the run's model.dtype, and `auto` as the trainer resolved it on its
    device, which the checkpoint's DeepSpeed config records (a GPU run: bf16.enabled)."""
    import argparse
    import shutil

    import yaml

    from llara_dist.retrieval import export

    cmd = [sys.executable, "-m", "llara_dist", "export", "--run", str(trained_run), "--out", str(tmp_path / "bf16"),
           "--dtype", "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert saved_dtypes(tmp_path / "bf16") == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"

    # the same run with model.dtype auto, trained on the CPU (as it was: bf16.enabled false), then as if on a GPU
    run = tmp_path / "auto-run"
    shutil.copytree(trained_run, run)
    saved_config = yaml.safe_load((run / "config.yaml").read_text())
    saved_config["model"]["dtype"] = "auto"
    (run / "config.yaml").write_text(yaml.safe_dump(saved_config))
    assert export.load_run_config(run).model.dtype == "auto"
    assert saved_dtypes(export.export_run(run, tmp_path / "auto-cpu")) == {torch.float32}
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    for states in latest.glob("*model_states.pt"):
        saved = torch.load(states, weights_only=False)
        assert saved["ds_config"]["bf16"]["enabled"] is False
        saved["ds_config"]["bf16"]["enabled"] = True
        torch.save(saved, states)
    assert saved_dtypes(export.export_run(run, tmp_path / "auto-gpu")) == {torch.bfloat16}
    assert saved_dtypes(export.export_run(run, tmp_path / "auto-gpu-fp32", dtype="fp32")) == {torch.float32}

    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter)  # as the CLI makes it
    export.configure(parser)
    text = " ".join(parser.format_help().split())
    for default in ("(default: latest)", "(default: the run's training dtype", "(default: merge)", "(default: 5GB)"):
        assert default in text, text


def test_shard_sizes_in_decimal_and_binary_units():
    from llara_dist.retrieval.export import shard_bytes

    assert [shard_bytes(t) for t in ("5GB", "200KB", "2MiB", " 1.5gib ", "1000", "7B")] == \
        [5 * 10**9, 200_000, 2 * 2**20, 3 * 2**29, 1000, 7]
    for bad in ("5XB", "", "GB", "0", "-1MB", "inf", "nan"):
        with pytest.raises(ValueError, match="not a size in bytes"):
            shard_bytes(bad)
