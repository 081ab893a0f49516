"""`sdpa`: the reference path. A dense [R, 1, L, L] boolean mask into scaled_dot_product_attention.

Runs anywhere (CPU training uses it); memory O(L^2) per row, and on GPU a dense mask
rules out the flash kernel, so it is the slow baseline of the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llara_dist.kernels.mask import dense_mask


def prepare(doc: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    return dense_mask(doc, segment)  # [R, 1, L, L] bool


def attend(q, k, v, mask: torch.Tensor, scale: float | None, dropout: float = 0.0) -> torch.Tensor:
    """q [R, H, L, D], k/v [R, Hkv, L, D] -> [R, H, L, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
