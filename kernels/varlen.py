"""`varlen`: variable-length flash attention, two sequences per document.

Document d becomes

    A: queries [prefix TEXT SELF] over keys [prefix TEXT SELF]   (causal)
    B: queries [NEXT]             over keys [prefix TEXT NEXT]   (causal, bottom-right aligned)

so no kernel needs the joint mask: each sequence is plain causal. Queries keep the
row-major token order (A then B of each document are already contiguous there), so
scattering the output back is one index_copy. Keys of B repeat the TEXT tokens.
Padding tokens are in no sequence; their output is zero.

The layout's sizes depend on the data (boolean-mask indexing, unique, the longest sequence):
built from GPU tensors, each of its ~10 reads stalls the host until the device drains. So
`registry.prepare` builds it from the batch's host copy (registry.HOST_METADATA) and copies it to
the device without a read back (`Layout.to`).

Kernels: `flash_attn.flash_attn_varlen_func` when the flash-attn package is installed,
else `torch.nn.attention.varlen.varlen_attn` (CUDA). `reference` runs the same layout
through per-sequence SDPA on any device: the CPU test of the layout.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llara_dist.data.batch import SEG_NEXT, SEG_PAD, SEG_SELF

DTYPES = (torch.bfloat16, torch.float16)  # what the flash kernels take


@dataclass
class Layout:
    q_index: torch.Tensor  # [Tq] int64 flat token index (row * L + column) of each query, sequence order
    k_index: torch.Tensor  # [Tk] int64 flat token index of each key, sequence order
    cu_q: torch.Tensor  # [S + 1] int32 query offsets of the S sequences
    cu_k: torch.Tensor  # [S + 1] int32 key offsets
    max_q: int
    max_k: int

    def to(self, device, non_blocking: bool = False) -> "Layout":
        """The same layout on `device`; the lengths stay Python ints (nothing is read back). From the
        CPU to CUDA without blocking, through page-locked memory: a pageable copy may wait for the device."""
        pin = non_blocking and torch.device(device).type == "cuda" and not self.q_index.is_cuda
        move = lambda t: (t.pin_memory() if pin else t).to(device, non_blocking=non_blocking)  # noqa: E731
        return Layout(move(self.q_index), move(self.k_index), move(self.cu_q), move(self.cu_k), self.max_q, self.max_k)


def prepare(doc: torch.Tensor, segment: torch.Tensor) -> Layout:
    R, L = doc.shape
    doc, seg = doc.reshape(-1), segment.reshape(-1)  # [R*L]
    real = (doc >= 0) & (seg != SEG_PAD)
    q_index = torch.arange(R * L, device=doc.device)[real]  # [T] real tokens, row-major
    s = seg[real]
    rank = torch.unique(q_index // L * L + doc[real].long(), return_inverse=True)[1]  # [T] document number
    n_docs = int(rank.max()) + 1 if rank.numel() else 0
    is_next = s == SEG_NEXT
    # query sequence of each token: 2*doc (A) or 2*doc + 1 (B); nondecreasing in row-major order
    seq_q = 2 * rank + is_next.long()
    # B keys exist only for documents that have NEXT tokens (two-pass blanks them out)
    has_b = torch.zeros(n_docs, dtype=torch.bool, device=doc.device)
    has_b[rank[is_next]] = True
    key_a = ~is_next
    key_b = (s != SEG_SELF) & has_b[rank]
    seq_k = torch.cat([2 * rank[key_a], 2 * rank[key_b] + 1])
    col_k = torch.cat([q_index[key_a], q_index[key_b]])
    k_index = col_k[torch.argsort(seq_k * (R * L) + col_k)]  # by sequence, then column
    len_q = torch.bincount(seq_q, minlength=2 * n_docs)
    len_k = torch.bincount(seq_k, minlength=2 * n_docs)
    keep = len_q > 0

    def cu(lengths):
        return F.pad(torch.cumsum(lengths[keep], 0), (1, 0)).to(torch.int32)

    return Layout(q_index, k_index, cu(len_q), cu(len_k),
                  int(len_q.max()) if n_docs else 0, int(len_k.max()) if n_docs else 0)


def reference(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """Per-sequence SDPA over the packed layout: q [Tq, H, D], k/v [Tk, Hkv, D] -> [Tq, H, D]."""
    out = []
    for s in range(cu_q.numel() - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)  # [H, n, D]
        ks, vs = (t[cu_k[s]:cu_k[s + 1]].transpose(0, 1) for t in (k, v))  # [Hkv, m, D]
        n, m = qs.shape[1], ks.shape[1]
        # bottom-right causal: query i sees keys j <= i + (m - n)
        mask = torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                           enable_gqa=qs.shape[0] != ks.shape[0])
        out.append(o.transpose(0, 1))
    return torch.cat(out) if out else q.new_zeros(q.shape)


def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)

    return run


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    # the signature moved between torch releases: is_causal (2.10) vs window_size, scale, enable_gqa
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        extra = dict(causal)
        if scale is not None:
            if "scale" in params:
                extra["scale"] = scale
            else:  # the kernel's own scale is D^-0.5
                q = q * (scale * q.shape[-1] ** 0.5)
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **extra)

    return run


def backend():
    """(name, kernel) of the best varlen kernel installed, or (None, None)."""
    if not torch.cuda.is_available():
        return None, None
    for name, make in (("flash_attn", _flash_attn), ("torch.varlen_attn", _torch_varlen)):
        fn = make()
        if fn is not None:
            return name, fn
    return None, None


def attend(q, k, v, layout: Layout, scale: float | None, dropout: float = 0.0, kernel=None) -> torch.Tensor:
    """q [R, H, L, D], k/v [R, Hkv, L, D] -> [R, H, L, D]; `kernel` defaults to backend()'s."""
    if dropout:
        raise ValueError("the varlen attention path does not support attention dropout")
    kernel = kernel or backend()[1]
    R, H, L, D = q.shape
    flat_q = q.transpose(1, 2).reshape(R * L, H, D)
    flat_k, flat_v = (t.transpose(1, 2).reshape(R * L, t.shape[1], D) for t in (k, v))
    out = kernel(flat_q[layout.q_index], flat_k[layout.k_index], flat_v[layout.k_index],
                 layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, scale)  # [Tq, H, D]
    full = flat_q.new_zeros(R * L, H, D).index_copy(0, layout.q_index, out.to(q.dtype))
    return full.view(R, L, H, D).transpose(1, 2)
