"""model.fused_ops (llara_dist.model.fused): the compiled norms, SwiGLU product and RoPE compute HF's eager math.

Tolerance, fp32 on CPU: the same operations in the same dtypes, but a compiled reduction (RMSNorm's
mean) and fused multiply-adds round in another order, a few fp32 ulps (1 ulp = 1.2e-7 relative) per
op. Over 2 layers, the loss and the backward the largest gap seen is 5.7e-7 of a tensor's largest
value (a k_proj gradient); RTOL = 2e-6 leaves ~3x room, far below what wrong math does (a weight
left out, the wrong halves rotated: order 1). The dtype flow (fp32 statistics, results in the
input's dtype) only shows in bf16: the GPU bench checks that loss against eager's (rtol 2e-2).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llara_dist.config import ModelConfig
from llara_dist.model import fused
from llara_dist.model.decoder import decoder_layers, forward_hidden, load_model
from llara_dist.model.objective import batch_counts, combine, loss_sums

RTOL = 2e-6
COMPILED = "Torch-Compiled Region"  # torch.profiler's event for each call of compiled code (then the code's id)
ROOT = Path(__file__).resolve().parents[1]


def _close(got, want, what):
    gap = float((got.detach() - want.detach()).abs().max() / want.detach().abs().max().clamp_min(1e-30))
    assert gap <= RTOL, f"{what}: relative gap {gap:.2e}"


def _loss_and_grads(model, batch, preset):
    model.zero_grad(set_to_none=True)
    loss, _ = combine(loss_sums(model, batch, preset), batch_counts(batch, preset), preset, as_floats=False)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _setup(tokenizer_dir, tiny_llama_dir, fused_ops):
    from llara_dist.config import ObjectiveConfig
    from llara_dist.prompts import prompt_tokens, resolve_preset
    from llara_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    preset = resolve_preset(ObjectiveConfig(preset="released"))
    torch.manual_seed(0)  # the preset's new token embeddings are drawn at random: the same ones each time
    model = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="fp32", fused_ops=fused_ops), tok, preset, "cpu")
    return tok, preset, model.train(), prompt_tokens(tok, preset)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2))


def test_fused_model_computes_the_eager_math(tokenizer_dir, tiny_llama_dir, shared_data):
    """Hidden states, loss and every gradient of a packed batch: load_model with fused_ops on vs off."""
    from helpers import micro_batches
    from transformers.models.llama import modeling_llama

    from kernels import get_kernelized_layers

    rope = modeling_llama.apply_rotary_pos_emb
    tok, preset, eager, prompt = _setup(tokenizer_dir, tiny_llama_dir, False)
    _, _, model, _ = _setup(tokenizer_dir, tiny_llama_dir, True)
    batch = micro_batches(tok, prompt, shared_data)[0]
    with torch.profiler.profile() as prof:
        got = forward_hidden(model, batch)
    # 2 layers x (2 norms, 1 MLP product, 1 RoPE) + the final norm, each one compiled call, of 3 graphs
    compiled = [e.name for e in prof.events() if e.name.startswith(COMPILED)]
    assert len(compiled) == 9 and len(set(compiled)) == 3
    # kernels' view: the norms and each attention's rotary function kernelized with our layers
    found = get_kernelized_layers(model)
    assert sorted(found.layers) == sorted(n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm")
    assert sorted(found.funcs) == [(f"model.layers.{i}.self_attn", "rotary_pos_emb") for i in range(2)]
    assert {k.repo.load() for k in (*found.layers.values(), *found.funcs.values())} == {fused.RMSNormLayer,
                                                                                      fused.RoPELayer}
    _close(got, forward_hidden(eager, batch), "hidden states")
    want_loss, want_grads = _loss_and_grads(eager, batch, preset)
    got_loss, got_grads = _loss_and_grads(model, batch, preset)
    _close(got_loss, want_loss, "loss")
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
    for name, g in want_grads.items():
        assert g.abs().max() > 0, name
        _close(got_grads[name], g, name)
    # per instance: the classes and the modeling module's global stay HF's, the eager model too
    assert modeling_llama.apply_rotary_pos_emb is rope and "forward" not in vars(eager.model.layers[0].mlp)
    assert fused.patch(model) == 9  # again: idempotent
    assert fused.unpatch(model) == 9 and fused.unpatch(model) == 0
    after = get_kernelized_layers(model)
    assert not after.layers and not after.funcs
    with torch.no_grad():  # back to the eager forwards: bit for bit
        assert torch.equal(forward_hidden(model, batch), forward_hidden(eager, batch))


def test_norm_function_keeps_hfs_dtype_flow_in_bf16():
    """Uncompiled, rms_norm is LlamaRMSNorm bit for bit in bf16: fp32 statistics, the weight applied in bf16."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 64).mul(4).to(torch.bfloat16)
    with torch.no_grad():
        got, want = fused.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_other_llama_style_decoders_are_recognised():
    """Qwen2 (biased q/k/v, its own rotary function) patched and equal in a forward."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert fused.patch(model) == 9
        _close(model(input_ids=ids).logits, want, "Qwen2 logits")
    fused.unpatch(model)


def test_fused_ops_default_on_a_gpu_only(capsys):
    """model.fused_ops unset: patched for a GPU, not on a CPU; a model the fused ops do not know keeps
    HF's ops with a line on stderr when unset, and is an error when asked for."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llara_dist.model.decoder import apply_fused_ops

    llama = _tiny_llama()
    assert not apply_fused_ops(llama, None, torch.device("cpu")) and fused.unpatch(llama) == 0
    assert not apply_fused_ops(llama, False, torch.device("cuda"))
    assert apply_fused_ops(llama, None, torch.device("cuda")) and fused.unpatch(llama) == 5  # 3 norms, mlp, attention
    assert apply_fused_ops(llama, True, torch.device("cpu")) and fused.unpatch(llama) == 5
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2))
    assert not apply_fused_ops(gpt2, None, torch.device("cuda"))
    assert "GPT2LMHeadModel is not a LLaMA-style decoder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not a LLaMA-style decoder"):
        apply_fused_ops(gpt2, True, torch.device("cpu"))


