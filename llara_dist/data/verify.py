"""Check shards against their manifest: `llara-dist verify-shards DIR`, and train's start-up check.

    llara-dist verify-shards shards/wiki        # exit 0: every shard as prep wrote it; 2: problems listed

verify-shards reads every shard in full: present, its byte size and sha256 as recorded,
every sample well formed, its number of documents and text tokens as recorded, and every
token id (text and next-chunk sets) below the vocabulary size the manifest records. Each
problem is one line naming the shard and, where it is one, the document (its key).

Before training, `check_before_training` does what costs no reading of the shards: every
local shard present with its recorded size (or, for manifests without sizes, its recorded
number of documents, from the tar headers), and the run's tokenizer the one the shards
were made with. The stream checks the rest as it reads (stream.ShardSet.read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from llara_dist.data import shards as sh
from llara_dist.errors import UserError

BAD_EXIT = 2
_LISTED = 20  # problems listed per shard; the rest are counted


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", metavar="DIR", help="folder (or URL prefix) holding manifest.json and the shards")


def run(args: argparse.Namespace) -> int:
    report, problems = verify(args.shards)
    print(report)
    if problems:
        print(f"llara-dist verify-shards: {problems} problem(s) in {args.shards}", file=sys.stderr)
        return BAD_EXIT
    return 0


def verify(location: str) -> tuple[str, int]:
    """(the printable report, the number of problems) of the shards at `location`."""
    from llara_dist.data.stream import ShardSet, read_shard

    shards = ShardSet.open(location)  # an unreadable manifest is a refusal
    m = shards.manifest
    lines, notes, problems = [], [], 0
    entries = m["shards"]
    docs = tokens = special_docs = 0
    first_special = None
    specials = _special_ids(m)
    for i, entry in enumerate(entries):
        try:
            found = read_shard(shards.url(i), shards.sizes[i], shards.digests[i])
        except (FileNotFoundError, ValueError, OSError) as e:
            lines.append(f"  {e}")
            problems += 1
            continue
        bad = shards.check_docs(i, found)
        n_tokens = sum(len(d.ids) for d in found)
        if isinstance(entry.get("tokens"), int) and n_tokens != entry["tokens"]:
            bad.append(f"{shards.url(i)}: holds {n_tokens:,} text tokens but the manifest says {entry['tokens']:,}")
        lines += [f"  {b}" for b in bad[:_LISTED]]
        if len(bad) > _LISTED:
            lines.append(f"  {shards.url(i)}: ... and {len(bad) - _LISTED} more problem(s) in this shard")
        problems += len(bad)
        docs, tokens = docs + len(found), tokens + n_tokens
        if specials is not None:
            with_specials = [d.key for d in found if np.isin(d.ids, specials).any()]
            special_docs += len(with_specials)
            first_special = first_special or (with_specials and f"{shards.url(i)}: {with_specials[0]!r}")
    per_shard = {"docs": list(shards.docs), "tokens": [e.get("tokens") for e in entries]}
    for key, values in per_shard.items():
        found = sum(values) if all(isinstance(v, int) for v in values) else None
        if isinstance(m.get(key), int) and found is not None and m[key] != found:
            lines.append(f"  {location}: the manifest's total {key} {m[key]:,} != the sum over its shards {found:,}")
            problems += 1
    if shards.vocab_size is None:
        notes.append("token ids not checked: the manifest records no vocabulary size")
    if None in shards.digests or None in shards.sizes:
        notes.append("the manifest records no sha256 or byte size for some shards: those were not compared")
    if special_docs:
        notes.append(f"{special_docs:,} document(s) hold special token ids in their text (first: {first_special}); "
                     "prep tokenizes a literal <unk>, <s> or </s> as text, so these come from an older prep or "
                     "another tool: re-run prep to have none")
    notes += _strays(location, set(shards.names))
    vocab = f"ids below {shards.vocab_size:,}" if shards.vocab_size is not None else "ids unchecked"
    head = (f"verify-shards {location}: {len(entries)} shard(s), {docs:,} documents, {tokens:,} text tokens read "
            f"({vocab}): " + (f"{problems} problem(s)" if problems else "OK"))
    return "\n".join([head] + lines + [f"  note: {n}" for n in notes]), problems


def _special_ids(manifest: dict):
    """The special token ids the manifest records, as an array; None if it records none."""
    recorded = (manifest.get("tokenizer") or {}).get("special_tokens")
    if not isinstance(recorded, dict):
        return None
    ids = sorted({v[1] for v in recorded.values() if v is not None})
    return np.asarray(ids, dtype=sh.ID_DTYPE) if ids else None


def _strays(location: str, listed: set) -> list[str]:
    """Shard files in a local folder that the manifest does not list (training never reads them)."""
    folder = Path(location)
    if not folder.is_dir():
        return []
    stray = sorted(p.name for p in folder.iterdir() if sh.SHARD_NAME.fullmatch(p.name) and p.name not in listed)
    return [f"{len(stray)} shard file(s) not in the manifest (never read): {', '.join(stray[:5])}"] if stray else []


def check_before_training(location: str, tokenizer_dir: str, extra_ok=()) -> int:
    """Refuse shards that are missing or of the wrong size, and a tokenizer other than theirs,
    before any step; returns the text vocabulary size (every id read must be below it)."""
    from llara_dist.data.stream import ShardSet
    from llara_dist.tokenizer import load_tokenizer

    shards = ShardSet.open(location)
    problems = shards.check_files()
    if problems:
        listed = "\n  ".join(problems[:_LISTED]) + (
            f"\n  ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else "")
        raise UserError(f"{location}: {len(problems)} shard(s) do not match the manifest "
                         f"(`llara-dist verify-shards {location}` checks them in full):\n  {listed}")
    tokenizer = load_tokenizer(tokenizer_dir)  # a folder it cannot load is refused, named
    recorded = shards.manifest.get("tokenizer") or {}
    sh.check_tokenizer(location, recorded, tokenizer, tokenizer_dir, extra_ok)
    return sh.text_vocab_size(recorded, tokenizer, extra_ok)
