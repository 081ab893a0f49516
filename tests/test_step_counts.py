"""What a step is counted as: the attention pairs the joint mask allows, the model FLOPs
(metrics.flop_rates, against torch's own count over a real model) and the LM targets a batch carries.
"""

from __future__ import annotations

import numpy as np
import torch
from helpers import allowed_pairs, counted_train_flops, full_training_rates, matmul_params

from llara_dist.data.batch import build_batch
from llara_dist.data.shards import Doc
from llara_dist.prompts import PromptTokens
from llara_dist.train.metrics import attention_pairs, flop_rates


def _batch():
    prompt = PromptTokens(prefix=(1, 7), self_suffix=(5, 6, 90), next_suffix=(8, 91), num_emb_tokens=1)
    rng = np.random.default_rng(0)
    rows = [[Doc(f"d{r}{i}", rng.integers(10, 80, n).astype(np.int32), None) for i, n in enumerate(lens)]
            for r, lens in enumerate([[5, 9, 3], [20], [1, 1]])]
    return build_batch(rows, prompt, 40, 0)


def test_attention_pairs_match_the_mask():
    b = _batch()
    allowed = allowed_pairs(b)
    assert attention_pairs(b) == int(allowed.sum())
    # the brute force itself, on the first document by hand: text t = prefix 2 + 5 = 7, S = 3, N = 2; the
    # first 10 tokens attend causally (10 * 11 / 2), each NEXT token the 7 text tokens and the NEXT tokens
    # up to itself (2 * 7 + 1 + 2)
    first = b.doc[0] == 0
    assert (int(b.text_len[0]), b.self_len, b.next_len) == (7, 3, 2)
    assert int(allowed[0][first][:, first].sum()) == 55 + 17 == 72


def test_train_flops_count_the_models_matmuls():
    """The config's count of weights against the model's own linear layers, the rates flop_rates finds in
    the model against the config's and against torch's count of the FLOPs of a real forward and backward
    (a shape with grouped-query attention: 1 key/value head of 2; a plain causal LM applies its head at
    every token)."""
    from transformers import AutoModelForCausalLM

    from llara_dist.model.tiny import tiny_llama_config

    c = tiny_llama_config(vocab_size=100, hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16)
    model = AutoModelForCausalLM.from_config(c)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; the LM head
    assert matmul_params(c) + c.hidden_size * c.vocab_size == sum(m.weight.numel() for m in linears)
    rates = flop_rates(model)
    assert rates == full_training_rates(c)
    # two lengths: a per-token or a per-pair error could not cancel out at both
    for tokens in (5, 10):
        assert rates.step(tokens, tokens * tokens, tokens) == counted_train_flops(c, tokens)


def test_batch_carries_its_lm_targets():
    from llara_dist.data.batch import lm_targets

    b = _batch()
    where = lm_targets(b).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(b.lm_index, where) and b.lm_index.dtype == torch.int64
    # each text token is a target, predicted from the token before it (the last prefix token for the first)
    assert b.lm_index.numel() == 5 + 9 + 3 + 20 + 1 + 1
    assert torch.equal(b.lm_index[:5], torch.tensor([1, 2, 3, 4, 5]))  # row 0: prefix at 0-1, text at 2-6
