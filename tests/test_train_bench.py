"""bench/train_bench.py on CPU: its workloads, and one whole run of a tiny shape through the real engine.

The report's work is counted here another way: documents, tokens and attention pairs from the
step's documents and the mask rule, FLOPs from torch's own count over a model of the benchmarked
shape; every configuration must have processed the same documents.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("train_bench", ROOT / "bench" / "train_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks the module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    yield load_bench()
    del sys.modules["train_bench"]


def test_drawn_documents_form_articles(bench):
    docs = [d for _, d in zip(range(20), bench.drawn_docs("dpr", vocab=500, seed=3))]
    per = bench.CHUNKS_PER_ARTICLE
    for i, d in enumerate(docs):
        assert d.key == f"dpr/a{i // per}/c{i % per}"
        assert 40 <= len(d.ids) <= 400 and d.ids.min() >= 3 and d.ids.max() < 500
        if (i + 1) % per == 0:
            assert d.next_set is None  # an article's last chunk
        elif i + 1 < len(docs):
            assert np.array_equal(d.next_set, np.unique(docs[i + 1].ids))


def test_workload_layouts_hold_the_same_documents(bench):
    prompt = bench.released_prompt(500)
    assert (len(prompt.prefix), len(prompt.self_suffix), len(prompt.next_suffix)) == (2, 19, 18)
    w = bench.make_workload("chunks", bench.drawn_docs("chunks", 500, 0), prompt, seq_len=512, rows=5, micro_batch=2)
    assert [b.rows for b in w.packed] == [2, 2, 1]
    assert len(w.padded) == len(w.packed)
    keys = sorted(d.key for d in w.docs)
    assert sorted(k for b in w.packed for k in b.keys) == keys == sorted(k for b in w.padded for k in b.keys)
    assert bench.docs_hash(w.packed) == bench.docs_hash(w.padded)
    for b in w.padded:  # one document per row, the row as long as the micro-batch's longest document
        assert b.rows == b.num_docs
        assert b.input_ids.shape[1] == int((b.text_len + b.self_len + b.next_len).max())
    assert sum(b.text_tokens() for b in w.packed) == sum(b.text_tokens() for b in w.padded)


def test_tiny_run_reports_equal_work(tmp_path, bench):
    from helpers import allowed_pairs, flops_per_token_and_pair

    from llara_dist.model.tiny import tiny_llama_config

    out = tmp_path / "bench"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "train_bench.py"), "--shape", "tiny", "--device", "cpu",
           "--seq-len", "256", "--rows", "4", "--micro-batch", "2", "--warmup", "0", "--steps", "1",
           "--compare-fused", "--compare-compiled", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["device"] == "cpu" and report["table_peak_tflops"] is None and report["matmul_peak_tflops"] > 0
    assert report["micro_batches"] == 2
    assert [w["docs"] for w in report["workloads"]] == ["dpr", "chunks"]
    # the tiny shape, its vocabulary with the released preset's 16 tokens: FLOPs per token and per pair
    # from torch's count of the matmuls a model of that shape runs
    assert report["shape"] == {"hidden": 128, "heads": 4, "intermediate": 344, "vocab": 2000 + 16, "layers": 2}
    per_token, per_pair = flops_per_token_and_pair(tiny_llama_config(2016, hidden=128, layers=2, heads=4,
                                                                     intermediate=344))
    prompt = bench.released_prompt(2000)
    for w in report["workloads"]:
        # the step's documents again (the bench's --seed 0), counted from their ids and the mask rule
        step = bench.make_workload(w["docs"], bench.drawn_docs(w["docs"], 2000, 0), prompt, 256, rows=4,
                                   micro_batch=2)
        text = sum(min(len(d.ids), 256 - prompt.overhead) for d in step.docs)
        counted = {"docs": len(step.docs), "text_tokens": text, "real_tokens": text + len(step.docs) * prompt.overhead,
                   "pairs": sum(int(allowed_pairs(b).sum()) for b in step.packed)}
        assert w["documents"] == counted["docs"]
        rows = {r["config"]: r for r in w["results"]}
        # flex/varlen cannot train on CPU; the fastest of ours again with activation checkpointing, then with
        # fused ops, then with compiled layers (first workload)
        first = w["docs"] == "dpr"
        assert list(rows) == ["baseline", "sdpa", "two-pass"] + (["sdpa+ckpt", "sdpa+fused", "sdpa+compiled"]
                                                                 if first else [])
        assert [r["checkpointing"] for r in rows.values()] == [False, False, False] + [True, False, False] * first
        assert [r["fused_ops"] for r in rows.values()] == [False, False, False] + [False, True, False] * first
        assert [r["compiled_layers"] for r in rows.values()] == [False] * 3 + [False, False, True] * first
        base = rows["baseline"]
        assert base["rows"] == base["docs"] == w["documents"]  # one document per sequence
        assert rows["sdpa"]["rows"] == 4 and rows["sdpa"]["micro_batches"] == base["micro_batches"] == 2
        for r in rows.values():
            same = ("docs", "docs_hash", "text_tokens", "real_tokens", "pairs")
            assert {k: r[k] for k in same} == {k: base[k] for k in same}, r["config"]
            assert abs(r["loss_at_start"] - base["loss_at_start"]) <= 1e-4 * abs(base["loss_at_start"])
            assert {k: r[k] for k in counted} == counted, r["config"]
            assert r["flops"] == per_token * counted["real_tokens"] + per_pair * counted["pairs"]
            assert r["step_s"] > 0 and r["text_tokens_per_s"] == pytest.approx(r["text_tokens"] / r["step_s"])
            assert r["mfu_measured"] == pytest.approx(r["flops"] / r["step_s"] / (report["matmul_peak_tflops"] * 1e12))
            assert r["speedup"] == pytest.approx(base["step_s"] / r["step_s"])
            assert r["mfu_table"] is None and r["peak_mem_gib"] is None
            assert r["syncs_per_step"] is None and r["sync_sites"] is None  # counted on CUDA only
        assert rows["sdpa"]["slots"] == 4 * 256 and rows["sdpa"]["fill"] > base["fill"] * 0.5
    md = (out / "bench.md").read_text().splitlines()
    table = [ln for ln in md if ln.startswith("| dpr") or ln.startswith("| chunks")]
    assert len(table) == 9 and all(ln.count("|") == 12 and ln.endswith("| n/a |") for ln in table)
    assert sum(ln.startswith("- ") and "x the baseline" in ln for ln in md) == 2
    ckpt, *compiled = report["workloads"][0]["results"][-3:]
    for r, what in zip(compiled, ("fused ops", "compiled layers")):
        assert 0 <= r["fused_loss_gap"] <= 1e-4  # the loss against eager's at the same weights
        assert f"- dpr: {what} on sdpa: {r['step_s'] / rows_of(report, 'dpr')['sdpa']['step_s']:.2f}x the step " \
               f"time, peak memory n/a (without: n/a); loss {r['fused_loss_gap']:.1e} from eager's; " \
               f"{r['graphs_compiled']} graphs compiled" in md
    # the two layers share their graphs (one without grad for the loss check, one training), not one each
    assert 1 <= compiled[1]["graphs_compiled"] <= 2
    assert f"- dpr: activation checkpointing on sdpa: {ckpt['step_s'] / rows_of(report, 'dpr')['sdpa']['step_s']:.2f}x " \
           "the step time, peak memory n/a (without: n/a)" in md


def rows_of(report, docs):
    return next({r["config"]: r for r in w["results"]} for w in report["workloads"] if w["docs"] == docs)


def _checkpointing_worker(rank, world, port, paths, out):
    """One micro-batch's loss and gradients on one ZeRO-3 engine: checkpointing off, on, off again."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from deepspeed.utils import safe_get_full_grad

    from llara_dist.model import objective
    from llara_dist.model.decoder import set_attention
    from llara_dist.prompts import PRESETS

    bench = load_bench()
    vocab = bench.SHAPES["tiny"]["vocab"]
    args = SimpleNamespace(shape="tiny", layers=0, micro_batch=2, seq_len=256, seed=0, zero3_layer_gather=True,
                           zero_stage=3)
    engine = bench.build(args, torch.device("cpu"), torch.float32, 1, vocab)
    batch = bench.make_workload("dpr", bench.drawn_docs("dpr", vocab, 0), bench.released_prompt(vocab), 256,
                                rows=2, micro_batch=2).packed[0]
    set_attention(engine, "sdpa", "cpu")
    preset = PRESETS["released"]
    # calls of the first layer's MLP: twice per step when its activations are recomputed (a pre-hook: the
    # recomputation stops once it has what the backward needs, before a forward hook would run)
    calls = []
    engine.module.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    runs = []
    for on in (False, True, False):
        bench.set_checkpointing(engine, on)
        calls.clear()
        loss, _ = objective.combine(objective.loss_sums(engine, batch, preset),
                                    objective.batch_counts(batch, preset), preset)
        engine.backward(loss, scale_wrt_gas=False)
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.optimizer.zero_grad()  # no step: the next run starts from the same weights
        runs.append({"loss": float(loss.detach()), "calls": len(calls), "grads": grads})
    torch.save(runs, out)


