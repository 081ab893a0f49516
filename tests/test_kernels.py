"""Kernel paths against the dense-mask reference, at the attention level (CPU).

varlen's layout (gather indices, cu_seqlens, scatter back) runs through per-sequence
SDPA here; its real CUDA kernels are checked by `llara-dist doctor` (bench/gpu_check.sh).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llara_dist.data.batch import SEG_NEXT, SEG_SELF, build_batch
from llara_dist.data.shards import Doc
from llara_dist.kernels import flex, mask, registry, sdpa, varlen
from llara_dist.prompts import PromptTokens

PROMPT = PromptTokens(prefix=(1, 7), self_suffix=(11, 12, 13), next_suffix=(21, 22, 23, 24), num_emb_tokens=2)


def packed(lengths_per_row, seq_len=64):
    rows = [[Doc(f"r{r}d{i}", np.full(n, 100 + i, np.int32), None) for i, n in enumerate(row)]
            for r, row in enumerate(lengths_per_row)]
    return build_batch(rows, PROMPT, seq_len=seq_len, pad_id=0)


def qkv(R, L, H=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, H, L, D, generator=g), torch.randn(R, Hkv, L, D, generator=g),
            torch.randn(R, Hkv, L, D, generator=g))


def blanked(batch, seg):
    """The two-pass metadata: doc ids with one prompt's tokens turned into padding."""
    return batch.doc.masked_fill(batch.segment == seg, -1)


LAYOUTS = [[[30]], [[5, 9], [12, 3, 4]], [[3, 2, 1, 2, 1]]]


def test_dense_mask_is_the_rule():
    b = packed([[2, 3]], seq_len=24)
    m = mask.dense_mask(b.doc, b.segment)[0, 0]
    doc, seg = b.doc[0], b.segment[0]
    for i in range(24):
        for j in range(24):
            want = (doc[i] == doc[j] and doc[i] >= 0 and j <= i
                    and not (seg[i] == SEG_NEXT and seg[j] == SEG_SELF)) or i == j
            assert bool(m[i, j]) == bool(want), (i, j)


@pytest.mark.parametrize("rows", LAYOUTS)
@pytest.mark.parametrize("blank", [None, SEG_NEXT, SEG_SELF])
def test_varlen_layout_matches_dense(rows, blank):
    b = packed(rows)
    doc = b.doc if blank is None else blanked(b, blank)
    q, k, v = qkv(*doc.shape)
    ref = sdpa.attend(q, k, v, sdpa.prepare(doc, b.segment), scale=None)
    out = varlen.attend(q, k, v, varlen.prepare(doc, b.segment), scale=None, kernel=varlen.reference)
    real = (doc >= 0)[:, None, :, None].expand_as(ref)
    assert (out - ref)[real].abs().max() <= 1e-5
    assert (out[~real] == 0).all()  # padding is in no sequence


def test_varlen_layout_indices():
    b = packed([[2, 1]], seq_len=32)  # documents of 2+2 and 2+1 text tokens, S=3, N=4
    lay = varlen.prepare(b.doc, b.segment)
    # queries: doc0 A (4 text + 3 self), doc0 B (4 next), doc1 A (3 + 3), doc1 B (4)
    assert lay.cu_q.tolist() == [0, 7, 11, 17, 21]
    # keys: A = its queries; B = text + next
    assert lay.cu_k.tolist() == [0, 7, 15, 21, 28]
    assert lay.k_index[7:15].tolist() == [0, 1, 2, 3, 7, 8, 9, 10]
    assert (lay.max_q, lay.max_k) == (7, 8)
    assert lay.q_index.tolist() == list(range(21))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", LAYOUTS)
