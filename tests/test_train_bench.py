"""bench/train_bench.py on CPU: its workloads, its smoke run (every row, both rounds, a tiny shape through the
real engines), and its summary's rule on spread.

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


def test_smoke_run_reports_equal_work_and_its_spread(tmp_path, bench):
    from helpers import allowed_pairs, flops_per_token_and_pair

    from llara_dist.model.tiny import tiny_llama_config

    out = tmp_path / "bench"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["device"] == "cpu" and report["table_peak_tflops"] is None and report["matmul_peak_tflops"] > 0
    assert (report["micro_batches"], report["rounds"], report["steps"]) == (2, 2, 2)
    assert [w["docs"] for w in report["workloads"]] == ["dpr", "chunks"]
    assert report["recipe_engine_released"]["freed"]  # the recipe's engine is gone before the shared one is built
    # the tiny shape, its vocabulary with the released preset's 16 tokens: FLOPs per token and per pair from
    # torch's count of the matmuls a model of that shape runs, the LM head's share per position from the
    # same count at half the vocabulary
    assert report["shape"] == {"hidden": 128, "heads": 4, "intermediate": 344, "vocab": 2000 + 16, "layers": 2}
    shape = dict(hidden=128, layers=2, heads=4, intermediate=344)
    per_token, per_pair = flops_per_token_and_pair(tiny_llama_config(2016, **shape))
    per_head = 2 * (per_token - flops_per_token_and_pair(tiny_llama_config(1008, **shape))[0])
    prompt = bench.released_prompt(2000)
    for w in report["workloads"]:
        # the step's documents again (the bench's --seed 0), counted from their ids and the mask rule
        step = bench.make_workload(w["docs"], bench.drawn_docs(w["docs"], 2000, 0), prompt, 256, rows=4,
                                   micro_batch=2)
        texts = [min(len(d.ids), 256 - prompt.overhead) for d in step.docs]
        counted = {"docs": len(step.docs), "text_tokens": sum(texts),
                   "real_tokens": sum(texts) + len(step.docs) * prompt.overhead,
                   "pairs": sum(int(allowed_pairs(b).sum()) for b in step.packed),
                   # where the LM head runs: 8 + 8 embedding positions a document, and the LM loss's text tokens
                   "head_positions": 2 * prompt.num_emb_tokens * len(step.docs) + sum(texts)}
        assert w["documents"] == counted["docs"]
        rows = {r["config"]: r for r in w["results"]}
        # the recipe first (its own engine), the baseline with and without fused ops, ours on sdpa (flex and
        # varlen cannot train on CPU), two-pass, the fastest with fused ops; on the first workload also with
        # activation checkpointing and compiled layers
        first = w["docs"] == "dpr"
        assert list(rows) == ["released-recipe", "baseline", "baseline+fused", "sdpa", "two-pass", "sdpa+fused"] + \
            (["sdpa+ckpt", "sdpa+compiled"] if first else [])
        assert {c: r["ref"] for c, r in rows.items()} == {
            "released-recipe": None, "baseline": None, "baseline+fused": "baseline", "sdpa": "baseline",
            "two-pass": "sdpa", "sdpa+fused": "baseline+fused",
            **({"sdpa+ckpt": "sdpa", "sdpa+compiled": "sdpa+fused"} if first else {})}
        checkpointed = ["released-recipe"] + (["sdpa+ckpt"] if first else [])
        assert [c for c, r in rows.items() if r["checkpointing"]] == checkpointed
        assert [c for c, r in rows.items() if r["fused_ops"]] == ["baseline+fused", "sdpa+fused"]
        # the recipe: one document a micro-batch, each padded up to a multiple of 8; the baseline: one a row
        recipe, base = rows["released-recipe"], rows["baseline"]
        assert recipe["engine"] == "recipe" and recipe["micro_batches"] == recipe["rows"] == counted["docs"]
        assert recipe["slots"] == sum(-(-(n + prompt.overhead) // 8) * 8 for n in texts)
        assert base["rows"] == base["docs"] == w["documents"] and base["micro_batches"] == 2
        assert rows["sdpa"]["rows"] == 4 and rows["sdpa"]["slots"] == 4 * 256
        for c, r in rows.items():
            assert {k: r[k] for k in counted} == counted, c
            assert abs(r["loss_at_start"] - base["loss_at_start"]) <= 1e-4 * abs(base["loss_at_start"]), c
            per_layers = per_token - per_head  # a token's FLOPs in the decoder layers
            assert r["flops"] == per_layers * counted["real_tokens"] + per_head * counted["head_positions"] \
                + per_pair * counted["pairs"]
            # every timed step of both rounds; the median and the spread
            times = r["step_s_all"]
            assert len(times) == 4 and len(r["step_s_rounds"]) == 2
            assert (r["step_s_min"], r["step_s_max"]) == (min(times), max(times)) and r["step_s"] == np.median(times)
            assert r["text_tokens_per_s"] == pytest.approx(r["text_tokens"] / r["step_s"])
            assert r["mfu_measured"] == pytest.approx(r["flops"] / r["step_s"] / (report["matmul_peak_tflops"] * 1e12))
            assert r["mfu_table"] is None and r["peak_mem_gib"] is None
            assert r["syncs_per_step"] is None and r["sync_sites"] is None  # counted on CUDA only
            other = rows.get(r["ref"])
            assert r["x_ref"] == (None if other is None else pytest.approx(other["step_s"] / r["step_s"]))
            if other is not None:  # within spread exactly when the two [min, max] ranges overlap
                apart = max(times) < min(other["step_s_all"]) or min(times) > max(other["step_s_all"])
                assert r["x_ref_within_spread"] is not apart
        for c in ("baseline+fused", "sdpa+fused"):
            assert 0 <= rows[c]["fused_loss_gap"] <= 1e-4  # the loss against eager's at the same weights
    md = (out / "bench.md").read_text().splitlines()
    table = [ln for ln in md if ln.startswith("| dpr") or ln.startswith("| chunks")]
    assert len(table) == 14 and all(ln.count("|") == 13 and ln.endswith("| n/a |") for ln in table)
    dpr = rows_of(report, "dpr")
    for line, fast, slow in (("- dpr: ours as the trainer runs it (sdpa+fused) against the released recipe as its "
                              "README runs it: ", "sdpa+fused", "released-recipe"),
                             ("- dpr: same shape, fused ops on both sides: sdpa+fused ", "sdpa+fused",
                              "baseline+fused"),
                             ("- dpr: same shape, no fused ops on either side: sdpa ", "sdpa", "baseline")):
        said = next(ln for ln in md if ln.startswith(line))
        x = dpr[slow]["step_s"] / dpr[fast]["step_s"]
        assert said.startswith(line + f"{x:.2f}x")
        assert ("(within spread)" in said) == bench.overlaps(dpr[fast], dpr[slow])
    for name in ("baseline+fused", "baseline"):  # no table peak on a CPU: the measured one alone
        assert f"- dpr: bound on any ratio against {name} at this shape (1 / its MFU): " \
               f"{1 / dpr[name]['mfu_measured']:.2f}x at the measured matmul peak" in "\n".join(md)
    compiled = dpr["sdpa+compiled"]
    # the two layers share their graphs (one without grad for the loss check, one training), not one each
    assert 1 <= compiled["graphs_compiled"] <= 2
    assert f"{compiled['graphs_compiled']} graphs compiled for 2 layers (target 1-2)" in "\n".join(md)
    assert any(ln.startswith(f"- dpr: activation checkpointing on sdpa: "
                             f"{dpr['sdpa+ckpt']['step_s'] / dpr['sdpa']['step_s']:.2f}x the step time") for ln in md)


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
    engine = bench.build(args, torch.device("cpu"), torch.float32, 1, bench.model_config(args, vocab))
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


def test_summary_claims_a_gain_only_beyond_the_spread(bench):
    """A ratio between configurations whose step-time ranges overlap is "within spread"; one whose ranges
    are apart is a gain. A failed configuration keeps its row, the others theirs."""
    from llara_dist.train.metrics import FlopRates

    work = dict(docs=40, docs_hash="h", text_tokens=30_000, real_tokens=40_000, pairs=10 ** 7, head_positions=31_000,
                slots=50_000, peak_mem_gib=10.0, syncs_per_step=9)

    def row(config, ref, times, **extra):
        return {**work, "config": config, "path": config.split("+")[0], "ref": ref, "step_s": float(np.median(times)),
                "step_s_min": min(times), "step_s_max": max(times), "step_s_all": times, "compiled_layers": False,
                "text_tokens_per_s": 30_000 / float(np.median(times)), **extra}

    results = [row("released-recipe", None, [6.0, 6.1, 6.2]),
               row("baseline", None, [1.00, 1.02, 1.04]),
               row("baseline+fused", "baseline", [0.90, 0.92, 0.94]),
               {"config": "flex", "path": "flex", "ref": "baseline", "error": "RuntimeError: out of memory"},
               row("sdpa", "baseline", [0.98, 0.99, 1.01]),  # overlaps the baseline's range: no gain
               row("sdpa+fused", "baseline+fused", [0.60, 0.61, 0.63])]  # apart from baseline+fused's
    rates = FlopRates(per_token=10 ** 10, per_head_position=10 ** 9, per_pair=10 ** 4)
    bench.finish(results, "dpr", rates, 989e12, 800e12)
    report = {"device": "H100", "torch": "2", "dtype": "bfloat16", "seq_len": 1024, "micro_batches": 2,
              "micro_batch": 16, "steps": 3, "rounds": 2, "warmup": 1, "matmul_peak_tflops": 800.0,
              "table_peak_tflops": 989.0, "shape": {"layers": 8, "hidden": 4096, "vocab": 32016},
              "workloads": [{"docs": "dpr", "results": results}]}
    md = bench.markdown(report)
    assert "| dpr | flex | failed: RuntimeError: out of memory |" in md
    flops = 10 ** 10 * 40_000 + 10 ** 9 * 31_000 + 10 ** 4 * 10 ** 7
    assert results[-1]["flops"] == flops and results[-1]["mfu_table"] == pytest.approx(flops / 0.61 / 989e12)
    assert "| dpr (40) | sdpa | 0.990 | 0.980-1.010 | 30,303 | 1.03 (baseline, within spread) | 6.16 | 0.80 |" in md
    assert "| dpr (40) | sdpa+fused | 0.610 | 0.600-0.630 | 49,180 | 1.51 (baseline+fused) | 10.00 |" in md
    assert "- dpr: ours as the trainer runs it (sdpa+fused) against the released recipe as its README runs it: " \
           "10.00x (target >= 5)" in md
    assert "- dpr: same shape, fused ops on both sides: sdpa+fused 1.51x baseline+fused (target >= 1.3)" in md
    assert "- dpr: same shape, no fused ops on either side: sdpa 1.03x (within spread) baseline" in md
    assert f"- dpr: MFU of sdpa+fused (FLOPs where applied) {flops / 0.61 / 989e12:.1%} of the 989 TFLOP/s " \
           f"table peak (target >= 55%)" in md
    base = results[2]  # the bound: no configuration can beat baseline+fused by more than 1 / its MFU
    assert f"- dpr: bound on any ratio against baseline+fused at this shape (1 / its MFU): " \
           f"{0.92 * 800e12 / flops:.2f}x at the measured matmul peak (800.0 TFLOP/s), " \
           f"{0.92 * 989e12 / flops:.2f}x at the 989 TFLOP/s table peak" in md and base["mfu_table"] is not None
    assert "- dpr: fused ops on sdpa: 0.62x the step time, peak memory 10.0 GiB (without: 10.0 GiB)" in md
    assert "- dpr: fused ops on baseline: 0.90x the step time, peak memory" in md
