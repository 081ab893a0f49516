"""The real LLaMA-2 tokenizer (no pad token) through every command, as a user runs them.

prep -> bench-data -> train (1 rank, 2 ranks) -> export -> encode -> make-beir -> eval ->
finetune -> doctor, over a tiny random LLaMA (hidden 64, 2 layers) on its 32000-token
vocabulary. The steps share module fixtures, so the pipeline runs once.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import launch, metrics, wait

from llara_dist import cli
from llara_dist.tokenizer import load_tokenizer, pad_id, with_pad_token

pytestmark = pytest.mark.slow

SEQ_LEN = 256
TEXTS = ["What is a llama?", "The llama is a domesticated South American camelid, widely used as a meat and "
         "pack animal by Andean cultures since the pre-Columbian era.", "A short one.",
         "Tropical storms form over warm water and move west in the trade winds."]
# What a command may print besides its output: its own lines (`llara-dist CMD: ...` warnings) and the
# trainer's progress lines. Anything else is a third party talking to the user (a DeepSpeed log line, a
# Python warning, a progress bar) or a traceback, which a run without --verbose must not show.
OWN_LINE = re.compile(r"^(llara-dist [\w-]+: |\d\d:\d\d:\d\d step )")
THIRD_PARTY_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[[A-Z]+\]|Traceback|Warning: |\d+%\|")


def noise(stderr: str, stdout: str = "") -> list[str]:
    """The lines a quiet command should not have printed."""
    return ([line for line in stderr.splitlines() if line.strip() and not OWN_LINE.match(line)]
            + [line for line in stdout.splitlines() if THIRD_PARTY_LINE.search(line)])


def llara_dist(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "llara_dist", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"llara-dist {args[0]}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert not noise(proc.stderr, proc.stdout), f"llara-dist {args[0]} is not quiet: {noise(proc.stderr, proc.stdout)}"
    return proc


def in_process(capsys, *args: str) -> str:
    """A command run through the CLI entry point in this process: its stdout (exit status 0 asserted)."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    out, err = capsys.readouterr()
    assert e.value.code == 0, out
    assert not noise(err, out), f"llara-dist {args[0]} is not quiet: {noise(err, out)}"
    return out


@pytest.fixture(scope="module")
def llama2(shared_data, tmp_path_factory):
    """(tokenizer folder, work folder holding a tiny random LLaMA over its vocabulary and a run config)."""
    from llara_dist.model.tiny import save_tiny_llama

    tok_dir = shared_data / "llama2-tokenizer"
    root = tmp_path_factory.mktemp("llama2")
    save_tiny_llama(root / "model", vocab_size=len(load_tokenizer(tok_dir)))
    return tok_dir, root


@pytest.fixture(scope="module")
def shards(llama2, shared_data):
    tok_dir, root = llama2
    llara_dist("prep", "--input", str(shared_data / "llara_toy_pretrain.jsonl"), "--format", "llara-jsonl",
               "--tokenizer", str(tok_dir), "--out", str(root / "shards"), "--seq-len", str(SEQ_LEN),
               "--shard-docs", "4")
    config = {
        "data": {"shards": str(root / "shards"), "seq_len": SEQ_LEN, "num_workers": 0},
        "model": {"path": str(root / "model"), "dtype": "fp32"},
        "objective": {"preset": "released"},
        "train": {"global_batch": 2, "micro_batch": 1, "steps": 2, "lr": 1e-3, "warmup_steps": 0,
                  "tokenizer": str(tok_dir), "collective_timeout_s": 60},
    }
    (root / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    return root / "shards"


def train(root, world: int, env: dict | None = None):
    run_dir = root / f"run{world}"
    codes = wait(launch(root, run_dir, world, env=env), timeout=300)
    assert codes == [0] * world, (run_dir / "log-rank0.txt").read_text()[-3000:]
    for rank in range(world):  # each rank's stdout and stderr together
        log = (run_dir / f"log-rank{rank}.txt").read_text()
        assert not noise(log), f"rank {rank} is not quiet: {noise(log)}"
    return run_dir


@pytest.fixture(scope="module")
def run1(llama2, shards):
    return train(llama2[1], 1)


@pytest.fixture(scope="module")
def exported(llama2, run1):
    out = llama2[1] / "export"
    llara_dist("export", "--run", str(run1), "--out", str(out), "--dtype", "fp32")
    return out


@pytest.fixture(scope="module")
def beir(llama2, shared_data):
    out = llama2[1] / "beir"
    llara_dist("make-beir", "--finetune", str(shared_data / "llara_toy_finetune.jsonl"), "--out", str(out))
    return out


def test_pad_rule(llama2, tokenizer_dir):
    tok = load_tokenizer(llama2[0])
    assert tok.pad_token is None and pad_id(tok) == tok.unk_token_id == 0  # as the released code pads
    bpe = load_tokenizer(tokenizer_dir)
    assert pad_id(bpe) == bpe.pad_token_id == 3  # a pad token of its own is kept
    special, size = tok.all_special_ids, len(tok)
    with_pad_token(tok)
    assert (tok.pad_token, tok.pad_token_id, len(tok), tok.all_special_ids) == ("<unk>", 0, size, special)
    assert tok(["a", "a b c"], padding=True)["input_ids"][0][-1] == 0


def test_prep(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 32000
    assert manifest["chunking"]["prompt_overhead"] == 2 + 19 + 18  # <s> " | summarize suffix | predict suffix
    assert manifest["chunking"]["chunk_tokens"] == SEQ_LEN - 39
    assert manifest["docs"] == 11 and len(manifest["shards"]) == 3


def test_bench_data(shards, capsys):
    out = in_process(capsys, "bench-data", "--shards", str(shards), "--seq-len", str(SEQ_LEN), "--workers", "0",
                     "--rows", "8", "--micro-batch", "2", "--repeat", "1", "--baseline-docs", "11")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["prompt_overhead"] == 39 and result["rows"] >= 8
    assert 0.5 < result["fill"] <= 1.0 and 0.5 < result["baseline_fill"] <= 1.0  # the baseline padded its batches
    assert result["baseline_docs"] >= 4 and result["baseline_tokens_per_s"] > 0


def test_train_one_rank(run1):
    steps = metrics(run1)
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["docs"] == 2 for m in steps)
    # ln(32016) ~ 10.37: a random model's next-token and bag-of-words losses over this vocabulary
    assert all(abs(m["lm"] - math.log(32016)) < 0.5 and abs(m["ebae"] - math.log(32016)) < 0.5 for m in steps)
    assert len(load_tokenizer(run1 / "tokenizer")) == 32016


def test_train_two_ranks(llama2, shards, rendezvous):
    run_dir = train(llama2[1], 2, env=rendezvous())
    steps = metrics(run_dir)
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["docs"] == 2 for m in steps)  # one row of one document per rank
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000002"


