"""The packed batch: the one interface between the data side and the model side.

A batch holds R rows of L tokens. Each row holds whole documents laid out as

    [prefix] TEXT [self_suffix] [next_suffix]     (see prompts.py)

followed by padding. Token i may attend token j iff they are in the same document,
j <= i by column, and not (segment[i] == NEXT and segment[j] == SELF). Position ids
of the NEXT part restart where the SELF part starts, so the NEXT embedding equals
that of a separate pass over `[prefix] TEXT [next_suffix]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from llara_dist.prompts import PromptTokens

SEG_PAD, SEG_TEXT, SEG_SELF, SEG_NEXT = -1, 0, 1, 2


@dataclass
class PackedBatch:
    # per token, [R, L]
    input_ids: torch.Tensor  # int64; pad_id on padding
    doc: torch.Tensor  # int32; document index within its row, -1 on padding
    segment: torch.Tensor  # int8; SEG_TEXT (prefix and text), SEG_SELF, SEG_NEXT, SEG_PAD
    position: torch.Tensor  # int64; position id (0 on padding)
    # per document, D documents in the batch, in row order
    doc_row: torch.Tensor  # [D] int64 row of the document
    doc_start: torch.Tensor  # [D] int64 column of its first token
    text_len: torch.Tensor  # [D] int64 prefix + text tokens
    self_emb: torch.Tensor  # [D, k] int64 flat index (row * L + column) of the SELF embedding tokens
    next_emb: torch.Tensor  # [D, k] int64 flat index of the NEXT embedding tokens
    has_next: torch.Tensor  # [D] bool: the document has an EBAR target
    ebae_ids: torch.Tensor  # [T1] int64 EBAE target sets, concatenated (sorted, unique per document)
    ebae_offsets: torch.Tensor  # [D + 1] int64 document d's set is ebae_ids[off[d]:off[d+1]]
    ebar_ids: torch.Tensor  # [T2] int64 EBAR target sets (empty for documents without a next chunk)
    ebar_offsets: torch.Tensor  # [D + 1] int64
    # [T] int64 flat index of the positions whose next token is an LM target (lm_targets), found
    # here on the CPU: nonzero() on a GPU tensor makes the host wait for the device
    lm_index: torch.Tensor
    # constants of the prompt
    prefix_len: int
    self_len: int
    next_len: int
    keys: list[str] = field(default_factory=list)  # document keys, for the ledger
    # set by the loader: which reader made this batch and its cursor after it
    reader: int = -1
    cursor: dict | None = None
    _host = None  # not a field: the CPU batch that `to` copied this one from

    @property
    def host(self) -> "PackedBatch | None":
        """This batch on the CPU (itself, or the one `to` copied it from; None if it never was there):
        its metadata can be read without waiting for the device."""
        if self._host is not None:
            return self._host
        return self if self.doc.device.type == "cpu" else None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_docs(self) -> int:
        return self.doc_row.shape[0]

    @property
    def num_emb_tokens(self) -> int:
        return self.self_emb.shape[1]

    def real_tokens(self) -> int:
        """Non-padding tokens, prompts included."""
        return int((self.segment != SEG_PAD).sum())

    def text_tokens(self) -> int:
        """Tokens of the documents' text, without prefix and prompts."""
        return int(self.text_len.sum()) - self.prefix_len * self.num_docs

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        out = PackedBatch(**moved)
        out._host = self.host
        return out


