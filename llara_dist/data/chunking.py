"""Cutting an article into chunks at sentence ends, by words and/or by tokens.

A chunk is a slice of the article's text (whitespace inside it is kept as is), made
of whole *units*. A unit is a sentence: it ends at `.`, `!` or `?` (closing quotes and
brackets included) followed by whitespace and then anything but a lower-case letter
or a comma-like mark, at a CJK full stop, or at a blank line. Abbreviations (`Dr.`, `e.g.`) and
initials (`J. Smith`, `H. gammarus`) do not end a sentence. Single line breaks do not
end one either: wrapped plain text would otherwise be cut mid-sentence.

Chunks are filled greedily with whole units up to the limits: at most `max_words`
words and/or at most `max_tokens` tokens. A unit that alone exceeds a limit is cut at
word boundaries (counted `hard_cut_sentence`); a run of non-space characters longer
than `MAX_WORD_CHARS` counts as one word per `MAX_WORD_CHARS` characters and may be
cut between them (counted `hard_cut_word`), so that a 10 MB article without a space
still becomes bounded chunks.

Token limits need a Hugging Face fast tokenizer. Each article is tokenized once with
offsets, which gives the token count of any span (a token straddling a cut counts on
both sides), plus what a chunk's first word takes extra out of context ("was" may
be two tokens where " was" is one); the greedy pass fills chunks by that count. The
chunk texts are then tokenized on their own and the rare chunk still over the limit
is cut again exactly: binary search over its sentence ends, then word ends, then
characters.

The text of a chunk is text: a literal `<unk>`, `<s>` or `</s>` in it (WikiText writes
`<unk>` for rare words) is tokenized as the characters it is made of, never as the
tokenizer's special token, as SentencePiece does with user text. So corpus text can
never put an unknown, BOS or EOS id (or a pad id) into the shards; the objective
drops special ids from its target sets and the LM loss would learn them as text.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections import Counter
from typing import Sequence

MAX_WORD_CHARS = 100

_WORD = re.compile(r"\S+")
_LONG = re.compile(r"\S{%d,}" % (MAX_WORD_CHARS + 1))
# A sentence end: terminal punctuation, optional closers, whitespace, then something
# that can start a sentence. The start of the next sentence is not consumed.
_LATIN_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+(\S))")
_NOT_A_START = frozenset(",;:.!?)]}%")
_CJK_END = re.compile(r"[\u3002\uff01\uff1f]+[\u300d\u300f\uff09]*")
_PARA = re.compile(r"\n[ \t\r\f\v]*\n")
_ABBREV = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e cf al no nos fig figs vol vols ed eds rev gen col "
    "lt sgt capt cmdr gov sen rep mt ft approx ca op pp p jan feb mar apr jun jul aug sep sept oct nov dec".split())


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the `.` at `dot` closes an abbreviation or an initial, not a sentence."""
    if text[dot] != ".":
        return False
    start = dot
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:dot]
    if len(word) == 1 and word.isupper():  # an initial: "J. Smith", "H. gammarus"
        return True
    return word.lower().lstrip("([\"'") in _ABBREV


def units(text: str) -> list[tuple[int, int]]:
    """Sentence spans [start, end) of `text`, surrounding whitespace trimmed, in order."""
    cuts = set()
    for m in _LATIN_END.finditer(text):
        nxt = m.group(1)
        if not nxt.islower() and nxt not in _NOT_A_START and not _is_abbreviation(text, m.start()):
            cuts.add(m.end())
    for m in _CJK_END.finditer(text):
        cuts.add(m.end())
    for m in _PARA.finditer(text):
        cuts.add(m.start())
    out = []
    start = 0
    for cut in sorted(cuts) + [len(text)]:
        a, b = _trim(text, start, cut)
        if a < b:
            out.append((a, b))
        start = cut
    return out


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    seg = text[a:b]
    core = seg.strip()
    if not core:
        return b, b
    a += len(seg) - len(seg.lstrip())
    return a, a + len(core)


