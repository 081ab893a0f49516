"""Joint pass == separate passes: the heart of the joint EBAE/EBAR prompt.

For a tiny random LLaMA (fp32, CPU), the SELF and NEXT embedding states of every
document in a packed row must equal those of separate, unpacked, plainly causal
passes over `prefix TEXT self_suffix` and `prefix TEXT next_suffix`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import load_tiny, make_docs

from llara_dist.data.batch import build_batch
from llara_dist.data.shards import Doc
from llara_dist.model.decoder import forward_hidden, gather_states

TOL = 1e-5


def separate_states(model, prompt, doc):
    """Plain causal HF passes (stock sdpa, no llara kernel) over each prompt alone: 2 x [k, H]."""
    k = prompt.num_emb_tokens
    out = []
    for suffix in (prompt.self_suffix, prompt.next_suffix):
        ids = torch.tensor([list(prompt.prefix) + doc.ids.tolist() + list(suffix)])
        out.append(model.get_decoder()(input_ids=ids).last_hidden_state[0, -k:])
    return out


@pytest.mark.parametrize("attn", ["sdpa", "flex", "two-pass"])  # varlen needs CUDA: test_kernels + GPU check
@pytest.mark.parametrize("preset_name", ["paper", "released"])
def test_joint_pass_equals_separate_passes(preset_name, attn, tokenizer_dir, tiny_llama_dir, shared_data):
    tok, preset, model, prompt = load_tiny(preset_name, tokenizer_dir, tiny_llama_dir, attn)
    # rows holding 1, 2 and many documents, with padding at the end of the first two
    docs = make_docs(tok, shared_data, [37, 12, 20, 5, 9, 14, 3, 8, 11])
    rows = [docs[:1], docs[1:3], docs[3:]]
    batch = build_batch(rows, prompt, seq_len=prompt.overhead * 6 + 60, pad_id=tok.pad_token_id)
    with torch.no_grad():
        hidden = forward_hidden(model, batch)
        joint_self = gather_states(hidden, batch.self_emb)  # [D, k, H]
        joint_next = gather_states(hidden, batch.next_emb)
        assert torch.isfinite(hidden).all(), "padding produced NaN/inf"
        model.set_attn_implementation("sdpa")  # stock HF causal attention for the separate passes
        for d, doc in enumerate(docs):
            ref_self, ref_next = separate_states(model, prompt, doc)
            assert (joint_self[d] - ref_self).abs().max() <= TOL, f"SELF state of document {d}"
            assert (joint_next[d] - ref_next).abs().max() <= TOL, f"NEXT state of document {d}"


@pytest.mark.parametrize("preset_name", ["paper", "released"])
def test_embeddings_equal_a_separate_pass(preset_name, tokenizer_dir, tiny_llama_dir, shared_data):
    from llara_dist.model.embed import encode

    tok, preset, model, prompt = load_tiny(preset_name, tokenizer_dir, tiny_llama_dir)
    texts = ["The river flows north.", "A short query", "Anarchism is a political philosophy and movement."]
    got = {kind: encode(model, tok, preset, texts, kind, batch_size=2) for kind in ("passage", "query")}
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        for i, text in enumerate(texts):
            doc = Doc("t", np.asarray(tok(text, add_special_tokens=False)["input_ids"]), None)
            ref_self, ref_next = separate_states(model, prompt, doc)
            for kind, ref in (("passage", ref_self), ("query", ref_next)):
                v = ref[-1] if preset_name == "paper" else ref.mean(0)  # paper: </s>; released: mean of 8
                assert (got[kind][i] - v / v.norm()).abs().max() <= TOL, (kind, i)
                assert abs(float(got[kind][i].norm()) - 1) <= 1e-6


@pytest.mark.parametrize("preset_name", ["paper", "released"])
def test_packed_embeddings_equal_one_text_at_a_time(preset_name, tokenizer_dir, tiny_llama_dir, shared_data):
    """Inference packing: texts of very different lengths, several to a row (some cut at the token limit),
    give the vectors of one text per row to 1e-5, in the order given."""
    from llara_dist.model.embed import encode, encode_packed

    tok, preset, model, _ = load_tiny(preset_name, tokenizer_dir, tiny_llama_dir)
    lines = [line for line in (shared_data / "wikitext2_valid.txt").read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(0)
    texts = [" ".join(lines[i].split()[:int(n)]) for i, n in zip(rng.permutation(len(lines))[:40],
                                                                   rng.integers(1, 120, 40))]
    rows = []  # rows of each forward pass
    hook = model.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    for kind in ("passage", "query"):
        alone = encode(model, tok, preset, texts, kind, max_text_tokens=96, batch_size=1)
        rows.clear()
        packed = encode_packed(model, tok, preset, texts, kind, max_text_tokens=96, rows_per_batch=3, buffer=8)
        assert packed.shape == alone.shape and (packed - alone).abs().max() <= 1e-5, kind
        assert sum(rows) < len(texts) and max(rows) <= 3  # texts share rows; 3 rows a pass
    hook.remove()


def test_varlen_layout_in_the_model_equals_separate_passes(tokenizer_dir, tiny_llama_dir, shared_data, monkeypatch):
    """The varlen path end to end on CPU: its CUDA kernel swapped for per-sequence SDPA."""
    from llara_dist.kernels import registry, varlen

    monkeypatch.setattr(registry, "why_unavailable", lambda path, device, backward=False, dtype=None: None)
    monkeypatch.setattr(varlen, "backend", lambda: ("reference", varlen.reference))
    tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir, attn="varlen")
    docs = make_docs(tok, shared_data, [30, 7, 12, 4, 9])
    batch = build_batch([docs[:1], docs[1:]], prompt, seq_len=prompt.overhead * 4 + 70, pad_id=tok.pad_token_id)
    with torch.no_grad():
        hidden = forward_hidden(model, batch)
        states = gather_states(hidden, batch.self_emb), gather_states(hidden, batch.next_emb)
        model.set_attn_implementation("sdpa")
        for d, doc in enumerate(docs):
            for joint, ref in zip(states, separate_states(model, prompt, doc)):
                assert (joint[d] - ref).abs().max() <= TOL, d
