"""Export a run's checkpoint to a Hugging Face model folder: `llara-dist export`.

    llara-dist export --run runs/llara --out export/ [--tag latest] [--dtype fp32|bf16|fp16]
        [--lora merge|adapter] [--overwrite]

The folder loads with plain `AutoModelForCausalLM.from_pretrained` and holds: sharded
safetensors (+ index), config.json, the tokenizer with the preset's special tokens (and a
pad token: see save_tokenizer), and `llara.json` (the preset and prompts, so
`encode`/`eval` need no flags). --out must be new or empty; with --overwrite, the files
an export writes are replaced and any others in the folder are left alone. The weights keep
the dtype the run trained in (its config's model.dtype; `auto` as the trainer resolved it)
unless --dtype says otherwise, and every file is written readable by all (0644), whatever
the umask, so that a model folder can be shared.

ZeRO-3 shards are consolidated tensor by tensor (DeepSpeed's lazy mode memory-maps
the checkpoint files), and each output shard is written as soon as it is full, so host
memory holds about one output shard, never the whole fp32 optimizer state. With LoRA the
adapters are merged into the base weights (default) or saved as a peft adapter folder.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import torch

from llara_dist.config import RunConfig, load_config, to_dict
from llara_dist.errors import UserError
from llara_dist.quiet import quiet_stdout
from llara_dist.retrieval.encode import LLARA_JSON

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
LORA_MARK = ".lora_"
# what an export (merged, sharded or adapter) may write: --overwrite removes these and nothing else,
# so that no stale shard, index or adapter of an earlier export is mixed into the new one
EXPORT_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "config.json",
                "generation_config.json", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                "chat_template.jinja", LLARA_JSON)


def write_llara_json(out: Path, cfg, source: str) -> None:
    (out / LLARA_JSON).write_text(json.dumps({"objective": to_dict(cfg.objective), "source": source}, indent=1) + "\n")


def load_run_config(run_dir: Path):
    """A run folder's resolved config: a pretraining RunConfig or a FinetuneRunConfig."""
    import yaml

    from llara_dist.config import FinetuneRunConfig

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: missing; is {run_dir} a llara-dist run folder?")
    is_finetune = "finetune" in (yaml.safe_load(path.read_text()) or {})
    return load_config(FinetuneRunConfig if is_finetune else RunConfig, path)


