"""The packer: whole documents, best fill, state round trip, and the batch layout against a
direct per-token construction, for both presets' prompts."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from llara_dist.config import ObjectiveConfig
from llara_dist.data.batch import SEG_NEXT, SEG_PAD, SEG_SELF, SEG_TEXT, build_batch
from llara_dist.data.pack import Packer
from llara_dist.data.shards import Doc
from llara_dist.prompts import add_special_tokens, prompt_tokens, resolve_preset
from llara_dist.tokenizer import load_tokenizer


@pytest.fixture(scope="module", params=["paper", "released"])
def prompt_and_tok(request, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    preset = resolve_preset(ObjectiveConfig(preset=request.param))
    add_special_tokens(tok, preset)
    return prompt_tokens(tok, preset), tok


def as_doc(d) -> Doc:
    key, ids, nxt, _ = d
    return Doc(key, np.asarray(ids, np.int32), None if nxt is None else np.unique(np.asarray(nxt, np.int32)))


def synthetic(n: int, max_len: int, seed: int = 0) -> list[Doc]:
    rng = np.random.default_rng(seed)
    return [Doc(f"d{i}", rng.integers(0, 500, rng.integers(1, max_len)).astype(np.int32),
                None if i % 4 == 3 else np.unique(rng.integers(0, 500, 30)).astype(np.int32)) for i in range(n)]


def pack_all(docs, seq_len, overhead, capacity, on_pop=None) -> list[list[Doc]]:
    """Stream docs through a fresh Packer, then drain it."""
    return feed_and_drain(Packer(seq_len, overhead, capacity), docs, on_pop)


def feed_and_drain(packer, docs, on_pop=None) -> list[list[Doc]]:
    rows = []
    for d in docs:
        packer.add(d)
        if packer.full:
            on_pop and on_pop(packer)
            rows.append(packer.pop_row())
    while len(packer):
        on_pop and on_pop(packer)
        rows.append(packer.pop_row())
    return rows


def test_no_document_lost_repeated_or_split():
    docs = synthetic(300, 260)  # some longer than a row's text room: truncated, still whole
    rows = pack_all(docs, 200, 13, 16)
    assert Counter(d.key for r in rows for d in r) == Counter(d.key for d in docs)
    original = {d.key: d for d in docs}
    for r in rows:
        assert sum(min(len(d.ids), 200 - 13) + 13 for d in r) <= 200
        assert all(d is original[d.key] for d in r)  # whole documents, not pieces (cut only by build_batch)


def test_each_row_is_the_best_fill_with_the_oldest():
    """Brute force over the buffer: no subset that holds the oldest fills the row better."""
    seq_len, overhead = 300, 9
    cost = lambda d: min(len(d.ids), seq_len - overhead) + overhead  # noqa: E731
    expected = []

    def best(packer):
        oldest, rest = packer._docs[0], packer._docs[1:]
        fits = (cost(oldest) + sum(map(cost, s)) for n in range(len(rest) + 1)
                for s in itertools.combinations(rest, n))
        expected.append(max(f for f in fits if f <= seq_len))

    docs = synthetic(120, 150, seed=1)
    order = {d.key: i for i, d in enumerate(docs)}
    rows = pack_all(docs, seq_len, overhead, 8, on_pop=best)
    assert [sum(map(cost, r)) for r in rows] == expected
    # the oldest document leads every row, so none waits more than `capacity` rows
    firsts = [order[r[0].key] for r in rows]
    assert firsts == sorted(firsts)


def test_fill_on_real_passages(wiki_docs, prompt_and_tok):
    prompt, _ = prompt_and_tok
    docs = [as_doc(d) for d in wiki_docs]
    rows = pack_all(docs, 1024, prompt.overhead, 64)[:-20]  # the drained tail is not steady state
    used = sum(min(len(d.ids), 1024 - prompt.overhead) + prompt.overhead for r in rows for d in r)
    # 100-word passages are ~158 tokens under the 2000-token test tokenizer; measured 0.989
    # (paper, overhead 15) and 0.950 (released, overhead 52); largest-first fit gives 0.935 / 0.892
    assert used / (len(rows) * 1024) >= (0.985 if prompt.overhead < 20 else 0.945)


def test_state_round_trip():
    # some documents carry a stored EBAE set (prep's target options), which the state keeps too
    docs = [Doc(d.key, d.ids, d.next_set, np.unique(d.ids[:5]) if i % 3 == 0 else None)
            for i, d in enumerate(synthetic(200, 120, seed=2))]
    straight = pack_all(docs, 256, 20, 12)
    packer, rows = Packer(256, 20, 12), []
    for d in docs[:50]:
        packer.add(d)
        if packer.full:
            rows.append(packer.pop_row())
    state = json.loads(json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v
                                   for k, v in packer.state().items()}))
    fresh = Packer(256, 20, 12)
    fresh.load(state)
    rows += feed_and_drain(fresh, docs[50:])

    def flat(rs):
        return [(d.key, d.ids.tolist(), None if d.next_set is None else d.next_set.tolist(),
                 None if d.self_set is None else d.self_set.tolist()) for r in rs for d in r]

    assert [len(r) for r in rows] == [len(r) for r in straight]
    assert flat(rows) == flat(straight)


def direct_layout(rows, prompt, seq_len, pad_id, drop_ids):
    """The batch written out token by token: slow and obvious."""
    P, S, N, k = len(prompt.prefix), len(prompt.self_suffix), len(prompt.next_suffix), prompt.num_emb_tokens
    R = len(rows)
    out = {"input_ids": [[pad_id] * seq_len for _ in range(R)], "doc": [[-1] * seq_len for _ in range(R)],
           "segment": [[SEG_PAD] * seq_len for _ in range(R)], "position": [[0] * seq_len for _ in range(R)],
           "doc_row": [], "doc_start": [], "text_len": [], "self_emb": [], "next_emb": [], "has_next": [],
           "ebae": [], "ebar": [], "keys": []}
    for r, docs in enumerate(rows):
        col = 0
        for i, d in enumerate(docs):
            text = [int(t) for t in d.ids[:seq_len - prompt.overhead]]
            parts = [(t, SEG_TEXT) for t in list(prompt.prefix) + text]
            parts += [(t, SEG_SELF) for t in prompt.self_suffix] + [(t, SEG_NEXT) for t in prompt.next_suffix]
            out["doc_row"].append(r)
            out["doc_start"].append(col)
            out["text_len"].append(P + len(text))
            self_cols, next_cols = [], []
            for j, (tok, seg) in enumerate(parts):
                out["input_ids"][r][col] = tok
                out["doc"][r][col] = i
                out["segment"][r][col] = seg
                out["position"][r][col] = j - S if seg == SEG_NEXT else j  # NEXT restarts where SELF starts
                (self_cols if seg == SEG_SELF else next_cols if seg == SEG_NEXT else []).append(r * seq_len + col)
                col += 1
            out["self_emb"].append(self_cols[-k:])
            out["next_emb"].append(next_cols[-k:])
            out["has_next"].append(d.next_set is not None)
            out["ebae"].append(sorted({t for t in text if t not in drop_ids}))
            nxt = [] if d.next_set is None else d.next_set.tolist()
            out["ebar"].append(sorted({t for t in nxt if t not in drop_ids}))
            out["keys"].append(d.key)
        assert col <= seq_len
    return out


@pytest.mark.parametrize("last_chunks_only", [False, True])
def test_layout_matches_direct_construction(wiki_docs, prompt_and_tok, last_chunks_only):
    prompt, tok = prompt_and_tok
    seq_len = 160  # shorter than many passages: truncation is part of the layout
    docs = [as_doc(d) for d in wiki_docs[:40]] + synthetic(20, 30, seed=3)
    if last_chunks_only:  # no document has an EBAR target: empty sets throughout
        docs = [Doc(d.key, d.ids, None) for d in docs]
    rows = pack_all(docs, seq_len, prompt.overhead, 8)
    drop = (0, 1, 2, 3)
    batch = build_batch(rows, prompt, seq_len, tok.pad_token_id, drop)
    want = direct_layout(rows, prompt, seq_len, tok.pad_token_id, drop)
    assert any(len(d.ids) > seq_len - prompt.overhead for r in rows for d in r)
    for name in ("input_ids", "doc", "segment", "position", "doc_row", "doc_start", "text_len",
                 "self_emb", "next_emb", "has_next"):
        assert getattr(batch, name).tolist() == want[name], name
    assert batch.keys == want["keys"]
    for ids, off, sets in ((batch.ebae_ids, batch.ebae_offsets, want["ebae"]),
                           (batch.ebar_ids, batch.ebar_offsets, want["ebar"])):
        assert [ids[off[i]:off[i + 1]].tolist() for i in range(len(sets))] == sets
    assert batch.input_ids.dtype == torch.int64 and batch.segment.dtype == torch.int8
