"""The shard reader: which shards each (rank, worker) reads, in which order, and where it is.

There are N = world * W readers (W = max(num_workers, 1)); reader g = rank * W + worker.
In epoch e the shards are permuted by a generator seeded with (seed, e) and reader g
reads every N-th of them, starting at g. A shard is read in full and its documents
are permuted by (seed, e, shard). When its list ends a reader goes on to epoch e + 1,
so readers are endless and every document is read exactly once per epoch.

The cursor of a reader is (epoch, index in its shard list, documents already taken
from that shard): a fresh Reader given the cursor goes on exactly where the old one
was. webdataset itself cannot resume mid-epoch; this cursor is ours.

Shards are opened with webdataset's `gopen`, so `data.shards` may be a local folder,
an http(s):// prefix, or a `pipe:` command with `{name}` where the file name goes
(`pipe:aws s3 cp s3://bucket/wiki/{name} -`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from llara_dist.data import shards as sh

# Members a reader needs; .txt and .json (audit only) are skipped without decoding.
_NEEDED = ("ids", "next")


@dataclass(frozen=True)
class ShardSet:
    """The shards of one manifest: URLs, document counts and an identity for cursors."""

    location: str
    names: tuple[str, ...]
    docs: tuple[int, ...]
    fingerprint: str  # sha256 of the manifest's shard list: a cursor belongs to one manifest

    @classmethod
    def open(cls, location: str) -> "ShardSet":
        manifest = sh.read_manifest(location)
        entries = manifest["shards"]
        try:
            names = tuple(str(e["name"]) for e in entries)
            docs = tuple(int(e["docs"]) for e in entries)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{location}: manifest shard entries need 'name' and 'docs' ({e})") from None
        listing = json.dumps([[e.get("name"), e.get("docs"), e.get("sha256")] for e in entries])
        return cls(location, names, docs, hashlib.sha256(listing.encode()).hexdigest()[:16])

    def __len__(self) -> int:
        return len(self.names)

    def url(self, i: int) -> str:
        return sh.shard_url(self.location, self.names[i])

    def check_readers(self, num_readers: int, world: int, workers: int) -> None:
        """Refuse a split where some reader would get no shard."""
        if len(self) < num_readers:
            raise ValueError(
                f"{self.location}: {len(self)} shard(s) for {num_readers} readers "
                f"(world size {world} x {workers} DataLoader worker(s) per rank); every reader needs "
                f"at least one shard: write at least {num_readers} shards (prep with a smaller "
                f"--shard-docs) or lower data.num_workers")


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the shard indices."""
    return np.random.default_rng([seed, epoch]).permutation(n_shards)


def reader_shards(n_shards: int, seed: int, epoch: int, reader: int, num_readers: int) -> list[int]:
    """Shard indices that `reader` reads in `epoch`, in order; disjoint across readers."""
    return [int(i) for i in shard_order(n_shards, seed, epoch)[reader::num_readers]]


def read_shard(url: str) -> list[sh.Doc]:
    """All documents of one shard, in file order; a malformed sample raises naming shard and key."""
    docs, current = [], None
    for fname, payload in shard_members(url):
        key, _, ext = fname.partition(".")
        if current is None or key != current["__key__"]:
            if current is not None:
                docs.append(sh.decode_sample(current, url))
            current = {"__key__": key}
        if ext in _NEEDED:
            current[ext] = payload
    if current is not None:
        docs.append(sh.decode_sample(current, url))
    return docs


def shard_members(url: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every member of a tar shard at any URL webdataset opens."""
    import webdataset as wds

    with wds.gopen(url, "rb") as stream:
        data = stream.read()
    members = _plain_tar_members(data)
    if members is None:  # long names, pax headers, compression: tarfile handles the general case
        try:
            members = _tarfile_members(data)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{url}: not a readable tar shard ({e})") from None
    return members


def _plain_tar_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """(name, bytes) of every member of a plain ustar archive, or None if it is not one.

    Python's tarfile spends ~40 us per member; shards hold four members per document,
    so this walk over the 512-byte headers is what makes a million tokens a second.
    """
    out, pos, n = [], 0, len(data)
    while pos + 512 <= n:  # fields are read in place: no copy of the header
        if data[pos] == 0:  # the end-of-archive zero blocks
            return out
        if data[pos + 257:pos + 262] != b"ustar" or data[pos + 156] not in (48, 0) or data[pos + 345] != 0:
            return None  # not a regular file ("0") with a short name
        size = int(data[pos + 124:pos + 136].rstrip(b"\0 ") or b"0", 8)
        name_end = data.find(b"\0", pos, pos + 100)
        name = data[pos:name_end if name_end >= 0 else pos + 100].decode("utf-8")
        pos += 512
        if pos + size > n:
            return None  # truncated: tarfile names the problem
        out.append((name, data[pos:pos + size]))
        pos += (size + 511) // 512 * 512
    return out


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


class Reader:
    """One endless reader of documents; `cursor()` after a document resumes right after it."""

    def __init__(self, shards: ShardSet, seed: int, reader: int, num_readers: int, cursor: dict | None = None):
        self.shards, self.seed, self.reader, self.num_readers = shards, seed, reader, num_readers
        cursor = cursor or {}
        self.epoch = int(cursor.get("epoch", 0))
        self.index = int(cursor.get("index", 0))  # position in this epoch's shard list
        self.offset = int(cursor.get("offset", 0))  # documents already taken from that shard

    def cursor(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "offset": self.offset}

    def _shard_docs(self, shard: int) -> list[sh.Doc]:
        url = self.shards.url(shard)
        docs = read_shard(url)
        if len(docs) != self.shards.docs[shard]:
            raise ValueError(f"{url}: holds {len(docs)} documents but the manifest says "
                             f"{self.shards.docs[shard]}: truncated or replaced shard")
        order = np.random.default_rng([self.seed, self.epoch, shard]).permutation(len(docs))
        return [docs[i] for i in order]

    def __iter__(self) -> Iterator[sh.Doc]:
        while True:
            mine = reader_shards(len(self.shards), self.seed, self.epoch, self.reader, self.num_readers)
            if not any(self.shards.docs[s] for s in mine):
                raise ValueError(f"{self.shards.location}: reader {self.reader} has shards "
                                 f"{[self.shards.names[s] for s in mine]} with no documents in them")
            while self.index < len(mine):
                docs = self._shard_docs(mine[self.index])
                while self.offset < len(docs):
                    doc = docs[self.offset]
                    self.offset += 1
                    if self.offset == len(docs):  # keep the cursor normalised: at the next shard
                        self.index, self.offset = self.index + 1, 0
                    yield doc
                    if self.offset == 0:
                        break
                else:  # a restored cursor at the end of its shard
                    self.index, self.offset = self.index + 1, 0
            self.epoch, self.index, self.offset = self.epoch + 1, 0, 0