def test_transformers_releases_not_tested_are_refused(monkeypatch):
    """patch replaces code inside transformers' LLaMA modules: another release than those it knows, or
    one without its kernels integration (no hooks), is refused whole, saying what to do."""
    import transformers

    llama = _tiny_llama()
    monkeypatch.setattr(transformers, "__version__", "5.26.0")
    with pytest.raises(ValueError) as refusal:
        fused.patch(llama)
    known = ", ".join(v + ".x" for v in fused.KNOWN_TRANSFORMERS)
    for part in ("model.fused_ops: transformers 5.26.0 is not a release", f"({known})", "model.fused_ops=false",
                 "llara_dist.model.fused.KNOWN_TRANSFORMERS"):
        assert part in str(refusal.value)
    monkeypatch.setattr(transformers, "__version__", f"{fused.KNOWN_TRANSFORMERS[-1]}.3")  # a patch release: known
    monkeypatch.setattr(fused, "is_kernels_available", lambda: False)
    with pytest.raises(ValueError, match=r"without its kernels integration.*Install 'kernels>=.*model.fused_ops=false"):
        fused.patch(llama)
    assert fused.unpatch(llama) == 0 and not any("forward" in vars(m) for m in llama.modules())


def test_patch_is_all_or_nothing_where_kernels_declines_a_layer(monkeypatch):
    """kernels refuses a layer that does not say it compiles, in a TORCH_COMPILE mode: at the first
    norm, after an attention's rotary function and an MLP were patched, which are undone."""
    llama = _tiny_llama()
    monkeypatch.setattr(fused.RMSNormLayer, "can_torch_compile", False)
    with pytest.raises(ValueError, match="does not support torch.compile"):
        fused.patch(llama)
    assert fused.unpatch(llama) == 0 and not any("forward" in vars(m) for m in llama.modules())


