"""The shard layout, shared by prep (writer) and the stream (reader).

A document (a chunk of an article) has four fields, and a fifth where prep was told to:

    ids    text token ids, int32 little-endian (no special tokens)
    next   EBAR target set: sorted unique int32 ids of the next chunk (or of its first
           `--next-tokens`, after any `--stop-words`); absent when the chunk is the last of its article
    self   EBAE target set, sorted unique int32 ids: written only under `--stop-words` or
           `--self-tokens`; without it the EBAE target is the unique ids of the text the row shows
    txt    the chunk's text, UTF-8 (for audit; never read in training)
    json   {"article", "chunk", "source"}

and a key `<source>-<article>-<chunk>`, with no dots (webdataset splits at dots).

Layout `block` (what prep writes): up to BLOCK_DOCS documents share one tar member,
`<first key>.docs`. A tar member costs a 512-byte header and pads its data to 512 bytes, so
four members per document made a shard of 100-word passages about 3x its payload; a block
costs one header for hundreds of documents. The member holds BLOCK_MAGIC, the length of a
JSON index (the documents' keys and each field's byte length per document, -1 for a missing
`next` or `self`; `self` listed only in blocks that hold one), the index, padding to 4 bytes,
then each field of every document in turn: all the ids, all the next sets, all the self sets,
all the texts, all the json.

Layout `sample` (shards of earlier versions, still read; `prep --layout sample` writes it):
one webdataset sample per document, a member per field: `<key>.ids`, `<key>.next`, ...

Either way the reader sees samples, one dict of field bytes per document (`samples_in`). The
two target sets travel together: a reader that asks for `next` gets `self` too, so the
stream, which asks for the fields training needs, reads the EBAE sets of shards that hold them.

Also here, shared by prep, the stream, train and verify-shards: the manifest's I/O, the
check of token ids against a vocabulary, and the tokenizer's identity as the manifest
records it (and its comparison with the tokenizer a run loads).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llara_dist.errors import UserError

ID_DTYPE = np.dtype("<i4")


@dataclass
class Doc:
    key: str
    ids: np.ndarray  # [n] int32 text tokens
    next_set: np.ndarray | None  # [m] int32 sorted unique ids of the next chunk, None if last chunk
    self_set: np.ndarray | None = None  # [s] int32 sorted unique EBAE target ids, None: the text's own ids

    @property
    def has_next(self) -> bool:
        return self.next_set is not None


def make_key(source: str, article: int, chunk: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', source)}-{article:09d}-{chunk:05d}"


def encode_sample(key: str, ids, next_ids, text: str, meta: dict, self_ids=None) -> dict:
    """A document to the bytes of its sample; `next_ids` is the next chunk's tokens (its EBAR target)
    or None, `self_ids` its EBAE target tokens where they are not `ids` themselves, else None."""
    sample = {
        "__key__": key,
        "ids": np.asarray(ids, dtype=ID_DTYPE).tobytes(),
        "txt": text.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }
    if next_ids is not None:
        sample["next"] = np.unique(np.asarray(next_ids, dtype=ID_DTYPE)).astype(ID_DTYPE).tobytes()
    if self_ids is not None:
        sample["self"] = np.unique(np.asarray(self_ids, dtype=ID_DTYPE)).astype(ID_DTYPE).tobytes()
    return sample


FIELDS = ("ids", "next", "self", "txt", "json")
# Fields a block's index lists only when one of its documents has them: blocks without them are
# byte for byte what prep wrote before they existed, and such blocks read as documents without them.
OPTIONAL = frozenset({"self"})


def _with_targets(fields) -> tuple:
    """`fields`, with `self` where `next` is asked for: the two target sets are read together."""
    return (*fields, "self") if "next" in fields and "self" not in fields else tuple(fields)


BLOCK = "docs"  # the member extension of a block of documents
BLOCK_MAGIC = b"LLARAD01"
BLOCK_DOCS = 256
LAYOUTS = ("block", "sample")


def encode_block(samples: list[dict]) -> bytes:
    """Encoded samples (encode_sample) to the bytes of one block member."""
    index = {"keys": [s["__key__"] for s in samples]}
    body = []
    for f in FIELDS:
        if f in OPTIONAL and not any(f in s for s in samples):
            continue
        index[f] = [len(s[f]) if f in s else -1 for s in samples]
        body += [s[f] for s in samples if f in s]
    head = json.dumps(index, separators=(",", ":")).encode("utf-8")
    head += b" " * (-(len(BLOCK_MAGIC) + 4 + len(head)) % 4)  # the int32 arrays start 4-aligned
    return BLOCK_MAGIC + len(head).to_bytes(4, "little") + head + b"".join(body)


def decode_block(payload: bytes, where: str, fields=FIELDS, index_only: bool = False) -> list[dict]:
    """A block member to its samples, with the `fields` asked for (the others are not copied);
    `index_only`: `payload` ends after the index, and the samples hold their keys alone."""
    start = len(BLOCK_MAGIC) + 4
    fields = _with_targets(fields)
    try:
        if payload[:len(BLOCK_MAGIC)] != BLOCK_MAGIC:
            raise ValueError("not a llara-dist document block")
        head_len = int.from_bytes(payload[len(BLOCK_MAGIC):start], "little")
        index = json.loads(payload[start:start + head_len])
        keys = index["keys"]
        lengths = {f: index[f] if f in index or f not in OPTIONAL else [-1] * len(keys) for f in FIELDS}
        if any(len(v) != len(keys) for v in lengths.values()):
            raise ValueError("its index lists fields of another number of documents")
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: damaged document block ({e})") from None
    samples = [{"__key__": k} for k in keys]
    if index_only:
        return samples
    pos = start + head_len
    for f in FIELDS:
        for s, n in zip(samples, lengths[f]):
            if n >= 0:
                if f in fields:
                    s[f] = payload[pos:pos + n]
                pos += n
    if pos != len(payload):
        raise UserError(f"{where}: damaged document block (its index accounts for {pos:,} of {len(payload):,} bytes)")
    return samples


def samples_in(members, where: str, fields=FIELDS) -> list[dict]:
    """The samples, in file order, of a shard's (member name, bytes) in either layout."""
    out, current = [], None
    fields = _with_targets(fields)
    for name, payload in members:
        key, _, ext = name.partition(".")
        if ext == BLOCK:
            out += decode_block(payload, f"{where}: {name}", fields)
            current = None
            continue
        if current is None or key != current["__key__"]:
            current = {"__key__": key}
            out.append(current)
        if ext in fields:
            current[ext] = payload
    return out


