"""The LLaRA objective: EBAE and EBAR bag-of-words losses (+ the released variant's LM loss).

For document d with embedding states e (k tokens after its SELF or NEXT prompt):

    p      = softmax(pool(lm_head(e)))          pool: the one token (paper) or max over k logits (released)
    ebae_d = -mean_{t in T_self(d)} log p_self[t]      T_self: unique ids of d's text
    ebar_d = -mean_{t in T_next(d)} log p_next[t]      T_next: unique ids of the next chunk

    loss = bow_scale * B + lm_weight * mean over LM target tokens of -log p(next token)
    B    = mean_d ebae_d + mean_d ebar_d, or their average if bow_average (released: /2 and x0.1)

The documents are the unit of averaging. `loss_sums` returns sums over one micro-batch,
`batch_counts` the matching counts, and `combine` divides by counts that the trainer
all-reduces over ranks and micro-batches: summing combine() over all micro-batches of
all ranks gives the exact mean over all documents of the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llara_dist.batch import PackedBatch
from llara_dist.modeling import forward_hidden, gather_states, unwrap
from llara_dist.prompts import Preset

TERMS = ("ebae", "ebar", "lm")
LM_CHUNK = 4096  # tokens per LM-loss chunk: [LM_CHUNK, vocab] fp32 logits live at a time


def _set_sizes(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]  # [D]


def _has_ebar(batch: PackedBatch) -> torch.Tensor:
    return batch.has_next & (_set_sizes(batch.ebar_offsets) > 0)  # [D] bool


def batch_counts(batch: PackedBatch, preset: Preset) -> dict[str, int]:
    """Documents with an EBAE term, with an EBAR term, and LM target tokens (metadata only)."""
    return {
        "ebae": int((_set_sizes(batch.ebae_offsets) > 0).sum()),
        "ebar": int(_has_ebar(batch).sum()),
        "lm": batch.lm_index.numel() if preset.lm_weight else 0,
    }


def _set_nll_sum(logp: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """Sum over documents d with use[d] of -mean log p_d[ids of d's set]; logp [D, V]."""
    sizes = _set_sizes(offsets)  # [D]
    # output_size: else repeat_interleave reads the total back from the device (a host sync)
    owner = torch.repeat_interleave(torch.arange(sizes.numel(), device=ids.device), sizes,
                                    output_size=ids.numel())  # [T]
    nll = -logp[owner, ids]  # [T]
    per_doc = torch.zeros_like(logp[:, 0]).index_add(0, owner, nll) / sizes.clamp(min=1)  # [D]
    return (per_doc * use).sum()


def _lm_chunk_nll(head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="sum")  # [chunk, V] fp32 logits inside


class _FrozenHeadNLL(torch.autograd.Function):
    """_lm_chunk_nll through a head that does not train (LoRA): forward also computes the
    gradient w.r.t. h, backward only scales it; no logits are kept, nothing is recomputed.

    Checkpointing cannot be used here under ZeRO-3: torch's recompute keeps a parameter that
    does not require grad as the parameter itself (not a detached alias of its gathered data),
    and ZeRO-3 releases it to shape [0] right after the head's forward (CheckpointError).
    The head is still called as a module, so ZeRO-3 gathers it (and again for the local backward).
    """

    @staticmethod
    def forward(ctx, h, head, targets):  # h [chunk, H], targets [chunk]
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            nll = _lm_chunk_nll(head, h, targets)
            (grad_h,) = torch.autograd.grad(nll, h)  # [chunk, H]
        ctx.save_for_backward(grad_h)
        return nll.detach()

    @staticmethod
    def backward(ctx, grad_nll):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_nll, None, None


def loss_sums(model, batch: PackedBatch, preset: Preset, lm_chunk: int = LM_CHUNK) -> dict[str, torch.Tensor]:
    """One forward; fp32 sums over this micro-batch of each term (see module docstring)."""
    hidden = forward_hidden(model, batch)  # [R, L, H]
    head = unwrap(model).get_output_embeddings()
    D, k = batch.self_emb.shape

    # bag of words: the LM head only at the 2 x D x k embedding positions
    states = gather_states(hidden, torch.cat([batch.self_emb, batch.next_emb]))  # [2D, k, H]
    logits = head(states).float()  # [2D, k, V]
    pooled = logits.amax(1) if preset.pool == "max" else logits[:, -1]  # [2D, V]
    logp = torch.log_softmax(pooled, -1)
    anchor = logits.sum() * 0.0  # keeps every term on the graph, even with no documents
    has_ebae = (_set_sizes(batch.ebae_offsets) > 0).to(logp.dtype)
    sums = {
        "ebae": anchor + _set_nll_sum(logp[:D], batch.ebae_ids, batch.ebae_offsets, has_ebae),
        "ebar": anchor + _set_nll_sum(logp[D:], batch.ebar_ids, batch.ebar_offsets, _has_ebar(batch).to(logp.dtype)),
        "lm": anchor.clone(),
    }
    if preset.lm_weight:
        # a FIXED number of chunks per micro-batch (from R x L, not from the real tokens), so that
        # every ZeRO-3 rank calls the head equally often; each chunk recomputes its logits in backward
        # (checkpoint), or, when the head does not train (LoRA), computes its gradient at once
        where = batch.lm_index  # [T], found on the CPU by build_batch
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = batch.input_ids.reshape(-1)[where + 1]
        n_chunks = math.ceil(batch.input_ids.numel() / lm_chunk)
        frozen = torch.is_grad_enabled() and not any(p.requires_grad for p in head.parameters())
        for w, t in zip(torch.tensor_split(where, n_chunks), torch.tensor_split(targets, n_chunks)):
            if frozen:  # keeps [chunk, H] gradients instead: [T, H] in all, like the hidden states
                nll = _FrozenHeadNLL.apply(flat[w], head, t)
            else:
                nll = checkpoint(_lm_chunk_nll, head, flat[w], t, use_reentrant=False)
            sums["lm"] = sums["lm"] + nll
    return sums


def combine(sums: dict[str, torch.Tensor], counts: dict[str, int], preset: Preset,
            as_floats: bool = True) -> tuple[torch.Tensor, dict]:
    """The loss given (global) counts; a term with count 0 contributes 0.

    Returns (loss, parts): parts[t] = sums[t] / counts[t], so summing parts over all
    micro-batches of all ranks gives each term's mean over the global batch. Parts are
    floats, or with as_floats=False detached 0-d tensors: float() of a GPU tensor makes the
    host wait for the device, which the training step leaves to its end.
    """
    means = {t: sums[t] / counts[t] if counts[t] else sums[t] * 0.0 for t in TERMS}
    bow_terms = [means[t] for t in ("ebae", "ebar") if counts[t]]
    bow = sum(bow_terms, sums["ebae"] * 0.0)
    if preset.bow_average and bow_terms:
        bow = bow / len(bow_terms)
    loss = preset.bow_scale * bow + preset.lm_weight * means["lm"]
    parts = {t: means[t].detach() for t in TERMS}
    return loss, {t: float(v) for t, v in parts.items()} if as_floats else parts
