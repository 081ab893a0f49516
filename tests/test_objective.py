"""The loss against a direct, slow implementation written here from the formulas.

paper (eq. 6):  mean_d -mean_{t in set} log softmax(W e_d)[t], EBAE + EBAR, one </s> token each.
released:       max over the 8 positions' fp32 logits, unique ids > 2, each task's mean / 10,
                averaged over the tasks, plus the next-token loss on the text (mean over tokens).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import load_tiny, make_docs

from llara_dist.data.batch import build_batch
from llara_dist.model.objective import batch_counts, combine, loss_sums

LENGTHS = [23, 9, 14, 5, 17, 7]


def slow_loss(model, prompt, preset, docs, drop_specials: bool):
    """Unpacked, plainly causal passes (stock HF sdpa), full logits, Python loops."""
    model.set_attn_implementation("sdpa")
    k, P = prompt.num_emb_tokens, len(prompt.prefix)
    ebae, ebar, lm = [], [], []
    for doc in docs:
        text = doc.ids.tolist()
        logp = []
        for suffix in (prompt.self_suffix, prompt.next_suffix):
            ids = torch.tensor([list(prompt.prefix) + text + list(suffix)])
            logits = model(input_ids=ids).logits[0].float()  # [n, V]
            emb = logits[-k:]
            pooled = emb.max(0).values if preset.pool == "max" else emb[-1]
            logp.append(torch.log_softmax(pooled, -1))
            if suffix == prompt.self_suffix:  # position i predicts text token i + 1 (not the prefix)
                lm += [-torch.log_softmax(logits[P - 1 + j], -1)[t] for j, t in enumerate(text)]
        drop = 2 if drop_specials else -1  # released: ids <= 2 are not targets
        own = torch.unique(torch.tensor([t for t in text if t > drop]))
        ebae.append(-logp[0][own].mean())
        if doc.next_set is not None:
            nxt = torch.unique(torch.tensor([t for t in doc.next_set.tolist() if t > drop]))
            ebar.append(-logp[1][nxt].mean())
    mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
    bow = (mean(ebae) + mean(ebar)) / 2 if preset.bow_average else mean(ebae) + mean(ebar)
    return preset.bow_scale * bow + preset.lm_weight * mean(lm)


@pytest.mark.parametrize("preset_name", ["paper", "released"])
def test_loss_equals_slow_formula_and_splits_exactly(preset_name, tokenizer_dir, tiny_llama_dir, shared_data):
    tok, preset, model, prompt = load_tiny(preset_name, tokenizer_dir, tiny_llama_dir)
    docs = make_docs(tok, shared_data, LENGTHS)
    drop = (0, 1, 2) if preset_name == "released" else ()  # released drops ids <= 2
    seq_len = 3 * prompt.overhead + 60
    whole = build_batch([docs[:3], docs[3:]], prompt, seq_len, tok.pad_token_id, drop)
    # the same documents as two micro-batches of one row each, combined with global counts
    parts = [build_batch([d], prompt, seq_len, tok.pad_token_id, drop) for d in (docs[:3], docs[3:])]
    with torch.no_grad():
        counts = batch_counts(whole, preset)
        loss, terms = combine(loss_sums(model, whole, preset, lm_chunk=16), counts, preset)
        split = sum(combine(loss_sums(model, b, preset, lm_chunk=16), counts, preset)[0] for b in parts)
        want = slow_loss(model, prompt, preset, docs, drop_specials=bool(drop))
    assert counts["ebae"] == len(docs) and counts["ebar"] == sum(d.next_set is not None for d in docs)
    assert counts["lm"] == (sum(LENGTHS) if preset.lm_weight else 0)
    assert abs(float(loss) - float(want)) <= 1e-5 * abs(float(want)), (float(loss), float(want))
    assert abs(float(split) - float(loss)) <= 1e-5 * abs(float(loss))
    assert terms["ebae"] > 0 and terms["ebar"] > 0


def test_lm_chunks_are_fixed_per_batch_shape_and_exact(tokenizer_dir, tiny_llama_dir, shared_data):
    tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir)
    docs = make_docs(tok, shared_data, LENGTHS)
    seq_len = 3 * prompt.overhead + 60
    full = build_batch([docs[:3], docs[3:]], prompt, seq_len, tok.pad_token_id)
    sparse = build_batch([docs[:1], docs[3:4]], prompt, seq_len, tok.pad_token_id)  # fewer real tokens
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    sums = {}
    for name, b in (("full", full), ("sparse", sparse)):
        calls.clear()
        sums[name] = loss_sums(model, b, preset, lm_chunk=10)
        sums[name]["calls"] = len(calls)
    hook.remove()
    # the same number of head calls whatever the batch (ZeRO-3 ranks must agree): the model's own
    # last-column logits, 1 BoW call, 1 LM call (its chunks inside)
    assert sums["full"]["calls"] == sums["sparse"]["calls"] == 3
    # chunking changes nothing, forward or backward
    model.zero_grad()
    sums["full"]["lm"].backward()
    g_small = model.lm_head.weight.grad.clone()
    model.zero_grad()
    big = loss_sums(model, full, preset, lm_chunk=10**6)["lm"]
    big.backward()
    assert abs(big.item() - sums["full"]["lm"].item()) <= 1e-5 * big.item()
    assert torch.allclose(model.lm_head.weight.grad, g_small, atol=1e-6)


def test_zero_count_term_contributes_nothing(tokenizer_dir, tiny_llama_dir, shared_data):
    tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir)
    docs = [d for d in make_docs(tok, shared_data, LENGTHS) if d.next_set is None]  # no EBAR at all
    b = build_batch([docs], prompt, 4 * prompt.overhead + 60, tok.pad_token_id)
    counts = batch_counts(b, preset)
    assert counts["ebar"] == 0
    sums = loss_sums(model, b, preset)
    loss, terms = combine(sums, counts, preset)
    # released: with no EBAR term, the BoW loss is EBAE's alone (not halved)
    want = preset.bow_scale * sums["ebae"] / counts["ebae"] + sums["lm"] / counts["lm"]
    assert terms["ebar"] == 0.0 and torch.allclose(loss, want)
    loss.backward()  # on the graph, finite
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype, bias, frozen", [(torch.float64, True, False), (torch.float64, False, True),
                                                 (torch.bfloat16, False, False)])
def test_head_nll_is_cross_entropy_of_the_heads_logits(dtype, bias, frozen):
    """objective.head_nll (gradients in the forward, chunk by chunk) against eager cross-entropy of
    head(h).float(): the sum and the gradients of h, W and b; chunk sizes that do and do not divide T;
    a frozen head; no rows at all."""
    from llara_dist.model.objective import head_nll

    torch.manual_seed(0)
    head = torch.nn.Linear(24, 50, bias=bias).to(dtype)
    head.weight.requires_grad_(not frozen)
    h = torch.randn(13, 24, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 50, (13,))
    # the logits are fp32 in both (head(h).float()), so fp64 agrees to fp32 rounding, not to fp64's
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-9)

    def grads():
        out = {"h": h.grad}
        out.update({n: p.grad for n, p in head.named_parameters() if p.requires_grad})
        return out

    want = F.cross_entropy(head(h).float(), t, reduction="sum")
    (want * 0.5).backward()
    ref = {k: v.clone() for k, v in grads().items()}
    for chunk in (4, 13, 100):
        h.grad = None
        head.zero_grad()
        got = head_nll(head, h, t, chunk)
        (got * 0.5).backward()
        torch.testing.assert_close(got, want.detach(), **tol)
        for name, g in grads().items():
            assert g is not None and g.dtype == dtype, name
            torch.testing.assert_close(g, ref[name], **tol, msg=name)
        assert "forward" not in head.__dict__  # the module's own forward is back
    assert (head.weight.grad is None) == frozen
    empty = head_nll(head, h[:0], t[:0], 4)
    assert empty.item() == 0.0
    torch.testing.assert_close(head(h), F.linear(h, head.weight, head.bias))  # the head still a head


def test_head_nll_refuses_a_wrapped_head():
    from llara_dist.model.objective import head_nll

    class Adapted(torch.nn.Linear):
        pass

    with pytest.raises(ValueError, match="plain Linear LM head, not Adapted"):
        head_nll(Adapted(4, 5), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 4)