def decode_sample(sample: dict, where: str = "") -> Doc:
    """Raw tar members of one sample to a Doc; a malformed sample names itself."""
    key = sample.get("__key__", "?")
    raw = sample.get("ids")
    if raw is None or len(raw) % 4:
        raise UserError(f"{where}: sample {key!r} has no valid .ids member")
    sets = {}
    for member in ("next", "self"):
        raw_set = sample.get(member)
        ids = None if raw_set is None or len(raw_set) % 4 else np.frombuffer(raw_set, dtype=ID_DTYPE)
        if raw_set is not None and (ids is None or (ids[1:] <= ids[:-1]).any()):
            raise UserError(f"{where}: sample {key!r} has a .{member} member that is not a sorted set of int32 ids")
        sets[member] = ids
    return Doc(key=key, ids=np.frombuffer(raw, dtype=ID_DTYPE), next_set=sets["next"], self_set=sets["self"])


SHARD_NAME = re.compile(r"shard-\d{6}\.tar")  # what shard_name gives


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def write_shard(path, samples, layout: str = "block") -> None:
    """Write encoded samples to a tar file in `layout`, byte-identical for identical input."""
    import webdataset as wds

    if layout == "block":
        samples = [{"__key__": samples[i]["__key__"], BLOCK: encode_block(samples[i:i + BLOCK_DOCS])}
                   for i in range(0, len(samples), BLOCK_DOCS)]
    with open(path, "wb") as f, wds.TarWriter(f, user="llara", group="llara", mtime=0, encoder=False) as w:
        for s in samples:
            w.write(s)


