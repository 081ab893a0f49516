"""Reading the small text inputs of fine-tuning, encoding and evaluation (JSON lines, TSV, plain
lines), refusing what cannot be read with the file, the line and the reason.

Large corpora go through data/formats.py instead, which counts and replaces undecodable bytes:
one bad byte in gigabytes of web text should not stop prep, but a query file is small enough
to fix, and a replaced character there would silently change what is retrieved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from llara_dist.errors import UserError

BOM = "\ufeff"


def read_lines(path: str | Path, what: str = "file") -> Iterator[tuple[int, str]]:
    """(line number, text without its newline) of every non-blank line of a UTF-8 file. A byte order
    mark at the start of the file (Windows editors write one) is dropped: it is no part of the text."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such {what}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a {what}")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                f"convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
            if n == 1:
                line = line.removeprefix(BOM)
            if line.strip():
                yield n, line.rstrip("\r\n")


def read_json_lines(path: str | Path, what: str = "JSON lines file") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSON lines file."""
    for n, line in read_lines(path, what):
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
