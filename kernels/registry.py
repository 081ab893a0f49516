"""The attention kernel paths for the joint EBAE/EBAR mask: which run where, their masks, and their
registration with transformers (installed as llara_dist.kernels.registry; kernels/ has no
__init__.py, so the folder can never shadow the PyPI package `kernels` that transformers imports).

    sdpa      dense boolean mask into scaled_dot_product_attention (the reference; any device)
    flex      FlexAttention BlockMask, fully masked blocks skipped (CUDA; CPU forward only)
    varlen    two plain-causal sequences per document through varlen flash attention (CUDA)
    two-pass  no joint mask: the model runs over [prefix TEXT SELF] and over
              [prefix TEXT NEXT] (a baseline and an independent check; see llara_dist/model/decoder.py)

Each kernel is registered with transformers' AttentionInterface as `llara_<path>`, so any
HF decoder (LLaMA, Mistral, Qwen2) calls it unchanged. The mask of a micro-batch is
prepared once (`prepare`) and reaches every layer as the `llara_mask` keyword argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llara_dist.errors import UserError
from llara_dist.kernels import flex, sdpa, varlen

PATHS = ("sdpa", "flex", "varlen", "two-pass")
KERNELS = {"sdpa": sdpa, "flex": flex, "varlen": varlen}


@dataclass
class LlaraMask:
    path: str  # the kernel that consumes it: sdpa, flex or varlen
    payload: Any  # dense mask, BlockMask or varlen.Layout


def why_unavailable(path: str, device: torch.device | str, backward: bool = False,
                    dtype: torch.dtype | None = None) -> str | None:
    """None if `path` runs on `device` (with a backward if asked, in `dtype` if given), else why not."""
    dev = torch.device(device).type
    if path not in PATHS:
        return f"unknown attention path {path!r}"
    if path == "flex" and dev == "cpu" and backward:
        return "FlexAttention has no backward on CPU"
    if path == "varlen":
        if dev != "cuda":
            return "varlen flash attention needs CUDA"
        if varlen.backend()[0] is None:
            return "neither flash-attn nor torch.nn.attention.varlen is installed"
        if dtype is not None and dtype not in varlen.DTYPES:
            return f"varlen flash attention needs bf16 or fp16, not {dtype}"
    return None


def available(device: torch.device | str, backward: bool = False, dtype: torch.dtype | None = None) -> list[str]:
    return [p for p in PATHS if why_unavailable(p, device, backward, dtype) is None]


def check_path(path: str, device: torch.device | str, backward: bool = False, dtype: torch.dtype | None = None) -> None:
    """Refuse a path that cannot run here, naming the ones that can."""
    why = why_unavailable(path, device, backward, dtype)
    if why is not None:
        need = "forward and backward" if backward else "forward"
        raise UserError(f"attention path {path!r} is not available on {torch.device(device).type} "
                         f"({why}); available here ({need}): {', '.join(available(device, backward, dtype))}")


def inner_kernel(path: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The kernel that a path's attention calls use (two-pass: varlen where it can run, else sdpa)."""
    if path != "two-pass":
        return path
    return "varlen" if why_unavailable("varlen", device, dtype=dtype) is None else "sdpa"


# kernels whose preparation reads the metadata's values (data-dependent sizes): on a GPU each read
# would stall the host, so they take the batch's host copy (PackedBatch.host) instead
HOST_METADATA = ("varlen",)


def prepare(kernel: str, doc: torch.Tensor, segment: torch.Tensor,
            device: torch.device | str | None = None) -> LlaraMask:
    """Build a micro-batch's mask once for all layers from doc/segment [R, L]: on the model's device,
    or on the host for the HOST_METADATA kernels, whose result is then copied to `device`
    (non-blocking: nothing is read back)."""
    payload = KERNELS[kernel].prepare(doc, segment)
    if device is not None and doc.device != torch.device(device):
        payload = payload.to(device, non_blocking=True)
    return LlaraMask(kernel, payload)


def hf_name(kernel: str) -> str:
    return f"llara_{kernel}"


def _hf_attention(kernel: str):
    mod = KERNELS[kernel]
    # varlen's layout carries its longest sequences as Python ints, on which a compiled caller
    # (model.compile_layers) would specialise, compiling again at each new length: it runs eagerly
    attend = torch.compiler.disable(mod.attend) if kernel == "varlen" else mod.attend

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                  llara_mask: LlaraMask | None = None, **kwargs):
        # query [R, H, L, D], key/value [R, Hkv, L, D]; HF wants [R, L, H, D] back
        if llara_mask is None:
            raise ValueError(f"attention {hf_name(kernel)!r} needs the packed batch's mask: run the model "
                             "through llara_dist.model.decoder.forward_hidden (or set a standard attn_implementation)")
        if llara_mask.path != kernel:
            raise ValueError(f"mask prepared for {llara_mask.path!r} given to the {kernel!r} kernel")
        out = attend(query, key, value, llara_mask.payload, scaling, dropout)
        return out.transpose(1, 2).contiguous(), None

    return attention


def register() -> None:
    """Register every kernel with transformers (idempotent).

    No AttentionMaskInterface entry on purpose: for an implementation it does not know,
    transformers' create_causal_mask builds no mask at all (our kernels bring their own)."""
    from transformers import AttentionInterface

    for kernel in KERNELS:
        AttentionInterface.register(hf_name(kernel), _hf_attention(kernel))
