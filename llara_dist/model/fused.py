"""Fused elementwise ops for LLaMA-style decoder layers (`model.fused_ops`): compiled pure functions.
And whole decoder layers compiled (`model.compile_layers`).

    from llara_dist.model import fused
    fused.patch(model)           # every RMSNorm, MLP activation product and rotary embedding; a model or an engine
    fused.compile_layers(layers) # every decoder layer's forward, whole (modeling.decoder_layers)
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

How: through transformers' kernel hooks where it has them. transformers, with its `kernels`
package, names the layers a faster kernel may replace: LlamaRMSNorm is the layer "RMSNorm";
apply_rotary_pos_emb, a module-level function, is the layer "rotary_pos_emb", of which each
attention instance holds a private wrapper that its forward routes the call to. kernels'
`kernelize` sets, per instance, the forward of such a layer to that of a class from a mapping.
Ours maps the two names to RMSNormLayer and RoPELayer (LLaMA's own apply_rotary_pos_emb,
compiled), and is applied to the recognised modules alone: no Hub download, no other model in the
process. LlamaMLP has no hook, so the MLPs' instance forwards are set here. transformers itself
kernelizes a model it loads with its Hub mapping (from_pretrained's `use_kernels`, on by default),
and again at each train()/eval() switch, which would undo ours: patch turns that off for the model.
`unpatch` kernelizes the hooked modules again with a mapping that names the two layers for no
device, which kernels answers with the class's own forward, and removes the MLPs' forwards.

What is recognised (anything else is refused, naming the module): a norm with the "RMSNorm" hook
whose forward is LlamaRMSNorm's code, an MLP whose forward is LlamaMLP's code with a SiLU
activation, and an attention whose "rotary_pos_emb" wrapper holds a function of LLaMA's
apply_rotary_pos_emb code; Mistral and Qwen2 share all three.

Shapes compile as torch does by default (`dynamic=None`): static at first, which suits packed rows
of seq_len (one shape); at a second shape once more with the sizes symbolic, and then never again.
Fine-tuning's batches, as long as their longest text, change shape at every step, and would
otherwise compile at each one up to torch's recompile limit.

Versions: `patch` first checks that transformers is a release these ops were tested with
(KNOWN_TRANSFORMERS; its own requirements pin the `kernels` versions), and refuses any other,
saying what to do. Recognising by code compares with the installed LLaMA, which would not notice a
release changing LLaMA's math along with it; and three details used here are no public API: the
MLPs' forwards replaced, the attention's wrappers read from its `_kernel_funcs` (where kernelize
finds them too), and the wrapped function read from the closure of kernels' wrapper class (the
last two in llara_dist/patches.py, with every other use of a third-party internal). A
transformers without its kernels integration (`kernels` missing, or a version it does not accept)
is refused as well: its decorators are then no-ops that leave no hook.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F
from packaging.version import Version
from transformers import PreTrainedModel
from transformers.activations import SiLUActivation
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.utils import is_kernels_available

from llara_dist.errors import UserError
from llara_dist.patches import kernel_function, rotary_wrapper, torch_linear

# transformers releases (major.minor) whose LLaMA code and kernel hooks this file was tested with
# (tests/test_fused.py). Patch releases do not change modeling code.
KNOWN_TRANSFORMERS = ("5.25",)
NORM, ROPE = "RMSNorm", "rotary_pos_emb"  # transformers' kernel layer names for LlamaRMSNorm and apply_rotary_pos_emb


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
def _llama_rope() -> types.FunctionType:
    """LLaMA's own apply_rotary_pos_emb, the plain function: what the RoPE layer compiles."""
    return kernel_function(modeling_llama.apply_rotary_pos_emb)


@functools.cache
def compiled(fn):
    """One compiled version of `fn` per process, shared by every layer and model (compiles at first call)."""
    return torch.compile(fn, dynamic=None)  # see the module docstring


# The layers that kernelize puts in place: kernels binds their forward to each module it replaces
# (`self` is the norm, or the attention's rotary wrapper). kernels validates them against the class
# they replace: no __init__, no members but these flags, the same forward arguments.
class RMSNormLayer(torch.nn.Module):
    can_torch_compile = True  # a kernelize mode with TORCH_COMPILE takes it (compile_layers traces it)

    def forward(self, hidden_states):
        return compiled(rms_norm)(hidden_states, self.weight, self.variance_epsilon)


class RoPELayer(torch.nn.Module):
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return compiled(_llama_rope())(q, k, cos, sin, unsqueeze_dim)


class _Repository:
    """What a kernels mapping takes for a repository: anything whose `load()` returns the layer class."""

    def __init__(self, layer):
        self.layer = layer

    def load(self):
        return self.layer

    def __str__(self):
        return f"llara_dist.model.fused.{self.layer.__name__}"