@pytest.mark.slow
def test_activation_checkpointing_keeps_loss_and_gradients(run_ranks, tmp_path):
    """The bench's checkpointed configuration computes what the plain one does (ZeRO-3, tiny shape, CPU)."""
    plain, ckpt, plain_again = run_ranks(_checkpointing_worker, 1, None, tmp_path / "runs.pt")
    assert [r["calls"] for r in (plain, ckpt, plain_again)] == [1, 2, 1]  # recomputed in backward only when on
    assert plain["loss"] == ckpt["loss"] == plain_again["loss"]
    assert len(plain["grads"]) > 10
    for name, g in plain["grads"].items():
        assert g.abs().max() > 0, name  # every parameter gets a gradient from this batch
        torch.testing.assert_close(ckpt["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(plain_again["grads"][name], g, rtol=0, atol=0, msg=name)


def test_markdown_keeps_a_failed_configuration_and_the_others(bench):
    ok = dict(docs=40, step_s=2.0, text_tokens_per_s=100.0, docs_per_s=20.0, speedup=1.0, fill=0.8,
              peak_mem_gib=10.0, mfu_table=0.1, mfu_measured=0.2, checkpointing=False)
    report = {"device": "H100", "torch": "2", "dtype": "bfloat16", "seq_len": 1024, "micro_batches": 4,
              "micro_batch": 8, "steps": 3, "matmul_peak_tflops": 800.0,
              "shape": {"layers": 2, "hidden": 4096, "vocab": 32016},
              "workloads": [{"docs": "dpr", "results": [
                  {**ok, "config": "baseline"},
                  {"config": "flex", "path": "flex", "error": "RuntimeError: out of memory"},
                  {**ok, "config": "sdpa", "step_s": 0.5, "text_tokens_per_s": 400.0, "speedup": 4.0,
                   "mfu_table": 0.4},
                  {**ok, "config": "two-pass", "step_s": 1.0, "speedup": 2.0},
                  {**ok, "config": "sdpa+ckpt", "path": "sdpa", "step_s": 0.6, "text_tokens_per_s": 333.3,
                   "speedup": 3.33, "peak_mem_gib": 4.0, "checkpointing": True}]}]}
    md = bench.markdown(report)
    assert "| dpr | flex | failed: RuntimeError: out of memory |" in md
    assert "| dpr (40) | sdpa | 0.500 | 400 | 20.0 | 4.00 | 0.80 | 10.0 | 40.0% | 20.0% |" in md
    assert "- dpr: best path sdpa 4.00x the baseline (target >= 4); joint prompt 2.00x two-pass " \
           "(target >= 1.6); MFU 40.0% (target >= 50%)" in md  # not the checkpointed sdpa
    assert "- dpr: activation checkpointing on sdpa: 1.20x the step time, peak memory 4.0 GiB (without: 10.0 GiB)" in md
