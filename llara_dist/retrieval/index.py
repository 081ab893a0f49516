"""Inner-product search over embedding shards with FAISS: exact, streaming, and approximate (IVF).

`exact_search` streams shards (arrays of passage vectors, in corpus order) through one
`IndexFlatIP`, one shard at a time, and keeps a running top-k per query: memory holds one shard
(and its copy in the index), never the corpus. Results are ordered by score, then by the lower
global row index, so equal scores always come out the same way whatever the shard sizes.

`build_ivf` builds an approximate IVF-Flat index for corpora too large to scan per query, and
measures its recall@k against the exact top-k on sample queries while the shards stream past
(`recall_against_exact`), so a poor `nlist`/`nprobe` shows at build time, not in the metrics.

`build_pq` and `rerank` are the approximate search for corpora whose vectors do not fit in memory:
4-bit product-quantization codes (FAISS fast scan, optionally under IVF lists) held in memory
propose a pool of candidates per query, and their exact scores, computed from the float16 shards
streamed once more, pick the top-k. `FolderIndex` keeps such an index beside an embedding-shard
folder (`index.faiss` and its manifest `index.json`, which names the shards' sha256), reuses it
while the shards are unchanged and rebuilds it when they are not. It searches the queries in
blocks of a bounded queries x pool, so that memory does not grow with the number of queries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from llara_dist.errors import UserError
from llara_dist.quiet import verbose
from llara_dist.retrieval import embeddings

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


def add_shards(index, shards, dim: int, train_rows: int, train, exact: ExactTopK | None) -> None:
    """Add shards to an untrained FAISS index one at a time: the first `train_rows` vectors are held
    until `train(held)` has trained it on them, then added, so memory holds a shard (and the training
    rows) at most. `exact`: fed the same shards for the recall check at build, or None."""
    held: list[np.ndarray] = []  # shards read before the index could be trained
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
        train(held)
        for h in held:
            index.add(h)


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

    def train(vectors: list[np.ndarray]) -> None:
        pool = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
        if len(pool) < nlist:
            raise UserError(f"{len(pool)} vectors cannot train {nlist} IVF lists: lower nlist "
                            f"(about 4 x sqrt(rows) is usual)")
        if len(pool) > train_rows:
            pool = pool[np.random.default_rng(seed).choice(len(pool), train_rows, replace=False)]
        index.train(pool)

    add_shards(index, shards, dim, train_rows, train, exact)
    built = ApproximateIndex(index, min(nprobe, nlist), None, check_k)
    if exact is not None:
        _, approx_ids = built.search(exact.queries, check_k)
        built.recall = recall_against_exact(approx_ids, exact.result()[1])
    return built


# -- approximate search: compressed codes propose, exact scores decide --------------------------

@dataclass(frozen=True)
class PQSettings:
    """What an approximate index is built with (and must match to be reused).

    m: sub-quantizers of 4 bits each, so m/2 bytes a vector; dim/m dimensions each. Structureless
    data needs about dim/2 (2 dimensions a code: 4096-d random unit vectors at m=1024 reach only
    about 0.73 recall@100 in a pool of 1,000 of 100k, at m=2048 0.97).
    nlist: IVF lists over the codes (1: none, the codes of every vector are scanned, which is
    what data without cluster structure needs); nprobe lists are scanned per query.
    train_rows: vectors sampled from the leading shards to train on (default max(8192, 64 x nlist)).
    """

    m: int
    nlist: int = 1
    train_rows: int | None = None
    seed: int = 1234

    def factory(self, dim: int) -> str:
        if self.m < 1 or dim % self.m:
            raise UserError(f"{self.m} sub-quantizers do not divide the dimension {dim}: pick a divisor "
                            f"(default {default_pq_m(dim)})")
        if self.nlist < 1:
            raise UserError(f"nlist must be at least 1, got {self.nlist}")
        codes = f"PQ{self.m}x4fs"
        return codes if self.nlist == 1 else f"IVF{self.nlist},{codes}"

    def rows_to_train(self) -> int:
        return self.train_rows or max(8192, 64 * self.nlist)


def default_pq_m(dim: int) -> int:
    """2 dimensions a 4-bit code where the dimension is even (see PQSettings)."""
    return dim // 2 if dim % 2 == 0 else dim


@contextmanager
def _one_thread():
    """FAISS trains a product quantizer one tiny k-means per sub-quantizer (16 centroids of 2
    dimensions): threads spend more on meeting each other than on the work, badly so on a loaded
    machine (measured: 128 s with 2 threads against 21 s with 1 on the same sample)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def build_pq(shards: Iterable[np.ndarray], dim: int, settings: PQSettings, check_queries: np.ndarray | None = None,
             check_k: int = 100) -> tuple[faiss.Index, ExactTopK | None]:
    """A product-quantization index (inner product, 4-bit fast-scan codes) over shards streamed once,
    in corpus order: it trains on `settings.rows_to_train()` vectors sampled from the leading shards
    (held until then), then adds each shard. With `check_queries`, their exact top-`check_k` is kept
    as the shards pass (returned, for `recall_against_exact` once the queries are re-ranked)."""
    index = faiss.index_factory(dim, settings.factory(dim), faiss.METRIC_INNER_PRODUCT)
    codes = index  # the fast-scan index that holds the product quantizer: itself, or the IVF's
    if settings.nlist > 1:
        faiss.extract_index_ivf(index).cp.seed = settings.seed
        codes = faiss.downcast_index(faiss.extract_index_ivf(index))  # a view, `index` owns it
    if not verbose():
        # FAISS warns on stderr, once per sub-quantizer, when a 16-centroid k-means gets fewer than
        # 39 points a centroid: a small corpus has no more to give, so a line each is only noise.
        codes.pq.cp.min_points_per_centroid = 1
    train_rows = settings.rows_to_train()
    exact = ExactTopK(check_queries, check_k) if check_queries is not None else None

    def train(vectors: list[np.ndarray]) -> None:
        pool = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
        least = max(16, settings.nlist)  # 16 centroids per sub-quantizer
        if len(pool) < least:
            raise UserError(f"{len(pool)} vectors cannot train an index of {settings.nlist} lists and "
                            f"16-centroid codes: it needs at least {least}")
        if len(pool) > train_rows:
            pool = pool[np.random.default_rng(settings.seed).choice(len(pool), train_rows, replace=False)]
        with _one_thread():
            index.train(pool)

    add_shards(index, shards, dim, train_rows, train, exact)
    return index, exact