def released_inference(model, tok, texts: list[str], suffix: str) -> torch.Tensor:
    """The released model card's inference, on plain transformers: prefix + text + suffix, the batch
    padded by the tokenizer, the mean of the last 8 final hidden states, L2-normalised."""
    prefix_ids = tok('"', return_tensors=None)["input_ids"]
    suffix_ids = tok(suffix, return_tensors=None)["input_ids"][1:]
    inputs = []
    for text in texts:
        x = tok(text, return_tensors=None, max_length=512, truncation=True, add_special_tokens=False)
        x["input_ids"] = prefix_ids + x["input_ids"] + suffix_ids
        x["attention_mask"] = [1] * len(x["input_ids"])
        inputs.append(x)
    batch = tok.pad(inputs, padding=True, pad_to_multiple_of=8, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch, output_hidden_states=True).hidden_states[-1][:, -8:, :]
    return torch.nn.functional.normalize(h.mean(1), dim=-1)


def test_export_loads_and_embeds_on_plain_transformers(exported, run1):
    """No pad token to add by hand: the exported tokenizer pads (with <unk>, on the left), and the
    released inference over it gives our embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llara_dist.prompts import PRESETS
    from llara_dist.retrieval.encode import encode_texts, load_encoder

    assert load_tokenizer(run1 / "tokenizer").pad_token is None  # the run's own tokenizer has none
    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert (tok.pad_token, tok.padding_side, len(tok)) == ("<unk>", "left", 32016)
    assert model.get_input_embeddings().num_embeddings == 32016
    released = PRESETS["released"]
    ours, tokenizer, preset = load_encoder(exported)
    for kind, suffix in (("passage", released.self_suffix), ("query", released.next_suffix)):
        want = released_inference(model, tok, TEXTS, suffix).numpy()  # rows of 3 lengths: padded
        np.testing.assert_allclose(encode_texts(ours, tokenizer, preset, TEXTS, kind), want, atol=1e-5)


def test_encode_command(exported, tmp_path):
    """Batches padded to their longest text give the vectors of texts encoded one by one (no padding)."""
    from llara_dist.retrieval.encode import encode_texts, load_encoder

    inp = tmp_path / "texts.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    model, tokenizer, preset = load_encoder(exported)
    for kind in ("passage", "query"):
        out = tmp_path / f"{kind}.npy"
        llara_dist("encode", "--model", str(exported), "--input", str(inp), "--kind", kind, "--out", str(out),
                   "--batch-size", "4")
        got = np.load(out)
        assert got.shape == (len(TEXTS), 64)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        alone = encode_texts(model, tokenizer, preset, TEXTS, kind, batch_size=1)
        np.testing.assert_allclose(got, alone, atol=1e-5)


def test_make_beir_and_eval(exported, beir, tmp_path):
    queries = (beir / "queries.jsonl").read_text().splitlines()
    corpus = (beir / "corpus.jsonl").read_text().splitlines()
    out = tmp_path / "metrics.json"
    llara_dist("eval", "--model", str(exported), "--beir", str(beir), "--out", str(out))
    result = json.loads(out.read_text())
    assert result["queries"] == len(queries) > 0
    assert len(corpus) < 1000 and result["recall@1000"] == 1.0  # every passage ranked
    assert all(0.0 <= result[m] <= 1.0 for m in ("mrr@10", "ndcg@10", "recall@10", "recall@100"))


def test_finetune_from_the_export(exported, shared_data, llama2):
    run_dir = llama2[1] / "finetune"
    llara_dist("finetune", f"run_dir={run_dir}", f"model.path={exported}", "model.dtype=fp32",
               "objective.preset=released", f"finetune.data={shared_data / 'llara_toy_finetune.jsonl'}",
               "finetune.group_size=2", "finetune.query_max_len=16", "finetune.passage_max_len=48",
               "train.global_batch=2", "train.micro_batch=1", "train.steps=2", "train.lr=1e-3")
    steps = metrics(run_dir)
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["docs"] == 2 * (1 + 2) for m in steps)  # 2 queries, 2 passages each
    assert load_tokenizer(run_dir / "tokenizer").pad_token == "<unk>"  # the export's tokenizer, as it was saved


def test_doctor_on_the_export(exported, capsys):
    out = in_process(capsys, "doctor", "--model", str(exported), "--device", "cpu", "--seq-len", "128")
    assert "0 failed" in out and f"model {exported}" in out
