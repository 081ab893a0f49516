"""Readers for the raw corpus formats that `llara-dist prep` accepts.

Each reader turns input files into `Article`s, in file order, each naming the file
and line it starts at. Formats:

    llara-jsonl  {"input", "output_summarize", "output_predict"} per line: one chunk
                 (input) and the text of the next one (output_predict). Not re-chunked.
    dpr-tsv      DPR psgs_w100.tsv: `id<TAB>text<TAB>title`, an optional header row,
                 consecutive rows with the same title form one article; each passage is
                 one chunk. Not re-chunked.
    wiki-jsonl   {"title", "text"} per line, one article (WikiExtractor, HF Wikipedia).
    wikitext     WikiText raw: ` = Title = ` starts an article, ` = = Section = = ` is a
                 sub-heading (kept as a line of its own, without the = marks).
    text         plain text, a blank line between documents; no titles.

Files may be gzip- or zstd-compressed (recognised by their first bytes, whatever
their name). What cannot be used is skipped and counted by reason (`Stats`), never
dropped silently; input that does not look like the format at all, or a file that
cannot be read, raises `InputError` naming the file and line.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import zstandard

from llara_dist.errors import UserError

FORMATS = ("llara-jsonl", "dpr-tsv", "wiki-jsonl", "wikitext", "text")
RECHUNKED = frozenset({"wiki-jsonl", "wikitext", "text"})  # the others arrive as chunks

SHAPES = {
    "llara-jsonl": 'one JSON object per line with string fields "input" and "output_predict" '
                   '(and "output_summarize")',
    "dpr-tsv": "tab-separated rows `id<TAB>text<TAB>title` (integer id), optionally a header row id/text/title",
    "wiki-jsonl": 'one JSON object per line with string fields "title" and "text"',
    "wikitext": "WikiText raw layout: a ' = Title = ' line starts each article",
    "text": "plain text, documents separated by blank lines",
}

# A file whose first WRONG_FORMAT_AFTER records all fail to parse (or that ends before
# any record parsed) is taken to be in another format: prep stops instead of skipping.
WRONG_FORMAT_AFTER = 10

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A zstd skippable frame (magic 0x184D2A50 to 0x184D2A5F, little-endian): pzstd starts its files with one.
_ZSTD_SKIPPABLE = re.compile(rb"[\x50-\x5f]\x2a\x4d\x18")
_ZSTD_READ = 1 << 16  # compressed bytes per step
# What reading a file can raise: the system's OSError, and a compressed stream's own complaints
# (EOFError: cut short; zlib.error: corrupt gzip data; ZstdError: corrupt zstd data).
_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
_WT_TITLE = re.compile(r"\s*= (?!=)(.*?) =\s*")
_WT_HEADING = re.compile(r"\s*(?:= )+(?!=)(.*?)(?: =)+\s*")


class InputError(UserError):
    """The input cannot be prepared as asked: a missing or unreadable file, a wrong format."""


@dataclass
class Article:
    """One article: either text to be chunked, or chunks as the input gave them."""

    source: str  # the input file, as given
    line: int  # 1-based line the article starts at
    title: str = ""
    text: str = ""  # re-chunked formats
    chunks: list[str] | None = None  # llara-jsonl, dpr-tsv: the chunks as given
    chunk_lines: list[int] | None = None  # their lines
    next_text: str | None = None  # llara-jsonl: the text after the last chunk (EBAR target)

    @property
    def size(self) -> int:
        return len(self.text) + sum(map(len, self.chunks or ())) + len(self.next_text or "")


@dataclass
class Stats:
    """Counts by reason of what was skipped, truncated or repaired, and where each reason
    was first seen (`"kind.reason": "file:line"`)."""

    skipped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    handled: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)

    def count(self, kind: str, reason: str, where: str, n: int = 1) -> None:
        getattr(self, kind)[reason] += n
        self.first.setdefault(f"{kind}.{reason}", where)

    def merge(self, other: "Stats") -> None:
        for kind in ("skipped", "truncated", "handled"):
            getattr(self, kind).update(getattr(other, kind))
        for k, v in other.first.items():
            self.first.setdefault(k, v)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Globs to a sorted file list per pattern; missing or unreadable inputs raise. A file named more
    than once (by a glob and by name, relatively and absolutely, through a link) is read once, under
    its first name."""
    paths: list[str] = []
    files: set[str] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"{pattern}: no file matches this pattern")
        else:
            found = [pattern]
        for p in found:
            if not os.path.exists(p):
                raise InputError(f"{p}: no such file")
            if os.path.isdir(p):
                raise InputError(f"{p}: is a folder (give files or a glob such as '{p}/*.jsonl')")
            if not os.access(p, os.R_OK):
                raise InputError(f"{p}: cannot be read (permission denied)")
            if os.path.realpath(p) not in files:
                files.add(os.path.realpath(p))
                paths.append(p)
    return paths


