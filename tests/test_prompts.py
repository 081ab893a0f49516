"""Prompt presets under a tokenizer: lengths from the tokenizer, embedding tokens checked."""

import pytest

from llara_dist.config import ObjectiveConfig
from llara_dist.prompts import PRESETS, add_special_tokens, prompt_tokens, resolve_preset
from llara_dist.tokenizer import load_tokenizer


def test_released_needs_and_gets_its_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    preset = PRESETS["released"]
    with pytest.raises(ValueError, match="embedding token"):
        prompt_tokens(tok, preset)  # <s1>.. not yet added: they would split into pieces
    assert add_special_tokens(tok, preset) == 16
    pt = prompt_tokens(tok, preset)
    ids = tok.convert_tokens_to_ids([f"<s{i}>" for i in range(1, 17)])
    assert list(pt.self_suffix[-8:]) == ids[:8]
    assert list(pt.next_suffix[-8:]) == ids[8:]
    assert pt.prefix[0] == tok.bos_token_id
    assert pt.overhead == len(pt.prefix) + len(pt.self_suffix) + len(pt.next_suffix)


def test_paper_ends_in_eos(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    pt = prompt_tokens(tok, PRESETS["paper"])
    assert pt.self_suffix[-1] == tok.eos_token_id == pt.next_suffix[-1]
    assert pt.num_emb_tokens == 1
    assert pt.prefix == (tok.bos_token_id,)


def test_resolve_overrides_fields():
    cfg = ObjectiveConfig(preset="released", lm_weight=0.0, num_emb_tokens=None)
    p = resolve_preset(cfg)
    assert p.lm_weight == 0.0 and p.num_emb_tokens == 8 and p.pool == "max"
