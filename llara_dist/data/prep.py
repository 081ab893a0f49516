"""Tokenize a raw corpus into webdataset shards plus a manifest (`llara-dist prep`).

Articles are cut into chunks at sentence ends (about --chunk-words words, the title
prepended to the first chunk), each chunk is paired with the next chunk of its article
(the EBAR target; the last chunk has none, and the manifest counts those), everything
is tokenized once, and the documents go into deterministic tar shards of --shard-docs
documents each. The target sets can be made as the released LLaRA code makes them: stop
words taken out of the target texts before tokenizing (--stop-words), the targets cut to
their first N tokens (--self-tokens, --next-tokens); see TargetRule. Re-running on the same
input gives byte-identical shards and manifest, whatever --workers is. Formats and rules: docs/data-prep.md.

    # the sample data (tokenizer: any local Hugging Face tokenizer folder)
    llara-dist prep --input ../shared/data/wikitext2_valid.txt --format wikitext \\
        --tokenizer TOKENIZER_DIR --out shards/wikitext
    # chunks sized for 1024-token rows under the released prompts, 2 processes
    llara-dist prep --input 'wiki/*.jsonl.zst' --format wiki-jsonl --tokenizer TOKENIZER_DIR \\
        --out shards/wiki --seq-len 1024 --preset released --workers 2
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llara_dist.data import shards, stopwords
from llara_dist.data.formats import FORMATS, RECHUNKED, Article, Reader, Stats, expand_inputs
from llara_dist.errors import UserError

DEFAULT_CHUNK_WORDS = 480  # the released LLaRA setting
DEFAULT_SHARD_DOCS = 10_000
# Articles go to the workers in blocks cut by these fixed sizes, never by the number of
# workers: the output cannot depend on --workers.
BLOCK_ARTICLES = 128
BLOCK_CHARS = 256 << 10


class PrepError(UserError):
    """prep cannot go on; the message says why and where."""


@dataclass
class PrepSettings:
    inputs: list[str]
    format: str
    tokenizer: str
    out: str
    chunk_words: int | None = None  # None: DEFAULT_CHUNK_WORDS unless a token limit is set
    chunk_tokens: int | None = None
    seq_len: int | None = None  # with preset: chunk_tokens = seq_len - prompt overhead
    preset: str | None = None
    min_words: int = 2
    shard_docs: int = DEFAULT_SHARD_DOCS
    layout: str = "block"  # shards.LAYOUTS
    workers: int = 1
    overwrite: bool = False
    stop_words: str | None = None  # "nltk-english", a file of words, or None / "none"
    self_tokens: int | None = None  # EBAE target: the first N tokens of the (filtered) text; None: all
    next_tokens: int | None = None  # EBAR target: the first N tokens of the (filtered) next chunk; None: all


@dataclass(frozen=True)
class TargetRule:
    """How prep makes the BoW target sets from the texts.

    Default (nothing set): no `.self` is stored, so the EBAE target is the unique ids of the text the
    row shows, and `.next` holds the unique ids of the whole next chunk. The released LLaRA code
    (`--remove_stop_words True --cutoff_len C`) instead tokenizes each target text after taking out
    punctuation and stop words, and keeps its first C - 1 tokens (C counts its BOS): that is
    `stop_words=nltk-english, self_tokens=next_tokens=C - 1`. A stored `.self` comes from the whole
    chunk as prep stores it, so it does not change with the row's cut of the text."""

    stop_words: frozenset[str] | None = None
    self_tokens: int | None = None
    next_tokens: int | None = None

    @property
    def stores_self(self) -> bool:
        return self.stop_words is not None or self.self_tokens is not None

    def target_texts(self, texts: list[str]) -> list[str]:
        return texts if self.stop_words is None else [stopwords.filter_text(t, self.stop_words) for t in texts]