@pytest.mark.parametrize("two_pass", [False, True])
def test_varlen_layout_from_the_host_equals_the_device_built(device, rows, two_pass):
    """forward_hidden's mask (modeling.pass_mask) takes varlen's layout from the batch's host copy:
    the same layout as built from the device tensors; two-pass: both passes' rows, blanked, stacked."""
    from llara_dist.model.decoder import pass_mask

    b = packed(rows).to(device)
    if two_pass:
        doc, seg = torch.cat([blanked(b, SEG_NEXT), blanked(b, SEG_SELF)]), torch.cat([b.segment, b.segment])
    else:
        doc, seg = b.doc, b.segment
    want, got = varlen.prepare(doc, seg), pass_mask(b, "varlen", two_pass).payload
    for name in ("q_index", "k_index", "cu_q", "cu_k"):
        w, g = getattr(want, name), getattr(got, name)
        assert g.device == w.device and g.dtype == w.dtype and torch.equal(g, w), name
    assert (got.max_q, got.max_k) == (want.max_q, want.max_k) and type(got.max_q) is int


def dense_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """The varlen kernels' contract without reading a value: each query attends the keys of its own
    sequence, bottom-right causal (key j of m sees query i of n iff m - j >= n - i)."""
    tq, tk = torch.arange(q.shape[0]), torch.arange(k.shape[0])
    sq, sk = torch.searchsorted(cu_q, tq, right=True), torch.searchsorted(cu_k, tk, right=True)  # sequence + 1
    allowed = (sq[:, None] == sk[None, :]) & (cu_k[sk] - tk >= (cu_q[sq] - tq)[:, None])  # [Tq, Tk]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


@pytest.mark.parametrize("kernel", ["sdpa", "flex", "varlen"])
@pytest.mark.parametrize("two_pass", [False, True])
def test_mask_preparation_reads_nothing_from_the_device(kernel, two_pass):
    """No host wait in the masks of a micro-batch. The batch on the meta device stands for the GPU:
    any read of a meta tensor raises, so building every path's masks there proves none is read
    (varlen: its layout comes from the host copy). SyncWatch (helpers.py) sees the operations:
    sdpa and flex prepare on the device without one, and varlen's device side (the layout's copy,
    the gather, a kernel that takes cu_seqlens on the device, the scatter) has none either."""
    from helpers import SyncWatch

    from llara_dist.model.decoder import pass_mask

    b = packed([[5, 9], [12, 3, 4]])
    on_meta = b.to("meta")
    assert b.host is b and on_meta.host is b and on_meta.to("meta").host is b
    mask = pass_mask(on_meta, kernel, two_pass)
    assert mask.path == kernel and meta_device(mask.payload)
    if kernel != "varlen":
        with SyncWatch() as watch:
            pass_mask(b, kernel, two_pass)
        assert watch.events == []
        return
    q, k, v = qkv(*b.doc.shape)
    ref = sdpa.attend(q, k, v, sdpa.prepare(b.doc, b.segment), scale=None)
    with SyncWatch() as watch:  # what the host copy spares the device: data-dependent sizes, reads
        layout = varlen.prepare(b.doc, b.segment)
    assert {"_unique2", "index", "_local_scalar_dense"} <= {name for name, _ in watch.events}
    with SyncWatch() as watch:
        out = varlen.attend(q, k, v, layout.to("cpu", non_blocking=True), scale=None, kernel=dense_varlen)
    assert watch.events == []
    real = (b.doc >= 0)[:, None, :, None].expand_as(ref)
    assert (out - ref)[real].abs().max() <= 1e-5 and (out[~real] == 0).all()


def meta_device(payload) -> bool:
    """Every tensor of a mask payload (tensor, BlockMask, varlen.Layout) is on the meta device."""
    if isinstance(payload, torch.Tensor):
        return payload.is_meta
    tensors = [t for t in vars(payload).values() if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(t.is_meta for t in tensors)


def _varlen_attn_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False):
    assert is_causal and key.shape[1] == query.shape[1]  # no scale, no GQA: the adapter handles both
    return varlen.reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, None)


def _varlen_attn_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    # torch 2.11 (the build the GPU figures used): is_causal = window_size == (-1, 0), a tuple; heads must match
    assert window_size == (-1, 0) and isinstance(window_size, tuple) and key.shape[1] == query.shape[1]
    return varlen.reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)


def _varlen_attn_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0) and enable_gqa == (key.shape[1] != query.shape[1])
    return varlen.reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)