def pq_candidates(index: faiss.Index, queries: np.ndarray, pool: int, nprobe: int = 16) -> np.ndarray:
    """Global row indices [Q, pool'] of each query's best `pool` rows by the codes' scores
    (pool' = min(pool, rows); -1 where IVF probing reached fewer)."""
    if pool < 1:
        raise UserError(f"the candidate pool must hold at least 1 row, got {pool}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    _, ids = index.search(_as_float32(queries, "queries", index.d), min(pool, max(1, index.ntotal)))
    return ids


def rerank(queries: np.ndarray, candidates: np.ndarray, shards: Iterable[np.ndarray],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k among each query's candidates (global row indices, -1 for none), their
    scores computed from the shards streamed once in corpus order (one shard in memory):
    (scores float32 [Q, k'], rows int64 [Q, k']), k' = min(k, pool), best first, equal scores by
    the lower row; -1 rows (score -inf) where a query had fewer than k candidates."""
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    queries = _as_float32(queries, "queries")
    candidates = np.asarray(candidates, np.int64)
    if candidates.shape[0] != queries.shape[0]:
        raise ValueError(f"{candidates.shape[0]} candidate rows for {queries.shape[0]} queries")
    # Each query's candidates in row order, so that a shard's are one run of columns per query.
    order = np.argsort(candidates, axis=1, kind="stable")
    by_row = np.take_along_axis(candidates, order, axis=1)
    by_row_scores = np.full(candidates.shape, -np.inf, np.float32)
    dim, start, n = queries.shape[1], 0, 0
    search = _RowSearch(by_row)
    for shard in shards:  # no enumerate(), as in exact_search
        shard = _as_float32(shard, f"shard {n}", dim)
        n, end = n + 1, start + len(shard)
        first = search.below(start)
        counts = search.below(end) - first
        width = int(counts.max()) if len(counts) else 0
        if width:
            columns = first[:, None] + np.arange(width)
            inside = np.arange(width) < counts[:, None]
            columns = np.where(inside, columns, 0)
            local = np.where(inside, np.take_along_axis(by_row, columns, axis=1) - start, -1)
            part = np.empty(local.shape, np.float32)
            # queries[i] . shard[local[i, j]] for every j, skipping -1: no gathered copy of the rows
            faiss.fvec_inner_products_by_idx(faiss.swig_ptr(part), faiss.swig_ptr(queries), faiss.swig_ptr(shard),
                                             faiss.swig_ptr(np.ascontiguousarray(local)), dim, len(queries), width)
            rows_of = np.broadcast_to(np.arange(len(queries))[:, None], local.shape)
            by_row_scores[rows_of[inside], columns[inside]] = part[inside]
        start = end
        del shard
    del search, by_row  # the arrays of queries x pool held at once stay few (see BLOCK_ENTRIES)
    if (candidates >= start).any():
        raise UserError(f"candidates name row {int(candidates.max())} of a corpus of {start} rows: the index "
                        "was built over other shards")
    scores = np.empty_like(by_row_scores)
    np.put_along_axis(scores, order, by_row_scores, axis=1)
    del by_row_scores, order
    rows = np.where(np.isfinite(scores), candidates, -1)
    # -1 rows sort last: score -inf, and a large id so that real rows with -inf come first
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -scores), axis=1)
    keep = order[:, :min(k, candidates.shape[1])]
    return np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)


class _RowSearch:
    """Per row of a row-wise sorted matrix of rows >= -1: how many entries lie below a value. Each
    row is offset past the one before, so the whole matrix is one sorted array to search at once."""

    def __init__(self, sorted_rows: np.ndarray):
        self.span = int(sorted_rows.max(initial=-1)) + 2
        self.offsets = np.arange(len(sorted_rows), dtype=np.int64) * self.span
        self.keys = sorted_rows + 1  # then offset in place: one array of the matrix's size, not three
        self.keys += self.offsets[:, None]
        self.keys = self.keys.ravel()
        self.width = sorted_rows.shape[1]

    def below(self, value: int) -> np.ndarray:
        value = min(max(value, -1), self.span - 1)  # within this row's keys, not a neighbour's
        return np.searchsorted(self.keys, self.offsets + value + 1) - self.offsets // self.span * self.width


# -- an approximate index kept beside its embedding shards ----------------------------------------

INDEX_FILE = "index.faiss"
INDEX_MANIFEST = "index.json"
INDEX_FORMAT = "llara-dist pq index"


class _HashedShards:
    """The vectors of an embedding folder's shards, in order, hashing ids and vectors as they pass
    (sha256), and collecting the ids."""

    def __init__(self, folder: Path):
        self.folder, self.ids = folder, []
        self._digest = hashlib.sha256()

    def __iter__(self) -> Iterator[np.ndarray]:
        for ids, vectors in embeddings.iter_shards(self.folder):
            self.ids.extend(ids)
            self._digest.update("".join(f"{i}\n" for i in ids).encode("utf-8"))
            self._digest.update(memoryview(np.ascontiguousarray(vectors)).cast("B"))
            yield vectors
            del vectors

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _feeding(shards: Iterable[np.ndarray], exact: ExactTopK | None) -> Iterator[np.ndarray]:
    """The shards, each also added to `exact` (when not None) as it passes."""
    n = 0
    for shard in shards:  # no enumerate(), as in exact_search
        if exact is not None:
            exact.add(shard, f"shard {n}")
        n += 1
        yield shard
        del shard


# Queries x candidates searched at once: the candidates' search and rerank hold a few arrays of that
# shape at a time (about 48 bytes an entry at the peak, measured), so 2^25 entries bound them to
# about 1.6 GB whatever the number of queries.
BLOCK_ENTRIES = 1 << 25


def query_blocks(queries: int, pool: int, entries: int = BLOCK_ENTRIES) -> list[tuple[int, int]]:
    """[start, end) ranges of the queries, each block's queries x pool within `entries` (one query at least)."""
    size = max(1, entries // max(1, pool))
    return [(start, min(start + size, queries)) for start in range(0, queries, size)]


def _faiss_error(error: RuntimeError) -> str:
    """FAISS's reason without the C++ function, source line and failed assertion it prefixes."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return re.sub(r"^Error in .*? at \S+: (Error: )?('.*?' failed: )?", "", text)


@dataclass
class FolderSearch:
    """What `FolderIndex.search` found and how: rows index `doc_ids`."""

    scores: np.ndarray
    rows: np.ndarray
    doc_ids: list[str]
    report: dict


class FolderIndex:
    """The approximate index of an embedding-shard folder (`encode --out-dir`), kept in the folder:

        DIR/index.faiss   the FAISS index (codes of every vector, in corpus order)
        DIR/index.json    its settings, the shards' manifest, the shards' sha256 (ids and vectors,
                          in order), and a recall@k measured on check queries with the pool and
                          nprobe it was measured at (at build, or on a later search if the build's was lost)

    `search` reuses the saved index when its settings and the shards' manifest are the same, builds
    (and saves) it otherwise, and checks the shards' sha256 while re-ranking reads them: an index
    over changed shards is rebuilt and the search done again. Building streams the shards once
    (training on a sample of the leading ones, then adding shard by shard) and keeps the exact
    top-k of a sample of the queries, whose recall@k is measured on the search that follows. A
    search of the saved index with other k, pool or nprobe measures the recall again on its own
    sample, its exact top-k kept while the re-ranking streams the shards (none without check queries:
    the report then says why, never pairing a figure with settings it was not measured at).
    """

    def __init__(self, folder: str | Path, settings: PQSettings, log=None):
        self.folder = Path(folder)
        self.settings = settings
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        manifest = embeddings.read_manifest(self.folder)
        if manifest is None or "count" not in manifest:
            list(embeddings.iter_shards(self.folder))  # its refusal names what is missing
        self.shards_manifest = manifest

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_FILE

    @property
    def manifest_path(self) -> Path:
        return self.folder / INDEX_MANIFEST

    def saved(self) -> dict | None:
        if not self.manifest_path.is_file() or not self.index_path.is_file():
            return None
        try:
            saved = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return saved if isinstance(saved, dict) and saved.get("format") == INDEX_FORMAT else None

    def _write_manifest(self, saved: dict) -> None:
        text = json.dumps(saved, indent=2, sort_keys=True) + "\n"
        embeddings.write_renamed(self.manifest_path, lambda f: f.write(text.encode("utf-8")),
                                  f"{INDEX_MANIFEST}.{os.getpid()}{embeddings.TMP_SUFFIX}")

    def _write_index(self, index: faiss.Index) -> None:
        def write(f) -> None:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))

        embeddings.write_renamed(self.index_path, write, f"{INDEX_FILE}.{os.getpid()}{embeddings.TMP_SUFFIX}")

    def _read_index(self, saved: dict) -> tuple[faiss.Index | None, str | None]:
        """(the saved index, None), or (None, why it cannot be read)."""
        try:
            index = faiss.read_index(str(self.index_path))
        except RuntimeError as error:  # a truncated or overwritten file
            return None, f"unreadable: {_faiss_error(error)}"
        if index.ntotal != saved.get("rows"):
            return None, f"holds {index.ntotal} rows, its {INDEX_MANIFEST} says {saved.get('rows')}"
        return index, None

    def stale_reason(self, saved: dict | None) -> str | None:
        """Why the saved index cannot serve (None when it can)."""
        if saved is None:
            return f"no {INDEX_FILE} with its {INDEX_MANIFEST}"
        if saved.get("settings") != asdict(self.settings):
            return f"built with other settings ({saved.get('settings')} != {asdict(self.settings)})"
        if saved.get("shards") != self.shards_manifest:
            return f"built over other shards (their {_first_difference(saved.get('shards'), self.shards_manifest)})"
        return None

    def search(self, queries: np.ndarray, k: int, pool: int, nprobe: int = 16, check_queries: int = 100,
               rebuild: bool = False, block_entries: int = BLOCK_ENTRIES) -> FolderSearch:
        if pool < k:
            raise UserError(f"a candidate pool of {pool} cannot give the top {k}: re-rank at least k candidates "
                            f"(--rerank {pool} is below --k {k})")
        queries = _as_float32(queries, "queries", self.shards_manifest["dim"])
        saved = None if rebuild else self.saved()
        reason = "asked to rebuild" if rebuild else self.stale_reason(saved)
        report = {"index": str(self.index_path), "factory": self.settings.factory(self.shards_manifest["dim"])}
        sample = np.sort(np.random.default_rng(self.settings.seed).choice(
            len(queries), min(check_queries, len(queries)), replace=False))
        index = exact = None
        if reason is None:
            index, reason = self._read_index(saved)
        if index is not None:
            report |= {"built": False, "build_s": None}
        else:
            self.log(f"{self.index_path}: building ({reason})")
            t0 = time.perf_counter()
            hashed = _HashedShards(self.folder)
            index, exact = build_pq(hashed, self.shards_manifest["dim"], self.settings,
                                    queries[sample] if len(sample) else None, k)
            saved = {"format": INDEX_FORMAT, "settings": asdict(self.settings), "shards": self.shards_manifest,
                     "shards_sha256": hashed.hexdigest(), "rows": int(index.ntotal), "recall": None}
            self.manifest_path.unlink(missing_ok=True)  # an index file without its manifest is never used
            self._write_index(index)
            self._write_manifest(saved)  # usable from now on; the recall is added once measured
            report |= {"built": True, "build_s": round(time.perf_counter() - t0, 3)}
        # The recall is a property of (k, pool, nprobe), not of the index alone: what the saved figure
        # was measured at must be what this search uses, or it is measured again on the check queries,
        # their exact top-k kept while the first block's re-ranking streams the shards.
        measured_at = {"k": min(k, pool, saved["rows"]), "pool": min(pool, max(1, saved["rows"])),
                       "nprobe": min(nprobe, self.settings.nlist)}
        recorded = saved.get("recall")
        complete = isinstance(recorded, dict) and all(key in recorded for key in (*measured_at, "value"))
        reusable = complete and all(recorded[key] == v for key, v in measured_at.items())
        if exact is None and not reusable and len(sample):
            exact = ExactTopK(queries[sample], k)
        report |= {"candidates_s": 0.0, "rerank_s": 0.0}
        scores, rows, doc_ids = [], [], []
        # No queries: still one pass over the shards, for their ids and sha256.
        blocks = query_blocks(len(queries), pool, block_entries) or [(0, 0)]
        for n, (start, end) in enumerate(blocks):
            t0 = time.perf_counter()
            candidates = pq_candidates(index, queries[start:end], pool, nprobe)
            if n == len(blocks) - 1:
                index = None  # the codes are not needed while the last block is re-ranked
            report["candidates_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            hashed = _HashedShards(self.folder)
            # A build fed the check queries' exact top-k already; otherwise the first pass does.
            feed = exact if n == 0 and report["built"] is False else None
            block_scores, block_rows = rerank(queries[start:end], candidates, _feeding(hashed, feed), k)
            del candidates
            report["rerank_s"] += time.perf_counter() - t0
            if hashed.hexdigest() != saved["shards_sha256"]:
                if report["built"]:  # built from the shards moments ago
                    raise UserError(f"{self.folder}: the shards changed while the index was built; search again")
                self.log(f"{self.index_path}: built over other shards (their sha256 differs); rebuilding")
                return self.search(queries, k, pool, nprobe, check_queries, rebuild=True, block_entries=block_entries)
            scores.append(block_scores)
            rows.append(block_rows)
            doc_ids = hashed.ids
        report |= {key: round(report[key], 3) for key in ("candidates_s", "rerank_s")}
        scores, rows = np.concatenate(scores), np.concatenate(rows)
        report |= {"recall": None, "pool": pool, "nprobe": measured_at["nprobe"], "blocks": len(blocks)}
        if exact is not None:
            truth = exact.result()[1]
            recall = {"k": int(truth.shape[1]), "pool": measured_at["pool"], "nprobe": measured_at["nprobe"],
                      "queries": len(sample), "value": recall_against_exact(rows[sample, :truth.shape[1]], truth)}
            if report["built"] or not complete:  # the index's first figure (or one lost to a crash)
                saved["recall"] = recall
                self._write_manifest(saved)
            report["recall"] = recall | {"measured": "now"}
            self.log(f"{self.index_path}: recall@{recall['k']} {recall['value']:.4f} against exact search on "
                     f"{len(sample)} of the queries (pool {recall['pool']}, nprobe {recall['nprobe']})")
        elif reusable:
            report["recall"] = recorded | {"measured": "saved"}
        else:
            report["recall_note"] = ("not measured: no check queries, and "
                                     + ("no recall was saved with the index" if not complete else
                                        f"the saved recall@{recorded['k']} {recorded['value']} was measured at pool "
                                        f"{recorded['pool']}, nprobe {recorded['nprobe']}, not at this search's "
                                        f"k {measured_at['k']}, pool {measured_at['pool']}, nprobe "
                                        f"{measured_at['nprobe']}"))
            self.log(f"{self.index_path}: recall {report['recall_note']}")
        return FolderSearch(scores, rows, doc_ids, report)


def _first_difference(a: dict | None, b: dict) -> str:
    a = a or {}
    key = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None)
    return f"{key}: {a.get(key)!r} != {b.get(key)!r}"
