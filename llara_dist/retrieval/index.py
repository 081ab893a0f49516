"""Inner-product search over embedding shards with FAISS: exact, streaming, and approximate (IVF).

`exact_search` streams shards (arrays of passage vectors, in corpus order) through one
`IndexFlatIP`, one shard at a time, and keeps a running top-k per query: memory holds one shard
(and its copy in the index), never the corpus. Results are ordered by score, then by the lower
global row index, so equal scores always come out the same way whatever the shard sizes.

`build_ivf` builds an approximate IVF-Flat index for corpora too large to scan per query, and
measures its recall@k against the exact top-k on sample queries while the shards stream past
(`recall_against_exact`), so a poor `nlist`/`nprobe` shows at build time, not in the metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from llara_dist.errors import UserError

# Scores recomputed at once when a shard's top-k boundary falls inside a run of equal scores
# (query rows x shard rows, 12 bytes each with the ids): bounds that extra memory to about 50 MiB.
_TIE_BLOCK_ELEMENTS = 1 << 22


def _as_float32(vectors: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 [n, dim] view, or a copy (float16 shards are converted here)."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise UserError(f"{what}: expected a 2-d array [rows, dim], got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise UserError(f"{what}: vectors of dimension {array.shape[1]}, expected {dim} (the queries')")
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{what}: expected floating-point vectors, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row: column order by score descending, then global id ascending."""
    return np.lexsort((ids, -scores), axis=1)


class ExactTopK:
    """The running exact top-k of fixed queries over shards added in corpus order."""

    def __init__(self, queries: np.ndarray, k: int):
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        self.queries = _as_float32(queries, "queries")
        self.k = k
        self.rows_seen = 0
        self.scores = np.zeros((len(self.queries), 0), np.float32)
        self.ids = np.zeros((len(self.queries), 0), np.int64)
        self._index = faiss.IndexFlatIP(self.queries.shape[1])

    def add(self, shard: np.ndarray, name: str = "shard") -> None:
        shard = _as_float32(shard, name, self.queries.shape[1])
        n = len(shard)
        if n == 0:
            return
        self._index.reset()
        self._index.add(shard)
        # One more than k: when the (k+1)-th score equals the k-th, FAISS may have chosen among
        # equal scores at the boundary arbitrarily (its reservoir selection does for k >= 100), so
        # those rows are recomputed whole and cut by the (score, lower index) rule.
        want = min(self.k + 1, n)
        scores, ids = self._index.search(self.queries, want)
        if want > self.k:
            tied = np.flatnonzero(scores[:, self.k - 1] == scores[:, self.k])
            scores, ids = scores[:, :self.k].copy(), ids[:, :self.k].copy()
            if len(tied):
                self._resolve_ties(n, tied, scores, ids)
        self._index.reset()
        ids += self.rows_seen
        self.rows_seen += n
        scores = np.concatenate([self.scores, scores], axis=1)
        ids = np.concatenate([self.ids, ids], axis=1)
        keep = _order(scores, ids)[:, :self.k]
        self.scores = np.take_along_axis(scores, keep, axis=1)
        self.ids = np.take_along_axis(ids, keep, axis=1)

    def _resolve_ties(self, n: int, rows: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        """Rewrite `rows` of the shard's top-k from all `n` of its scores, cut by (score, lower index)."""
        block = max(1, _TIE_BLOCK_ELEMENTS // n)
        for start in range(0, len(rows), block):
            part = rows[start:start + block]
            all_scores, all_ids = self._index.search(self.queries[part], n)  # every row of the shard
            keep = _order(all_scores, all_ids)[:, :self.k]
            scores[part] = np.take_along_axis(all_scores, keep, axis=1)
            ids[part] = np.take_along_axis(all_ids, keep, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k'], global row indices [Q, k']), k' = min(k, rows seen), best first."""
        return self.scores, self.ids


def exact_search(queries: np.ndarray, shards: Iterable[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over shards taken one at a time (a list, or a generator that
    loads each from disk): queries [Q, H] -> (scores float32 [Q, k'], global row indices int64
    [Q, k']), k' = min(k, total rows), best first, equal scores by the lower index."""
    top = ExactTopK(queries, k)
    # No enumerate(): its reused result tuple would hold each shard until the next one is loaded.
    n = 0
    for shard in shards:
        top.add(shard, f"shard {n}")
        del shard  # before the generator loads the next one
        n += 1
    return top.result()


def recall_against_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Recall@k of an approximate search against the exact one on the same queries: the mean
    fraction of each query's exact top-k that the approximate top-k also holds."""
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"{approx_ids.shape[0]} approximate rows against {exact_ids.shape[0]} exact ones")
    if exact_ids.size == 0:
        return 1.0
    found = [len(set(a[a >= 0].tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(found))


@dataclass
class ApproximateIndex:
    """An IVF-Flat inner-product index and the recall it reached at build time."""

    index: faiss.IndexIVFFlat
    nprobe: int
    recall: float | None  # recall@recall_k against exact on the check queries, None without them
    recall_k: int

    @property
    def rows(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], row indices [Q, k]); -1 where fewer than k rows were reached."""
        self.index.nprobe = self.nprobe
        return self.index.search(_as_float32(queries, "queries", self.index.d), k)


def build_ivf(shards: Iterable[np.ndarray], dim: int, nlist: int, nprobe: int = 16,
              train_rows: int | None = None, check_queries: np.ndarray | None = None,
              check_k: int = 10, seed: int = 1234) -> ApproximateIndex:
    """An IVF-Flat index (inner product) over shards streamed once, in corpus order.

    The coarse quantizer trains on the first `train_rows` vectors (default 64 per list) sampled
    from the leading shards, which are held until training is done; every shard is then added.
    With `check_queries`, their exact top-`check_k` is kept while the shards stream past and the
    built index's recall@`check_k` against it is returned in `.recall`.
    """
    if nlist < 1 or nprobe < 1:
        raise UserError(f"nlist and nprobe must be at least 1, got nlist={nlist}, nprobe={nprobe}")
    train_rows = train_rows or 64 * nlist
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    exact = ExactTopK(check_queries, check_k) if check_queries is not None else None
    held: list[np.ndarray] = []  # shards read before the quantizer could be trained

    def train(vectors: list[np.ndarray]) -> None:
        pool = np.concatenate(vectors)
        if len(pool) < nlist:
            raise UserError(f"{len(pool)} vectors cannot train {nlist} IVF lists: lower nlist "
                            f"(about 4 x sqrt(rows) is usual)")
        if len(pool) > train_rows:
            pool = pool[np.random.default_rng(seed).choice(len(pool), train_rows, replace=False)]
        index.train(pool)

    n = 0
    for shard in shards:  # no enumerate(), as in exact_search
        name, n = f"shard {n}", n + 1
        shard = _as_float32(shard, name, dim)
        if exact is not None:
            exact.add(shard, name)
        if index.is_trained:
            index.add(shard)
        else:
            held.append(shard)
            if sum(map(len, held)) >= train_rows:
                train(held)
                for h in held:
                    index.add(h)
                held = []
        del shard  # before the generator loads the next one
    if not index.is_trained:
        train(held or [np.zeros((0, dim), np.float32)])
        for h in held:
            index.add(h)
    built = ApproximateIndex(index, min(nprobe, nlist), None, check_k)
    if exact is not None:
        _, approx_ids = built.search(exact.queries, check_k)
        built.recall = recall_against_exact(approx_ids, exact.result()[1])
    return built