@dataclass
class PrepResult:
    manifest: dict
    out: Path
    seconds: float  # in all, from start to manifest
    busy: float  # reading, tokenizing and writing (no imports, no tokenizer loading)
    summary: str = ""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="input files or globs (quote globs); .gz and .zst are read as such")
    parser.add_argument("--format", required=True, choices=FORMATS, help="input format (docs/data-prep.md)")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="local Hugging Face tokenizer folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    parser.add_argument("--chunk-words", type=int, metavar="N",
                        help=f"at most N words per chunk, cut at sentence ends (default {DEFAULT_CHUNK_WORDS}; "
                             "no word limit when a token limit is given, unless set too)")
    parser.add_argument("--chunk-tokens", type=int, metavar="N",
                        help="at most N tokens per chunk (at sentence ends where possible); "
                             "N = seq_len - prompt overhead gives whole-row documents")
    parser.add_argument("--seq-len", type=int, metavar="L",
                        help="set --chunk-tokens to L minus the prompt overhead of --preset under this tokenizer")
    parser.add_argument("--preset", metavar="P", help="prompt preset for --seq-len: paper or released (default)")
    parser.add_argument("--min-words", type=int, default=2, metavar="N",
                        help="skip (and count) articles or passages of fewer words (default 2)")
    parser.add_argument("--shard-docs", type=int, default=DEFAULT_SHARD_DOCS, metavar="N",
                        help=f"documents per shard (default {DEFAULT_SHARD_DOCS})")
    parser.add_argument("--layout", choices=shards.LAYOUTS, default="block",
                        help="block: up to 256 documents per tar member (compact); sample: a member per field "
                             "of each document, as earlier versions wrote (default block; llara_dist/data/shards.py)")
    parser.add_argument("--stop-words", metavar="LIST",
                        help="take punctuation and stop words out of the target texts before tokenizing them, as "
                             "the released LLaRA code's --remove_stop_words: nltk-english (NLTK's 179 words), a "
                             "file of words one per line, or none (default: none; the texts themselves are kept)")
    parser.add_argument("--self-tokens", type=int, metavar="N",
                        help="EBAE target: the first N tokens of the chunk (after --stop-words) (default: all)")
    parser.add_argument("--next-tokens", type=int, metavar="N",
                        help="EBAR target: the first N tokens of the next chunk (after --stop-words) (default: all); "
                             "the released code's --cutoff_len C keeps C - 1")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizing processes (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards and manifest.json already in --out")


def run(args: argparse.Namespace) -> int:
    settings = PrepSettings(
        inputs=args.input, format=args.format, tokenizer=args.tokenizer, out=args.out,
        chunk_words=args.chunk_words, chunk_tokens=args.chunk_tokens, seq_len=args.seq_len,
        preset=args.preset, min_words=args.min_words, shard_docs=args.shard_docs, layout=args.layout,
        workers=args.workers, overwrite=args.overwrite, stop_words=args.stop_words,
        self_tokens=args.self_tokens, next_tokens=args.next_tokens)
    print(prep(settings).summary)
    return 0


# -- settings ------------------------------------------------------------------------------

def _resolve(s: PrepSettings) -> dict:
    """Check the settings and work out the chunk limits; returns the manifest's "chunking"."""
    problems = []
    for name in ("shard_docs", "workers", "min_words"):
        if getattr(s, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("chunk_words", "chunk_tokens", "seq_len", "self_tokens", "next_tokens"):
        if getattr(s, name) is not None and getattr(s, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if s.seq_len is not None and s.chunk_tokens is not None:
        problems.append("give --seq-len (with --preset) or --chunk-tokens, not both")
    if s.preset is not None and s.seq_len is None:
        problems.append("--preset only sizes chunks together with --seq-len")
    if s.chunk_words is not None and s.format not in RECHUNKED:
        problems.append(f"--chunk-words does not apply to {s.format}: its records are chunks already "
                        "(--chunk-tokens or --seq-len caps their length)")
    if problems:
        raise PrepError("; ".join(problems))
    chunk_tokens, overhead, preset = s.chunk_tokens, None, None
    if s.seq_len is not None:
        from llara_dist.prompts import PRESETS, add_special_tokens, prompt_tokens
        from llara_dist.tokenizer import load_tokenizer

        preset = s.preset or "released"
        if preset not in PRESETS:
            raise PrepError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
        tok = load_tokenizer(s.tokenizer)  # a copy: the preset's new tokens must not touch the text's ids
        add_special_tokens(tok, PRESETS[preset])
        try:
            overhead = prompt_tokens(tok, PRESETS[preset]).overhead
        except ValueError as e:
            raise PrepError(f"{s.tokenizer}: cannot size chunks for the {preset} prompts: {e}") from None
        chunk_tokens = s.seq_len - overhead
        if chunk_tokens < 1:
            raise PrepError(f"--seq-len {s.seq_len} leaves no room for text: the {preset} prompts take "
                            f"{overhead} tokens under this tokenizer")
    rechunked = s.format in RECHUNKED
    chunk_words = s.chunk_words if s.chunk_words is not None else (
        DEFAULT_CHUNK_WORDS if chunk_tokens is None else None)
    return {
        "rechunked": rechunked,
        "chunk_words": chunk_words if rechunked else None,
        "chunk_tokens": chunk_tokens,
        "seq_len": s.seq_len,
        "preset": preset,
        "prompt_overhead": overhead,
        "min_words": s.min_words,
        "cut": "sentence ends (llara_dist/data/chunking.py)" if rechunked else "as given (over-long chunks truncated)",
        "title": "prepended to an article's first chunk" if s.format in ("wiki-jsonl", "wikitext")
                 else "as in the input",
    }


def _targets(s: PrepSettings) -> tuple[TargetRule, dict | None]:
    """The target rule and the manifest's "targets" (None with the defaults: the manifest then
    reads as before these options existed, which means the same)."""
    words, listed = stopwords.load(s.stop_words)
    rule = TargetRule(words, s.self_tokens, s.next_tokens)
    if rule == TargetRule():
        return rule, None
    return rule, {"stop_words": listed, "self_tokens": s.self_tokens, "next_tokens": s.next_tokens,
                  "self_stored": rule.stores_self}


# -- workers -----------------------------------------------------------------------------

_W: dict = {}  # per process: the chunker (and through it the tokenizer)


def _init_worker(tokenizer_dir: str, chunking: dict, rule: TargetRule, in_pool: bool, tok=None) -> None:
    if in_pool:  # one process per core already; the tokenizer's own threads would fight them
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from llara_dist.data.chunking import Chunker
    from llara_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir) if tok is None else tok
    words, tokens = chunking["chunk_words"], chunking["chunk_tokens"]
    _W.clear()
    # Re-chunked formats: cut by words and/or tokens. The others: chunks as given,
    # cut down only to a token limit (None: kept whole).
    _W["chunker"] = Chunker(words, tokens, tok) if chunking["rechunked"] else Chunker(None, tokens, tok)
    _W["targets"] = rule


@dataclass
class _BlockOut:
    samples: list = field(default_factory=list)  # encoded webdataset samples, in order
    tokens: list = field(default_factory=list)  # text tokens per sample
    no_next: list = field(default_factory=list)  # whether each sample lacks an EBAR target
    articles: int = 0
    stats: Stats = field(default_factory=Stats)


def _source_name(path: str) -> str:
    name = os.path.basename(path)
    return name.split(".", 1)[0] or "input"


def _process(block: list[tuple[int, Article]]) -> _BlockOut:
    """Chunk and tokenize a block of articles into encoded samples (in a worker)."""
    import numpy as np

    out = _BlockOut(articles=len(block))
    chunker = _W["chunker"]
    per_article: list[list[tuple[str, list]]] = []  # [(chunk text, ids)] per article
    if block[0][1].chunks is None:  # re-chunked formats
        cuts: list = []
        per_article = chunker.chunk_many_ids([(a.title, a.text) for _, a in block], out.stats.handled, cuts)
        for (_, a), counted in zip(block, cuts):  # where each kind of forced cut first happened
            for reason in counted:
                out.stats.first.setdefault(f"handled.{reason}", f"{a.source}:{a.line}")
    else:
        flat = [c for _, a in block for c in a.chunks]
        if chunker.max_tokens is not None:
            fitted = chunker.fit_many(flat, out.stats.truncated, "chunk_tokens")
            lines = [(a.source, line) for _, a in block for line in a.chunk_lines]
            for (src, line), (_, _, cut) in zip(lines, fitted):
                if cut:
                    out.stats.first.setdefault("truncated.chunk_tokens", f"{src}:{line}")
            fitted = [(t, ids) for t, ids, _ in fitted]
        else:
            fitted = list(zip(flat, chunker.encode(flat)))
        k = 0
        for _, a in block:
            per_article.append(fitted[k:k + len(a.chunks)])
            k += len(a.chunks)
    rule: TargetRule = _W["targets"]
    next_ids = iter(chunker.encode(rule.target_texts([a.next_text for _, a in block if a.next_text is not None])))
    # the target tokens of every chunk: its own ids, or those of its text without stop words
    filtered = None if rule.stop_words is None else iter(
        chunker.encode(rule.target_texts([text for chunks in per_article for text, _ in chunks])))
    for (index, a), chunks in zip(block, per_article):
        arrays = [np.asarray(ids, dtype=shards.ID_DTYPE) for _, ids in chunks]
        targets = arrays if filtered is None else [np.asarray(next(filtered), dtype=shards.ID_DTYPE) for _ in chunks]
        tail = np.asarray(next(next_ids), dtype=shards.ID_DTYPE) if a.next_text is not None else None
        src = _source_name(a.source)
        for c, ((text, _), arr) in enumerate(zip(chunks, arrays)):
            nxt = targets[c + 1] if c + 1 < len(targets) else tail
            if nxt is not None and rule.next_tokens is not None:
                nxt = nxt[:rule.next_tokens]
            own = targets[c][:rule.self_tokens] if rule.stores_self else None
            line = a.chunk_lines[c] if a.chunk_lines else a.line
            if (own is not None and not own.size) or (nxt is not None and not nxt.size):
                # only stop words: that task has no term for this document (as in the released code)
                out.stats.handled["empty_target_set"] += 1
                out.stats.first.setdefault("handled.empty_target_set", f"{a.source}:{line}")
            meta = {"article": index, "chunk": c, "source": f"{a.source}:{line}", "title": a.title}
            out.samples.append(shards.encode_sample(shards.make_key(src, index, c), arr, nxt, text, meta, own))
            out.tokens.append(int(arr.size))
            out.no_next.append(nxt is None)
    return out


def _blocks(reader: Reader):
    block, chars, index = [], 0, 0
    for article in reader:
        block.append((index, article))
        index += 1
        chars += article.size
        if len(block) >= BLOCK_ARTICLES or chars >= BLOCK_CHARS:
            yield block
            block, chars = [], 0
    if block:
        yield block


def _results(blocks, s: PrepSettings, chunking: dict, rule: TargetRule, tokenizer):
    """Block results in block order, from up to `workers` processes, with bounded
    read-ahead (a large corpus is never all in memory)."""
    if s.workers == 1:
        _init_worker(s.tokenizer, chunking, rule, in_pool=False, tok=tokenizer)
        yield from map(_process, blocks)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(s.workers, initializer=_init_worker, initargs=(s.tokenizer, chunking, rule, True)) as pool:
        pending = collections.deque()
        for block in blocks:
            pending.append(pool.apply_async(_process, (block,)))
            if len(pending) >= 2 * s.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -- output ------------------------------------------------------------------------------

class _ShardWriter:
    def __init__(self, out: Path, shard_docs: int, layout: str):
        self.out, self.shard_docs, self.layout = out, shard_docs, layout
        self.entries: list[dict] = []
        self.samples, self.tokens, self.no_next = [], 0, 0

    def add(self, sample: dict, tokens: int, no_next: bool) -> None:
        self.samples.append(sample)
        self.tokens += tokens
        self.no_next += no_next
        if len(self.samples) >= self.shard_docs:
            self.flush()

    def flush(self) -> None:
        if not self.samples:
            return
        name = shards.shard_name(len(self.entries))
        path = self.out / name
        shards.write_shard(path, self.samples, self.layout)
        data = path.read_bytes()
        self.entries.append({"name": name, "docs": len(self.samples), "tokens": self.tokens,
                             "docs_without_next": self.no_next, "bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()})
        self.samples, self.tokens, self.no_next = [], 0, 0

    def remove(self) -> None:
        for e in self.entries:
            (self.out / e["name"]).unlink(missing_ok=True)


_OURS = re.compile(shards.SHARD_NAME.pattern + "|" + re.escape(shards.MANIFEST))


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepError(f"{out}: is a file, not a folder; --out names the folder for the shards and manifest.json")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission
        raise PrepError(f"{out}: cannot create the output folder ({e.strerror})") from None
    old = sorted(p for p in out.iterdir() if _OURS.fullmatch(p.name))
    if old and not overwrite:
        raise PrepError(f"{out}: already holds {old[0].name}" + (f" and {len(old) - 1} more" if len(old) > 1 else "")
                        + " from an earlier prep; pass --overwrite to replace them")
    for p in old:
        p.unlink()


class _Progress:
    """One status line on stderr, on a terminal only."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = self.last = time.monotonic()

    def update(self, docs: int, tokens: int, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.25 and not force):
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        pct = f"{100 * done / total:5.1f}% " if total else ""
        sys.stderr.write(f"\rprep: {pct}{docs:,} docs, {tokens:,} tokens | {docs / dt:,.0f} docs/s, "
                         f"{tokens / dt:,.0f} tokens/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# -- the command ------------------------------------------------------------------------

def prep(s: PrepSettings, progress: bool | None = None) -> PrepResult:
    """Run prep; returns the manifest (also written to s.out) and a printable summary."""
    from llara_dist.tokenizer import load_tokenizer

    t0 = time.monotonic()
    paths = expand_inputs(s.inputs)
    tokenizer = load_tokenizer(s.tokenizer)  # a folder it cannot load is refused, named
    if not getattr(tokenizer, "is_fast", False):
        raise PrepError(f"{s.tokenizer}: prep needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    chunking = _resolve(s)
    rule, targets = _targets(s)
    identity = shards.tokenizer_identity(s.tokenizer, tokenizer)
    out = Path(s.out)
    _prepare_out(out, s.overwrite)

    stats = Stats()
    reader = Reader(paths, s.format, s.min_words, stats)
    writer = _ShardWriter(out, s.shard_docs, s.layout)
    bar = _Progress(sys.stderr.isatty() if progress is None else progress)
    t_busy = time.monotonic()
    docs = tokens = articles = 0
    try:
        for res in _results(_blocks(reader), s, chunking, rule, tokenizer):
            for sample, n, no_next in zip(res.samples, res.tokens, res.no_next):
                writer.add(sample, n, no_next)
            docs += len(res.samples)
            articles += res.articles
            tokens += sum(res.tokens)
            stats.merge(res.stats)
            bar.update(docs, tokens, reader.bytes_read(), reader.total_bytes)
        writer.flush()
    except BaseException:
        bar.close()
        writer.remove()
        raise
    bar.update(docs, tokens, reader.total_bytes, reader.total_bytes, force=True)
    bar.close()
    if docs == 0:
        writer.remove()
        why = (f"all {articles} article(s) skipped ({_counts(stats.skipped)})" if stats.skipped
               else "no article found (empty or blank input)")
        raise PrepError(f"{_file_list(paths)}: no documents: {why}; nothing written")
    manifest = {
        "version": 1,
        "shards": writer.entries,
        "docs": docs,
        "tokens": tokens,
        "articles": articles,
        "docs_without_next": sum(e["docs_without_next"] for e in writer.entries),
        "tokenizer": identity,
        "special_tokens_in_text": "text",  # a literal "<unk>" is tokenized as text (chunking.TEXT_ONLY)
        "chunking": chunking,
        "format": s.format,
        "inputs": paths,
        "shard_docs": s.shard_docs,
        "layout": s.layout,
        "skipped": dict(sorted(stats.skipped.items())),
        "truncated": dict(sorted(stats.truncated.items())),
        "handled": dict(sorted(stats.handled.items())),
        "first_seen": dict(sorted(stats.first.items())),
    }
    if targets is not None:
        manifest["targets"] = targets
    shards.write_manifest(out, manifest)
    now = time.monotonic()
    seconds, busy = now - t0, now - t_busy
    return PrepResult(manifest, out, seconds, busy, summary(manifest, out, seconds, busy))


def _targets_line(t: dict) -> str:
    words = t.get("stop_words")
    stop = f"{words['list']} ({words['words']} words)" if words else "none"
    ebae = "stored" if t.get("self_stored") else "the text's ids"
    if t.get("self_tokens"):
        ebae += f", first {t['self_tokens']} tokens"
    ebar = f"first {t['next_tokens']} tokens" if t.get("next_tokens") else "all tokens"
    return f"  targets: stop words {stop}; EBAE {ebae}; EBAR {ebar} of the next chunk"


def _file_list(paths: list[str], shown: int = 3) -> str:
    """The input files for a message: the first few by name, and how many more."""
    more = len(paths) - shown
    return ", ".join(paths[:shown]) + (f" and {more} more file(s)" if more > 0 else "")


def _counts(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items()))


def summary(manifest: dict, out, seconds: float, busy: float) -> str:
    """The end-of-run report: what came out, how fast, and everything skipped or changed."""
    m = manifest
    first = m.get("first_seen", {})

    def detail(kind):
        items = m.get(kind, {})
        if not items:
            return "none"
        return ", ".join(f"{k}={v} (first at {first.get(f'{kind}.{k}', '?')})" for k, v in sorted(items.items()))

    busy = max(busy, 1e-9)
    rate = f"{m['docs'] / busy:,.0f} docs/s, {m['tokens'] / busy:,.0f} tokens/s"
    ch = m["chunking"]
    limits = ", ".join(f"{k}={ch[k]}" for k in ("chunk_words", "chunk_tokens") if ch.get(k) is not None)
    return "\n".join([
        f"prep: {m['articles']:,} articles from {len(m['inputs'])} file(s) ({m['format']}) -> "
        f"{m['docs']:,} docs, {m['tokens']:,} tokens in {len(m['shards'])} shard(s) at {out}",
        f"  time: {seconds:.1f} s in all; {busy:.1f} s reading, tokenizing, writing: {rate}",
        f"  chunks: {'re-chunked' if ch['rechunked'] else 'as given'}" + (f", {limits}" if limits else ""),
        f"  docs without EBAR target (last chunk of an article): {m['docs_without_next']:,}",
    ] + ([_targets_line(m["targets"])] if m.get("targets") else []) + [
        f"  skipped: {detail('skipped')}",
        f"  truncated: {detail('truncated')}",
        f"  handled: {detail('handled')}",
    ])
