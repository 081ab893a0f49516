"""Fused elementwise ops for LLaMA-style decoder layers (`model.fused_ops`): compiled pure functions.
And whole decoder layers compiled (`model.compile_layers`).

    from llara_dist import fused
    fused.patch(model)           # every RMSNorm, MLP activation product and rotary embedding; a model or an engine
    fused.compile_layers(model)  # every decoder layer's forward, whole
    fused.unpatch(model)         # back to the classes' own forwards (both)

Between the matmuls of a decoder layer, HF's eager code runs memory-bound elementwise work as
separate kernels, each a full pass over the activations: RMSNorm (fp32 upcast, pow, mean, rsqrt,
mul, cast, weight mul), SwiGLU's `act_fn(gate) * up`, RoPE's `rotate_half` (slices, cat, muls,
adds over q and k). Here each becomes one torch.compile'd function of the same math, with the
same dtypes and upcasts as HF's code, so results agree to rounding (a compiled reduction sums in
another order; in bf16 a compiled kernel may keep an intermediate in fp32 that eager rounds).

Why functions, not compiled modules: ZeRO-3 gathers a module's parameters in hooks around
`Module.__call__`, and a compiled module would trace into them. Only the forward of each module
instance is replaced; its `__call__`, hooks included, runs as before, and the compiled code sees
activations and the already gathered weight, passed as an argument.

What is recognised (anything else is refused, naming the module): a norm whose forward is
LlamaRMSNorm's code, an MLP whose forward is LlamaMLP's code with a SiLU activation (Mistral and
Qwen2 share both), and an attention whose forward calls its modeling module's
`apply_rotary_pos_emb`. That function is compiled as it is; the attention runs a copy of its
class's forward whose global of that name is the compiled one, so the module's global, and every
other model in the process, keep HF's. Shapes compile as torch does by default (`dynamic=None`):
static at first, which suits packed rows of seq_len (one shape); at a second shape once more with
the sizes symbolic, and then never again. Fine-tuning's batches, as long as their longest text,
change shape at every step, and would otherwise compile at each one up to torch's recompile limit.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

ROPE = "apply_rotary_pos_emb"  # the global that LLaMA/Mistral/Qwen2 attention forwards call


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward as a function: statistics in fp32, the weight applied in the input's dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product: silu(gate) * up, one pass instead of two and no silu(gate) tensor in between."""
    return F.silu(gate) * up


@functools.cache
def compiled(fn):
    """One compiled version of `fn` per process, shared by every layer and model (compiles at first call)."""
    return torch.compile(fn, dynamic=None)  # see the module docstring


def _ours(fn):
    fn.llara_fused = True  # what unpatch removes
    return fn


@_ours
def _norm_forward(self, hidden_states):
    return compiled(rms_norm)(hidden_states, self.weight, self.variance_epsilon)


@_ours
def _mlp_forward(self, x):
    return self.down_proj(compiled(silu_mul)(self.gate_proj(x), self.up_proj(x)))


@functools.cache
def _attention_forward(cls):
    """A copy of `cls.forward` (below its decorators: transformers 5.24 wraps it in a renamer of a
    deprecated argument that its own decoder layer does not use) whose `apply_rotary_pos_emb` is compiled.
    Its globals are a copy of its module's as they are now, that one name changed."""
    fn = inspect.unwrap(cls.forward)
    scope = {**fn.__globals__, ROPE: compiled(fn.__globals__[ROPE])}
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return _ours(copy)


def _same_code(a, b) -> bool:
    a, b = inspect.unwrap(a).__code__, inspect.unwrap(b).__code__
    return (a.co_code, a.co_names, a.co_consts) == (b.co_code, b.co_names, b.co_consts)


KINDS = ("norm", "mlp", "attention")


def _fused_forward(m):
    """(kind, its fused forward, or why it has none) for a module of a kind patched here; None for others."""
    cls = type(m)
    if cls.__name__.endswith("RMSNorm"):
        known = hasattr(m, "variance_epsilon") and _same_code(cls.forward, LlamaRMSNorm.forward)
        return "norm", _norm_forward if known else "not LlamaRMSNorm's math (weight, variance_epsilon, forward)"
    if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        known = _same_code(cls.forward, LlamaMLP.forward) and isinstance(m.act_fn, (SiLUActivation, torch.nn.SiLU))
        return "mlp", _mlp_forward if known else (f"not LlamaMLP's down(act(gate(x)) * up(x)) with a SiLU "
                                                  f"(act_fn {type(m.act_fn).__name__})")
    if cls.__name__.endswith("Attention") and hasattr(m, "q_proj"):
        fn = inspect.unwrap(cls.forward)
        known = ROPE in fn.__code__.co_names and inspect.isfunction(fn.__globals__.get(ROPE))
        return "attention", _attention_forward(cls) if known else f"its forward calls no module function {ROPE}"
    return None


