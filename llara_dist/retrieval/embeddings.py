"""The embedding-shard folder: what `llara-dist encode --out-dir` writes and search reads.

    DIR/manifest.json      model, preset, kind, dim, dtype, shard_docs, input (path, sha256), count
    DIR/emb-000000.npy     float16 [n, dim]: documents [0, shard_docs) of the input, in input order
    DIR/ids-000000.txt     their document ids, one a line
    DIR/emb-000001.npy ...
    DIR/index.faiss, DIR/index.json   an approximate index over the shards, once search builds one

    for ids, vectors in iter_shards("DIR"):   # in input order; an unfinished folder is refused
        ...

A shard is complete when its ids file exists: both files are written under temporary names and
renamed into place, the ids last, so a process killed at any moment leaves no half shard that
counts (an `emb-` file without its `ids-` file is encoded again). The manifest's `count` is written
once every shard is complete; its absence marks an unfinished folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llara_dist.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "llara-dist embeddings"
VERSION = 1
DTYPE = "float16"  # unit vectors: fp16 keeps ~3 decimal digits per component at half fp32's bytes
TMP_SUFFIX = ".tmp"
# What must agree for shards to belong together: the same model, prompts, texts and cut.
IDENTITY_KEYS = ("format", "version", "model", "preset", "kind", "max_tokens", "shard_docs", "input_sha256")
# The approximate index that search keeps beside the shards (index.py) belongs to them: replaced with them.
FORMAT_FILE = re.compile(r"^(?:emb-\d{6,}\.npy|ids-\d{6,}\.txt|manifest\.json|index\.faiss|index\.json)"
                         r"(?:\.\d+)?(?:\.tmp)?$")


def emb_name(index: int) -> str:
    return f"emb-{index:06d}.npy"


def ids_name(index: int) -> str:
    return f"ids-{index:06d}.txt"


def shard_count(docs: int, shard_docs: int) -> int:
    return -(-docs // shard_docs)


def shard_complete(folder: str | Path, index: int) -> bool:
    """Both files of shard `index` are in place (the ids file is renamed last)."""
    return (Path(folder) / ids_name(index)).is_file()


def write_renamed(path: Path, write, tmp_name: str) -> None:
    """write(file) into `tmp_name` beside `path`, flushed to disk, then renamed to `path`; a failed
    write leaves neither `path` changed nor the temporary file behind."""
    tmp = path.with_name(tmp_name)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_shard(folder: str | Path, index: int, ids: list[str], vectors: np.ndarray) -> None:
    """Shard `index`: vectors (as float16) then ids, each written whole and renamed into place.
    Fixed temporary names: one process owns a shard, and its rerun overwrites what a crash left."""
    folder = Path(folder)
    if len(ids) != len(vectors):
        raise ValueError(f"shard {index}: {len(ids)} ids for {len(vectors)} vectors")
    emb, names = folder / emb_name(index), folder / ids_name(index)
    write_renamed(emb, lambda f: np.save(f, np.ascontiguousarray(vectors, dtype=DTYPE)), emb.name + TMP_SUFFIX)
    write_renamed(names, lambda f: f.write("".join(f"{i}\n" for i in ids).encode("utf-8")), names.name + TMP_SUFFIX)


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest, or None when it has none; an unreadable one is refused."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an embeddings manifest (no \"format\": \"{FORMAT}\")")
    return manifest


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """Written whole, then renamed. The temporary name is this process's own: the last two ranks
    to finish may both write the final manifest (the same content) at the same moment."""
    path = Path(folder) / MANIFEST
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_renamed(path, lambda f: f.write(text.encode("utf-8")), f"{MANIFEST}.{os.getpid()}{TMP_SUFFIX}")


def identity_differences(manifest: dict, wanted: dict) -> list[str]:
    """`key: theirs != ours` for every identity key on which the two disagree."""
    return [f"{k}: {manifest.get(k)!r} != {wanted.get(k)!r}" for k in IDENTITY_KEYS if manifest.get(k) != wanted.get(k)]


def is_format_file(name: str) -> bool:
    """A file this format writes: a shard file, the manifest, or one of their temporary names."""
    return FORMAT_FILE.match(name) is not None


def clear(folder: str | Path) -> None:
    """Remove the manifest first (so no rank takes the folder for a finished or matching one while
    the shards go), then every shard file; files of other kinds stay."""
    folder = Path(folder)
    (folder / MANIFEST).unlink(missing_ok=True)
    for p in folder.iterdir():
        if p.is_file() and is_format_file(p.name):
            p.unlink(missing_ok=True)


def missing_shards(folder: str | Path, manifest: dict, docs: int) -> list[int]:
    return [i for i in range(shard_count(docs, manifest["shard_docs"])) if not shard_complete(folder, i)]


def _read_ids(path: Path) -> list[str]:
    # split on newlines only: str.splitlines would also cut an id at a form feed or U+2028
    try:
        return path.read_text(encoding="utf-8").split("\n")[:-1]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: damaged ids file, not UTF-8 ({e}); {_REENCODE.format(ids=path.name)}") from None


_REENCODE = "remove {ids} and run the same `llara-dist encode --out-dir` again to encode this shard again"


def _read_vectors(emb: Path, ids: Path) -> np.ndarray:
    """A shard's vectors; a damaged file is refused with its name. No pickles: a shard holds numbers
    only, and unpickling a file is running it."""
    try:
        return np.load(emb, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{emb}: damaged, not a .npy array ({e}); {_REENCODE.format(ids=ids.name)}") from None


def iter_shards(folder: str | Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, float16 vectors [n, dim]) of each shard in input order. Refuses a folder whose
    encoding has not finished, and a shard whose two files disagree with each other or the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder}: no {MANIFEST}; not an embeddings folder (llara-dist encode --out-dir writes one)")
    if "count" not in manifest:
        raise UserError(f"{folder}: the encoding has not finished (no count in {MANIFEST}); run the same "
                        "`llara-dist encode --out-dir` again to encode the missing shards")
    count, shard_docs, dim = manifest["count"], manifest["shard_docs"], manifest["dim"]
    for i in range(shard_count(count, shard_docs)):
        emb, names = folder / emb_name(i), folder / ids_name(i)
        if not names.is_file() or not emb.is_file():
            raise UserError(f"{folder}: shard {i} is missing ({emb.name}, {names.name}) although {MANIFEST} "
                            f"counts {count} documents")
        vectors, ids = _read_vectors(emb, names), _read_ids(names)
        expected = min(shard_docs, count - i * shard_docs)
        if vectors.shape != (expected, dim) or vectors.dtype != np.dtype(manifest["dtype"]) or len(ids) != expected:
            raise UserError(f"{emb}: {len(ids)} ids and vectors {vectors.dtype} {list(vectors.shape)}, expected "
                            f"{expected} of {manifest['dtype']} [{expected}, {dim}] as {MANIFEST} says")
        yield ids, vectors


def write_folder(folder: str | Path, shards: Iterable[tuple[list[str], np.ndarray]], identity: dict) -> dict:
    """A finished folder from vectors made elsewhere (a benchmark's, a test's): `shards` yields
    (ids, vectors) of identity["shard_docs"] documents each, the last one fewer; `identity` holds
    the other IDENTITY_KEYS (model, preset, kind, max_tokens, input_sha256) and `input`. Returns the
    manifest, written with its count after the last shard."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {**identity, "format": FORMAT, "version": VERSION, "dtype": DTYPE}
    count, dim, shard_docs = 0, None, identity["shard_docs"]
    for index, (ids, vectors) in enumerate(shards):
        if dim is None:
            dim = int(vectors.shape[1])
            write_manifest(folder, {**manifest, "dim": dim})
        if count % shard_docs or len(ids) > shard_docs:
            raise ValueError(f"shard {index}: {len(ids)} documents after a short shard or over {shard_docs}")
        write_shard(folder, index, ids, vectors)
        count += len(ids)
    if dim is None:
        raise ValueError("no shards to write")
    manifest = {**manifest, "dim": dim, "count": count}
    write_manifest(folder, manifest)
    return manifest


def read_all(folder: str | Path) -> tuple[list[str], np.ndarray]:
    """Every id and vector of a folder at once: for small sets (tests, a query file)."""
    all_ids, parts = [], []
    for ids, vectors in iter_shards(folder):
        all_ids.extend(ids)
        parts.append(vectors)
    return all_ids, np.concatenate(parts) if parts else np.zeros((0, read_manifest(folder)["dim"]), DTYPE)
