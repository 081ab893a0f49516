"""Write a small random decoder with a tokenizer beside it, for smoke tests on any machine.

    llara-dist init-model tiny/model --arch llama --tokenizer /models/llama-2-7b
    llara-dist init-model tiny/qwen --arch qwen2 --tokenizer tok/ --hidden 128 --layers 4 --dtype bf16

The folder holds a Hugging Face model of that architecture (LlamaConfig, MistralConfig or
Qwen2Config, built by llara_dist.model.tiny) over the tokenizer's whole vocabulary
(len(tokenizer), added tokens included), saved with save_pretrained, and the tokenizer itself:
a `model.path` that `llara-dist train` uses as it is (it finds the tokenizer in the model folder),
and a `--tokenizer` for `llara-dist prep`. The weights are random (seeded); the special token ids
in its config are the tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path

from llara_dist.errors import UserError
from llara_dist.model.tiny import ARCHITECTURES

DTYPES = ("fp32", "bf16")


def configure(parser) -> None:
    parser.add_argument("out", metavar="OUT", help="model folder to write (new or empty, see --overwrite)")
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES, help="Hugging Face architecture")
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="local Hugging Face tokenizer folder (copied into OUT; its size is the vocabulary)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=2,
                        help="key/value heads, a divisor of --heads (default: %(default)s)")
    parser.add_argument("--intermediate", type=int, default=128, help="MLP inner size (default: %(default)s)")
    parser.add_argument("--max-positions", type=int, default=2048,
                        help="longest sequence the position embedding is set for (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="saved weights' dtype (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="write into OUT even if it holds files")


def shape_problems(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                   max_positions: int) -> list[str]:
    """What makes a shape unbuildable, said in the flags' terms (HF would fail later, less clearly)."""
    out = [f"--{name.replace('_', '-')} {value}: must be >= 1"
           for name, value in (("hidden", hidden), ("layers", layers), ("heads", heads), ("kv_heads", kv_heads),
                               ("intermediate", intermediate), ("max_positions", max_positions)) if value < 1]
    if heads >= 1 and hidden % heads:
        out.append(f"--hidden {hidden} is not a multiple of --heads {heads}")
    if kv_heads >= 1 and heads % kv_heads:
        out.append(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    if heads >= 1 and hidden % heads == 0 and (hidden // heads) % 2:
        out.append(f"head size {hidden // heads} (--hidden / --heads) must be even for rotary positions")
    return out


def init_model(out: str | Path, arch: str, tokenizer: str | Path, hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 128, max_positions: int = 2048, seed: int = 0,
               dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the model and the tokenizer to `out`; returns the folder. Refusals are UserErrors."""
    import torch

    from llara_dist.model.tiny import save_tiny_model
    from llara_dist.tokenizer import load_tokenizer

    out, tokenizer = Path(out), Path(tokenizer)
    if arch not in ARCHITECTURES:
        raise UserError(f"--arch {arch!r}: not one of {', '.join(ARCHITECTURES)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: not one of {', '.join(DTYPES)}")
    problems = shape_problems(hidden, layers, heads, kv_heads, intermediate, max_positions)
    if problems:
        raise UserError("; ".join(problems))
    if not tokenizer.is_dir():
        raise UserError(f"--tokenizer {tokenizer}: no such folder (a local Hugging Face tokenizer folder)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: the folder is not empty; write into a new or empty folder, or pass --overwrite "
                        "(the model and tokenizer files are replaced, other files are left alone)")
    try:
        tok = load_tokenizer(tokenizer)
    except Exception as e:  # noqa: BLE001 - any loading problem is the folder's
        raise UserError(f"--tokenizer {tokenizer}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
    save_tiny_model(out, arch, len(tok), seed=seed, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                    hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                    max_positions=max_positions, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    tok.save_pretrained(out)
    return out


def run(args) -> int:
    out = init_model(args.out, args.arch, args.tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                     kv_heads=args.kv_heads, intermediate=args.intermediate, max_positions=args.max_positions,
                     seed=args.seed, dtype=args.dtype, overwrite=args.overwrite)
    print(json.dumps({"out": str(out), "arch": args.arch, "dtype": args.dtype}))
    return 0