def _plan(model) -> list:
    """[(module, fused forward)] for every module to patch; refuses, naming each, what it does not know."""
    plan, problems, seen = [], [], set()
    for name, m in model.named_modules():
        found = _fused_forward(m)
        if found is None:
            continue
        kind, fn = found
        seen.add(kind)
        if isinstance(fn, str):
            problems.append(f"{name} ({type(m).__name__}): {fn}")
        else:
            plan.append((m, fn))
    missing = [kind for kind in KINDS if kind not in seen]
    if missing:
        problems.append(f"no {', no '.join(missing)} module found")
    if problems:
        raise ValueError(f"model.fused_ops: {type(model).__name__} is not a LLaMA-style decoder these fused ops "
                         f"know: {'; '.join(problems)}")
    return plan


def patch(model) -> int:
    """Replace the forwards of `model`'s norms, MLPs and attentions (a HF model, a peft model or a
    DeepSpeed engine) by the fused ones; returns how many modules. Idempotent; all or nothing."""
    plan = _plan(model)
    for module, fn in plan:
        module.forward = types.MethodType(fn, module)  # an instance attribute: the class stays HF's
    return len(plan)


def compile_layers(model) -> int:
    """Each decoder layer's forward compiled whole, as torchtitan compiles each block: the layer's
    norms, projections, RoPE, attention and MLP become one graph (fewer kernels, no Python per op).
    Only the forward of each layer instance is replaced, so its `__call__` and its hooks run as
    before; but nothing inside a layer may have hooks, since the compiled code would trace them:
    ZeRO-3 must gather by layer (`train.zero3_layer_gather`), or run ZeRO-2. One compiled forward
    per layer class, shared by its layers (one graph for all of them: see torch_linear); shapes as
    in `compiled`. Returns how many layers."""
    from llara_dist.modeling import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"model.compile_layers: {type(model).__name__} names no decoder layer class "
                         f"(_no_split_modules)")
    hooked = [f"{type(m).__name__} in {type(layer).__name__}" for layer in layers for m in layer.modules()
              if m is not layer and (m._forward_pre_hooks or m._forward_hooks)]
    if hooked:
        raise ValueError(f"model.compile_layers: modules inside the decoder layers have hooks ({hooked[0]}, ...), "
                         f"which compiling would trace: ZeRO-3 must gather by layer (train.zero3_layer_gather)")
    for layer in layers:
        layer.forward = types.MethodType(_compiled_forward(type(layer)), layer)
    return len(layers)


@functools.cache
def _compiled_forward(cls):
    layer_forward = torch.compile(cls.forward, dynamic=None)

    @_ours
    def forward(self, *args, **kwargs):
        with torch_linear():
            return layer_forward(self, *args, **kwargs)

    return forward


@contextlib.contextmanager
def torch_linear():
    """torch's own F.linear for a compiled layer. DeepSpeed's zero.Init replaces F.linear, for the
    whole process, by an autograd Function whose backward looks each weight's ZeRO-3 state up
    (memory_efficient_linear). Traced into a compiled layer, that lookup made torch 2.11 guard on
    each weight's `ds_id`: one compile per layer, and past torch's recompile limit (8) the layers ran
    eagerly (the H100 run of session 5). A compiled layer needs none of it: its weights are gathered
    whole by the layer's own hooks (ZeRO-3 by layer) or never partitioned (ZeRO-2), and the compiled
    backward uses them as saved, as DeepSpeed's traced Function did."""
    patched = F.linear
    F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = patched


def unpatch(model) -> int:
    """Undo patch: the modules run their classes' forwards again; returns how many were patched."""
    n = 0
    for m in model.modules():
        if getattr(getattr(m.__dict__.get("forward"), "__func__", None), "llara_fused", False):
            del m.forward
            n += 1
    return n