_REPOSITORIES = {NORM: _Repository(RMSNormLayer), ROPE: _Repository(RoPELayer)}
# kernels picks a layer by the device type kernelize is given. Ours are torch code, compiled for the
# device of the tensors at each call (the model may move after patch), so one entry serves any device:
# under "cpu", the type kernels selects without querying a device.
_FUSED = {name: {"cpu": repo} for name, repo in _REPOSITORIES.items()}
_RESTORE = {name: {} for name in _REPOSITORIES}  # no device: kernels keeps the class's forward (no warning)


def _ours_kernelized(kernelized) -> bool:
    """Whether a kernels KernelizedLayer/KernelizedFunc entry (or None) is one of our layers."""
    return kernelized is not None and kernelized.repo in _REPOSITORIES.values()


def _kernelize(module, mapping) -> None:
    """kernels' kernelize on `module` alone (a norm, or an attention's rotary wrapper), under `mapping`
    only: no Hub kernel, nor any mapping registered elsewhere in the process."""
    # imported here, once check_versions found transformers' `kernels`: the bare name could otherwise
    # find the repo's kernels/ folder (a namespace package) when the repo root is on sys.path
    from kernels import Mode, get_kernelized_layers, kernelize, use_kernel_mapping

    with use_kernel_mapping(mapping, inherit_mapping=False):
        # the mode only filters a mapping's entries (ours name none: they serve every mode); with
        # TORCH_COMPILE in it, kernels takes only a layer that says it can be compiled
        kernelize(module, mode=Mode.TRAINING | Mode.TORCH_COMPILE, device="cpu", use_fallback=mapping is _RESTORE)
    if mapping is _FUSED and not _ours_kernelized(get_kernelized_layers(module).layers.get("")):
        raise UserError(f"model.fused_ops: kernels kept {type(module).__name__}'s own forward "
                         f"(are kernel mappings disabled, DISABLE_KERNEL_MAPPING?)")


def _ours(fn):
    fn.llara_fused = True  # what unpatch removes
    return fn


@_ours
def _mlp_forward(self, x):
    return self.down_proj(compiled(silu_mul)(self.gate_proj(x), self.up_proj(x)))


def _set_forward(module, fn) -> None:
    module.forward = types.MethodType(fn, module)  # an instance attribute: the class stays HF's


def _same_code(a, b) -> bool:
    a, b = inspect.unwrap(a).__code__, inspect.unwrap(b).__code__
    return (a.co_code, a.co_names, a.co_consts) == (b.co_code, b.co_names, b.co_consts)


def _hub_kernels_off(model) -> None:
    """transformers kernelizes a model it loads (from_pretrained: `use_kernels`, on by default) with
    its own Hub mapping, and again at each train()/eval() switch: that would put its layers, or on a
    CPU the classes' forwards, back in place of ours. So it is turned off for a patched model, whose
    same layers are ours (transformers' own way: `use_kernels = False` resets them)."""
    for m in model.modules():  # isinstance: a DeepSpeed engine or peft model passes attributes through
        if isinstance(m, PreTrainedModel) and m.use_kernels:
            m.use_kernels = False


def check_versions() -> None:
    """Refuse, saying what to do, a transformers these fused ops were not tested with, or one
    without its kernels integration (see the module docstring)."""
    from transformers import __version__ as installed  # read now: transformers replaces its top module object

    if "%d.%d" % Version(installed).release[:2] not in KNOWN_TRANSFORMERS:
        raise UserError(
            f"model.fused_ops: transformers {installed} is not a release these fused ops know "
            f"({', '.join(v + '.x' for v in KNOWN_TRANSFORMERS)}): they replace code inside its LLaMA modules, "
            f"which a release may change. Set model.fused_ops=false to run HF's own ops, or install transformers "
            f"{KNOWN_TRANSFORMERS[-1]}.x (to add a release: run tests/test_fused.py on it, then list it in "
            f"llara_dist.model.fused.KNOWN_TRANSFORMERS)")
    if not is_kernels_available():
        from transformers.utils.import_utils import KERNELS_MAX_VERSION, KERNELS_MIN_VERSION

        raise UserError(
            f"model.fused_ops: transformers {installed} runs without its kernels integration, whose hooks these "
            f"fused ops use: the `kernels` package it requires is missing or of another version. Install "
            f"'kernels>={KERNELS_MIN_VERSION},<{KERNELS_MAX_VERSION}', or set model.fused_ops=false")


KINDS = ("norm", "mlp", "attention")