def training_dtype(cfg, checkpoint: Path) -> str:
    """The dtype a run trained in: its config's model.dtype; for `auto`, what the trainer resolved it to
    on its device (decoder.resolve_dtype: bf16 on a GPU, fp32 on the CPU), which it handed DeepSpeed as
    bf16.enabled. DeepSpeed saves that config in every model-states file of the checkpoint."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    files = sorted(checkpoint.glob("*model_states.pt"))
    # memory-mapped: a ZeRO-2 model-states file holds the whole model, of which only the config is read
    ds_config = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True).get("ds_config") \
        if files else None
    if not isinstance(ds_config, dict):
        raise UserError(f"{checkpoint}: the run's model.dtype is auto and its checkpoint does not say which dtype "
                        "that was (no DeepSpeed config in a *model_states.pt file); pass --dtype fp32 or bf16")
    return "bf16" if (ds_config.get("bf16") or {}).get("enabled") else "fp32"


def readable_by_all(out: Path) -> None:
    """Mode 0644 for the files of an export: safetensors writes 0600, and a umask such as 077 would make
    the others so too, leaving a model folder others on a cluster cannot load."""
    for p in out.iterdir():
        if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in EXPORT_FILES):
            os.chmod(p, 0o644)


def save_tokenizer(tokenizer, out: Path) -> None:
    """The tokenizer as an exported folder carries it: llara-dist itself needs no pad token
    (tokenizer.pad_id), but Hugging Face's own batching does (LLaMA-2 has none), and the released
    LLaRA inference pools the last 8 positions of each row, which are the embedding tokens only
    when rows are padded on the left (the released fine-tuning saves its tokenizer so too)."""
    from llara_dist.tokenizer import with_pad_token

    with_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, or a folder with files in it unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder is not empty; export into a new or empty folder, "
                         "or pass --overwrite to replace the files of an earlier export there "
                         "(other files are left alone)")


def remove_export_files(out: Path) -> None:
    """Delete the files an export writes (EXPORT_FILES) from `out`, and no others."""
    for p in out.iterdir() if out.is_dir() else ():
        if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in EXPORT_FILES):
            p.unlink()


def write_sharded(tensors, out: Path, dtype: torch.dtype, max_shard_bytes: int) -> dict:
    """(name, tensor-or-lazy) pairs to model-XXXXX-of-YYYYY.safetensors + index; returns the index."""
    from safetensors.torch import save_file

    written, shard, size, total = [], {}, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            path = out / f"model-part{len(written):05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            written.append((path, list(shard)))
            shard, size = {}, 0

    for name, t in tensors:
        t = (t.contiguous() if not isinstance(t, torch.Tensor) else t).to(dtype).contiguous()  # [*] materialised
        n = t.numel() * t.element_size()
        if shard and size + n > max_shard_bytes:
            flush()
        shard[name] = t
        size += n
        total += n
    flush()
    weight_map = {}
    for i, (path, names) in enumerate(written, 1):
        final = out / (f"model-{i:05d}-of-{len(written):05d}.safetensors" if len(written) > 1 else "model.safetensors")
        path.rename(final)
        weight_map.update({n: final.name for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if len(written) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def _hf_config(cfg, vocab_size: int):
    from transformers import AutoConfig

    path = Path(cfg.model.path)
    config = AutoConfig.from_pretrained(path if path.is_dir() else str(path))
    config.vocab_size = vocab_size
    return config


def export_run(run_dir: str | Path, out: str | Path, tag: str | None = None, dtype: str | None = None,
               lora: str = "merge", max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Write the checkpoint `tag` (None: latest) of `run_dir` to the folder `out`; returns it. `dtype`:
    fp32, bf16 or fp16 (None: the run's training dtype, see training_dtype)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from llara_dist.tokenizer import load_tokenizer
    from llara_dist.train.checkpoint import CheckpointManager

    run_dir, out = Path(run_dir), Path(out)
    max_bytes = shard_bytes(max_shard_size)
    check_out(out, overwrite)
    cfg = load_run_config(run_dir)
    manager = CheckpointManager(run_dir / "checkpoints", keep=1, rank=0)
    tag = tag or manager.latest()
    if tag is None or not (manager.folder / tag).is_dir():
        have = ", ".join(manager.complete()) or "none"
        raise UserError(f"{manager.folder}: no checkpoint {tag or '(latest)'} to export (complete: {have})")
    dtype = dtype or training_dtype(cfg, manager.folder / tag)
    with quiet_stdout():  # DeepSpeed narrates every file it reads
        state = get_fp32_state_dict_from_zero_checkpoint(str(manager.folder), tag=tag, lazy_mode=True)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    is_lora = any(LORA_MARK in k for k in state)
    remove_export_files(out)  # only now: an export that fails before writing leaves an earlier one whole
    if not out.exists():
        out.mkdir(parents=True)
        out.chmod(0o755)  # as its files (readable_by_all): a folder the umask closed would hide them
    if is_lora:
        _export_lora(state, cfg, tokenizer, out, DTYPES[dtype], lora)
    else:
        names = list(state)
        embed = next(n for n in names if n.endswith("embed_tokens.weight"))
        config = _hf_config(cfg, state[embed].shape[0])
        if getattr(config, "tie_word_embeddings", False):
            names = [n for n in names if n != "lm_head.weight"]  # tied: the embedding carries it
        config.dtype = DTYPES[dtype]
        write_sharded(((n, state[n]) for n in names), out, DTYPES[dtype], max_bytes)
        config.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    write_llara_json(out, cfg, f"{run_dir}:{tag}")
    readable_by_all(out)
    return out


def _export_lora(state, cfg, tokenizer, out: Path, dtype: torch.dtype, mode: str) -> None:
    """Rebuild base + adapters in memory (LoRA runs are the memory-light case), then merge or save."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    embed = next(n for n in state if n.endswith("embed_tokens.weight"))
    model = AutoModelForCausalLM.from_config(_hf_config(cfg, state[embed].shape[0]), dtype=torch.float32)
    t = cfg.train  # LoRA settings, for fine-tuning runs too
    model = get_peft_model(model, LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                                             target_modules=list(t.lora_targets), bias="none"))
    sd = {k: (v if isinstance(v, torch.Tensor) else v.contiguous()) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or missing:
        raise UserError(f"checkpoint does not match the LoRA model: unexpected {unexpected[:5]}, missing {missing[:5]}")
    if mode == "merge":
        model.merge_and_unload().to(dtype).save_pretrained(out, safe_serialization=True)
    else:
        model.to(dtype).save_pretrained(out)  # adapter_config.json + adapter weights


SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def shard_bytes(text: str) -> int:
    """--max-shard-size in bytes: a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)."""
    unit = next((u for u in SIZE_UNITS if text.strip().upper().endswith(u)), "")
    try:
        size = int(float(text.strip()[:len(text.strip()) - len(unit)]) * SIZE_UNITS.get(unit, 1))
    except (ValueError, OverflowError):  # not a number; inf
        size = 0
    if size < 1:
        raise UserError(f"--max-shard-size {text}: not a size in bytes (a positive number with an optional "
                        f"unit: {', '.join(SIZE_UNITS)})")
    return size


def configure(parser) -> None:
    parser.add_argument("--run", required=True, help="run folder (holds config.yaml, tokenizer/, checkpoints/)")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step00001000 (default: latest)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written weights (default: the run's training dtype, its config's "
                             "model.dtype, auto as training resolved it: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--lora", choices=("merge", "adapter"), default="merge",
                        help="LoRA runs: merge adapters into the weights, or save the adapter alone "
                             "(default: %(default)s)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file; larger models are split, with an index (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="export into a folder that is not empty: the files an export writes (model "
                             "weights and index, config, tokenizer, adapter, llara.json) are replaced, any "
                             "others are left alone (without it such a folder is refused)")


def run(args) -> int:
    out = export_run(args.run, args.out, args.tag, args.dtype, args.lora, args.max_shard_size, args.overwrite)
    print(json.dumps({"out": str(out)}))
    return 0
