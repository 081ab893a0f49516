"""Tiny LLaMA-shaped decoders for the demo and the tests (random init, CPU-sized)."""

from __future__ import annotations

from pathlib import Path


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                      kv_heads: int | None = None, intermediate: int = 128, max_positions: int = 2048):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )


def save_tiny_llama(out_dir: str | Path, vocab_size: int, seed: int = 0, **shape):
    """Build a random tiny LLaMA, save it with save_pretrained, return the folder."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, **shape))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
