"""Hard negatives for fine-tuning, mined with a model: `llara-dist mine-negatives`.

    llara-dist mine-negatives --model export/ --input train.jsonl --out train-hn.jsonl
    llara-dist mine-negatives --model export/ --input train.jsonl --out train-hn.jsonl \\
        --corpus collection.tsv --emb-dir emb/collection --range 10-210 --negatives 15
    torchrun --nproc-per-node 8 -m llara_dist mine-negatives ... --corpus collection.tsv --emb-dir emb/collection

The input is fine-tuning JSON lines (`{"query", "pos": [...], "neg"?: [...]}`, finetune_data.py);
the output is the same lines, in the same order, each with `neg` replaced by passages the model
ranks high for its query without being its positive: the hard negatives the contrastive stage
learns from. As FlagEmbedding's `hn_mine.py`:

- the candidates are a corpus (`--corpus`, any input `encode` reads) or, without one, every
  distinct `pos` and `neg` text of the input;
- each query (NEXT prompt) retrieves the top B passages (SELF prompt) exactly (or with
  `--index pq`), and `--range A-B` keeps the ranking's slice [A:B]: ranks A+1 to B, the A best
  left out as likely unlabelled positives;
- a candidate is dropped when its text, or its text after a title line, equals one of the line's
  positives or the query (whitespace runs compared as one space), and when it repeats a text
  already kept; `--negatives N` of those left are drawn, kept in ranking order, hardest first;
- a line with fewer than N candidates left is filled with passages drawn at random from the rest of
  the corpus (never one ranked above A, a positive, the query, or a repeat), and is counted.

Every draw comes from a generator seeded with (--seed, line number): the output does not depend on
the corpus encoding's shards or the ranks, and a line's draws not on other lines' (without --corpus,
though, other lines' texts are candidates). Other fields of a line are kept, but
FlagEmbedding's `neg_scores`, which would describe the replaced negatives, is dropped.

With `--emb-dir` the corpus is encoded into (or read from) a resumable folder of embedding shards,
exactly as `encode --out-dir` writes one, so it can be encoded beforehand on many GPUs, resumes
after a preemption, and is reused by the next mining with the same model. Under a launcher the
ranks encode its shards together, and rank 0 then mines. Without `--emb-dir` the corpus is
encoded in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from llara_dist.errors import UserError, existing_path, integer_at_least
from llara_dist.prompts import PRESETS
from llara_dist.retrieval import embeddings
from llara_dist.retrieval.encode import (
    DEFAULT_SHARD_DOCS,
    MANIFEST_WAIT_S,
    encode_texts,
    encode_to_folder,
    encoder_objective,
    finish_if_complete,
    folder_identity,
    iter_documents,
    load_encoder,
)
from llara_dist.retrieval.finetune_data import read_examples
from llara_dist.retrieval.index import exact_search
from llara_dist.retrieval.search import add_index_arguments, prepare_outputs, search_folder
from llara_dist.textfiles import read_json_lines

STALE_FIELDS = ("neg_scores",)  # fields of a line that describe its negatives, which mining replaces
FILL_TRIES_PER_NEGATIVE = 20  # random draws tried per missing negative before a line is left short


def _normal(text: str) -> str:
    return " ".join(text.split())


def text_keys(text: str) -> tuple[int, int]:
    """(the text's key, the key of the text after its first line): equal keys are equal texts, with
    runs of whitespace compared as one space. A corpus passage that `encode` read with a title has
    it as its first line, and the fine-tuning data's positive may be its text without it."""
    body = text.partition("\n")[2] if "\n" in text else text
    return hash(_normal(text)), hash(_normal(body))


def parse_range(spec: str) -> tuple[int, int]:
    start, dash, end = spec.partition("-")
    try:
        lo, hi = int(start), int(end)
    except ValueError:
        lo = hi = -1
    if not dash or not 0 <= lo < hi:
        raise UserError(f"--range {spec}: give A-B with 0 <= A < B (the ranking's slice [A:B], e.g. 10-210)")
    return lo, hi


class Corpus:
    """The candidate passages, row by row in the order they were encoded: a corpus file read as a
    stream (never whole in memory), or the input's own texts. Each row's text keys are held (16
    bytes a row); texts are read again only for the rows picked."""

    def __init__(self, path: Path | None, texts: list[str] | None = None):
        self.path, self._texts = path, texts
        keys = np.fromiter((key for t in self.texts() for key in text_keys(t)), dtype=np.int64).reshape(-1, 2)
        self.text_key, self.body_key = keys[:, 0], keys[:, 1]

    def __len__(self) -> int:
        return len(self.text_key)

    def texts(self):
        return iter(self._texts) if self.path is None else (text for _, text in iter_documents(self.path))

    def texts_of(self, rows: set[int]) -> dict[int, str]:
        return {row: text for row, text in enumerate(self.texts()) if row in rows}


def pool_of_input(examples) -> list[str]:
    """Without a corpus: every distinct positive and negative of the input, in first-seen order."""
    return list(dict.fromkeys(t for ex in examples for t in (*ex.pos, *ex.neg)))


def choose_negatives(ranked: np.ndarray, excluded: set[int], corpus: Corpus, lo: int, n: int,
                     rng: np.random.Generator) -> tuple[list[int], int]:
    """(rows picked, how many of them were filled at random) for one query: `ranked` its rows best
    first (-1: none), `excluded` the keys of its positives and query."""
    kept, seen = [], set(excluded)
    for row in ranked[lo:]:
        if row >= 0 and corpus.text_key[row] not in seen and corpus.body_key[row] not in excluded:
            seen.add(corpus.text_key[row])
            kept.append(int(row))
    if len(kept) > n:
        kept = [kept[i] for i in np.sort(rng.choice(len(kept), n, replace=False))]
    missing = n - len(kept)
    if not missing:
        return kept, 0
    # Too few in the range: passages at random, never one the range left out as too close to the query.
    seen.update(int(corpus.text_key[row]) for row in ranked[:lo] if row >= 0)
    filled = []
    for row in rng.integers(0, len(corpus), FILL_TRIES_PER_NEGATIVE * missing + 100):
        if len(filled) == missing:
            break
        if corpus.text_key[row] not in seen and corpus.body_key[row] not in excluded:
            seen.add(corpus.text_key[row])
            filled.append(int(row))
    return kept + filled, len(filled)


def begun_folder(args) -> dict:
    """The manifest of the --emb-dir given, when it has one ({} otherwise)."""
    return (embeddings.read_manifest(args.emb_dir) or {}) if args.emb_dir and Path(args.emb_dir).is_dir() else {}


def folder_args(args) -> argparse.Namespace:
    """encode_to_folder's arguments for the corpus; a folder of another encoding is refused here, with
    this command's options."""
    encoding = argparse.Namespace(input=args.corpus, out_dir=args.emb_dir, model=args.model, preset=args.preset,
                                  kind="passage", max_tokens=args.max_tokens, shard_docs=args.shard_docs,
                                  overwrite=False, attn=args.attn, batch_size=args.batch_size, packed=False)
    manifest = begun_folder(args)
    differences = manifest and embeddings.identity_differences(manifest, folder_identity(encoding, Path(args.corpus)))
    if differences:
        raise UserError(f"{Path(args.emb_dir) / embeddings.MANIFEST}: embeddings of another encoding "
                        f"({'; '.join(differences)}); name another --emb-dir for this corpus and model")
    return encoding


def wait_for_folder(folder: Path, count: int) -> None:
    """Rank 0, its own shards written: wait for the other ranks' while shards keep coming in, then
    finish the folder (its count), which the rank that wrote the last shard may not have done yet."""
    manifest = embeddings.read_manifest(folder)
    missing = embeddings.missing_shards(folder, manifest, count)
    progress_at = time.monotonic()
    while missing:
        if time.monotonic() - progress_at > MANIFEST_WAIT_S:
            raise UserError(f"{folder}: shards {missing[:5]}{' ...' if len(missing) > 5 else ''} still missing, "
                            f"none written for {MANIFEST_WAIT_S} s: did another rank stop? Run again: the shards "
                            "written are kept")
        time.sleep(2.0)
        still = embeddings.missing_shards(folder, manifest, count)
        if len(still) < len(missing):
            progress_at = time.monotonic()
        missing = still
    finish_if_complete(folder, count)


def configure(parser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (with llara.json)")
    parser.add_argument("--input", required=True, help="fine-tuning JSON lines: query, pos, neg (optional)")
    parser.add_argument("--out", required=True, help="the JSON lines to write, each line's neg replaced")
    parser.add_argument("--corpus", help="candidate passages, any input `encode` reads (default: the distinct pos "
                                         "and neg texts of --input)")
    parser.add_argument("--emb-dir", help="with --corpus: the corpus's folder of embedding shards, encoded into it "
                                          "(resumable, shared by the ranks of a launch) or reused from it")
    parser.add_argument("--range", default="10-210", help="the slice [A:B] of each query's ranking that negatives "
                                                          "are drawn from (default: %(default)s)")
    parser.add_argument("--negatives", type=integer_at_least(1), default=15,
                        help="negatives per line (default: %(default)s)")
    parser.add_argument("--seed", type=integer_at_least(0), default=0, help="seed of the draws (default: %(default)s)")
    parser.add_argument("--batch-size", type=integer_at_least(1), default=32)
    parser.add_argument("--max-tokens", type=integer_at_least(1), default=None,
                        help="passage tokens kept (default: those of an --emb-dir begun already, else 512)")
    parser.add_argument("--shard-docs", type=integer_at_least(1), default=None,
                        help=f"with --emb-dir: documents per shard (default: those of a folder begun already, else "
                             f"{DEFAULT_SHARD_DOCS})")
    parser.add_argument("--query-max-tokens", type=integer_at_least(1), default=64,
                        help="query tokens kept (default: %(default)s)")
    parser.add_argument("--attn", default="sdpa", help="attention path (see `llara-dist doctor`)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="only for a model folder without llara.json")
    add_index_arguments(parser)


def _check_args(args) -> tuple[int, int]:
    lo, hi = parse_range(args.range)
    existing_path(args.model, "model folder")
    encoder_objective(args.model, args.preset, preset_option=True)  # its prompts known before any input is read
    existing_path(args.input, "fine-tuning data file")
    prepare_outputs({"--out": args.out}, [p for p in (args.input, args.model, args.corpus, args.emb_dir) if p])
    if args.emb_dir and not args.corpus:
        raise UserError("--emb-dir holds a corpus's embeddings: name the corpus with --corpus")
    if args.index != "exact" and not args.emb_dir:
        raise UserError(f"--index {args.index} searches an embedding folder: name one with --emb-dir")
    if args.corpus:
        existing_path(args.corpus, "corpus")
    begun = begun_folder(args)  # the defaults of a folder begun already are its own
    args.max_tokens = begun.get("max_tokens", 512) if args.max_tokens is None else args.max_tokens
    args.shard_docs = begun.get("shard_docs", DEFAULT_SHARD_DOCS) if args.shard_docs is None else args.shard_docs
    return lo, hi


def run(args) -> int:
    from llara_dist.train.distributed import dist_env

    lo, hi = _check_args(args)
    env = dist_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", **os.environ})  # ranks share only the folder
    if env.world > 1 and not args.emb_dir:
        raise UserError(f"{env.world} ranks share the work through the corpus's embedding folder: name it with "
                        "--corpus and --emb-dir (or run one process)")
    examples = read_examples(args.input, group_size=1)  # bad lines refused before the model loads
    line_numbers = [line_no for line_no, _ in read_json_lines(args.input)]  # each line's draws are seeded by it
    log = (lambda line: print(f"mine-negatives: {line}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    if env.rank == 0:  # the other ranks only encode shards of the corpus
        corpus = Corpus(Path(args.corpus)) if args.corpus else Corpus(None, pool_of_input(examples))
        if not len(corpus):
            raise UserError(f"{args.corpus}: no candidate passages")

    encoder = load_encoder(args.model, attn=args.attn, preset=args.preset, preset_option=True)
    if args.emb_dir:
        done = encode_to_folder(folder_args(args), encoder)
        if env.rank:
            print(json.dumps({"rank": env.rank, "emb_dir": args.emb_dir, "written": done["written"]}))
            return 0
        if not done["complete"]:
            log(f"waiting for the other ranks' shards of {args.emb_dir}")
            wait_for_folder(Path(args.emb_dir), done["count"])
    queries = list(dict.fromkeys(ex.query for ex in examples))
    log(f"{len(queries)} queries against {len(corpus)} passages, top {hi}")
    query_vectors = encode_texts(*encoder, queries, "query", args.batch_size, args.query_max_tokens)
    report = None
    if args.emb_dir:
        _, rows, _, report = search_folder(args, args.emb_dir, query_vectors, hi)
    else:
        passage_vectors = encode_texts(*encoder, list(corpus.texts()), "passage", args.batch_size, args.max_tokens)
        _, rows = exact_search(query_vectors, [passage_vectors], hi)
    query_row = {q: i for i, q in enumerate(queries)}

    picked, filled, short = [], [0, 0], 0  # filled: lines, negatives
    for ex, line_no in zip(examples, line_numbers):
        excluded = {key for text in (*ex.pos, ex.query) for key in text_keys(text)}
        chosen, from_random = choose_negatives(rows[query_row[ex.query]], excluded, corpus, lo, args.negatives,
                                               np.random.default_rng([args.seed, line_no]))
        picked.append(chosen)
        filled = [filled[0] + bool(from_random), filled[1] + from_random]
        short += len(chosen) < args.negatives
    texts = corpus.texts_of({row for rows_ in picked for row in rows_})

    def write(f) -> None:
        for (_, record), chosen in zip(read_json_lines(args.input), picked):
            record = {k: v for k, v in record.items() if k not in STALE_FIELDS} | {"neg": [texts[r] for r in chosen]}
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    out = Path(args.out)
    embeddings.write_renamed(out, write, f"{out.name}.{os.getpid()}{embeddings.TMP_SUFFIX}")
    if filled[0] or short:
        log(f"{filled[0]} of {len(examples)} lines had fewer than {args.negatives} candidates in ranks "
            f"{lo + 1}-{hi} and took {filled[1]} passages at random; {short} still have fewer than {args.negatives}")
    print(json.dumps({"out": str(out), "lines": len(examples), "queries": len(queries), "passages": len(corpus),
                      "range": [lo, hi], "negatives": args.negatives, "lines_filled_at_random": filled[0],
                      "negatives_at_random": filled[1], "lines_short": short, "index": args.index,
                      "seconds": round(time.perf_counter() - t0, 1)} | ({"approximate": report} if report else {})))
    return 0
