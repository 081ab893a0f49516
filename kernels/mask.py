"""The joint EBAE/EBAR attention rule, written once and shared by every kernel path.

Token i (query) may attend token j (key) iff

    doc[i] == doc[j] >= 0  and  j <= i  and  not (seg[i] == NEXT and seg[j] == SELF)

A padding query (doc -1) attends itself only, so no row of the softmax is empty
(an empty row gives NaN in SDPA's math kernel, and NaN would poison the backward).
"""

from __future__ import annotations

import torch

from llara_dist.data.batch import SEG_NEXT, SEG_SELF


def mask_mod(doc: torch.Tensor, segment: torch.Tensor):
    """The rule as a FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool`; doc/segment are [R, L].

    Plain tensor indexing, so it also evaluates on broadcast index grids (the dense mask).
    """

    def allowed(b, h, q_idx, kv_idx):
        dq, dk = doc[b, q_idx], doc[b, kv_idx]
        joint = (dq == dk) & (dq >= 0) & (kv_idx <= q_idx)
        next_to_self = (segment[b, q_idx] == SEG_NEXT) & (segment[b, kv_idx] == SEG_SELF)
        return (joint & ~next_to_self) | (q_idx == kv_idx)

    return allowed


def dense_mask(doc: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """[R, 1, L, L] bool, True where attention is allowed (the SDPA reference's mask)."""
    R, L = doc.shape
    b = torch.arange(R, device=doc.device)[:, None, None]  # [R, 1, 1]
    i = torch.arange(L, device=doc.device)
    return mask_mod(doc, segment)(b, None, i[None, :, None], i[None, None, :])[:, None]
