"""The shard sample layout, shared by prep (writer) and the stream (reader).

One document (a chunk of an article) is one webdataset sample:

    <key>.ids    text token ids, int32 little-endian (no special tokens)
    <key>.next   EBAR target set: sorted unique int32 ids of the next chunk;
                 absent when the chunk is the last of its article
    <key>.txt    the chunk's text, UTF-8 (for audit; never read in training)
    <key>.json   {"article", "chunk", "source"}

Keys are `<source>-<article>-<chunk>`, with no dots (webdataset splits at dots).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

ID_DTYPE = np.dtype("<i4")


@dataclass
class Doc:
    key: str
    ids: np.ndarray  # [n] int32 text tokens
    next_set: np.ndarray | None  # [m] int32 sorted unique ids of the next chunk, None if last chunk

    @property
    def has_next(self) -> bool:
        return self.next_set is not None


def make_key(source: str, article: int, chunk: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', source)}-{article:09d}-{chunk:05d}"


def encode_sample(key: str, ids, next_ids, text: str, meta: dict) -> dict:
    """A document to the bytes of its sample; `next_ids` is the next chunk's tokens or None."""
    sample = {
        "__key__": key,
        "ids": np.asarray(ids, dtype=ID_DTYPE).tobytes(),
        "txt": text.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }
    if next_ids is not None:
        sample["next"] = np.unique(np.asarray(next_ids, dtype=ID_DTYPE)).astype(ID_DTYPE).tobytes()
    return sample


def decode_sample(sample: dict, where: str = "") -> Doc:
    """Raw tar members of one sample to a Doc; a malformed sample names itself."""
    key = sample.get("__key__", "?")
    raw = sample.get("ids")
    if raw is None or len(raw) % 4:
        raise ValueError(f"{where}: sample {key!r} has no valid .ids member")
    nxt = sample.get("next")
    next_set = None if nxt is None or len(nxt) % 4 else np.frombuffer(nxt, dtype=ID_DTYPE)
    if nxt is not None and (next_set is None or (next_set[1:] <= next_set[:-1]).any()):
        raise ValueError(f"{where}: sample {key!r} has a .next member that is not a sorted set of int32 ids")
    return Doc(key=key, ids=np.frombuffer(raw, dtype=ID_DTYPE), next_set=next_set)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def write_shard(path, samples) -> None:
    """Write encoded samples to a tar file, byte-identical for identical input."""
    import webdataset as wds

    with open(path, "wb") as f, wds.TarWriter(f, user="llara", group="llara", mtime=0, encoder=False) as w:
        for s in samples:
            w.write(s)


# manifest.json, written by prep and read by the stream:
# {
#   "version": 1,
#   "shards": [{"name": "shard-000000.tar", "docs": int, "tokens": int, "sha256": str}, ...],
#   "docs": int, "tokens": int,                 # totals (tokens: text tokens)
#   "tokenizer": {"name_or_path", "class", "vocab_size", "sha256"},
#   "chunking": {...}, "format": str, "inputs": [...],
#   "skipped": {reason: count}, "truncated": {reason: count}
# }
MANIFEST = "manifest.json"


def write_manifest(folder, manifest: dict) -> None:
    from pathlib import Path

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
        raise FileNotFoundError(f"{url}: cannot read the shard manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{url}: not a llara-dist manifest (no 'shards' list)")
    return manifest
