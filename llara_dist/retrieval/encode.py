"""Embed texts with an adapted model: `llara-dist encode`.

    llara-dist encode --model out/export --input corpus.jsonl --kind passage --out p.npy
    llara-dist encode --model out/export --input queries.jsonl --kind query --out q.npy
    llara-dist encode --model out/export --input collection.tsv --kind passage --out-dir emb/ --shard-docs 10000

Passages get the SELF (summarize) prompt, queries the NEXT (predict) prompt, with the
pooling of the preset recorded in the model folder's `llara.json` (written by export).
Input, read as a stream: JSON lines with "text" (optional "title", id in "_id" or "id": BEIR's
corpus.jsonl and queries.jsonl; an id is a string or an integer), a .tsv of `id<TAB>text` lines
(MS MARCO's collection.tsv; a first line that names the columns, as `id<TAB>text`, is a header and
skipped), a folder of `prep` shards (each document's stored text, its id the shard key), or plain
text, one per line (its id: the line number). Ids must be unique within the input.

`--out` writes one float32 .npy, the whole input in memory. `--out-dir` writes a folder of
float16 shards with their ids (retrieval/embeddings.py), for corpora of any size: each rank of a
launch (train/distributed.py `dist_env`; one process without a launcher) encodes shards
rank, rank + world, ..., and skips the shards already complete, so a rerun after a crash or a
preemption finishes the folder with the files an uninterrupted run writes. The ranks share
nothing but the folder: no process group. Rank 0 writes the manifest first (the other ranks wait
for it); whichever rank finds every shard complete when its own work is done adds the count.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import fields
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llara_dist.errors import UserError, existing_path, integer_at_least
from llara_dist.prompts import PRESETS
from llara_dist.retrieval import embeddings
from llara_dist.textfiles import read_json_lines, read_lines

LLARA_JSON = "llara.json"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
DEFAULT_SHARD_DOCS = 10000
PROGRESS_EVERY_SHARDS = 10  # without a terminal, one progress line per this many shards
MANIFEST_WAIT_S = 1800  # how long ranks > 0 wait for rank 0's manifest (rank 0 loads the model first)
# For tests: exit (as a crash would, no clean-up) once this process has written N shards.
STOP_AFTER_SHARDS_ENV = "LLARA_DIST_TEST_STOP_AFTER_SHARDS"


def saved_objective(model_dir: str | Path):
    """The ObjectiveConfig recorded in a model folder's llara.json (by export), or None. One that is
    not JSON, has no "objective", or names a preset that does not exist is refused with the file."""
    from llara_dist.config import ObjectiveConfig

    path = Path(model_dir) / LLARA_JSON
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); `llara-dist export` writes this file") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("objective"), dict):
        raise UserError(f"{path}: no \"objective\" object (the preset and prompts); `llara-dist export` writes "
                        "this file")
    known = {f.name for f in fields(ObjectiveConfig)}
    objective = ObjectiveConfig(**{k: v for k, v in saved["objective"].items() if k in known})
    problems = objective.check()  # the config's own check: an unknown preset is refused, not taken for paper
    if problems:
        raise UserError(f"{path}: objective {'; '.join(problems)}")
    return objective


def encoder_objective(model_dir: str | Path, preset: str | None = None, preset_option: bool = False):
    """The model folder's ObjectiveConfig (llara.json), or the --preset named for a folder without one.
    preset_option: whether the caller's command has a --preset option (the refusal suggests it then)."""
    from llara_dist.config import ObjectiveConfig

    meta_path = Path(model_dir) / LLARA_JSON
    objective = saved_objective(model_dir)
    if objective is None and preset is not None:
        objective = ObjectiveConfig(preset=preset)
    elif objective is None:
        raise UserError(f"{meta_path}: missing; export the model with `llara-dist export`"
                        + (" or name the preset with --preset" if preset_option else ""))
    if preset is not None and preset != objective.preset:
        raise UserError(f"--preset {preset} contradicts {meta_path} (preset {objective.preset})")
    return objective