class Reader:
    """Iterates the articles of `paths` in `fmt`, counting what it skips in `stats`."""

    def __init__(self, paths: list[str], fmt: str, min_words: int = 2, stats: Stats | None = None):
        if fmt not in FORMATS:
            raise InputError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
        self.paths = paths
        self.fmt = fmt
        self.min_words = min_words
        self.stats = Stats() if stats is None else stats
        self.total_bytes = sum(os.path.getsize(p) for p in paths)
        self._done_bytes = 0
        self._raw = None

    def bytes_read(self) -> int:
        """Input bytes consumed so far (compressed bytes for compressed files)."""
        try:
            return self._done_bytes + (self._raw.tell() if self._raw is not None else 0)
        except (OSError, ValueError):
            return self._done_bytes

    def __iter__(self) -> Iterator[Article]:
        parse = {"llara-jsonl": self._llara, "dpr-tsv": self._dpr, "wiki-jsonl": self._wiki,
                 "wikitext": self._wikitext, "text": self._text}[self.fmt]
        for path in self.paths:
            yield from parse(path, self._lines(path))
            self._done_bytes += os.path.getsize(path)

    # -- reading --------------------------------------------------------------------
    def _lines(self, path: str) -> Iterator[tuple[int, str]]:
        """(line number, text) of a file, decompressing by magic bytes; bad UTF-8 is
        replaced (U+FFFD) and counted, read errors raise InputError."""
        n = 0
        compression = None
        try:
            with open(path, "rb") as raw:
                self._raw = raw
                magic = raw.read(4)
                raw.seek(0)
                if magic.startswith(_GZIP_MAGIC):
                    compression, stream = "gzip", gzip.GzipFile(fileobj=raw)
                elif magic == _ZSTD_MAGIC or _ZSTD_SKIPPABLE.fullmatch(magic):
                    compression, stream = "zstd", io.BufferedReader(_ZstdFrames(raw))
                else:
                    stream = raw
                for n, line in enumerate(stream, 1):
                    line = line.rstrip(b"\r\n")
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError:
                        text = line.decode("utf-8", "replace")
                        self.stats.count("handled", "invalid_utf8", f"{path}:{n}")
                    if n == 1:
                        text = text.lstrip("\ufeff")
                    yield n, text
        except _READ_ERRORS as e:
            # a plain OSError comes from the system (the disk, a permission); the rest from the data itself
            if compression and (not isinstance(e, OSError) or isinstance(e, gzip.BadGzipFile)):
                reason = f"truncated or corrupt {compression} data ({e})"
            else:
                reason = f"{type(e).__name__}: {e}"
            raise InputError(f"{path}:{n + 1}: cannot read: {reason}") from None
        finally:
            self._raw = None

    def _too_short(self, text: str, where: str) -> bool:
        """Counts and reports an article (or passage) with fewer than min_words words."""
        n = len(text.split(None, self.min_words))
        if n >= self.min_words:
            return False
        self.stats.count("skipped", "empty" if n == 0 else "too_short", where)
        return True

    class _FormatCheck:
        """Raises once a file's first records all fail: that is a wrong --format."""

        def __init__(self, reader: "Reader", path: str):
            self.reader, self.path = reader, path
            self.good, self.bad, self.first_bad = 0, 0, None

        def fail(self, kind_reason: str, line: int, detail: str) -> None:
            self.reader.stats.count("skipped", kind_reason, f"{self.path}:{line}")
            self.bad += 1
            self.first_bad = self.first_bad or (line, detail)
            if not self.good and self.bad >= WRONG_FORMAT_AFTER:
                self.raise_()

        def ok(self) -> None:
            self.good += 1

        def end(self) -> None:
            if not self.good and self.bad:
                self.raise_()

        def raise_(self) -> None:
            line, detail = self.first_bad
            fmt = self.reader.fmt
            raise InputError(
                f"{self.path}:{line}: not {fmt} input: none of the first {self.bad} record(s) parse "
                f"({detail}); expected {SHAPES[fmt]}. Is --format right?")

    # -- formats ------------------------------------------------------------------------
    def _json_records(self, path, lines, fields: tuple[str, ...]):
        """(line, object) for JSON lines holding string `fields`; the rest counted."""
        check = self._FormatCheck(self, path)
        for n, text in lines:
            if not text.strip():
                continue  # a blank line holds no record
            try:
                obj = json.loads(text)
            except ValueError as e:
                check.fail("bad_json", n, f"invalid JSON: {e}")
                continue
            if not isinstance(obj, dict):
                check.fail("bad_json", n, f"a JSON {type(obj).__name__}, not an object")
                continue
            missing = [f for f in fields if not isinstance(obj.get(f), str)]
            if missing:
                what = ", ".join(f"{f!r} " + ("missing" if f not in obj else "not a string") for f in missing)
                check.fail("missing_field", n, what)
                continue
            check.ok()
            yield n, obj
        check.end()

    def _llara(self, path, lines):
        for n, obj in self._json_records(path, lines, ("input", "output_predict")):
            where = f"{path}:{n}"
            if self._too_short(obj["input"], where):
                continue
            summ = obj.get("output_summarize")
            if summ is not None and summ != obj["input"]:
                # Our EBAE target is the text's own tokens (the paper's definition).
                self.stats.count("handled", "summarize_differs", where)
            nxt = obj["output_predict"] if obj["output_predict"].strip() else None
            yield Article(path, n, chunks=[obj["input"]], chunk_lines=[n], next_text=nxt)

    def _wiki(self, path, lines):
        for n, obj in self._json_records(path, lines, ("title", "text")):
            if not self._too_short(obj["text"], f"{path}:{n}"):
                yield Article(path, n, title=obj["title"], text=obj["text"])

    def _dpr(self, path, lines):
        check = self._FormatCheck(self, path)
        cur = None
        first = True
        for n, text in lines:
            if not text.strip():
                continue
            cols = text.split("\t")
            if first and [c.strip().lower() for c in cols] == ["id", "text", "title"]:
                first = False
                continue
            first = False
            if len(cols) != 3:
                check.fail("bad_row", n, f"{len(cols)} tab-separated column(s), not 3")
                continue
            pid, passage, title = cols
            try:
                int(pid)
            except ValueError:
                check.fail("bad_row", n, f"id {pid[:40]!r} is not an integer")
                continue
            check.ok()
            passage, title = _unquote(passage), _unquote(title)
            if cur is not None and title != cur.title:
                if cur.chunks:
                    yield cur
                cur = None
            if cur is None:
                cur = Article(path, n, title=title, chunks=[], chunk_lines=[])
            if not self._too_short(passage, f"{path}:{n}"):
                cur.chunks.append(passage)
                cur.chunk_lines.append(n)
        check.end()
        if cur is not None and cur.chunks:
            yield cur

    def _wikitext(self, path, lines):
        title, start, body = None, 0, []
        for n, text in lines:
            m = _WT_TITLE.fullmatch(text)
            if m:
                if title is not None:
                    yield from self._article(path, start, title, body)
                title, start, body = m.group(1).strip(), n, []
                continue
            if not text.strip():
                continue
            if title is None:
                raise InputError(f"{path}:{n}: not wikitext input: text before the first ' = Title = ' "
                                 f"heading; expected {SHAPES['wikitext']}. Is --format right?")
            h = _WT_HEADING.fullmatch(text)
            body.append(h.group(1).strip() if h else text.strip())
        if title is not None:
            yield from self._article(path, start, title, body)

    def _text(self, path, lines):
        start, body = 0, []
        for n, text in lines:
            if text.strip():
                start = start or n
                body.append(text)
            elif body:
                yield from self._article(path, start, "", body)
                start, body = 0, []
        if body:
            yield from self._article(path, start, "", body)

    def _article(self, path, line, title, body):
        text = "\n".join(body)
        if not self._too_short(text, f"{path}:{line}"):
            yield Article(path, line, title=title, text=text)


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a zstd file of one or more frames (as `zstd` and pzstd write it:
    concatenated frames, skippable ones among them), that raises EOFError where the file ends inside
    a frame. zstandard's own stream_reader takes such a cut for the end of the data: a truncated
    download would lose its second half without a word."""

    def __init__(self, raw):
        self._raw = raw
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False  # part of the current frame read, its end not yet
        self._out, self._at = b"", 0  # decompressed bytes not yet handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            data = self._raw.read(_ZSTD_READ)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._at = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            parts.append(self._frame.decompress(data))
            self._in_frame = not self._frame.eof
            if self._in_frame:
                break
            data = self._frame.unused_data  # the next frame starts here
            self._frame = zstandard.ZstdDecompressor().decompressobj()
        return b"".join(parts)


def _unquote(s: str) -> str:
    """DPR's TSV quotes fields csv-style: "a ""b"" c" -> a "b" c."""
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        return s[1:-1].replace('""', '"')
    return s
