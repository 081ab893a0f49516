"""The decoder: load a Hugging Face causal LM for LLaRA and run a PackedBatch to hidden states.

    model = load_model(cfg.model, tokenizer, preset)      # new tokens added, embeddings resized
    h = forward_hidden(model, batch.to(device))           # [R, L, hidden], after the final norm

The model module knows nothing of DeepSpeed (`model` may be a DeepSpeed engine: it is
called, not bypassed). Under ZeRO-3 every rank calls every module the same number of
times: one model call per micro-batch (two for `two-pass`), one attention call per
layer, whatever the documents of the batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llara_dist.data.batch import SEG_NEXT, SEG_SELF, PackedBatch
from llara_dist.errors import UserError
from llara_dist.kernels import registry
from llara_dist.model import fused
from llara_dist.prompts import Preset, add_special_tokens

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def unwrap(model):
    """The HF model inside a DeepSpeed engine or DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def load_model(model_cfg, tokenizer, preset: Preset, device: torch.device | str | None = None):
    """A causal LM from `model_cfg.path` (a model folder, or a config.json for a random init),
    with the preset's tokens added to `tokenizer` and the embeddings resized, attention path set.
    Stays on the CPU; `device` is where it will run (it decides which paths are available)."""
    from pickle import UnpicklingError

    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(model_cfg.dtype, device)
    registry.check_path(model_cfg.attn, device, dtype=dtype)
    path = Path(model_cfg.path)
    if not (path.is_dir() or (path.is_file() and path.suffix == ".json")):
        raise UserError(f"model.path {str(path)!r}: neither a model folder nor a config .json file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; not a Hugging Face model folder (export writes one)")
    try:
        if path.is_dir():
            # use_kernels=False: transformers >= 5.25 otherwise swaps Hub kernels into the layers when the
            # `kernels` package is installed (a download, and not the code our paths are checked against)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=False)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    except (OSError, ValueError, KeyError, EOFError, SafetensorError, UnpicklingError) as e:
        # what a broken or foreign folder raises (config.json not JSON or of an unknown model type, weights
        # missing or truncated); errors of the machine (memory, a GPU) pass as they are
        raise UserError(f"{path}: cannot load the model ({type(e).__name__}: {e})") from None
    add_special_tokens(tokenizer, preset)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    set_attention(model, model_cfg.attn, device)
    apply_fused_ops(model, model_cfg.fused_ops, device)
    if model_cfg.compile_layers:
        layers = decoder_layers(model)
        if not layers:
            raise UserError(f"model.compile_layers: {type(model).__name__} names no decoder layer class "
                             f"(_no_split_modules)")
        fused.compile_layers(layers)
    return model


def apply_fused_ops(model, requested: bool | None, device: torch.device) -> bool:
    """`model.fused_ops`: true patches (a model llara_dist.model.fused does not know is an error); unset
    patches on a GPU (2-18% faster steps, docs/performance.md), where a model it does not know keeps
    HF's ops, said on stderr; false, or unset on a CPU (compiling costs more than it saves), does not.
    Whether the model was patched."""
    if not (requested or (requested is None and torch.device(device).type == "cuda")):
        return False
    try:
        fused.patch(model)
    except ValueError as e:
        if requested:
            raise
        print(f"{e}; running HF's own ops (model.fused_ops=false silences this)", file=sys.stderr)
        return False
    return True


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules of the classes its `_no_split_modules` names (the unit
    FSDP wraps); [] if it names none."""
    names = next((m._no_split_modules for m in model.modules() if getattr(m, "_no_split_modules", None)), ())
    return [m for m in model.modules() if type(m).__name__ in names]


def set_attention(model, path: str, device: torch.device | str) -> None:
    """Point the model's attention at a path's kernel (registered with AttentionInterface)."""
    core = unwrap(model)
    dtype = core.get_input_embeddings().weight.dtype
    registry.check_path(path, device, dtype=dtype)
    registry.register()
    core.set_attn_implementation(registry.hf_name(registry.inner_kernel(path, device, dtype)))
    core.llara_attn = path


def forward_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """Last hidden states [R, L, hidden] of a packed batch under the joint EBAE/EBAR mask."""
    core = unwrap(model)
    path = getattr(core, "llara_attn", None)
    if path is None:
        raise ValueError("the model has no attention path: load it with load_model or call set_attention")
    registry.check_path(path, batch.input_ids.device, backward=torch.is_grad_enabled(),
                       dtype=core.get_input_embeddings().weight.dtype)
    kernel = core.config._attn_implementation.removeprefix("llara_")
    decoder = core.get_decoder()  # LLaMA, Mistral, Qwen2: the base model; through a peft wrapper too

    # two-pass: both passes in one call, as 2R rows (the SELF pass's, then the NEXT pass's), so each
    # module runs once per backward, as ZeRO-3's gathering by layer needs (train.zero3_layer_gather)
    two_pass = path == "two-pass"
    ids, position = (torch.cat([t, t]) if two_pass else t for t in (batch.input_ids, batch.position))
    mask = pass_mask(batch, kernel, two_pass)
    # through the top module, so a DeepSpeed engine's forward runs (calling the decoder directly
    # gave wrong ZeRO-3 gradients: tests/test_train_exact.py), logits only at the last column; the
    # decoder's output (after the final norm) is taken by a hook, not by output_hidden_states, which
    # would keep every layer's output alive (no_grad: L x the memory)
    out = []
    hook = decoder.register_forward_hook(lambda module, args, result: out.append(result.last_hidden_state))
    try:
        model(input_ids=ids, position_ids=position, llara_mask=mask, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    if len(out) != 1:
        raise RuntimeError(f"{type(core).__name__}.get_decoder() ({type(decoder).__name__}) ran {len(out)} "
                           "times in one forward, not once: cannot tell its final hidden states")
    if not two_pass:
        return out[0]
    h_self, h_next = out[0].chunk(2)
    return torch.where((batch.segment == SEG_NEXT)[..., None], h_next, h_self)


def pass_mask(batch: PackedBatch, kernel: str, two_pass: bool) -> registry.LlaraMask:
    """The mask of forward_hidden's model call, on the batch's device.

    two-pass: over 2R rows, the batch's rows twice: [prefix TEXT SELF] with the NEXT tokens blanked
    out, then [prefix TEXT NEXT] with the SELF tokens blanked out; each needs only a document-causal
    mask. A kernel that reads the metadata (registry.HOST_METADATA: varlen) gets the batch's host
    copy, blanking included, so nothing is read back from the device."""
    meta = batch.host if kernel in registry.HOST_METADATA and batch.host is not None else batch
    doc, segment = meta.doc, meta.segment
    if two_pass:
        doc = torch.cat([doc.masked_fill(segment == blank, -1) for blank in (SEG_NEXT, SEG_SELF)])
        segment = torch.cat([segment, segment])
    return registry.prepare(kernel, doc, segment, batch.input_ids.device)


def gather_states(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [R, L, H], flat token index [D, k] -> [D, k, H]."""
    return hidden.reshape(-1, hidden.shape[-1])[index]