def _fused_forward(m):
    """(kind, a function of no argument that patches `m`, or why `m` cannot be) for a module of a kind
    patched here; None for others."""
    cls = type(m)
    if cls.__name__.endswith("RMSNorm"):
        if not (hasattr(m, "variance_epsilon") and _same_code(cls.forward, LlamaRMSNorm.forward)):
            return "norm", "not LlamaRMSNorm's math (weight, variance_epsilon, forward)"
        if getattr(cls, "kernel_layer_name", None) != NORM:
            return "norm", f"no kernel hook {NORM!r} (transformers' use_kernel_forward_from_hub)"
        return "norm", functools.partial(_kernelize, m, _FUSED)
    if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        if not (_same_code(cls.forward, LlamaMLP.forward) and isinstance(m.act_fn, (SiLUActivation, torch.nn.SiLU))):
            return "mlp", (f"not LlamaMLP's down(act(gate(x)) * up(x)) with a SiLU "
                           f"(act_fn {type(m.act_fn).__name__})")
        return "mlp", functools.partial(_set_forward, m, _mlp_forward)
    if cls.__name__.endswith("Attention") and hasattr(m, "q_proj"):
        wrapper = rotary_wrapper(m, ROPE)
        if wrapper is None:
            return "attention", f"no kernel hook {ROPE!r} for its rotary function (kernels' use_kernelized_func)"
        rope = kernel_function(wrapper)
        if rope is None or not _same_code(rope, _llama_rope()):
            return "attention", f"its {ROPE} function is not LLaMA's apply_rotary_pos_emb"
        return "attention", functools.partial(_kernelize, wrapper, _FUSED)
    return None


def _plan(model) -> list:
    """[a function of no argument patching one module] for every module to patch; refuses, naming
    each, what it does not know."""
    plan, problems, seen = [], [], set()
    for name, m in model.named_modules():
        found = _fused_forward(m)
        if found is None:
            continue
        kind, apply = found
        seen.add(kind)
        if isinstance(apply, str):
            problems.append(f"{name} ({type(m).__name__}): {apply}")
        else:
            plan.append(apply)
    missing = [kind for kind in KINDS if kind not in seen]
    if missing:
        problems.append(f"no {', no '.join(missing)} module found")
    if problems:
        raise UserError(f"model.fused_ops: {type(model).__name__} is not a LLaMA-style decoder these fused ops "
                         f"know: {'; '.join(problems)}")
    return plan


def patch(model) -> int:
    """Replace the forwards of `model`'s norms, MLPs and attentions' rotary functions (a HF model, a
    peft model or a DeepSpeed engine) by the fused ones; returns how many modules. Idempotent; all
    or nothing."""
    check_versions()
    plan = _plan(model)
    try:
        _hub_kernels_off(model)
        for apply in plan:
            apply()
    except BaseException:
        unpatch(model)  # all or nothing, also where kernels declines a layer
        raise
    return len(plan)


def compile_layers(layers: list[torch.nn.Module]) -> int:
    """Each decoder layer's forward compiled whole, as torchtitan compiles each block: the layer's
    norms, projections, RoPE, attention and MLP become one graph (fewer kernels, no Python per op).
    `layers`: the model's decoder layers (modeling.decoder_layers). Only the forward of each layer
    instance is replaced, so its `__call__` and its hooks run as before; but nothing inside a layer
    may have hooks, since the compiled code would trace them: ZeRO-3 must gather by layer
    (`train.zero3_layer_gather`), or run ZeRO-2. One compiled forward per layer class, shared by its
    layers (one graph for all of them: see torch_linear); shapes as in `compiled`. Returns how many
    layers."""
    hooked = [f"{type(m).__name__} in {type(layer).__name__}" for layer in layers for m in layer.modules()
              if m is not layer and (m._forward_pre_hooks or m._forward_hooks)]
    if hooked:
        raise UserError(f"model.compile_layers: modules inside the decoder layers have hooks ({hooked[0]}, ...), "
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


def unpatch(model) -> int:
    """Undo patch and compile_layers: the modules run their classes' forwards again; returns how many
    were patched."""
    n = 0
    if is_kernels_available():  # else nothing was kernelized (and no `kernels` to import)
        from kernels import get_kernelized_layers

        found = get_kernelized_layers(model)  # the norms, and the attentions' rotary wrappers
        for kernelized in (*found.layers.values(), *found.funcs.values()):
            if _ours_kernelized(kernelized):
                _kernelize(kernelized.module, _RESTORE)
                n += 1
    for m in model.modules():  # the MLPs and compiled layers
        if getattr(getattr(m.__dict__.get("forward"), "__func__", None), "llara_fused", False):
            del m.forward
            n += 1
    return n
