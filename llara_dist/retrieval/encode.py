"""Embed texts with an adapted model: `llara-dist encode`.

    llara-dist encode --model out/export --input corpus.jsonl --kind passage --out p.npy
    llara-dist encode --model out/export --input queries.jsonl --kind query --out q.npy

Passages get the SELF (summarize) prompt, queries the NEXT (predict) prompt, with the
pooling of the preset recorded in the model folder's `llara.json` (written by export).
Input: JSON lines with "text" (and optional "title"), or plain text, one per line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from llara_dist.errors import UserError, existing_path
from llara_dist.textfiles import read_lines

LLARA_JSON = "llara.json"


def saved_objective(model_dir: str | Path):
    """The ObjectiveConfig recorded in a model folder's llara.json (by export), or None."""
    from llara_dist.config import ObjectiveConfig

    path = Path(model_dir) / LLARA_JSON
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())["objective"]
    known = {f.name for f in fields(ObjectiveConfig)}
    return ObjectiveConfig(**{k: v for k, v in saved.items() if k in known})


def load_encoder(model_dir: str | Path, attn: str = "sdpa", dtype: str = "auto", preset: str | None = None):
    """(model, tokenizer, Preset) from a model folder; the preset comes from its llara.json."""
    from llara_dist.config import ModelConfig, ObjectiveConfig
    from llara_dist.model.decoder import default_device, load_model
    from llara_dist.prompts import resolve_preset
    from llara_dist.tokenizer import load_tokenizer

    model_dir = existing_path(model_dir, "model folder")
    meta_path = model_dir / LLARA_JSON
    objective = saved_objective(model_dir)
    if objective is None and preset is not None:
        objective = ObjectiveConfig(preset=preset)
    elif objective is None:
        raise UserError(f"{meta_path}: missing; export the model with `llara-dist export` "
                                "or name the preset with --preset")
    if preset is not None and preset != objective.preset:
        raise UserError(f"--preset {preset} contradicts {meta_path} (preset {objective.preset})")
    p = resolve_preset(objective)
    tokenizer = load_tokenizer(model_dir)
    device = default_device()
    # no fused ops: batches of changing shapes would compile again and again
    model = load_model(ModelConfig(path=str(model_dir), attn=attn, dtype=dtype, fused_ops=False), tokenizer, p, device)
    return model.to(device).eval(), tokenizer, p


def encode_texts(model, tokenizer, preset, texts: list[str], kind: str, batch_size: int = 32,
                 max_text_tokens: int = 512, progress: bool = False) -> np.ndarray:
    """[N, hidden] float32 unit vectors, in the order of `texts`; batched by length."""
    from llara_dist.model.embed import encode

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
    out = torch.zeros(0)
    parts = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start:start + batch_size]]
        parts.append(encode(model, tokenizer, preset, chunk, kind=kind, max_text_tokens=max_text_tokens,
                            batch_size=len(chunk)))
        if progress:
            print(f"\rencode {min(start + batch_size, len(order))}/{len(order)}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    if parts:
        out = torch.cat(parts)
    vecs = np.zeros((len(texts), out.shape[1] if len(parts) else 0), dtype=np.float32)
    vecs[order] = out.numpy()
    return vecs


def read_texts(path: str | Path) -> list[str]:
    """JSON lines ({"text"[, "title"]}) or plain lines; errors name the file and line."""
    path = Path(path)
    texts = []
    for line_no, line in read_lines(path, "input file"):
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise UserError(f"{path}:{line_no}: no \"text\" field")
            title = (obj.get("title") or "").strip()
            texts.append(f"{title}\n{obj['text']}" if title else obj["text"])
        else:
            texts.append(line)
    if not texts:
        raise UserError(f"{path}: no texts to encode (the file is empty or blank)")
    return texts


def configure(parser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (with llara.json)")
    parser.add_argument("--input", required=True, help="JSON lines with text (and title), or plain lines")
    parser.add_argument("--kind", choices=("passage", "query"), required=True)
    parser.add_argument("--out", required=True, help="output .npy file, [N, hidden] float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=512, help="text tokens kept per input")
    parser.add_argument("--attn", default="sdpa", help="attention path (see `llara-dist doctor`)")
    parser.add_argument("--preset", default=None, help="only for a folder without llara.json")


def run(args) -> int:
    existing_path(args.model, "model folder")
    texts = read_texts(args.input)  # bad input is refused before the model loads
    model, tokenizer, preset = load_encoder(args.model, attn=args.attn, preset=args.preset)
    vecs = encode_texts(model, tokenizer, preset, texts, args.kind, args.batch_size, args.max_tokens,
                        progress=sys.stderr.isatty())
    np.save(args.out, vecs)
    print(json.dumps({"out": args.out, "count": len(texts), "dim": int(vecs.shape[1]) if vecs.size else 0}))
    return 0
