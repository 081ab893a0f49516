r"""Stop words taken out of the BoW target texts before they are tokenized (`prep --stop-words`).

The released LLaRA recipe (FlagEmbedding `research/LLARA/pretrain/data.py`, `--remove_stop_words True`)
turns each target text into its words before tokenizing it:

    text = re.sub(r"[\W_]+", " ", text)            # every run of non-word characters -> one space
    text = " ".join(w for w in text.split() if w.lower() not in stop_words)

with `stop_words` = NLTK's English list plus `! , . ?` (which the substitution has already removed).
`filter_text` is that, character for character, so the ids prep then takes from the filtered text are
the ones the released code trains on. Only the target sets change: the model still reads the chunk's
text as it is.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from llara_dist.errors import UserError

# NLTK's English stop words: the 179 words of `stopwords/english` in nltk_data's
# packages/corpora/stopwords.zip (github.com/nltk/nltk_data, commit 5db857e6f7df11eabb5e5665836db9ec8df07e28;
# the file is unchanged there since the repackaging of 2021-10-21), in the file's order: what
# `nltk.corpus.stopwords.words("english")` gave the released code.
NLTK_ENGLISH = (
    'i', 'me', 'my', 'myself', 'we', 'our', 'ours', 'ourselves', 'you', "you're", "you've", "you'll", "you'd",
    'your', 'yours', 'yourself', 'yourselves', 'he', 'him', 'his', 'himself', 'she', "she's", 'her', 'hers',
    'herself', 'it', "it's", 'its', 'itself', 'they', 'them', 'their', 'theirs', 'themselves', 'what', 'which',
    'who', 'whom', 'this', 'that', "that'll", 'these', 'those', 'am', 'is', 'are', 'was', 'were', 'be', 'been',
    'being', 'have', 'has', 'had', 'having', 'do', 'does', 'did', 'doing', 'a', 'an', 'the', 'and', 'but', 'if',
    'or', 'because', 'as', 'until', 'while', 'of', 'at', 'by', 'for', 'with', 'about', 'against', 'between', 'into',
    'through', 'during', 'before', 'after', 'above', 'below', 'to', 'from', 'up', 'down', 'in', 'out', 'on', 'off',
    'over', 'under', 'again', 'further', 'then', 'once', 'here', 'there', 'when', 'where', 'why', 'how', 'all',
    'any', 'both', 'each', 'few', 'more', 'most', 'other', 'some', 'such', 'no', 'nor', 'not', 'only', 'own',
    'same', 'so', 'than', 'too', 'very', 's', 't', 'can', 'will', 'just', 'don', "don't", 'should', "should've",
    'now', 'd', 'll', 'm', 'o', 're', 've', 'y', 'ain', 'aren', "aren't", 'couldn', "couldn't", 'didn', "didn't",
    'doesn', "doesn't", 'hadn', "hadn't", 'hasn', "hasn't", 'haven', "haven't", 'isn', "isn't", 'ma', 'mightn',
    "mightn't", 'mustn', "mustn't", 'needn', "needn't", 'shan', "shan't", 'shouldn', "shouldn't", 'wasn', "wasn't",
    'weren', "weren't", 'won', "won't", 'wouldn', "wouldn't",
)
# The released code appends these to the list; no word left by _NON_WORD can be one of them.
RELEASED_EXTRA = ("!", ",", ".", "?")

NLTK = "nltk-english"
NONE = "none"
_NON_WORD = re.compile(r"[\W_]+")


def filter_text(text: str, stop_words: frozenset[str]) -> str:
    """`text` without punctuation and without the words whose lower case is in `stop_words`, the
    remaining words joined by single spaces (the released code's filter)."""
    return " ".join(w for w in _NON_WORD.sub(" ", text).split() if w.lower() not in stop_words)


def load(spec: str | None) -> tuple[frozenset[str] | None, dict | None]:
    """`--stop-words` to (the words, what the manifest records); (None, None) for none.

    `spec`: "nltk-english", "none", or a UTF-8 file of words, one per line (blank lines and lines
    starting with # ignored; words lower-cased, as the filter compares lower-cased words)."""
    if spec is None or spec == NONE:
        return None, None
    if spec == NLTK:
        return frozenset(NLTK_ENGLISH + RELEASED_EXTRA), {"list": NLTK, "words": len(NLTK_ENGLISH),
                                                          "sha256": _digest(NLTK_ENGLISH)}
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--stop-words {spec}: no such file (give {NLTK}, {NONE} or a file of words, one per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{spec}: cannot read the stop-word file ({e})") from None
    listed = []
    for n, line in enumerate(lines, 1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if len(word.split()) > 1:
            raise UserError(f"{spec}:{n}: {word!r} is not one word (the filter compares single words)")
        listed.append(word.lower())
    if not listed:
        raise UserError(f"{spec}: holds no stop words (give --stop-words {NONE} to keep every word)")
    words = tuple(sorted(set(listed)))
    return frozenset(words), {"list": str(path), "words": len(words), "sha256": _digest(words)}


def _digest(words) -> str:
    return hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()
