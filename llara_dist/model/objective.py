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

import torch
import torch.nn.functional as F

from llara_dist.data.batch import PackedBatch
from llara_dist.errors import UserError
from llara_dist.model.decoder import forward_hidden, gather_states, unwrap
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


class _HeadNLL(torch.autograd.Function):
    """Sum over the rows of h of -log softmax(h W^T + b)[target], with its gradients w.r.t. h and,
    where they train, W and b, all in the forward, [chunk, V] fp32 logits at a time. No logits are
    kept and none recomputed: 3 matmuls a chunk, where checkpointed chunks took 4. backward only
    scales the gradients. The logits are those of head(h).float() (the head's dtype, then fp32).
    (Not torch's checkpoint either way: under ZeRO-3 its recompute finds a frozen head, kept by
    reference, already released to shape [0].)"""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):  # h [T, H], weight [V, H], targets [T]
        trains_w, trains_b = weight.requires_grad, bias is not None and bias.requires_grad
        grad_h = torch.empty_like(h)
        acc = torch.promote_types(weight.dtype, torch.float32)  # the head's gradient summed over chunks
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if trains_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if trains_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk, None]
            logp = torch.log_softmax(F.linear(hc, weight, bias).float(), -1)  # [c, V]
            total -= logp.gather(1, tc).sum()
            g = logp.exp_()  # softmax, then minus the one-hot target: d nll / d logits
            g.scatter_add_(1, tc, g.new_full(tc.shape, -1.0))
            g_low = g.to(h.dtype)  # as autograd casts it back through .float()
            grad_h[s:s + chunk] = g_low @ weight
            if trains_w:
                grad_w += (g_low.t() @ hc).to(acc)
            if trains_b:
                grad_b += g.sum(0).to(acc)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (grad_h * grad_total, None if grad_w is None else (grad_w * grad_total).to(w_dtype),
                None if grad_b is None else (grad_b * grad_total).to(b_dtype), None, None)


def head_nll(head, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """_HeadNLL through the head MODULE, so that ZeRO-3 gathers its weight for the forward (and again
    for the backward, where the weight's gradient goes to it as from any module), a frozen head (LoRA)
    included; one call a micro-batch, so every rank calls the head equally often."""
    if type(head) is not torch.nn.Linear:
        raise UserError(f"objective: the LM loss needs a plain Linear LM head, not {type(head).__name__} "
                         f"(is lm_head in train.lora_targets?)")
    head.forward = lambda x: _HeadNLL.apply(x, head.weight, head.bias, targets, chunk)  # this call only
    try:
        return head(h)
    finally:
        del head.forward


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
        where = batch.lm_index  # [T], found on the CPU by build_batch
        targets = batch.input_ids.reshape(-1)[where + 1]
        sums["lm"] = sums["lm"] + head_nll(head, hidden.reshape(-1, hidden.shape[-1])[where], targets, lm_chunk)
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


class Objective:
    """The objective of one preset, as the training step calls it: `counts` of a micro-batch (CPU
    metadata), the `sums` of one forward, and `combine` over global counts. Another way to compute
    the same sums (the benchmark's plain baseline) is a subclass that overrides `sums`."""

    TERMS = TERMS

    def __init__(self, preset: Preset, lm_chunk: int | None = None):
        self.preset = preset
        self.lm_chunk = LM_CHUNK if lm_chunk is None else lm_chunk

    def counts(self, batch: PackedBatch) -> dict[str, int]:
        return batch_counts(batch, self.preset)

    def sums(self, model, batch: PackedBatch) -> dict[str, torch.Tensor]:
        return loss_sums(model, batch, self.preset, self.lm_chunk)

    def combine(self, sums: dict[str, torch.Tensor], counts: dict[str, int], as_floats: bool = True):
        return combine(sums, counts, self.preset, as_floats)