def build_batch(rows: list[list], prompt: PromptTokens, seq_len: int, pad_id: int,
                drop_ids: tuple[int, ...] = ()) -> PackedBatch:
    """Lay out rows of documents (each a list of shards.Doc) into a PackedBatch.

    A document's text is cut to `seq_len - prompt.overhead` tokens (the packer counts
    such cuts). EBAE targets are the set prep stored (`Doc.self_set`, under `prep --stop-words`
    or `--self-tokens`: it does not depend on the cut), else the unique ids of the visible text;
    EBAR targets the next chunk's set; ids in `drop_ids` (the tokenizer's special tokens) are dropped.
    `pad_id` fills the slots after a row's documents (tokenizer.pad_id gives it): they belong
    to no document, so no real token attends them and no loss reads them.
    """
    P, S, N = len(prompt.prefix), len(prompt.self_suffix), len(prompt.next_suffix)
    k = prompt.num_emb_tokens
    max_text = seq_len - P - S - N
    prefix = np.asarray(prompt.prefix, dtype=np.int64)
    self_sfx = np.asarray(prompt.self_suffix, dtype=np.int64)
    next_sfx = np.asarray(prompt.next_suffix, dtype=np.int64)
    drop = np.asarray(drop_ids, dtype=np.int64)
    R = len(rows)

    docs = [d for row in rows for d in row]  # batch order: row by row
    texts = [d.ids[:max_text] for d in docs]  # visible text ids
    nexts = [d.next_set if d.next_set is not None else np.zeros(0, np.int32) for d in docs]
    n_per_row = np.fromiter(map(len, rows), dtype=np.int64, count=R)
    doc_row = np.repeat(np.arange(R, dtype=np.int64), n_per_row)  # [D]
    text_len = P + np.fromiter(map(len, texts), dtype=np.int64, count=len(docs))  # [D]
    lens = text_len + S + N  # [D] tokens of each document in its row
    row_used = np.bincount(doc_row, weights=lens, minlength=R).astype(np.int64)  # [R]
    if R and row_used.max() > seq_len:
        r = int(row_used.argmax())
        raise ValueError(f"row {r} needs {row_used[r]} tokens > seq_len {seq_len}")
    # the documents' tokens back to back, then scattered row by row (each row fills from column 0)
    stream = np.concatenate([x for t in texts for x in (prefix, t, self_sfx, next_sfx)]) if docs \
        else np.zeros(0, np.int64)  # [T]
    T = len(stream)
    doc_stream_start = np.cumsum(lens) - lens  # [D]
    row_first_doc = np.cumsum(n_per_row) - n_per_row  # [R]
    doc_start = doc_stream_start - np.repeat(doc_stream_start[row_first_doc[n_per_row > 0]], n_per_row[n_per_row > 0])
    token_doc = np.repeat(np.arange(len(docs), dtype=np.int64), lens)  # [T]
    dest = doc_row[token_doc] * seq_len + doc_start[token_doc] + (np.arange(T) - doc_stream_start[token_doc])
    seg_lens = np.stack([text_len, np.full(len(docs), S), np.full(len(docs), N)], 1).ravel()
    seg = np.repeat(np.tile(np.array([SEG_TEXT, SEG_SELF, SEG_NEXT], np.int8), len(docs)), seg_lens)  # [T]
    # position within the document; the NEXT part restarts where SELF starts
    pos = np.arange(T) - doc_stream_start[token_doc] - S * (seg == SEG_NEXT)

    input_ids = np.full(R * seq_len, pad_id, dtype=np.int64)
    doc = np.full(R * seq_len, -1, dtype=np.int32)
    segment = np.full(R * seq_len, SEG_PAD, dtype=np.int8)
    position = np.zeros(R * seq_len, dtype=np.int64)
    input_ids[dest] = stream
    doc[dest] = token_doc - row_first_doc[doc_row[token_doc]]  # index of the document within its row
    segment[dest] = seg
    position[dest] = pos
    input_ids, doc, segment, position = (a.reshape(R, seq_len) for a in (input_ids, doc, segment, position))
    keys = [d.key for d in docs]
    has_next = [d.next_set is not None for d in docs]

    doc_start_a = doc_start.astype(np.int64)
    text_len_a = text_len
    base = doc_row * seq_len + doc_start_a + text_len_a
    self_emb = base[:, None] + (S - k) + np.arange(k)[None, :]
    next_emb = base[:, None] + S + (N - k) + np.arange(k)[None, :]

    # stored sets are sorted and unique already; sorting them again with the texts costs no more
    ebae_ids, ebae_offsets = _target_sets([t if d.self_set is None else d.self_set for d, t in zip(docs, texts)],
                                          drop)
    ebar_ids, ebar_offsets = _target_sets(nexts, drop, presorted=True)  # prep stored them sorted, unique
    input_ids, doc, segment, position = map(torch.from_numpy, (input_ids, doc, segment, position))
    return PackedBatch(
        input_ids=input_ids,
        doc=doc,
        segment=segment,
        position=position,
        doc_row=torch.from_numpy(doc_row),
        doc_start=torch.from_numpy(doc_start_a),
        text_len=torch.from_numpy(text_len_a),
        self_emb=torch.from_numpy(self_emb.reshape(-1, k)),
        next_emb=torch.from_numpy(next_emb.reshape(-1, k)),
        has_next=torch.as_tensor(has_next, dtype=torch.bool),
        ebae_ids=ebae_ids,
        ebae_offsets=ebae_offsets,
        ebar_ids=ebar_ids,
        ebar_offsets=ebar_offsets,
        lm_index=_lm_targets(doc, segment, position, P).reshape(-1).nonzero().squeeze(1),
        prefix_len=P,
        self_len=S,
        next_len=N,
        keys=keys,
    )


def lm_targets(batch: PackedBatch) -> torch.Tensor:
    """[R, L] bool: position i predicts input_ids[i + 1], a text token (not prefix) of its document."""
    return _lm_targets(batch.doc, batch.segment, batch.position, batch.prefix_len)


def _lm_targets(doc: torch.Tensor, segment: torch.Tensor, position: torch.Tensor, prefix_len: int) -> torch.Tensor:
    nxt = segment[:, 1:] == SEG_TEXT  # [R, L - 1]
    nxt &= doc[:, 1:] == doc[:, :-1]
    nxt &= doc[:, 1:] >= 0
    nxt &= position[:, 1:] >= prefix_len
    return torch.nn.functional.pad(nxt, (0, 1))


def _target_sets(arrays: list[np.ndarray], drop: np.ndarray,
                 presorted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document sorted unique ids not in `drop`, concatenated, and their [D + 1] offsets.

    One np.unique over (document, id) pairs for the whole batch: per-document calls cost
    ~20 us each, most of the loader's time with 100-word passages.
    """
    lens = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    owner = np.repeat(np.arange(len(arrays), dtype=np.int64), lens)
    flat = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    if presorted:
        ids = flat
    else:
        pairs = np.sort(owner << 32 | flat)  # ids are int32 >= 0: sorted by document, then id
        first = np.ones(len(pairs), dtype=bool)
        first[1:] = pairs[1:] != pairs[:-1]
        pairs = pairs[first]  # unique; np.unique hashes, slower here
        ids, owner = pairs & 0xFFFFFFFF, pairs >> 32
    if drop.size:
        keep = ~np.isin(ids, drop)
        ids, owner = ids[keep], owner[keep]
    counts = np.bincount(owner, minlength=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(offsets)
