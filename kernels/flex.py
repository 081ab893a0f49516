"""`flex`: FlexAttention with a BlockMask built from the (doc, segment) metadata.

Blocks where the rule of mask.py holds nowhere are skipped; partial blocks evaluate
the same `mask_mod`. One BlockMask per micro-batch is shared by all layers. On CUDA
the mask is built with a compiled `create_block_mask` and `flex_attention` is
compiled once (not the whole model). On CPU FlexAttention runs eagerly, forward only.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from llara_dist import patches
from llara_dist.kernels.mask import mask_mod

BLOCK = 128
_compiled = None


def prepare(doc: torch.Tensor, segment: torch.Tensor, block: int = BLOCK) -> BlockMask:
    R, L = doc.shape
    return patches.block_mask(mask_mod(doc, segment), R, L, doc.device, block, compiled=doc.is_cuda)


def _compiled_flex():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def attend(q, k, v, block_mask: BlockMask, scale: float | None, dropout: float = 0.0) -> torch.Tensor:
    """q [R, H, L, D], k/v [R, Hkv, L, D] -> [R, H, L, D]."""
    if dropout:
        raise ValueError("the flex attention path does not support attention dropout")
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    with warnings.catch_warnings():  # eager on CPU is deliberate: no compile, tiny shapes
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
