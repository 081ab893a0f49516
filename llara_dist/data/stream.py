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

What is read is checked against the manifest: a shard's byte size at every read, its
sha256 the first time this process reads it (from memory: no second read), its number of
documents, and every token id below the vocabulary size. `ShardSet.check_files` is the
cheap check of all local shards before anything is read (train start-up).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from llara_dist.data import shards as sh
from llara_dist.errors import UserError

# Members a reader needs; .txt and .json (audit only) are skipped without decoding.
_NEEDED = ("ids", "next")


@dataclass(frozen=True)
class ShardSet:
    """The shards of one manifest: URLs, what each should hold, and an identity for cursors."""

    location: str
    names: tuple[str, ...]
    docs: tuple[int, ...]
    fingerprint: str  # sha256 of the manifest's shard list: a cursor belongs to one manifest
    sizes: tuple[int | None, ...] = ()  # per shard, in bytes; None: not recorded (older manifests)
    digests: tuple[str | None, ...] = ()  # per shard, sha256
    vocab_size: int | None = None  # every token id must be below it; None: not checked
    manifest: dict = field(default_factory=dict, compare=False, repr=False)
    # shards whose sha256 this process has verified: a copy per DataLoader worker process
    verified: set = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def open(cls, location: str, vocab_size: int | None = None) -> "ShardSet":
        """The manifest at `location`; ids are checked below `vocab_size`, by default the
        vocabulary size the manifest records."""
        manifest = sh.read_manifest(location)
        entries = manifest["shards"]
        try:
            names = tuple(str(e["name"]) for e in entries)
            docs = tuple(int(e["docs"]) for e in entries)
            sizes = tuple(None if e.get("bytes") is None else int(e["bytes"]) for e in entries)
            sums = tuple(None if e.get("sha256") is None else str(e["sha256"]) for e in entries)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{location}: manifest shard entries need 'name' and 'docs' ({e})") from None
        listing = json.dumps([[e.get("name"), e.get("docs"), e.get("sha256")] for e in entries])
        if vocab_size is None:
            recorded = (manifest.get("tokenizer") or {}).get("vocab_size")
            vocab_size = recorded if isinstance(recorded, int) else None
        return cls(location, names, docs, hashlib.sha256(listing.encode()).hexdigest()[:16], sizes, sums,
                   vocab_size, manifest)

    def __len__(self) -> int:
        return len(self.names)

    def url(self, i: int) -> str:
        return sh.shard_url(self.location, self.names[i])

    def read(self, i: int) -> list[sh.Doc]:
        """All documents of shard i, in file order, checked against the manifest (first error raised)."""
        url, check_sum = self.url(i), self.digests[i] is not None and i not in self.verified
        docs = read_shard(url, self.sizes[i], self.digests[i] if check_sum else None)
        problems = self.check_docs(i, docs)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s) in this shard)" if len(problems) > 1 else ""
            raise UserError(problems[0] + more)
        if check_sum:
            self.verified.add(i)
        return docs

    def check_docs(self, i: int, docs: list[sh.Doc]) -> list[str]:
        """What is wrong with the documents read from shard i: their number, ids out of range."""
        url, out = self.url(i), []
        if len(docs) != self.docs[i]:
            out.append(f"{url}: holds {len(docs)} documents but the manifest says {self.docs[i]}: "
                       "truncated or replaced shard")
        if self.vocab_size is not None:
            for key, member, bad in sh.out_of_range(docs, self.vocab_size):
                out.append(f"{url}: document {key!r} holds token id {bad} in its .{member}, outside the "
                           f"vocabulary (0..{self.vocab_size - 1}): made with another tokenizer, or damaged")
        return out

    def check_files(self) -> list[str]:
        """What is wrong with the local shards, found without reading them: a missing shard, a size
        other than the manifest's; for manifests without sizes, a document count other than the
        manifest's, counted from the tar headers (one read per member header, not of the data).
        Remote shards (http, pipe:) are checked when read."""
        out = []
        for i in range(len(self.names)):
            path = _local_path(self.url(i))
            if path is None:
                continue
            try:
                size = os.stat(path).st_size
                if self.sizes[i] is not None:
                    if size != self.sizes[i]:
                        out.append(f"{path}: {size:,} bytes but the manifest says {self.sizes[i]:,}: "
                                   "truncated or replaced shard")
                elif (n := count_documents(path)) != self.docs[i]:
                    out.append(f"{path}: holds {n} documents but the manifest says {self.docs[i]}: "
                               "truncated or replaced shard")
            except FileNotFoundError:
                out.append(f"{path}: missing (the manifest lists it)")
            except (ValueError, OSError) as e:
                out.append(str(e) if str(path) in str(e) else f"{path}: {e}")
        return out

    def check_readers(self, num_readers: int, world: int, workers: int) -> None:
        """Refuse a split where some reader would get no shard."""
        if len(self) < num_readers:
            raise UserError(
                f"{self.location}: {len(self)} shard(s) for {num_readers} readers "
                f"(world size {world} x {workers} DataLoader worker(s) per rank); every reader needs "
                f"at least one shard: prep again with --shard-docs {max(sum(self.docs) // num_readers, 1)} "
                f"or fewer ({num_readers} shards or more)" + (", or lower data.num_workers" if workers > 1 else ""))


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the shard indices."""
    return np.random.default_rng([seed, epoch]).permutation(n_shards)


def reader_shards(n_shards: int, seed: int, epoch: int, reader: int, num_readers: int) -> list[int]:
    """Shard indices that `reader` reads in `epoch`, in order; disjoint across readers."""
    return [int(i) for i in shard_order(n_shards, seed, epoch)[reader::num_readers]]


def read_shard(url: str, size: int | None = None, sha256: str | None = None) -> list[sh.Doc]:
    """All documents of one shard, in file order; a malformed sample raises naming shard and key.
    With `size` or `sha256`, a shard that does not have them is refused before it is parsed."""
    return [sh.decode_sample(s, url) for s in sh.samples_in(shard_members(url, size, sha256), url, _NEEDED)]


def shard_members(url: str, size: int | None = None, sha256: str | None = None) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every member of a tar shard at any URL webdataset opens, the shard
    checked against the `size` and `sha256` given."""
    data, digest = _read(url, sha256 is not None)
    if size is not None and len(data) != size:
        raise UserError(f"{url}: {len(data):,} bytes but the manifest says {size:,}: truncated or replaced shard")
    if digest != sha256:
        raise UserError(f"{url}: sha256 {digest} but the manifest says {sha256}: the shard changed after prep "
                         "(damaged or replaced)")
    members = _plain_tar_members(data)
    if members is None:  # long names, pax headers, compression: tarfile handles the general case
        try:
            members = _tarfile_members(data)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"{url}: not a readable tar shard ({e})") from None
    return members


