"""Search at corpus scale: exact top-k against the approximate index, on random unit vectors.

    python bench/search_bench.py                       # 2M passages x 4096-d, 1,000 queries, top-100
    python bench/search_bench.py --docs 3000 --dim 32 --queries 20 --k 10 --rerank 300   # a smoke run

Writes --docs random unit vectors (float16, seeded, shard by shard, never all in memory) as an
embedding-shard folder as `encode --out-dir` writes it, and --queries more as the query folder; then
runs `llara-dist search` three times, each in a child process whose peak resident memory (VmHWM,
from the kernel's rusage of that child) and wall time are taken:

  exact       --index exact: every passage scored, shard by shard
  pq_build    --index pq --rebuild-index: the codes trained, added shard by shard, saved; then the
              search (candidates from the codes, exact re-ranking from the shards)
  pq_reuse    --index pq again: the saved index loaded and searched (and once more for each of
              --more-pools, with that many candidates re-ranked)

Recall@k of each approximate run against the exact run is computed here from the TREC runs the
children wrote, over every query. Prints one JSON line; the folder is deleted unless --keep.

Random unit vectors in high dimension have no cluster structure: every passage is about as far
from a query as any other, IVF lists do not narrow the search, and each code's error is large
against the small spread of the scores. That is the hardest case for an approximate index.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llara_dist.retrieval import embeddings  # noqa: E402


def random_shards(count: int, dim: int, shard_docs: int, seed: int, prefix: str):
    """(ids, float16 unit vectors) shard by shard; shard i draws from its own seeded generator."""
    for index, start in enumerate(range(0, count, shard_docs)):
        n = min(shard_docs, count - start)
        rng = np.random.default_rng([seed, index])
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield [f"{prefix}{start + i}" for i in range(n)], vectors.astype(np.float16)


def write_random(folder: Path, kind: str, count: int, dim: int, shard_docs: int, seed: int) -> None:
    """The folder, unless it already holds these vectors (a rerun after a failure skips writing)."""
    identity = {"model": "random", "preset": "none", "kind": kind, "max_tokens": 0, "shard_docs": shard_docs,
                "input": "random unit vectors", "input_sha256": f"seed {seed}, {count} x {dim}"}
    manifest = embeddings.read_manifest(folder) if folder.is_dir() else None
    if manifest is not None and manifest.get("count") == count and not embeddings.identity_differences(
            manifest, {**identity, "format": embeddings.FORMAT, "version": embeddings.VERSION}):
        return
    if folder.exists():
        shutil.rmtree(folder)
    embeddings.write_folder(folder, random_shards(count, dim, shard_docs, seed, kind[0]), identity)


def run_child(argv: list[str]) -> dict:
    """`llara-dist ARGV` in a child process: its JSON line, wall time, and peak resident memory."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "llara_dist", *argv], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"llara-dist {' '.join(argv)} exited {child.returncode}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss: KiB
            "output": json.loads(out.strip().splitlines()[-1])}


def read_run(path: Path) -> dict[str, list[str]]:
    run: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            qid, _, doc, _, _, _ = line.split()
            run.setdefault(qid, []).append(doc)
    return run


def recall(approx: dict[str, list[str]], exact: dict[str, list[str]]) -> float:
    return float(np.mean([len(set(approx.get(q, [])) & set(docs)) / len(docs) for q, docs in exact.items()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--shard-docs", type=int, default=10000)
    parser.add_argument("--rerank", type=int, default=20000, help="candidates re-ranked per query")
    parser.add_argument("--more-pools", type=int, nargs="*", default=[],
                        help="further runs of the saved index with these pool sizes (pq_reuse_poolN)")
    parser.add_argument("--pq-m", type=int, help="sub-quantizers (default: the search's, dimension / 2)")
    parser.add_argument("--nlist", type=int, default=1)
    parser.add_argument("--check-queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default="/tmp/llara_search_bench", help="work folder (deleted unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the vectors and runs")
    args = parser.parse_args()

    work = Path(args.dir)
    passages, queries = work / "corpus", work / "queries"
    start = time.perf_counter()
    write_random(passages, "passage", args.docs, args.dim, args.shard_docs, args.seed)
    write_random(queries, "query", args.queries, args.dim, args.shard_docs, args.seed + 1)
    written = time.perf_counter() - start
    common = ["search", "--passages", str(passages), "--queries", str(queries), "--k", str(args.k)]
    pq = ["--index", "pq", "--rerank", str(args.rerank), "--nlist", str(args.nlist), "--check-queries",
          str(args.check_queries), *(["--pq-m", str(args.pq_m)] if args.pq_m else [])]
    result = {"docs": args.docs, "dim": args.dim, "queries": args.queries, "k": args.k,
              "shard_docs": args.shard_docs, "bytes_on_disk": sum(p.stat().st_size for p in passages.iterdir()),
              "write_s": round(written, 1), "cpus": os.cpu_count()}
    result["exact"] = run_child([*common, "--out", str(work / "exact.trec")])
    exact = read_run(work / "exact.trec")
    runs = [("pq_build", ["--rebuild-index"]), ("pq_reuse", []),
            *((f"pq_reuse_pool{p}", ["--rerank", str(p)]) for p in args.more_pools)]
    for name, extra in runs:
        child = run_child([*common, "--out", str(work / f"{name}.trec"), *pq, *extra])
        report = child.pop("output")["approximate"]
        child |= {f"recall@{args.k}": recall(read_run(work / f"{name}.trec"), exact), "index_built": report["built"],
                  "build_s": report["build_s"], "candidates_s": report["candidates_s"],
                  "rerank_s": report["rerank_s"], "pool": report["pool"], "factory": report["factory"],
                  "recall_reported": report["recall"], "index_bytes": (passages / "index.faiss").stat().st_size}
        result[name] = child
    result["exact"].pop("output")
    result["self_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if not args.keep:
        shutil.rmtree(work)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
