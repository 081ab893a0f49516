"""Inference embeddings per preset: passages with the SELF prompt, queries with the NEXT prompt.

    vecs = encode(model, tokenizer, preset, ["some passage", ...], kind="passage")  # [N, hidden] fp32, unit norm

paper: the state of the one embedding token (</s>); released: the mean of the last 8
hidden states. The joint layout gives both prompts in one pass (equal to separate passes,
see tests/test_parity.py), and we keep the one asked for.

`encode` puts one text per row, rows as long as the batch's longest (padding);
`encode_packed` packs several texts per row, each attending only itself with positions of
its own, as in training: no compute on padding, and the same vectors (tested to 1e-5, fp32).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llara_dist.data.batch import PackedBatch, build_batch
from llara_dist.data.pack import Packer
from llara_dist.data.shards import Doc
from llara_dist.model.decoder import forward_hidden, gather_states, unwrap
from llara_dist.prompts import Preset, prompt_tokens
from llara_dist.tokenizer import pad_id

KINDS = {"passage": "self_emb", "query": "next_emb"}


def pool(states: torch.Tensor, how: str) -> torch.Tensor:
    """[D, k, H] embedding-token states -> [D, H] unit vectors (fp32)."""
    if how not in ("last", "mean"):
        raise ValueError(f"embed_pool {how!r} is not one of last, mean")
    v = states[:, -1] if how == "last" else states.mean(1)
    return F.normalize(v.float(), dim=-1)


def embed_batch(model, batch: PackedBatch, kind: str, preset: Preset) -> torch.Tensor:
    """[D, H] unit vectors of a batch's documents, in the batch's document order (with gradient when
    the model has one: fine-tuning embeds this way)."""
    states = gather_states(forward_hidden(model, batch), getattr(batch, KINDS[kind]))  # [D, k, H]
    return pool(states, preset.embed_pool)


@torch.no_grad()
def encode_packed(model, tokenizer, preset: Preset, texts: list[str], kind: str = "passage",
                  max_text_tokens: int = 512, rows_per_batch: int = 8, buffer: int = 64) -> torch.Tensor:
    """[N, H] fp32 unit vectors in the order of `texts`, several texts packed per row of
    max_text_tokens + the prompts' tokens (best fit over `buffer` texts, data/pack.py)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    prompt = prompt_tokens(tokenizer, preset)
    device = next(unwrap(model).parameters()).device
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    packer = Packer(prompt.overhead + max_text_tokens, prompt.overhead, buffer)
    out = torch.zeros(len(texts), unwrap(model).config.hidden_size)
    rows: list[list[Doc]] = []

    def flush():
        seq_len = max(sum(packer.cost(d) for d in r) for r in rows)
        batch = build_batch(rows, prompt, seq_len, pad_id(tokenizer)).to(device)
        out[[int(k) for k in batch.keys]] = embed_batch(model, batch, kind, preset).cpu()
        rows.clear()

    for i, x in enumerate(ids):
        packer.add(Doc(str(i), np.asarray(x[:max_text_tokens], np.int64), None))
        while packer.full or (i == len(ids) - 1 and len(packer)):
            rows.append(packer.pop_row())
            if len(rows) == rows_per_batch:
                flush()
    if rows:
        flush()
    return out


@torch.no_grad()
def encode(model, tokenizer, preset: Preset, texts: list[str], kind: str = "passage",
           max_text_tokens: int = 512, batch_size: int = 16) -> torch.Tensor:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    prompt = prompt_tokens(tokenizer, preset)
    device = next(unwrap(model).parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"][:max_text_tokens], np.int64)
               for t in texts[i:i + batch_size]]
        rows = [[Doc(f"t{i + j}", x, None)] for j, x in enumerate(ids)]
        seq_len = prompt.overhead + max(len(x) for x in ids)
        batch = build_batch(rows, prompt, seq_len, pad_id(tokenizer)).to(device)
        out.append(embed_batch(model, batch, kind, preset).cpu())
    return torch.cat(out) if out else torch.zeros(0)