@pytest.mark.parametrize("fake", [_varlen_attn_210, _varlen_attn_211, _varlen_attn_213])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_torch_varlen_adapter_fits_each_signature(monkeypatch, fake, scale):
    """The CUDA-only torch.nn.attention.varlen.varlen_attn call, checked on CPU: stand-ins with the
    signatures of torch 2.10, 2.11 and 2.13 run the reference kernel; causal, scale and GQA must arrive."""
    import torch.nn.attention.varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", fake)
    b = packed([[5, 9], [12, 3, 4]])
    q, k, v = qkv(*b.doc.shape)  # 4 query heads over 2 key/value heads
    ref = sdpa.attend(q, k, v, sdpa.prepare(b.doc, b.segment), scale=scale)
    out = varlen.attend(q, k, v, varlen.prepare(b.doc, b.segment), scale=scale, kernel=varlen._torch_varlen())
    assert out.shape == ref.shape
    real = (b.doc >= 0)[:, None, :, None].expand_as(ref)
    assert (out - ref)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("rows", LAYOUTS)
def test_flex_matches_dense(rows):
    b = packed(rows)
    q, k, v = qkv(*b.doc.shape)
    ref = sdpa.attend(q, k, v, sdpa.prepare(b.doc, b.segment), scale=0.3)
    out = flex.attend(q, k, v, flex.prepare(b.doc, b.segment, block=16), scale=0.3)
    assert (out - ref).abs().max() <= 1e-5


def test_flex_skips_fully_masked_blocks():
    b = packed([[3, 2, 4, 5, 1, 2]], seq_len=128)  # six short documents, then padding
    bm = flex.prepare(b.doc, b.segment, block=16)
    causal_blocks = 8 * 9 // 2
    visited = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    assert visited < causal_blocks / 2, (visited, causal_blocks)


def test_unavailable_path_is_refused_with_the_available_ones():
    with pytest.raises(ValueError, match=r"'varlen' is not available on cpu .*available here .*sdpa, flex, two-pass"):
        registry.check_path("varlen", "cpu")
    with pytest.raises(ValueError, match=r"'flex' .*no backward on CPU.*sdpa, two-pass"):
        registry.check_path("flex", "cpu", backward=True)
    with pytest.raises(ValueError, match="unknown attention path 'flash'"):
        registry.check_path("flash", "cpu")