def _read(url: str, hashed: bool) -> tuple[bytes, str | None]:
    """The bytes at `url` and, if `hashed`, their sha256: hashed in memory, where the parse reads
    them from too, so the check costs no second read of the shard (about 1 GB/s of hashing)."""
    import webdataset as wds

    try:
        with wds.gopen(url, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        raise UserError(f"{url}: missing (the manifest lists it)") from None
    return data, hashlib.sha256(data).hexdigest() if hashed else None


def _member_header(h, pos: int = 0) -> tuple[str, int] | None:
    """(name, size) of the plain ustar member header at h[pos:pos + 512], or None if it is not one."""
    if h[pos + 257:pos + 262] != b"ustar" or h[pos + 156] not in (48, 0) or h[pos + 345] != 0:
        return None  # not a regular file ("0") with a short name
    size = int(h[pos + 124:pos + 136].rstrip(b"\0 ") or b"0", 8)
    name_end = h.find(b"\0", pos, pos + 100)
    return h[pos:name_end if name_end >= 0 else pos + 100].decode("utf-8"), size


def _plain_tar_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """(name, bytes) of every member of a plain ustar archive, or None if it is not one.

    Python's tarfile spends ~40 us per member; shards hold four members per document,
    so this walk over the 512-byte headers is what makes a million tokens a second.
    """
    out, pos, n = [], 0, len(data)
    while pos + 512 <= n:  # fields are read in place: no copy of the header
        if data[pos] == 0:  # the end-of-archive zero blocks
            return out
        member = _member_header(data, pos)
        if member is None:
            return None
        name, size = member
        pos += 512
        if pos + size > n:
            return None  # truncated: tarfile names the problem
        out.append((name, data[pos:pos + size]))
        pos += (size + 511) // 512 * 512
    return out


def count_documents(path) -> int:
    """Documents of a local tar shard (runs of members with one key; for a block, the keys of its
    index), from the member headers and block indexes only; a shard that ends inside a member or
    before its end-of-archive blocks is an error."""
    keys, last, pos = 0, None, 0
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        while pos + 512 <= end:
            h = os.pread(f.fileno(), 512, pos)
            if h[0] == 0:  # the end-of-archive zero blocks
                return keys
            member = _member_header(h)
            if member is None:  # long names, pax headers: tarfile walks those
                try:
                    return len(sh.samples_in(_tarfile_members(Path(path).read_bytes()), str(path), fields=()))
                except (tarfile.TarError, EOFError) as e:
                    raise UserError(f"{path}: not a readable tar shard ({e})") from None
            name, size = member
            key, _, ext = name.partition(".")
            if ext == sh.BLOCK and pos + 512 + size <= end:
                keys, last = keys + _block_size(f.fileno(), pos + 512, str(path)), None
            else:
                keys, last = keys + (key != last), key
            pos += 512 + (size + 511) // 512 * 512
    raise UserError(f"{path}: ends {'inside a member' if pos > end else 'before its end-of-archive blocks'} "
                     f"({end:,} bytes): truncated shard")


def _block_size(fd: int, offset: int, where: str) -> int:
    """Documents in the block member whose data starts at `offset`: the keys of its index."""
    start = len(sh.BLOCK_MAGIC) + 4
    head = os.pread(fd, start, offset)
    return len(sh.decode_block(head + os.pread(fd, int.from_bytes(head[-4:], "little"), offset + start), where,
                               fields=(), index_only=True))


def _local_path(url: str) -> str | None:
    """The file behind a shard URL, or None when it is not local (http, pipe:)."""
    if url.startswith("file:"):
        return url[len("file:"):]
    return None if url.startswith("pipe:") or "://" in url else url


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
        docs = self.shards.read(shard)
        order = np.random.default_rng([self.seed, self.epoch, shard]).permutation(len(docs))
        return [docs[i] for i in order]

    def __iter__(self) -> Iterator[sh.Doc]:
        while True:
            mine = reader_shards(len(self.shards), self.seed, self.epoch, self.reader, self.num_readers)
            if not any(self.shards.docs[s] for s in mine):
                raise UserError(f"{self.shards.location}: reader {self.reader} has shards "
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