def test_importing_fused_leaves_the_repos_kernels_folder_alone():
    """The repo's kernels/ folder (llara_dist.kernels, no __init__.py) never stands in for the PyPI
    package `kernels`, whose hooks these fused ops use: not even from the repo root, first on sys.path."""
    import kernels

    code = ("import sys, llara_dist.model.fused, kernels; print(kernels.__file__); "
            "print([n for n, m in list(sys.modules.items()) if n.startswith('llara_dist.kernels') "
            "or str(getattr(m, '__file__', '') or '').startswith(sys.argv[1])])")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "kernels")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True).stdout.splitlines()
    assert out[0] == kernels.__file__ and not out[0].startswith(str(ROOT / "kernels")), out  # PyPI's, as here
    assert out[1] == "[]", out


def test_changing_shapes_compile_twice_at_most():
    """Fine-tuning's batches change length every step: a second shape compiles once more (sizes
    symbolic), later shapes none; the results stay HF's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    norm = fused.compiled(fused.rms_norm)
    weight = torch.randn(16)
    for length in (5, 7, 9, 12, 30):
        x = torch.randn(2, length, 16)
        _close(norm(x, weight, 1e-6), fused.rms_norm(x, weight, 1e-6), f"length {length}")
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_unknown_models_are_refused():
    from transformers import GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not a LLaMA-style decoder.*"
                                         r"no norm, no mlp, no attention module found"):
        fused.patch(gpt2)
    # Gemma: same attribute names, other math (a norm scaled by 1 + weight, a GELU MLP): refused, named,
    # and nothing patched (all or nothing)
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="GemmaForCausalLM is not a LLaMA-style decoder") as refusal:
        fused.patch(gemma)
    for name in ("model.layers.0.input_layernorm (GemmaRMSNorm)", "model.norm (GemmaRMSNorm)",
                 "model.layers.0.mlp (GemmaMLP)"):
        assert name in str(refusal.value)
    assert "no norm" not in str(refusal.value)  # they were found, and refused
    assert fused.unpatch(gemma) == 0


def _zero3_worker(rank, world, port, paths, out):
    """One ZeRO-3 engine (world 1, every weight partitioned, gathered by layer) over a model loaded with
    fused_ops: loss and gradients with the fused ops taken off, then on, then with whole layers compiled
    (model.compile_layers), then a real training step with the fused ops on. Then a second engine that
    gathers per module, where compiling a layer is refused."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from helpers import micro_batches
    from torch._dynamo.utils import counters

    from llara_dist.config import TrainConfig
    from llara_dist.model.objective import TERMS, Objective
    from llara_dist.train.distributed import BatchPlan, dist_env, init_distributed
    from llara_dist.train.engine import build_engine, deepspeed_config, zero3_loading
    from llara_dist.train.pretrain import train_step

    init_distributed(dist_env(), timeout_s=60)
    tokenizer_dir, tiny_llama_dir, shared_data = paths
    # every weight partitioned (DeepSpeed keeps those under 1e5 elements whole): gathered and released
    train = TrainConfig(global_batch=2, micro_batch=1, lr=1e-3, warmup_steps=0,
                        deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    ds = deepspeed_config(train, BatchPlan(2, 1, 2, 1), torch.float32)
    with zero3_loading(ds):
        tok, preset, model, prompt = _setup(tokenizer_dir, tiny_llama_dir, True)
    engine = build_engine(model, train, ds)
    micro = micro_batches(tok, prompt, shared_data)
    runs = {}
    compile_layers = lambda e: fused.compile_layers(decoder_layers(e))  # noqa: E731
    for name, switch in (("eager", fused.unpatch), ("fused", fused.patch), ("compiled", compile_layers)):
        fused.unpatch(engine)
        switch(engine)
        graphs = counters["stats"]["unique_graphs"]
        loss, _ = combine(loss_sums(engine, micro[0], preset), batch_counts(micro[0], preset), preset,
                          as_floats=False)
        engine.backward(loss, scale_wrt_gas=False)
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.optimizer.zero_grad()  # no step: the next run starts from the same weights
        runs[name] = {"loss": float(loss.detach()), "grads": grads,
                      "graphs": counters["stats"]["unique_graphs"] - graphs}
    # zero.Init put DeepSpeed's linear in place for the process, and the compiled layers left it there
    runs["linear_after"] = torch.nn.functional.linear.__name__
    fused.unpatch(engine)  # the step's loss at these weights, eager: what train_step must report
    counts = {t: sum(batch_counts(b, preset)[t] for b in micro) for t in TERMS}
    with torch.no_grad():
        runs["eager_step_loss"] = sum(float(combine(loss_sums(engine, b, preset), counts, preset)[0]) for b in micro)
    fused.patch(engine)
    before = safe_get_full_fp32_param(engine.module.lm_head.weight).clone()
    runs["step"] = train_step(engine, micro, Objective(preset), 1)  # fused: both micro-batches, the AdamW step
    runs["moved"] = float((safe_get_full_fp32_param(engine.module.lm_head.weight) - before).abs().max())
    per_module = dataclasses.replace(train, zero3_layer_gather=False)
    with zero3_loading(ds):
        _, _, model, _ = _setup(tokenizer_dir, tiny_llama_dir, False)
    try:
        fused.compile_layers(decoder_layers(build_engine(model, per_module, ds)))
    except ValueError as e:
        runs["refused"] = str(e)
    torch.save(runs, out)


@pytest.mark.slow
def test_zero3_training_step_with_fused_ops_or_compiled_layers(run_ranks, tokenizer_dir, tiny_llama_dir, shared_data, tmp_path):
    runs = run_ranks(_zero3_worker, 1, (tokenizer_dir, tiny_llama_dir, shared_data), tmp_path / "runs.pt")
    eager = runs["eager"]
    assert len(eager["grads"]) > 10
    for got in (runs["fused"], runs["compiled"]):
        assert got["loss"] == pytest.approx(eager["loss"], rel=RTOL)
        for name, g in eager["grads"].items():
            assert g.abs().max() > 0, name
            _close(got["grads"][name], g, name)
    assert runs["step"]["loss"] == pytest.approx(runs["eager_step_loss"], rel=RTOL)
    assert runs["moved"] > 0  # the optimizer stepped
    # one graph for every layer: DeepSpeed's F.linear, traced, made torch 2.11 compile once per layer
    assert runs["compiled"]["graphs"] == 1
    assert runs["linear_after"] == "zero3_linear_wrap"
    assert "model.compile_layers: modules inside the decoder layers have hooks" in runs["refused"]


def test_compile_layers_needs_layers_without_hooks_inside(tokenizer_dir, tiny_llama_dir):
    """model.compile_layers: refused where ZeRO-3 gathers per module (pretraining told so, fine-tuning
    under ZeRO-3); at load, every decoder layer's forward is the compiled one, which unpatch takes off."""
    from llara_dist.config import ConfigError, FinetuneRunConfig, ObjectiveConfig, RunConfig, load_config
    from llara_dist.prompts import resolve_preset
    from llara_dist.tokenizer import load_tokenizer

    with pytest.raises(ConfigError, match="gathers per module here.*; set train.zero3_layer_gather=true or"):
        load_config(RunConfig, None, ["model.compile_layers=true", "train.zero3_layer_gather=false"])
    with pytest.raises(ConfigError, match="gathers per module here.*; set train.activation_checkpointing=true"):
        load_config(RunConfig, None, ["model.compile_layers=true", "train.lora_r=4"])  # LoRA gathers per module
    load_config(RunConfig, None, ["model.compile_layers=true", "train.lora_r=4", "train.activation_checkpointing=true"])
    with pytest.raises(ConfigError, match="gathers per module here.*; set train.zero_stage=2"):
        load_config(FinetuneRunConfig, None, ["finetune.data=x", "model.compile_layers=true"])
    load_config(FinetuneRunConfig, None, ["finetune.data=x", "model.compile_layers=true", "train.zero_stage=2"])
    cfg = load_config(RunConfig, None, ["model.compile_layers=true", f"model.path={tiny_llama_dir}"]).model
    model = load_model(cfg, load_tokenizer(tokenizer_dir), resolve_preset(ObjectiveConfig(preset="released")), "cpu")
    layers = model.model.layers
    assert all(getattr(layer.forward.__func__, "llara_fused", False) for layer in layers)
    assert fused.unpatch(model) == len(layers) > 0
    assert all("forward" not in layer.__dict__ for layer in layers)
