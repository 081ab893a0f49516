"""Typed configuration: nested dataclasses, loaded from YAML plus `key=value` overrides.

Every field carries a one-line help text (`opt(default, "help")`). Loading collects
every problem (unknown keys, wrong types, failed checks) and raises them together in
one ConfigError, so a user fixes a config in one round trip.

    cfg = load_config(RunConfig, "run.yaml", ["train.lr=2e-5", "data.seq_len=512"])
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from llara_dist.errors import UserError


class ConfigError(UserError):
    """All problems of one configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def opt(default: Any, help: str, path: bool = False):
    """A config field with a default and its one-line help text. A `path` field is made absolute
    when loaded (see absolute_path)."""
    metadata = {"help": help, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    if is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def absolute_path(value: str) -> str:
    """A local path made absolute against the working folder; URLs (`s3://...`, `pipe:...`) and ""
    as they are. The run folder saves the resolved config, and export, resume or finetune started from
    another folder must find the same files (a relative model path would be taken for a hub name)."""
    if not value or "://" in value or value.startswith("pipe:"):
        return value
    return str(Path(value).expanduser().absolute())


def help_of(cls) -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) for every leaf field of a config class."""
    return [(name, help, default) for name, _, help, default in fields_of(cls)]


def fields_of(cls, base=None) -> list[tuple[str, str, str, Any]]:
    """(dotted name, type as written, help, default) for every leaf field of a config class; `base`:
    the instance whose values are the defaults (a section's default in its parent)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        default = getattr(base, f.name) if base is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if is_dataclass(t):
            out += [(f"{f.name}.{n}", ty, h, d) for n, ty, h, d in fields_of(t, default)]
        else:
            out.append((f.name, _type_name(t), f.metadata.get("help", ""), default))
    return out


def _type_name(t) -> str:
    if typing.get_origin(t) is typing.Literal:
        return "|".join(map(str, typing.get_args(t)))
    if typing.get_origin(t) is not None:  # list[str], str | None
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", None) or str(t)


def config_help(cls) -> str:
    """Every key of a config class, its type, default and help: the `--help` of train and finetune."""
    lines = ["configuration keys (YAML sections, or key=value overrides):"]
    for name, ty, help, default in fields_of(cls):
        lines.append(f"  {name} ({ty}, default {default!r})")
        lines.append(f"      {help}")
    return "\n".join(lines)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def closest(key: str, names) -> str | None:
    """The name a mistyped `key` most likely meant. First a name whose words (split at `_`) begin the
    key's, or the key's words begin its (`lr_rate` -> `lr`, `warmup` -> `warmup_steps`), the shortest
    such; else the fewest edits, then the shorter name, unless even that rewrites more than half of
    the key (a guess that far off misleads more than it helps)."""
    words = key.split("_")

    def word_prefix(name: str) -> bool:
        other = name.split("_")
        n = min(len(words), len(other))
        return words[:n] == other[:n]

    related = sorted((n for n in names if word_prefix(n)), key=lambda n: (len(n), n))
    if related:
        return related[0]
    best = min(sorted(names), key=lambda n: (edit_distance(key, n), len(n)), default=None)
    return best if best is not None and edit_distance(key, best) <= max(2, (len(key) + 1) // 2) else None


def _coerce(value: Any, t: Any, where: str, problems: list[str]) -> Any:
    """Check/convert one value against a type hint; append a problem on mismatch."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if t is Any:
        return value
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, problems)
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if t is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where}: expected a number, got {value!r}")
        return value
    if t is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str, problems: list[str], failed: set[str], base=None):
    """Phase one: `cls` from `data`, every value coerced to its field's type. A value that cannot be
    is a problem, its dotted name goes to `failed`, and the default stands in for it, so that phase
    two's checks see only values of the right types. `base`: the instance whose values are the
    defaults (a section's default in its parent, e.g. fine-tuning's LoRA rank)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            close = closest(key, names)
            hint = f" (did you mean {prefix}{close}?)" if close else ""
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        t, v, where = hints[f.name], data[f.name], f"{prefix}{f.name}"
        if is_dataclass(t):
            if not isinstance(v, dict):
                problems.append(f"{where}: expected a section (mapping), got {v!r}")
                failed.add(where)
                continue
            kwargs[f.name] = _build(t, v, where + ".", problems, failed, getattr(base, f.name, f.default_factory()))
            continue
        before = len(problems)
        value = _coerce(v, t, where, problems)
        if len(problems) == before:
            kwargs[f.name] = value
        else:
            failed.add(where)
    obj = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    for f in fields(cls):  # defaults included: runs/llara is where the command started
        if f.metadata.get("path") and isinstance(getattr(obj, f.name), str):
            setattr(obj, f.name, absolute_path(getattr(obj, f.name)))
    return obj


def _validate(obj, prefix: str, problems: list[str]) -> None:
    """Phase two: run `check()` of every section (each returns a list of problems about values)."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            _validate(v, f"{prefix}{f.name}.", problems)
    check = getattr(obj, "check", None)
    if check is not None:
        problems += [f"{prefix}{p}" for p in check()]


def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """`a.b=value` strings to a nested dict; values parse as YAML scalars."""
    out: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out, problems


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None):
    """Build `cls` from an optional YAML file, a base dict and key=value overrides."""
    problems: list[str] = []
    data = dict(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError([f"{path}: cannot read config: {e}"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: top level must be a mapping"])
        data = merge(data, loaded)
    extra, bad = parse_overrides(overrides or [])
    problems += bad
    data = merge(data, extra)
    failed: set[str] = set()
    cfg = _build(cls, data, "", problems, failed)
    checks: list[str] = []
    _validate(cfg, "", checks)
    # a check of a value that failed phase one saw its default: what it says is not the user's value
    problems += [p for p in checks if p.split(":", 1)[0] not in failed]
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["ConfigError", "opt", "help_of", "load_config", "save_config", "to_dict", "dataclass", "merge"]


# what engine.deepspeed_config derives from the run config (dotted key -> where to set it instead):
# train.deepspeed may not override these
TRAINER_OWNED = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch and train.micro_batch (it is derived)",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype (bf16 or fp32)",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer.device": "train.offload_optimizer",
    "zero_optimization.offload_param.device": "train.offload_params",
    "optimizer.params.lr": "train.lr",
    "optimizer.params.betas": "train.adam_betas",
    "optimizer.params.eps": "train.adam_eps",
    "optimizer.params.weight_decay": "train.weight_decay",
    "optimizer.params.torch_adam": "train.adam_impl",
    "optimizer.params.fused": "train.adam_impl",
    "scheduler": "train.warmup_steps, train.decay and train.min_lr_ratio",
    "checkpoint.load_universal": "nothing: the trainer sets it for a resume on another world size",
}


def deepspeed_override_problems(overrides: dict) -> list[str]:
    """One problem per key of `overrides` (train.deepspeed) that would replace what the trainer sets."""
    problems = []
    for key, value in _leaves(overrides):
        if key == "optimizer.type":
            if str(value).lower() != "adamw":
                problems.append(f"deepspeed.{key}: {value!r}: the trainer's optimizer is AdamW "
                                "(train.adam_impl picks its kernel)")
            continue
        owner = next((k for k in TRAINER_OWNED if key == k or key.startswith(k + ".") or k.startswith(key + ".")),
                     None)
        if owner is not None:
            problems.append(f"deepspeed.{key}: set by the trainer ({owner}); use {TRAINER_OWNED[owner]}")
    return problems


def _leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) of every non-mapping value (and empty mapping) of a nested dict."""
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# --------------------------------------------------------------------------------------
# The run configuration. Each section validates itself in `check()`.
# --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the tokenized shards are and how they become packed rows."""

    shards: str = opt("", "folder (or URL prefix) holding manifest.json and the shard tar files", path=True)
    seq_len: int = opt(1024, "tokens per packed row, prompts included")
    num_workers: int = opt(1, "DataLoader worker processes per rank (0: read in the main process)")
    pack_buffer: int = opt(64, "documents held in the packer's look-ahead buffer (best fit)")
    seed: int = opt(0, "seed of the shard and document order; the epoch is mixed in")
    reset_cursor: bool = opt(False, "on resume, ignore the saved data cursor and start the data afresh")
    streams: int = opt(0, "logical data streams (0: one per rank and worker): with S > 0 the rows of every "
                          "step are the same whatever the number of ranks and workers (docs/data-stream.md)")

    def check(self) -> list[str]:
        out = []
        if self.streams < 0:
            out.append("streams: must be >= 0")
        if self.seq_len < 16:
            out.append(f"seq_len: {self.seq_len} is too short (at least 16)")
        if self.num_workers < 0:
            out.append("num_workers: must be >= 0")
        if self.pack_buffer < 1:
            out.append("pack_buffer: must be >= 1")
        if self.seed < 0:
            out.append("seed: must be >= 0 (it seeds numpy's generator together with the epoch)")
        return out


@dataclass
class ObjectiveConfig:
    """The LLaRA prompts and loss; `preset` fills every field left empty."""

    preset: str = opt("released", "prompt/loss preset: paper, released or custom")
    prefix: str | None = opt(None, "text before the document (None: the preset's)")
    self_suffix: str | None = opt(None, "SELF (EBAE) prompt after the text, ending in the embedding tokens")
    next_suffix: str | None = opt(None, "NEXT (EBAR) prompt after the SELF part, ending in the embedding tokens")
    num_emb_tokens: int | None = opt(None, "embedding tokens that end each prompt")
    new_tokens: list[str] | None = opt(None, "special tokens to add to the tokenizer (None: the preset's)")
    pool: str | None = opt(None, "loss pooling over the embedding tokens: token (the one token) or max (of logits)")
    lm_weight: float | None = opt(None, "weight of the next-token loss on the text")
    bow_scale: float | None = opt(None, "factor on the bag-of-words loss (released: 0.1)")
    bow_average: bool | None = opt(None, "average EBAE and EBAR instead of summing them (released: true)")
    embed_pool: str | None = opt(None, "inference pooling: last (the last token) or mean (of the embedding tokens)")
    lm_chunk: int = opt(4096, "tokens per chunk of the next-token loss (fp32 logits of one chunk live at a time)")

    def check(self) -> list[str]:
        from llara_dist.prompts import PRESETS

        if self.preset not in PRESETS and self.preset != "custom":
            return [f"preset: {self.preset!r} is not one of {', '.join(PRESETS)}, custom"]
        if self.lm_chunk < 1:
            return [f"lm_chunk: {self.lm_chunk} must be >= 1"]
        return []


@dataclass
class ModelConfig:
    """The decoder to adapt."""

    path: str = opt("", "local Hugging Face model folder (or a config.json to build a random model)", path=True)
    attn: str = opt("sdpa", "attention kernel path: sdpa, flex, varlen or two-pass")
    dtype: str = opt("auto", "parameter dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    fused_ops: bool | None = opt(None, "compiled fused RMSNorm, SwiGLU product and RoPE in the decoder layers "
                                       "(llara_dist.model.fused; same math, compiles at the first step); "
                                       "default: on for a GPU, off on the CPU (compiling costs more than it saves)")
    compile_layers: bool = opt(False, "torch.compile each decoder layer's forward whole (llara_dist.model.fused; fewer "
                                      "kernels, less host time per layer); needs ZeRO-3 gathering by layer or "
                                      "ZeRO-2: no hooks inside a layer")

    def check(self) -> list[str]:
        out = []
        if self.dtype not in ("auto", "bf16", "fp32"):
            out.append(f"dtype: {self.dtype!r} is not one of auto, bf16, fp32")
        paths = ("sdpa", "flex", "varlen", "two-pass")  # llara_dist.kernels.registry.PATHS (not imported: no torch here)
        if self.attn not in paths:
            out.append(f"attn: {self.attn!r} is not one of {', '.join(paths)}")
        return out


@dataclass
class TrainConfig:
    """The optimisation loop."""

    global_batch: int = opt(256, "rows per optimizer step across all ranks (= micro_batch x grad_accum x world)")
    micro_batch: int = opt(8, "rows per forward pass on one rank")
    steps: int = opt(10000, "optimizer steps")
    lr: float = opt(1e-5, "peak learning rate")
    warmup_steps: int = opt(100, "linear warm-up steps from 0 to lr")
    decay: str = opt("cosine", "learning-rate decay after warm-up: cosine, linear or constant")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr (cosine, linear)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    activation_checkpointing: bool = opt(False, "recompute layer activations in backward (less memory, ~30% more compute)")
    zero_stage: int = opt(3, "DeepSpeed ZeRO stage: 3 partitions weights, gradients and optimizer states over the "
                             "ranks; 2 keeps a whole copy of the weights on every rank (2 bytes a weight more in "
                             "bf16) and so gathers nothing: less host time per layer and less traffic")
    zero3_layer_gather: bool | None = opt(None, "ZeRO-3: gather each decoder layer's parameters at once (one hook "
                                                "pair per layer instead of one per linear and norm: less host work "
                                                "per step). Unset: on, but off in finetune, which runs each layer "
                                                "twice per backward, and with LoRA unless activation_checkpointing; "
                                                "false: DeepSpeed's per-module gathering")
    offload_optimizer: bool = opt(False, "keep optimizer states in CPU memory")
    offload_params: bool = opt(False, "ZeRO-3: keep parameters in CPU memory")
    lora_r: int = opt(0, "LoRA rank (0: train all weights)")
    lora_alpha: float = opt(16.0, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  "module names LoRA adapts")
    seed: int = opt(0, "seed of the weights' random parts and the loop's RNG")
    tokenizer: str = opt("", "tokenizer folder (empty: the model folder, else the one the shard manifest names)",
                         path=True)
    ckpt_every: int = opt(500, "save a checkpoint every this many steps (and always at the end)")
    keep_checkpoints: int = opt(3, "complete checkpoints kept in run_dir/checkpoints (older ones deleted)")
    ledger: bool = opt(False, "record the keys of the documents each rank consumed at each step (ledger-rankN.jsonl)")
    collective_timeout_s: int = opt(300, "seconds a collective may wait for a dead or stuck rank before all fail")
    peak_tflops: float = opt(0.0, "device peak TFLOP/s for MFU (0: look the GPU up in a table; none on CPU)")
    adam_impl: str = opt("torch", "AdamW kernel on GPU: torch (torch.optim.AdamW, fused; nothing to build) or "
                                  "deepspeed (DeepSpeed's FusedAdam, built with nvcc at first start); offloaded "
                                  "optimizer states always use DeepSpeed's CPU-Adam, CPU runs torch's AdamW")
    deepspeed: dict[str, Any] = opt({}, "DeepSpeed config entries merged into the generated config (ZeRO-3 "
                                        "knobs, e.g. zero_optimization.stage3_prefetch_bucket_size); entries "
                                        "the trainer sets from train.* are refused")
    trackers: list[str] = opt([], "metric trackers fed besides metrics.jsonl (rank 0): tensorboard (into "
                                  "run_dir/tensorboard), wandb; each needs its extra: pip install "
                                  "'llara-dist[NAME]'")
    wandb_project: str = opt("llara-dist", "Weights & Biases project of the run when train.trackers has wandb")

    @property
    def lora_without_recompute(self) -> bool:
        # DeepSpeed's gathering by layer breaks in the backward of LoRA's frozen weights (a released,
        # empty weight reaches autograd) unless the layer is recomputed there (DeepSpeed 0.19.8)
        return bool(self.lora_r) and not self.activation_checkpointing

    def gathers_by_layer(self) -> bool:
        """Whether ZeRO-3 gathers a decoder layer's parameters at once (zero3_layer_gather; unset: on, except
        for LoRA without activation checkpointing, which must gather per module)."""
        if self.zero_stage != 3 or self.zero3_layer_gather is False:
            return False
        return self.zero3_layer_gather is True or not self.lora_without_recompute

    def check(self) -> list[str]:
        out = []
        if self.zero3_layer_gather is True and self.zero_stage == 3 and self.lora_without_recompute:
            out.append("zero3_layer_gather: with LoRA (lora_r) DeepSpeed's gathering by layer fails in the backward "
                       "of the frozen weights unless the layers are recomputed: set activation_checkpointing=true, "
                       "or leave zero3_layer_gather unset (LoRA then gathers per module)")
        for name in ("global_batch", "micro_batch", "steps", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1")
        if self.global_batch % self.micro_batch:
            out.append(f"global_batch: {self.global_batch} is not a multiple of micro_batch {self.micro_batch}")
        if self.lr <= 0:
            out.append(f"lr: {self.lr} must be > 0")
        if self.warmup_steps < 0 or self.lora_r < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            out.append("warmup_steps, lora_r, grad_clip and weight_decay must be >= 0")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout: {self.lora_dropout} is not in [0, 1)")
        if self.decay not in ("cosine", "linear", "constant"):
            out.append(f"decay: {self.decay!r} is not one of cosine, linear, constant")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"min_lr_ratio: {self.min_lr_ratio} is not in [0, 1]")
        if len(self.adam_betas) != 2:
            out.append(f"adam_betas: expected two numbers, got {self.adam_betas}")
        if self.collective_timeout_s < 5:
            out.append(f"collective_timeout_s: {self.collective_timeout_s} is too short (at least 5)")
        if self.zero_stage not in (2, 3):
            out.append(f"zero_stage: {self.zero_stage} is not 2 or 3")
        elif self.zero_stage == 2 and self.offload_params:
            out.append("offload_params: needs zero_stage 3 (ZeRO-2 keeps the weights whole on every rank's device)")
        if self.adam_impl not in ("torch", "deepspeed"):
            out.append(f"adam_impl: {self.adam_impl!r} is not one of torch, deepspeed")
        out += deepspeed_override_problems(self.deepspeed)
        trackers = ("tensorboard", "wandb")  # train.trackers.TRACKERS; the ground floor imports nothing from train/
        out += [f"trackers: {name!r} is not one of {', '.join(trackers)}" for name in self.trackers
                if name not in trackers]
        return out


@dataclass
class RunConfig:
    """Everything a training run needs; saved into every checkpoint."""

    run_dir: str = opt("runs/llara", "run folder: config, metrics, checkpoints", path=True)
    data: DataConfig = opt(DataConfig(), "data stream and packing")
    objective: ObjectiveConfig = opt(ObjectiveConfig(), "prompts and loss")
    model: ModelConfig = opt(ModelConfig(), "model")
    train: TrainConfig = opt(TrainConfig(), "optimisation")

    def check(self) -> list[str]:
        by_layer = ("train.activation_checkpointing=true (with LoRA, gathering by layer needs it)"
                    if self.train.lora_without_recompute else "train.zero3_layer_gather=true")
        return compile_layers_problems(self.model, self.train, per_module=not self.train.gathers_by_layer(),
                                       by_layer=by_layer)


def compile_layers_problems(model: ModelConfig, train: TrainConfig, per_module: bool,
                            by_layer: str | None = None) -> list[str]:
    """model.compile_layers needs a layer without hooks inside: not ZeRO-3 gathering per module.
    `by_layer`: the setting that would make it gather by layer, where the task can."""
    if model.compile_layers is True and train.zero_stage == 3 and per_module:
        return ["model.compile_layers: ZeRO-3 gathers per module here, and compiling a layer would trace the "
                f"hooks inside it; set {by_layer + ' or ' if by_layer else ''}train.zero_stage=2"]
    return []


@dataclass
class FinetuneConfig:
    """The contrastive fine-tuning stage (RepLLaMA-style; defaults of FlagEmbedding's LLARA finetune recipe)."""

    data: str = opt("", "training data: JSON lines {\"query\": str, \"pos\": [str, ...], \"neg\": [str, ...]}",
                     path=True)
    group_size: int = opt(8, "passages per query: 1 positive + group_size - 1 hard negatives")
    temperature: float = opt(0.01, "scores are cosine / temperature")
    query_max_len: int = opt(32, "query text tokens kept (the prompt comes on top)")
    passage_max_len: int = opt(128, "passage text tokens kept (the prompt comes on top)")
    cross_device: bool = opt(True, "score each query against the passages of all ranks, not only its own rank's")
    seed: int = opt(0, "seed of the example order and of the negative sampling; the epoch is mixed in")
    grad_cache_chunk: int = opt(0, "GradCache: embed each micro-batch's texts this many at a time, first without a "
                                   "graph, then again with one against the loss's cached gradient: memory of one "
                                   "such sub-batch whatever micro_batch x group_size, ~1/3 more compute (0: off)")

    def check(self) -> list[str]:
        out = []
        if not self.data:
            out.append("data: set the training JSON lines file")
        if self.grad_cache_chunk < 0:
            out.append(f"grad_cache_chunk: {self.grad_cache_chunk} must be >= 0 (0: off)")
        for name in ("group_size", "query_max_len", "passage_max_len"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1")
        if self.temperature <= 0:
            out.append(f"temperature: {self.temperature} must be > 0")
        if self.seed < 0:
            out.append("seed: must be >= 0")
        return out


@dataclass
class FinetuneRunConfig:
    """A fine-tuning run: the trainer's sections plus `finetune` (data, loss, LoRA) instead of `data`."""

    run_dir: str = opt("runs/llara-finetune", "run folder: config, metrics, checkpoints", path=True)
    objective: ObjectiveConfig = opt(ObjectiveConfig(), "prompts and pooling (the loss terms are not used)")
    model: ModelConfig = opt(ModelConfig(), "model (an exported LLaRA folder, see llara-dist export)")
    # LoRA as the released recipe fine-tunes (FlagEmbedding research/LLARA/finetune): rank 64, dropout 0.1
    train: TrainConfig = opt(TrainConfig(lora_r=64, lora_dropout=0.1),
                             "optimisation and LoRA; global_batch and micro_batch count queries "
                             "(the released recipe: lr 3e-4)")
    finetune: FinetuneConfig = opt(FinetuneConfig(), "data and contrastive loss")

    def check(self) -> list[str]:
        out = []
        if self.train.zero3_layer_gather is True:  # DeepSpeed reduces a leaf module's gradients at its first backward
            out.append("train.zero3_layer_gather: fine-tuning runs each decoder layer twice per backward (queries, "
                       "then passages), which ZeRO-3's gathering by layer cannot reduce; leave it unset or false")
        return out + compile_layers_problems(self.model, self.train, per_module=True)  # finetune: per module
