"""Inference embeddings per preset: passages with the SELF prompt, queries with the NEXT prompt.

    vecs = encode(model, tokenizer, preset, ["some passage", ...], kind="passage")  # [N, hidden] fp32, unit norm

paper: the state of the one embedding token (</s>); released: the mean of the last 8
hidden states. One document per row; the joint layout gives both prompts in one pass
(equal to separate passes, see tests/test_parity.py), and we keep the one asked for.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llara_dist.data.batch import build_batch
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
        states = gather_states(forward_hidden(model, batch), getattr(batch, KINDS[kind]))  # [D, k, H]
        out.append(pool(states, preset.embed_pool).cpu())
    return torch.cat(out) if out else torch.zeros(0)