def words(text: str, a: int = 0, b: int | None = None) -> list[tuple[int, int]]:
    """Word spans in text[a:b]; a run longer than MAX_WORD_CHARS splits into pieces."""
    b = len(text) if b is None else b
    spans = [m.span() for m in _WORD.finditer(text, a, b)]
    if not _LONG.search(text, a, b):
        return spans
    out = []
    for s, e in spans:
        while e - s > MAX_WORD_CHARS:
            out.append((s, s + MAX_WORD_CHARS))
            s += MAX_WORD_CHARS
        out.append((s, e))
    return out


def count_words(text: str) -> int:
    """Words as the chunker counts them (a long run counts once per MAX_WORD_CHARS)."""
    n = len(text.split())
    for m in _LONG.finditer(text):
        n += (m.end() - m.start() - 1) // MAX_WORD_CHARS
    return n


def _cut_reason(text: str, end: int) -> str:
    """How a cut at `end` inside a sentence splits it: between words or inside one."""
    return "hard_cut_sentence" if end >= len(text) or text[end].isspace() else "hard_cut_word"


class _Meter:
    """Token counts of any span of one article, from one tokenization with offsets.

    count(a, b) is the number of tokens overlapping text[a:b]: a token straddling a
    cut counts on both sides, so the in-context count is never underestimated.
    Articles are measured in sections of about SECTION_CHARS characters (cut where a
    unit starts); a span must lie within one section.
    """

    def __init__(self, sections: list[tuple[int, int]], offsets: list):
        import numpy as np

        self.bounds = [a for a, _ in sections]
        self.starts, self.ends = [], []
        for (a, _), offs in zip(sections, offsets):
            arr = np.fromiter(itertools.chain.from_iterable(offs), np.int64, 2 * len(offs)).reshape(-1, 2) + a
            self.starts.append(arr[:, 0].copy())
            self.ends.append(np.maximum.accumulate(arr[:, 1]) if len(arr) else arr[:, 1].copy())

    def section(self, pos: int) -> int:
        return max(bisect.bisect_right(self.bounds, pos) - 1, 0)

    def count(self, a: int, b: int) -> int:
        k = self.section(a)
        starts, ends = self.starts[k], self.ends[k]
        return int(starts.searchsorted(b, "left") - ends.searchsorted(a, "right"))


def _backend(tokenizer):
    """A copy of the Rust tokenizer behind a Hugging Face fast tokenizer that reads special
    tokens' strings as text, if calling it directly gives the same ids as the documented
    call (it skips per-text Python work); else None.

    A copy: the Hugging Face wrapper sets `encode_special_tokens` on its own backend at
    every call, so a flag set on that one would not stay set."""
    raw = getattr(tokenizer, "_tokenizer", None)
    if raw is None or not hasattr(raw, "encode_batch_fast") or not hasattr(raw, "encode_special_tokens"):
        return None
    probe = ["Hello world. It's 3.14, naïve café 東京.", "  two leading spaces\tand a tab", "x",
             "a <unk> b <s> c </s> <pad>"]
    try:
        raw = type(raw).from_str(raw.to_str())
        raw.encode_special_tokens = True
        same = ([e.ids for e in raw.encode_batch_fast(probe, add_special_tokens=False)]
                == tokenizer(probe, **TEXT_ONLY)["input_ids"])
    except Exception:  # noqa: BLE001 - any mismatch in API: use the documented call
        return None
    return raw if same else None


# How prep calls a tokenizer on corpus text: no BOS/EOS added, and the strings of special
# tokens read as text (the module's docstring says why).
TEXT_ONLY = {"add_special_tokens": False, "split_special_tokens": True}


