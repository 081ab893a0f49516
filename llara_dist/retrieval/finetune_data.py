"""Fine-tuning data: `{"query", "pos": [...], "neg": [...]}` JSON lines to query/passage groups.

    examples = read_examples("train.jsonl", group_size=8)        # errors name file:line
    loader = GroupLoader(examples, tokenizer, prompt, cfg.finetune, plan, rank, pad_id)
    for batch in loader: ...     # this rank's micro-batches, forever (epoch after epoch)

The order is a permutation of the examples per (seed, epoch). Global example n (the
n-th one consumed since the start) is example perm_epoch[n % N] with epoch n // N; its
positive and its group_size - 1 hard negatives are drawn by a generator seeded with
(seed, epoch, example), so a group does not depend on the number of ranks. Micro-step
a of a step gives rank r the examples [a x world + r] x micro_batch + [0, micro_batch)
of the step's global batch: the micro-batches of all ranks at one micro-step form a
contiguous slice, the set of passages that cross-device negatives score against. The
cursor (examples consumed, all ranks) is the loader's whole state.

With finetune.grad_cache_chunk = C > 0 a micro-batch also comes as sub-batches of C texts
(queries, then passages, in the same order), each as long as its own longest text: the
pieces that GradCache (finetune.grad_cache_backward) runs through the model one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llara_dist.data.batch import PackedBatch, build_batch
from llara_dist.data.shards import Doc
from llara_dist.errors import UserError
from llara_dist.textfiles import read_json_lines


@dataclass(frozen=True)
class Example:
    query: str
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    key: str  # "file:line", for the ledger and error messages
    line: int  # its line in the file


def read_examples(path: str | Path, group_size: int) -> list[Example]:
    """Read and check every line; a bad one raises ValueError naming file:line and the reason."""
    path = Path(path)
    out = []
    for n, rec in read_json_lines(path, "fine-tuning data file"):
        where = f"{path}:{n}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object with query, pos, neg")
        query, pos, neg = rec.get("query"), rec.get("pos"), rec.get("neg", [])
        if not isinstance(query, str) or not query.strip():
            raise UserError(f"{where}: 'query' must be a non-empty string")
        for name, texts in (("pos", pos), ("neg", neg)):
            if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
                raise UserError(f"{where}: {name!r} must be a list of non-empty strings")
        if not pos:
            raise UserError(f"{where}: 'pos' is empty (a query needs a positive passage)")
        if group_size > 1 and not neg:
            raise UserError(f"{where}: 'neg' is empty but group_size {group_size} needs hard negatives")
        out.append(Example(query, tuple(pos), tuple(neg), f"{path.name}:{n}", n))
    if not out:
        raise UserError(f"{path}: no examples")
    return out


@dataclass
class GroupBatch:
    """One micro-batch: M queries and their M x G passages (each group: positive first)."""

    queries: PackedBatch | None  # M documents, one per row (None: in query_chunks instead)
    passages: PackedBatch | None  # M x G documents, one per row, group by group (None: in passage_chunks)
    keys: list[str]  # the examples' "file:line"
    # finetune.grad_cache_chunk > 0: the queries and passages in sub-batches of that many texts instead
    query_chunks: list[PackedBatch] = field(default_factory=list)
    passage_chunks: list[PackedBatch] = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        return sum(c.num_docs for c in self.query_chunks) if self.query_chunks else self.queries.num_docs

    @property
    def num_passages(self) -> int:
        return sum(c.num_docs for c in self.passage_chunks) if self.passage_chunks else self.passages.num_docs

    @property
    def num_docs(self) -> int:
        return self.num_queries + self.num_passages


class GroupLoader:
    def __init__(self, examples: list[Example], tokenizer, prompt, cfg, plan, rank: int, pad_id: int):
        self.examples, self.tokenizer, self.prompt, self.cfg = examples, tokenizer, prompt, cfg
        self.plan, self.rank, self.pad_id = plan, rank, pad_id
        self.consumed = 0  # examples consumed by all ranks; advanced a whole step at a time
        self._perm: tuple[int, np.ndarray] | None = None

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.cfg.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["examples"]) != (self.cfg.seed, len(self.examples)):
            raise UserError(f"the data cursor was saved with seed {state['seed']} over {state['examples']} "
                             f"examples; this run has seed {self.cfg.seed} over {len(self.examples)}: "
                             "the order would differ, so resuming is refused (use a new run_dir)")
        self.consumed = state["consumed"]

    def __iter__(self):
        M, W = self.plan.micro_batch, self.plan.world
        while True:
            start = self.consumed
            self.consumed += self.plan.global_batch  # the step's micro-batches are all fetched before a save
            for a in range(self.plan.grad_accum):
                first = start + (a * W + self.rank) * M
                yield self.batch(range(first, first + M))

    def group(self, n: int) -> tuple[Example, list[str]]:
        """Global example n: the example and its passages (positive, then sampled negatives)."""
        N = len(self.examples)
        epoch = n // N
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.cfg.seed, epoch]).permutation(N))
        index = int(self._perm[1][n % N])
        ex = self.examples[index]
        rng = np.random.default_rng([self.cfg.seed, epoch, index])
        pos = ex.pos[rng.integers(len(ex.pos))]
        k = self.cfg.group_size - 1
        picks = rng.choice(len(ex.neg), size=k, replace=len(ex.neg) < k) if k else []
        return ex, [pos, *(ex.neg[i] for i in picks)]

    def batch(self, numbers) -> GroupBatch:
        groups = [self.group(n) for n in numbers]
        queries = self._rows([ex.query for ex, _ in groups], self.cfg.query_max_len)
        passages = self._rows([p for _, ps in groups for p in ps], self.cfg.passage_max_len)
        keys, chunk = [ex.key for ex, _ in groups], self.cfg.grad_cache_chunk
        if not chunk:
            return GroupBatch(self._pack(queries), self._pack(passages), keys)
        return GroupBatch(None, None, keys, [self._pack(queries[i:i + chunk]) for i in range(0, len(queries), chunk)],
                          [self._pack(passages[i:i + chunk]) for i in range(0, len(passages), chunk)])

    def _rows(self, texts: list[str], max_len: int) -> list[list[Doc]]:
        """One text per row (as embed.encode lays them out), cut to max_len tokens."""
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [[Doc(f"t{i}", np.asarray(x[:max_len], np.int64), None)] for i, x in enumerate(ids)]

    def _pack(self, rows: list[list[Doc]]) -> PackedBatch:
        """The rows as long as the longest of them."""
        seq_len = self.prompt.overhead + max(len(r[0].ids) for r in rows)
        return build_batch(rows, self.prompt, seq_len, self.pad_id)