# manifest.json, written by prep and read by the stream:
# {
#   "version": 1,
#   "shards": [{"name": "shard-000000.tar", "docs": int, "tokens": int, "bytes": int, "sha256": str}, ...],
#   "docs": int, "tokens": int,                 # totals (tokens: text tokens)
#   "tokenizer": tokenizer_identity(...),       # below
#   "chunking": {...}, "format": str, "inputs": [...],
#   "targets": {"stop_words": {...} | None, "self_tokens": int | None, "next_tokens": int | None},
#                                               # only where prep's target options were given
#   "skipped": {reason: count}, "truncated": {reason: count}
# }
# Manifests from before "bytes", "vocab_sha256" and "special_tokens" are read as they are:
# what they lack is not checked (docs/data-prep.md).
MANIFEST = "manifest.json"


def write_manifest(folder, manifest: dict) -> None:
    Path(folder, MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def shard_url(location: str, name: str) -> str:
    """The URL of file `name` under `location`: a folder, a URL prefix, or a template with
    `{name}` where the file name goes (`pipe:aws s3 cp s3://bucket/wiki/{name} -`)."""
    if "{name}" in location:
        return location.replace("{name}", name)
    return location.rstrip("/") + "/" + name


def read_manifest(location: str) -> dict:
    """manifest.json under `location` (see shard_url), or a .json path itself."""
    import webdataset as wds

    url = location if location.endswith(".json") else shard_url(location, MANIFEST)
    try:
        with wds.gopen(url, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - any transport error becomes one clear message
        raise UserError(f"{url}: cannot read the shard manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{url}: not a llara-dist manifest (no 'shards' list)")
    return manifest


# -- token ids against a vocabulary ------------------------------------------------------

def out_of_range(docs: list[Doc], vocab_size: int) -> list[tuple[str, str, int]]:
    """(key, member, first bad id) of every document whose .ids or .next hold an id outside
    [0, vocab_size). One min and max over the whole list first: a clean shard costs two
    numpy reductions, not two per document."""
    arrays = [a for d in docs for a in (d.ids, d.next_set, d.self_set) if a is not None and a.size]
    if not arrays:
        return []
    flat = np.concatenate(arrays)
    if flat.min() >= 0 and flat.max() < vocab_size:
        return []
    bad = []
    for d in docs:
        for member, a in (("ids", d.ids), ("next", d.next_set), ("self", d.self_set)):
            if a is not None and a.size and (a.min() < 0 or a.max() >= vocab_size):
                bad.append((d.key, member, int(a[(a < 0) | (a >= vocab_size)][0])))
                break
    return bad


# -- the tokenizer's identity, recorded by prep and compared by train ---------------------

SPECIALS = ("bos", "eos", "unk", "pad")


def files_sha256(folder) -> tuple[str, list[str]]:
    """sha256 over a tokenizer folder's defining file(s): tokenizer.json, else every file."""
    folder = Path(folder)
    files = [folder / "tokenizer.json"] if (folder / "tokenizer.json").is_file() else sorted(
        p for p in folder.iterdir() if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest(), [p.name for p in files]


def vocab_sha256(tokenizer, n: int) -> str:
    """sha256 of the token strings of ids 0..n-1, in id order: what the ids in the shards mean,
    whatever file layout or library version holds the tokenizer."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    return hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode("utf-8")).hexdigest()


def special_tokens(tokenizer) -> dict:
    """{"bos": [token, id] or None, "eos": ..., "unk": ..., "pad": ...}."""
    out = {}
    for name in SPECIALS:
        token, tid = getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None)
        out[name] = None if token is None or tid is None else [str(token), int(tid)]
    return out


def tokenizer_identity(path, tokenizer) -> dict:
    """What the manifest records about the tokenizer that made the ids."""
    digest, hashed = files_sha256(path)
    return {"name_or_path": str(path), "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "sha256": digest, "hashed": hashed, "vocab_sha256": vocab_sha256(tokenizer, len(tokenizer)),
            "special_tokens": special_tokens(tokenizer)}


def tokenizer_differences(recorded: dict, tokenizer, path, extra_ok=()) -> list[str]:
    """How `tokenizer` (loaded from `path`) differs from the recorded identity; [] if it does not.

    Compared, where the manifest records them: the vocabulary size, the vocabulary itself (its
    sha256 over the token strings of the recorded ids; manifests without it: the sha256 of the
    tokenizer's files), and the bos/eos/unk/pad tokens and their ids. The class and the path are
    not compared: one folder loads as different classes in different library versions. Tokens
    above the recorded vocabulary are allowed when they are all in `extra_ok` (the preset's own
    tokens, which a model folder that was trained before already holds)."""
    out = []
    n, size = recorded.get("vocab_size"), len(tokenizer)
    if isinstance(n, int):
        extra = tokenizer.convert_ids_to_tokens(list(range(n, size))) if size > n else []
        unknown = [t for t in extra if t not in extra_ok]
        if size < n or unknown:
            out.append(f"vocabulary size {n} != {size}"
                       + (f" (tokens beyond the shards' vocabulary: {_few(unknown)})" if unknown else ""))
        if recorded.get("vocab_sha256") and size >= n:
            mine = vocab_sha256(tokenizer, n)
            if mine != recorded["vocab_sha256"]:
                out.append(f"vocabulary sha256 {recorded['vocab_sha256'][:16]} != {mine[:16]}")
    if not recorded.get("vocab_sha256") and recorded.get("sha256") and Path(path).is_dir():
        mine, _ = files_sha256(path)
        if mine != recorded["sha256"]:
            out.append(f"sha256 of the tokenizer files {recorded['sha256'][:16]} != {mine[:16]} (this manifest "
                       "predates vocabulary fingerprints, so even a re-saved copy of the same tokenizer "
                       "differs here: re-run prep to record one)")
    if isinstance(recorded.get("special_tokens"), dict):
        mine = special_tokens(tokenizer)
        for name in SPECIALS:
            theirs = recorded["special_tokens"].get(name)
            if theirs != mine[name]:
                out.append(f"{name} token {_special(theirs)} != {_special(mine[name])}")
    return out


def check_tokenizer(location: str, recorded: dict, tokenizer, path, extra_ok=()) -> None:
    """Refuse a tokenizer other than the one the shards at `location` were made with."""
    diff = tokenizer_differences(recorded, tokenizer, path, extra_ok)
    if not diff:
        return
    name = recorded.get("name_or_path") or "?"
    theirs = f"{name} ({recorded.get('class', '?')}, {recorded.get('vocab_size', '?')} tokens)"
    raise UserError(
        f"{location}: the shards were made with tokenizer {theirs}, and this run's tokenizer is {path} "
        f"({type(tokenizer).__name__}, {len(tokenizer)} tokens); they differ: {'; '.join(diff)}. The token ids "
        f"in the shards would stand for other tokens: train with the tokenizer the shards were made with "
        f"(train.tokenizer={name}), or re-run `llara-dist prep` with this one")


def text_vocab_size(recorded: dict, tokenizer, extra_ok=()) -> int:
    """Ids below this are text tokens: the recorded vocabulary size, else the tokenizer's size
    without the extra tokens (added at the end: the preset's own)."""
    if isinstance(recorded.get("vocab_size"), int):
        return recorded["vocab_size"]
    vocab = tokenizer.get_vocab()
    return min([vocab[t] for t in extra_ok if t in vocab] + [len(tokenizer)])


def _special(x) -> str:
    return f"{x[0]!r} (id {x[1]})" if isinstance(x, list) and len(x) == 2 else "none" if x is None else repr(x)


def _few(items: list, k: int = 5) -> str:
    return ", ".join(map(str, items[:k])) + (f" and {len(items) - k} more" if len(items) > k else "")