class Chunker:
    """Cuts articles into chunk texts under a word and/or a token limit.

    `tokenizer` (a Hugging Face fast tokenizer) is needed for a token limit, and for
    the ids that `chunk_many_ids` and `fit_many` return.
    """

    SECTION_CHARS = 200_000  # articles are measured in pieces of about this many characters

    def __init__(self, max_words: int | None = None, max_tokens: int | None = None, tokenizer=None):
        if max_tokens is not None and tokenizer is None:
            raise ValueError("max_tokens needs a tokenizer")
        self.max_words = max_words
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self._raw = _backend(tokenizer) if tokenizer is not None else None

    # -- tokenizer calls (batched) ------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list:
        """Token ids of each text: no special token added, none read from the text (TEXT_ONLY)."""
        if not texts:
            return []
        if self._raw is not None:
            if len(texts) == 1:  # no thread pool round trip for one short text
                return [self._raw.encode(texts[0], add_special_tokens=False).ids]
            return [e.ids for e in self._raw.encode_batch_fast(list(texts), add_special_tokens=False)]
        return self.tokenizer(list(texts), **TEXT_ONLY)["input_ids"]

    def _offsets(self, texts: Sequence[str]) -> list:
        if not texts:
            return []
        if self._raw is not None:
            return [e.offsets for e in self._raw.encode_batch(list(texts), add_special_tokens=False)]
        return self.tokenizer(list(texts), **TEXT_ONLY, return_offsets_mapping=True)["offset_mapping"]

    # -- public ---------------------------------------------------------------------------
    def chunk(self, text: str, title: str = "", counts: Counter | None = None) -> list[str]:
        """One article to its chunk texts; `title` is prepended to the first chunk."""
        return self.chunk_many([(title, text)], counts)[0]

    def chunk_many(self, articles: Sequence[tuple[str, str]], counts: Counter | None = None,
                   per_article: list | None = None) -> list[list[str]]:
        """Several (title, text) articles to their chunk texts."""
        return [[t for t, _ in chunks] for chunks in self._chunk(articles, counts, per_article, ids=False)]

    def chunk_many_ids(self, articles: Sequence[tuple[str, str]], counts: Counter | None = None,
                       per_article: list | None = None) -> list[list[tuple[str, list]]]:
        """Several (title, text) articles to [(chunk text, its token ids)] each.

        Forced cuts are counted in `counts` by reason (hard_cut_sentence, hard_cut_word);
        `per_article`, if given, receives one such Counter per article.
        """
        return self._chunk(articles, counts, per_article, ids=True)

    def fit_many(self, texts: Sequence[str], counts: Counter | None = None,
                 reason: str = "chunk_tokens") -> list[tuple[str, list, bool]]:
        """Chunks that arrive already cut: (text, ids, was_cut) each, a text over the
        limits cut to its longest fitting prefix (at a sentence end where possible,
        else a word end, else a character) and counted as `reason`."""
        ids = self.encode(texts)
        out = []
        for text, tokens in zip(texts, ids):
            if self._fits(text, len(tokens)):
                out.append((text, tokens, False))
                continue
            end, _ = self._fit_end(text, 0, len(text), [b for _, b in units(text)])
            text = text[:end].rstrip()
            out.append((text, self.encode([text])[0], True))
            if counts is not None:
                counts[reason] += 1
        return out

    # -- the cut ------------------------------------------------------------------------------
    def _chunk(self, articles, counts, per_article, ids: bool):
        if self.max_words is None and self.max_tokens is None:
            raise ValueError("a chunker needs max_words, max_tokens or both")
        per = [Counter() for _ in articles]
        # The title joins the first sentence: it counts against the first chunk's
        # limits like any text, and is never a chunk of its own.
        texts = [f"{title.strip()} {text}" if title.strip() else text for title, text in articles]
        docs = []
        for text in texts:
            sentences = units(text)
            bounded = self._bounded(text, sentences) if self.max_tokens is not None else sentences
            docs.append((text, bounded, {b for _, b in sentences}))
        meters: list = [None] * len(docs)
        if self.max_tokens is not None:
            sections = [self._sections(text, spans) for text, spans, _ in docs]
            offsets = self._offsets([text[a:b] for (text, _, _), secs in zip(docs, sections) for a, b in secs])
            k = 0
            for d, secs in enumerate(sections):
                meters[d] = _Meter(secs, offsets[k:k + len(secs)])
                k += len(secs)
        out = [self._greedy(text, spans, ends, meters[d], per[d]) for d, (text, spans, ends) in enumerate(docs)]
        if self.max_tokens is not None:
            return self._finish(self._verify(out, docs, per), per, counts, per_article)
        out = [[text[a:b] for a, b in chunks] for (text, _, _), chunks in zip(docs, out)]
        if ids:
            flat = self.encode([c for chunks in out for c in chunks])
            k, with_ids = 0, []
            for chunks in out:
                with_ids.append(list(zip(chunks, flat[k:k + len(chunks)])))
                k += len(chunks)
            out = with_ids
        else:
            out = [[(c, None) for c in chunks] for chunks in out]
        return self._finish(out, per, counts, per_article)

    @staticmethod
    def _finish(out, per, counts, per_article):
        if counts is not None:
            for c in per:
                counts.update(c)
        if per_article is not None:
            per_article.extend(per)
        return out

    def _bounded(self, text, spans):
        """Units with those longer than SECTION_CHARS cut at word ends into smaller ones
        (a 10 MB sentence is never measured or tokenized in one piece)."""
        if all(b - a <= self.SECTION_CHARS for a, b in spans):
            return spans
        out = []
        for a, b in spans:
            if b - a <= self.SECTION_CHARS:
                out.append((a, b))
                continue
            start = last = None
            for s, e in words(text, a, b):
                if start is None:
                    start = s
                elif e - start > self.SECTION_CHARS:
                    out.append((start, last))
                    start = s
                last = e
            out.append((start, last))
        return out

    def _sections(self, text, spans):
        """Char ranges of at most about SECTION_CHARS, cut where units start."""
        out, a = [], 0
        for s, e in spans:
            if e - a > self.SECTION_CHARS and s > a:
                out.append((a, s))
                a = s
        out.append((a, len(text)))
        return out

    def _greedy(self, text, spans, sentence_ends, meter, counts):
        """Chunk spans (a, b): whole units per chunk while the limits allow."""
        pieces = []  # (a, b, words): units, over-long ones already cut into pieces
        for a, b in spans:
            w = count_words(text[a:b]) if self.max_words is not None else 0
            t = meter.count(a, b) if meter is not None else 0
            pieces += self._split_unit(text, a, b, meter) if self._over(w, t) else [(a, b, w)]
        chunks, start, end, cw, extra = [], None, None, 0, 0
        for a, b, w in pieces:
            if start is not None:
                same = meter is None or meter.section(a) == meter.section(start)
                if not same or self._over(cw + w, meter.count(start, b) + extra if meter is not None else 0):
                    chunks.append((start, end))
                    start, cw = None, 0
            if start is None:
                start = a
                extra = self._first_word_extra(text, a, meter) if meter is not None else 0
            end = b
            cw += w
        if start is not None:
            chunks.append((start, end))
        for _, b in chunks:
            if b not in sentence_ends:  # the chunk ends inside a sentence
                counts[_cut_reason(text, b)] += 1
        return chunks

    def _first_word_extra(self, text, a, meter) -> int:
        """Tokens the word at `a` takes beyond its in-context count when it starts a chunk
        (out of context, a word often splits differently: 'was' vs ' was')."""
        m = _WORD.match(text, a)
        if m is None:
            return 0
        return max(0, len(self.encode([m.group()])[0]) - meter.count(a, m.end()))

    def _over(self, w: int, t: int) -> bool:
        return ((self.max_words is not None and w > self.max_words)
                or (self.max_tokens is not None and t > self.max_tokens))

    def _split_unit(self, text, a, b, meter):
        """A unit over a limit to pieces (a, b, words), each within the limits: whole
        words while they fit, a word alone over the token limit by characters."""
        import numpy as np

        if meter is None and not _LONG.search(text, a, b):  # words only: max_words at a time, by regex
            rx = re.compile(r"\S+(?:\s+\S+){0,%d}" % (self.max_words - 1))
            pieces = [m.span() for m in rx.finditer(text, a, b)]
            return [(s, e, self.max_words) for s, e in pieces[:-1]] + [
                (s, e, count_words(text[s:e])) for s, e in pieces[-1:]]
        spans = words(text, a, b)
        n = len(spans)
        if meter is not None:  # tokens starting before each word's end
            k = meter.section(a)
            before_end = meter.starts[k].searchsorted(np.array([e for _, e in spans], dtype=np.int64), "left")
        out, i = [], 0
        while i < n:
            s = spans[i][0]
            j = min(n, i + self.max_words) if self.max_words is not None else n
            if meter is not None:  # the most words whose tokens fit: count(s, end) + extra <= max_tokens
                done = int(meter.ends[k].searchsorted(s, "right"))
                extra = self._first_word_extra(text, s, meter)
                j = min(j, i + int(before_end[i:j].searchsorted(done + self.max_tokens - extra, "right")))
            if j > i:
                out.append((s, spans[j - 1][1], j - i))
                i = j
                continue
            e = spans[i][1]  # one word alone is over the token limit: cut by characters
            while s < e:
                lo, hi = s + 1, e  # the largest end with count(s, end) <= max_tokens
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if meter.count(s, mid) <= self.max_tokens:
                        lo = mid
                    else:
                        hi = mid - 1
                out.append((s, lo, 1))
                s = lo
            i += 1
        return out

    # -- exact check --------------------------------------------------------------------------
    def _verify(self, out, docs, per):
        """Tokenize every chunk; cut again, exactly, the few that the count missed.
        Returns [(chunk text, ids)] per article."""
        ids = self.encode([text[a:b] for (text, _, _), chunks in zip(docs, out) for a, b in chunks])
        k, fixed = 0, []
        for d, ((text, _, sentence_ends), chunks) in enumerate(zip(docs, out)):
            new = []
            for a, b in chunks:
                if len(ids[k]) <= self.max_tokens:
                    new.append((text[a:b], ids[k]))
                else:
                    parts = self._recut(text, a, b, sorted(sentence_ends), per[d])
                    new += zip(parts, self.encode(parts))
                k += 1
            fixed.append(new)
        return fixed

    def _recut(self, text, a, end, sentence_ends, counts):
        """text[a:end] in exact-fitting chunks, cut at sentence ends where possible."""
        out = []
        while a < end:
            lo = bisect.bisect_right(sentence_ends, a)
            hi = bisect.bisect_right(sentence_ends, end)
            cut, reason = self._fit_end(text, a, end, sentence_ends[lo:hi])
            if reason is not None and cut < end:
                counts[reason] += 1
            out.append(text[a:cut])
            a, _ = _trim(text, cut, end)
        return out

    def _fits(self, s: str, n_tokens: int | None = None) -> bool:
        if self.max_words is not None and count_words(s) > self.max_words:
            return False
        if self.max_tokens is None:
            return True
        return (len(self.encode([s])[0]) if n_tokens is None else n_tokens) <= self.max_tokens

    def _fit_end(self, text, a, b, candidates):
        """(end, reason): the largest end among `candidates`, else among word ends, else
        among characters, such that text[a:end] fits. At least one character always
        goes, so cutting makes progress."""
        # Every word (and every MAX_WORD_CHARS piece of one) is at least one token, so
        # no prefix holding more words than the limit fits: search only below that.
        limit = min(x for x in (self.max_words, self.max_tokens) if x is not None)
        for n, m in enumerate(_WORD.finditer(text, a, b)):
            if n >= limit:
                b = m.end()
                break
        word_ends = [e for _, e in words(text, a, b)]
        first_word_end = word_ends[0] if word_ends else b
        tiers = ((candidates, None), (word_ends, "hard_cut_sentence"),
                 (range(a + 1, first_word_end + 1), "hard_cut_word"))
        for cands, reason in tiers:
            cands = [c for c in cands if a < c <= b]
            lo, hi, best = 0, len(cands) - 1, None
            while lo <= hi:  # a longer prefix never has fewer tokens: binary search
                mid = (lo + hi) // 2
                if self._fits(text[a:cands[mid]]):
                    best, lo = cands[mid], mid + 1
                else:
                    hi = mid - 1
            if best is not None:
                return best, (None if reason is None else _cut_reason(text, best))
        return a + 1, "hard_cut_word"