def load_encoder(model_dir: str | Path, attn: str = "sdpa", dtype: str = "auto", preset: str | None = None,
                 preset_option: bool = False):
    """(model, tokenizer, Preset) from a model folder; the preset comes from its llara.json
    (preset_option: as for encoder_objective)."""
    from llara_dist.config import ModelConfig
    from llara_dist.model.decoder import default_device, load_model
    from llara_dist.prompts import resolve_preset
    from llara_dist.tokenizer import load_tokenizer

    model_dir = existing_path(model_dir, "model folder")
    p = resolve_preset(encoder_objective(model_dir, preset, preset_option))
    tokenizer = load_tokenizer(model_dir)
    device = default_device()
    # no fused ops: batches of changing shapes would compile again and again
    model = load_model(ModelConfig(path=str(model_dir), attn=attn, dtype=dtype, fused_ops=False), tokenizer, p, device)
    return model.to(device).eval(), tokenizer, p


PACK_TEXTS = 1024  # texts packed together (and tokenized) at a time


def encode_texts(model, tokenizer, preset, texts: list[str], kind: str, batch_size: int = 32,
                 max_text_tokens: int = 512, progress: bool = False, packed: bool = False) -> np.ndarray:
    """[N, hidden] float32 unit vectors, in the order of `texts`. Packed: several texts a row, `batch_size`
    rows a batch (embed.encode_packed); else one text a row, `batch_size` texts of similar length a batch,
    padded to the longest (the released code's way)."""
    from llara_dist.model.embed import encode, encode_packed

    order = list(range(len(texts))) if packed else sorted(range(len(texts)), key=lambda i: len(texts[i]))
    step = PACK_TEXTS if packed else batch_size
    out = torch.zeros(0)
    parts = []
    for start in range(0, len(order), step):
        chunk = [texts[i] for i in order[start:start + step]]
        if packed:
            parts.append(encode_packed(model, tokenizer, preset, chunk, kind=kind, max_text_tokens=max_text_tokens,
                                       rows_per_batch=batch_size))
        else:
            parts.append(encode(model, tokenizer, preset, chunk, kind=kind, max_text_tokens=max_text_tokens,
                                batch_size=len(chunk)))
        if progress:
            print(f"\rencode {min(start + step, len(order))}/{len(order)}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    if parts:
        out = torch.cat(parts)
    vecs = np.zeros((len(texts), out.shape[1] if len(parts) else 0), dtype=np.float32)
    vecs[order] = out.numpy()
    return vecs


ID_FIELDS = ("_id", "id")  # a JSON record's id, the first one present (BEIR: "_id")


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number with a fraction",
             str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _json_document(path: Path, line_no: int, obj) -> tuple[str | int, str]:
    """(id, title and text) of one JSON record. An id is a string or an integer: anything else would
    be stored as its Python spelling ("None", "1.0"), which no qrels or run file names."""
    if not isinstance(obj, dict) or "text" not in obj:
        raise UserError(f"{path}:{line_no}: no \"text\" field (a string)")
    if not isinstance(obj["text"], str):
        raise UserError(f"{path}:{line_no}: field \"text\" is {_json_type(obj['text'])}, not a string")
    if obj.get("title") is not None and not isinstance(obj["title"], str):  # null: no title, as ""
        raise UserError(f"{path}:{line_no}: field \"title\" is {_json_type(obj['title'])}, not a string (or null)")
    id_field = next((name for name in ID_FIELDS if name in obj), None)
    doc_id = line_no if id_field is None else obj[id_field]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise UserError(f"{path}:{line_no}: field \"{id_field}\" is {_json_type(doc_id)}; a document id is a "
                        "string or an integer")
    title = (obj.get("title") or "").strip()
    return doc_id, f"{title}\n{obj['text']}" if title else obj["text"]


def _prep_shards(folder: Path):
    """The ShardSet of a `prep` folder: its manifest checked as verify-shards and training check it."""
    from llara_dist.data import shards as sh
    from llara_dist.data.stream import ShardSet

    if not (folder / sh.MANIFEST).is_file():
        raise UserError(f"{folder}: a folder, but no {sh.MANIFEST}; an input folder is one `llara-dist prep` wrote")
    return ShardSet.open(str(folder))


def _prep_records(folder: Path) -> Iterator[tuple[str, object, str]]:
    """(where, shard key, stored text) of every document of a `prep` shard folder, shard by shard in
    the manifest's order, each shard checked against the size and sha256 the manifest gives it."""
    from llara_dist.data import shards as sh
    from llara_dist.data.stream import shard_members

    shards = _prep_shards(folder)
    for i in range(len(shards)):
        url = shards.url(i)
        for sample in sh.samples_in(shard_members(url, shards.sizes[i], shards.digests[i]), url, ("txt",)):
            where = f"{url}: document {sample['__key__']!r}"
            if "txt" not in sample:
                raise UserError(f"{where}: no stored text (.txt), which encode reads")
            try:
                yield where, sample["__key__"], sample["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: its text is not UTF-8 ({e})") from None


TSV_ID_COLUMNS = ("id", "_id", "docid", "doc_id", "pid", "qid", "query_id", "query-id", "corpus-id")
TSV_TEXT_COLUMNS = ("text", "passage", "query", "contents", "title")


def _is_tsv_header(line: str) -> bool:
    """A .tsv's first line that names its columns (`id<TAB>text`, `qid<TAB>query`, any case): no document."""
    columns = [c.strip().lower() for c in line.split("\t")]
    return len(columns) >= 2 and columns[0] in TSV_ID_COLUMNS and all(c in TSV_TEXT_COLUMNS for c in columns[1:])


def _records(path: Path) -> Iterator[tuple[int, object, str]]:
    """(line number, raw id, text) in file order; the format from the suffix, else the first line.
    A folder is `prep`'s shards: (where, key, text) of each document (_prep_records)."""
    if path.is_dir():
        yield from _prep_records(path)
        return
    if path.suffix.lower() == ".tsv":
        for line_no, line in read_lines(path, "input file"):
            if line_no == 1 and _is_tsv_header(line):
                continue
            doc_id, tab, text = line.partition("\t")
            if not tab:
                raise UserError(f"{path}:{line_no}: no tab; a .tsv input holds `id<TAB>text` lines "
                                "(as MS MARCO's collection.tsv)")
            yield line_no, doc_id, text
        return
    as_json = path.suffix.lower() in JSON_SUFFIXES
    if not as_json:  # a file without a telling name: JSON lines when its first line is a JSON object
        first = next(read_lines(path, "input file"), (0, ""))[1]
        as_json = first.lstrip().startswith("{")
    if as_json:
        for line_no, obj in read_json_lines(path, "input file"):
            yield line_no, *_json_document(path, line_no, obj)
    else:
        for line_no, line in read_lines(path, "input file"):
            yield line_no, line_no, line


def _documents(path: Path) -> Iterator[tuple[object, str, str]]:
    """(line number or place, document id, text) of every record (iter_documents)."""
    for line_no, doc_id, text in _records(path):
        doc_id = str(doc_id)
        if not doc_id or "\n" in doc_id or "\r" in doc_id:
            raise UserError(f"{path}:{line_no}: document id {doc_id!r} is empty or holds a line break "
                            "(ids are stored one a line)")
        yield line_no, doc_id, text


def iter_documents(path: str | Path) -> Iterator[tuple[str, str]]:
    """(document id, text) of every record, streamed: never the whole file in memory.

    JSON lines: {"text", "title"?, "_id" or "id"?} (BEIR corpus.jsonl, queries.jsonl; a title goes
    before the text on its own line; an id is a string or an integer); .tsv: `id<TAB>text` (MS MARCO
    collection.tsv, queries.*.tsv; a first line that only names the columns, as `id<TAB>text`, is a
    header and skipped); a folder of `prep` shards (block or sample layout): each document's key and
    stored text; else plain lines. A record without an id is named by its line number. Bad input is
    refused with the file, the line (or shard and key) and the reason. Duplicate ids are
    unique_documents' to refuse."""
    for _, doc_id, text in _documents(Path(path)):
        yield doc_id, text


def unique_documents(path: str | Path) -> Iterator[tuple[str, str]]:
    """iter_documents, refusing an id met before: its vectors could not be told apart from the first
    one's. Costs a set of every id, about 100 bytes an id (~1 GB for MS MARCO's 8.8M passages), so it
    runs in the one pass before the model loads, not as the shards are encoded. A `prep` folder's
    keys are unique as prep makes them (source, article, chunk); its count comes from the manifest."""
    path = Path(path)
    seen = set()
    for line_no, doc_id, text in _documents(path):
        if doc_id in seen:  # read again to name the first line: a set of ids costs less than a dict of lines
            first = next(n for n, other, _ in _documents(path) if other == doc_id)
            raise UserError(f"{path}:{line_no}: document id {doc_id!r} again (first at line {first}); "
                            "ids must be unique")
        seen.add(doc_id)
        yield doc_id, text


def read_texts(path: str | Path) -> list[str]:
    """Every text of an input file, in memory; an input without any is refused. Ids may repeat: the
    .npy of `--out` keeps no ids, only the input's order."""
    texts = [text for _, text in iter_documents(path)]
    if not texts:
        raise UserError(f"{path}: no texts to encode (the file is empty or blank)")
    return texts


def file_sha256(path: str | Path) -> str:
    """A file's sha256; a prep folder's is its manifest's, which holds every shard's sha256."""
    if Path(path).is_dir():
        path = Path(path) / "manifest.json"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def count_documents(path: str | Path) -> int:
    """Read the whole input once before any model loads: bad input (a duplicate id too) is refused at
    start, not hours into the run, and the count fixes the shards. A `prep` folder's manifest has the
    count already (its shards are checked against their sha256 as the encode reads them)."""
    if Path(path).is_dir():
        count = sum(_prep_shards(Path(path)).docs)
    else:
        count = sum(1 for _ in unique_documents(path))
    if not count:
        raise UserError(f"{path}: no texts to encode (the file is empty or blank)")
    return count


def iter_shard_documents(path: str | Path, shard_docs: int) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """(shard index, its (id, text) records) in input order; one shard in memory at a time."""
    documents = iter_documents(path)
    index = 0
    while chunk := list(islice(documents, shard_docs)):
        yield index, chunk
        index += 1


class ShardProgress:
    """Rank 0's progress on stderr: its shards and documents done, docs/s, ETA for its share (every
    rank has about the same). On a terminal one line redrawn after each shard, else a line per
    PROGRESS_EVERY_SHARDS shards and at the end, so a log file stays short."""

    def __init__(self, rank: int, world: int, shards: int, docs: int, enabled: bool, tty: bool):
        self.rank, self.world, self.shards, self.docs = rank, world, shards, docs
        self.enabled, self.tty = enabled, tty
        self.shards_done = self.docs_done = 0
        self.started = time.monotonic()

    def shard_done(self, docs: int) -> None:
        self.shards_done += 1
        self.docs_done += docs
        last = self.shards_done == self.shards
        if not self.enabled or not (self.tty or last or self.shards_done % PROGRESS_EVERY_SHARDS == 0):
            return
        from llara_dist.train.metrics import hms

        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.docs_done / elapsed
        line = (f"encode rank {self.rank}/{self.world}: {self.shards_done}/{self.shards} shards, "
                f"{self.docs_done}/{self.docs} docs, {rate:.1f} docs/s, ETA {hms((self.docs - self.docs_done) / rate)}")
        print(f"\r{line}" if self.tty else line, end="\n" if last or not self.tty else "", file=sys.stderr, flush=True)


def folder_identity(args, input_path: Path) -> dict:
    """What a folder's shards must share (embeddings.IDENTITY_KEYS), and where they came from."""
    model = Path(args.model).expanduser().resolve()
    return {"format": embeddings.FORMAT, "version": embeddings.VERSION, "model": str(model),
            "preset": encoder_objective(model, args.preset).preset, "kind": args.kind, "max_tokens": args.max_tokens,
            "shard_docs": args.shard_docs, "input": str(input_path.resolve()), "input_sha256": file_sha256(input_path),
            "dtype": embeddings.DTYPE}


def check_folder(out_dir: Path, wanted: dict, overwrite: bool) -> dict | None:
    """The folder's manifest when it is this encoding's; else a refusal unless --overwrite (then None)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file; the embedding shards need a folder")
    manifest = embeddings.read_manifest(out_dir) if out_dir.is_dir() else None
    if manifest is not None:
        differences = embeddings.identity_differences(manifest, wanted)
        if not differences:
            return manifest
        if not overwrite:
            raise UserError(f"{out_dir / embeddings.MANIFEST}: written by another encoding "
                            f"({'; '.join(differences)}); name another --out-dir, or pass --overwrite to replace "
                            "its shards")
    elif out_dir.is_dir() and not overwrite:
        others = sorted(p.name for p in out_dir.iterdir() if not p.name.endswith(embeddings.TMP_SUFFIX))
        if others:
            raise UserError(f"{out_dir}: holds files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                            f"but no {embeddings.MANIFEST}; name a new or empty --out-dir, or pass --overwrite "
                            "to write into it")
    return None


def wait_for_manifest(out_dir: Path, wanted: dict, rank: int) -> dict:
    """Ranks > 0: rank 0's manifest for this encoding (it clears a replaced folder before writing it)."""
    deadline = time.monotonic() + MANIFEST_WAIT_S
    while time.monotonic() < deadline:
        manifest = embeddings.read_manifest(out_dir) if out_dir.is_dir() else None
        if manifest is not None and not embeddings.identity_differences(manifest, wanted):
            return manifest
        time.sleep(1.0)
    raise UserError(f"rank {rank}: no {out_dir / embeddings.MANIFEST} for this encoding after {MANIFEST_WAIT_S} s; "
                    "rank 0 writes it once its model is loaded: is rank 0 running, with the same arguments?")


def finish_if_complete(out_dir: Path, count: int) -> bool:
    """Add the count to the manifest once every shard is complete; True when the folder is finished.
    Every rank checks when its own shards are done, so the last one to finish writes it."""
    manifest = embeddings.read_manifest(out_dir)
    if embeddings.missing_shards(out_dir, manifest, count):
        return False
    if manifest.get("count") != count:
        embeddings.write_manifest(out_dir, {**manifest, "count": count})
    return True


def encode_to_folder(args, encoder=None) -> dict:
    """`--out-dir`: this rank's missing shards of the input, written into the folder. `encoder`: the
    (model, tokenizer, preset) of load_encoder, when the caller has it loaded already."""
    from llara_dist.train.distributed import dist_env

    input_path = Path(args.input)
    out_dir = Path(args.out_dir)
    # The ranks share only the folder, never a process group: no rendezvous address is needed, and
    # dist_env (which checks one for training) gets a placeholder when the launcher set none.
    env = dist_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", **os.environ})
    count = count_documents(input_path)  # bad input is refused before the model loads
    wanted = folder_identity(args, input_path)
    check_folder(out_dir, wanted, args.overwrite)
    n_shards = embeddings.shard_count(count, args.shard_docs)

    if torch.cuda.is_available():  # the ranks of one machine each on their own GPU (srun may show each only one)
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    model, tokenizer, preset = encoder or load_encoder(args.model, attn=args.attn, preset=args.preset)
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if check_folder(out_dir, wanted, args.overwrite) is None:  # new, or replaced with --overwrite
            embeddings.clear(out_dir)
            embeddings.write_manifest(out_dir, {**wanted, "dim": int(model.config.hidden_size)})
    else:
        wait_for_manifest(out_dir, wanted, env.rank)

    mine = [i for i in range(env.rank, n_shards, env.world) if not embeddings.shard_complete(out_dir, i)]
    todo = set(mine)
    stop_after = int(os.environ.get(STOP_AFTER_SHARDS_ENV) or 0)
    progress = ShardProgress(env.rank, env.world, len(mine),
                             sum(min(args.shard_docs, count - i * args.shard_docs) for i in mine),
                             enabled=env.rank == 0, tty=sys.stderr.isatty())
    if env.rank == 0:
        print(f"encode rank 0/{env.world}: {len(mine)} shards to encode of {n_shards} ({count} documents), "
              f"{len(range(0, n_shards, env.world)) - len(mine)} of rank 0's already complete", file=sys.stderr)
    written = 0
    for index, records in iter_shard_documents(input_path, args.shard_docs) if mine else ():
        if index > mine[-1]:  # the rest of the input is other ranks' or done
            break
        if index not in todo:
            continue
        vectors = encode_texts(model, tokenizer, preset, [text for _, text in records], args.kind, args.batch_size,
                               args.max_tokens, packed=args.packed)
        embeddings.write_shard(out_dir, index, [doc_id for doc_id, _ in records], vectors)
        written += 1
        progress.shard_done(len(records))
        if stop_after and written >= stop_after:
            print(f"encode: {STOP_AFTER_SHARDS_ENV}={stop_after}: exiting as a crash would", file=sys.stderr,
                  flush=True)
            os._exit(1)
    complete = finish_if_complete(out_dir, count)
    return {"out_dir": str(out_dir), "rank": env.rank, "world": env.world, "shards": n_shards, "written": written,
            "skipped": len(range(env.rank, n_shards, env.world)) - written, "count": count, "complete": complete}


def configure(parser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (with llara.json)")
    parser.add_argument("--input", required=True,
                        help="JSON lines with text (title, _id/id), a .tsv of id<TAB>text, plain lines, or a "
                             "folder of `prep` shards (ids: the shard keys)")
    parser.add_argument("--kind", choices=("passage", "query"), required=True)
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="output .npy file, [N, hidden] float32 (the whole input in memory)")
    out.add_argument("--out-dir", help="output folder of float16 shards with their ids, resumable, one shard per rank "
                                       "at a time (docs/retrieval.md)")
    parser.add_argument("--shard-docs", type=integer_at_least(1), default=None,
                        help=f"documents per shard, with --out-dir (default {DEFAULT_SHARD_DOCS})")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --out-dir: replace the shards of a folder encoded with other settings")
    parser.add_argument("--batch-size", type=integer_at_least(1), default=32)
    parser.add_argument("--max-tokens", type=integer_at_least(1), default=512, help="text tokens kept per input")
    parser.add_argument("--packed", action="store_true",
                        help="several texts a row, --batch-size rows a pass (the same vectors; pays off where the "
                             "attention skips what the mask hides: varlen on a GPU; on CPU with sdpa it is slower, "
                             "docs/retrieval.md)")
    parser.add_argument("--attn", default="sdpa", help="attention path (see `llara-dist doctor`)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None, help="only for a folder without llara.json")


def save_vectors(out: Path, vecs: np.ndarray) -> None:
    """The .npy at exactly `out`, whatever its suffix: np.save given a name adds ".npy" to one without
    it, so `--out q` wrote q.npy, and np.load("q") with the path given found nothing. Writing where
    told surprises no one; refusing a name without .npy would refuse a file name that works."""
    with open(out, "wb") as f:
        np.save(f, vecs)


def run(args) -> int:
    existing_path(args.model, "model folder")
    # a folder without llara.json, and no --preset, is refused before the input is read
    encoder_objective(args.model, args.preset, preset_option=True)
    if args.out_dir is None:
        if args.shard_docs is not None or args.overwrite:
            raise UserError("--shard-docs and --overwrite go with --out-dir; --out writes one .npy file")
        from llara_dist.retrieval.search import prepare_outputs

        out = Path(args.out)
        prepare_outputs({"--out": args.out}, [args.input, args.model])
        texts = read_texts(args.input)  # bad input is refused before the model loads
        model, tokenizer, preset = load_encoder(args.model, attn=args.attn, preset=args.preset)
        vecs = encode_texts(model, tokenizer, preset, texts, args.kind, args.batch_size, args.max_tokens,
                            progress=sys.stderr.isatty(), packed=args.packed)
        save_vectors(out, vecs)
        print(json.dumps({"out": str(out), "count": len(texts), "dim": int(vecs.shape[1]) if vecs.size else 0}))
        return 0
    args.shard_docs = DEFAULT_SHARD_DOCS if args.shard_docs is None else args.shard_docs
    print(json.dumps(encode_to_folder(args)))
    return 0