def test_registered_attention_needs_the_packed_mask(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    registry.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.set_attn_implementation("llara_sdpa")
    with pytest.raises(ValueError, match="needs the packed batch's mask"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_config_accepts_exactly_the_kernel_paths():
    from llara_dist.config import ModelConfig

    for path in registry.PATHS:
        assert ModelConfig(attn=path).check() == []
    assert "attn: 'flash' is not one of" in ModelConfig(attn="flash").check()[0]


def gpu_check(tmp_path, **env):
    """bench/gpu_check.sh at tiny CPU shapes under this interpreter; its results go to tmp_path/out."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path / "out"), "PY": sys.executable, **env}
    return subprocess.run(["bash", "bench/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=400)


def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    """bench/gpu_check.sh's plumbing (no install, no wheels: DeepSpeed is here) at tiny CPU shapes."""
    import json

    (tmp_path / "no_wheels").mkdir()
    run = gpu_check(tmp_path, WHEELS=str(tmp_path / "no_wheels"))
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "out"
    check = (out / "check.txt").read_text()
    assert "!!" not in check
    # the environment, then each stage's end: the training benchmarks, the doctor, the microbenchmark
    assert [ln.split()[0].rstrip(":") for ln in check.splitlines()[1:7]] == \
        ["python", "triton", "tokenizers", "peft", "flash_attn", "deepspeed"]
    stages = [ln.split()[1] for ln in run.stdout.splitlines() if ln.startswith("== ") and "budget" in ln]
    assert stages == ["train_bench", "train_bench_deep", "doctor"]
    assert [ln.split(":")[0] for ln in check.splitlines() if "exit status 0" in ln] == stages
    bench = json.loads((out / "train_bench" / "bench.json").read_text())
    assert [w["docs"] for w in bench["workloads"]] == ["dpr", "chunks"]
    assert "| dpr (" in (out / "train_bench.txt").read_text()
    assert "ZeRO-3 gathers by decoder layer" in (out / "train_bench.txt").read_text()  # the trainer's default
    deep = (out / "train_bench_deep.txt").read_text()  # more layers, one micro-batch of 4 rows, dpr only
    assert "4 layers of hidden 128" in deep and "1 micro-batches of 4 packed rows" in deep
    assert "| dpr (" in deep and "| chunks (" not in deep
    assert "0 failed, 1 passed, 0 skipped" in (out / "doctor.txt").read_text()
    # $OUT stays small to copy off a GPU machine: 8 files at most, none deeper than $OUT/a/b
    files = [f.relative_to(out) for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files
    assert "== sdpa" in (out / "train_bench" / "profile.txt").read_text()


def test_gpu_check_optional_stages_dry_run_on_cpu(tmp_path):
    """The stages run only when named: twice the micro-batch, ZeRO-3 gathering per module, ZeRO-2, long
    rows, the host's time per layer, and the attention layer alone."""
    (tmp_path / "no_wheels").mkdir()
    run = gpu_check(tmp_path, WHEELS=str(tmp_path / "no_wheels"), STAGES="train_bench_mb16 train_bench_module "
                    "train_bench_zero2 train_bench_long host_overhead attn_bench")
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "out"
    assert sorted(f.name for f in out.iterdir()) == [
        "attn_bench.txt", "check.txt", "host_overhead.txt", "train_bench_long.txt", "train_bench_mb16.txt",
        "train_bench_module.txt", "train_bench_zero2.txt"]
    mb = (out / "train_bench_mb16.txt").read_text()  # one micro-batch of 4 rows, ours on sdpa only
    assert "1 micro-batches of 4 packed rows" in mb and "| dpr (5) | sdpa |" in mb and "| flex |" not in mb
    module = (out / "train_bench_module.txt").read_text()
    assert "ZeRO-3 gathers by module" in module and "| dpr (" in module
    zero2 = (out / "train_bench_zero2.txt").read_text()
    assert "ZeRO-2 (nothing gathered)" in zero2 and "| dpr (" in zero2
    rows = [line.split() for line in (out / "attn_bench.txt").read_text().splitlines()
            if line[:8].strip() in ("5.0", "1.5")]
    assert sorted({r[1] for r in rows}) == ["causal", "flex", "sdpa", "two-pass", "varlen"]
    for r in rows:
        assert float(r[2]) > 0
        if r[1] != "causal":
            assert float(r[-1]) <= 1e-5, r  # every path's output equals the dense reference
    host = (out / "host_overhead.txt").read_text()
    rows = [ln.split("|")[1:3] for ln in host.splitlines() if ln.startswith("| ")][1:]  # below the header
    assert [(v.strip(), c.strip()) for v, c in rows if not v.startswith("-")] == \
        [("module", "sdpa"), ("module", "baseline"), ("layer", "sdpa"), ("layer", "baseline"),
         ("layer", "sdpa+compiled"), ("zero2", "sdpa"), ("zero2", "baseline")]
    assert "rows of 512, 1 micro-batches of 2 packed rows" in (out / "train_bench_long.txt").read_text()


def test_gpu_check_without_deepspeed_fails_loudly(tmp_path):
    """Neither an importable DeepSpeed nor its wheels: a named failure, not a silently missing benchmark."""
    fake = tmp_path / "fake" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no deepspeed on this image (test)')\n")
    (tmp_path / "no_wheels").mkdir()
    run = gpu_check(tmp_path, PYTHONPATH=str(fake.parent), WHEELS=str(tmp_path / "no_wheels"), TOTAL_S="0")
    assert run.returncode == 1
    errors = (tmp_path / "out" / "check.txt").read_text()
    assert "NO DEEPSPEED, the training benchmark cannot run (ImportError: no deepspeed on this image (test))" in errors
    assert "!! NO DEEPSPEED" in run.stdout
    assert not (tmp_path / "out" / "train_bench.txt").exists()
    assert "doctor: no time left" in errors  # TOTAL_S=0: every stage is refused, none hangs
