"""Shared fixtures: the real sample data and a small tokenizer trained on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"sample data not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, shared_data) -> Path:
    """A 2000-token byte-level BPE trained on WikiText (LLaMA-like specials)."""
    from llara_dist.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    lines = (shared_data / "wikitext2_valid.txt").read_text(encoding="utf-8").splitlines()
    train_tokenizer(lines, out, vocab_size=2000)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random 2-layer LLaMA (hidden 64) over the test tokenizer's vocabulary, saved to disk.

    Its vocabulary is the base tokenizer's; loading code resizes it for a preset's new tokens.
    """
    from llara_dist.tiny import save_tiny_llama
    from llara_dist.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    return save_tiny_llama(out, vocab_size=len(load_tokenizer(tokenizer_dir)))
