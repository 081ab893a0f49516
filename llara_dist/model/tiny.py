"""Tiny random decoders (LLaMA, Mistral or Qwen2 shaped) for the demo, the tests and `llara-dist init-model`.

The one place that builds their Hugging Face configs: `tiny_config(arch, vocab_size, ...)`;
`tiny_llama_config` and `save_tiny_llama` are its LLaMA forms, which most tests use.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("llama", "mistral", "qwen2")


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int | None = None, intermediate: int = 128, max_positions: int = 2048,
                bos_token_id: int | None = 1, eos_token_id: int | None = 2, pad_token_id: int | None = 3):
    """A Hugging Face config of `arch` (one of ARCHITECTURES) at this size. The special ids default to
    the test tokenizer's (<s>=1, </s>=2, <pad>=3); the embedding row of pad_token_id starts at zero."""
    import transformers

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}: one of {', '.join(ARCHITECTURES)}")
    # Mistral's config attends a 4096-token sliding window by default; the joint-mask kernels attend
    # each whole document, so a window would make HF's own attention and ours disagree on long rows
    window = {"sliding_window": None} if arch == "mistral" else {}
    return classes[arch](
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        **window,
    )


def tiny_llama_config(vocab_size: int, **shape):
    return tiny_config("llama", vocab_size, **shape)


def save_tiny_model(out_dir: str | Path, arch: str, vocab_size: int, seed: int = 0, dtype=None, **shape) -> Path:
    """Build a random tiny decoder of `arch`, save it with save_pretrained, return the folder.

    The weights are drawn in fp32 under `seed`, then cast to `dtype` (a torch dtype; None: fp32),
    so one seed gives the same model, rounded, in every dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **shape), dtype=torch.float32)
    if dtype is not None:
        model = model.to(dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def save_tiny_llama(out_dir: str | Path, vocab_size: int, seed: int = 0, **shape) -> Path:
    """Build a random tiny LLaMA, save it with save_pretrained, return the folder."""
    return save_tiny_model(out_dir, "llama", vocab_size, seed, **shape)
