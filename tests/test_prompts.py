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


# --- the released preset under the real LLaMA-2 tokenizer ---------------------------------------

# FlagEmbedding research/LLARA, copied from its code: the prompt strings (pretrain/data.py,
# finetune/data.py) and the suffix ids its pretrain/modeling.py hard-codes for LLaMA-2, with the
# embedding-token ids of the released checkpoint's tokenizer
RELEASED_PREFIX = '"'
RELEASED_SUFFIXES = ['", summarize the above passage within eight words: <s1><s2><s3><s4><s5><s6><s7><s8>',
                     '", predict the following passage within eight words: <s9><s10><s11><s12><s13><s14><s15><s16>']
RELEASED_SUMMARIZE_IDS = [9162, 19138, 675, 278, 2038, 13382, 2629, 9475, 3838, 29901, 29871,
                          32008, 32011, 32004, 32013, 32007, 32005, 32002, 32014]
RELEASED_PREDICT_IDS = [9162, 8500, 278, 1494, 13382, 2629, 9475, 3838, 29901, 29871, 32000,
                        32009, 32012, 32001, 32010, 32003, 32006, 32015]


@pytest.fixture
def llama2_dir(shared_data):
    return shared_data / "llama2-tokenizer"


def ours(tokenizer):
    preset = PRESETS["released"]
    add_special_tokens(tokenizer, preset)
    return prompt_tokens(tokenizer, preset)


def released_calls(tokenizer, cutoff_len: int = 128):
    """The released code's own calls: pretrain/run.py sets the pad token and adds <s1>..<s16>,
    pretrain/data.py tokenizes the prefix (with the tokenizer's specials) and both suffixes
    (without); finetune/data.py does the same for passages (summarize) and queries (predict)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    special_tokens = [f"<s{i}>" for i in range(1, 17)]
    current_vocab = tokenizer.get_vocab()
    tokens_to_add = [token for token in special_tokens if token not in current_vocab]
    if tokens_to_add:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens_to_add})
    prefix_ids = tokenizer(RELEASED_PREFIX, truncation=True, max_length=cutoff_len, return_tensors=None)["input_ids"]
    suffix_ids = tokenizer(RELEASED_SUFFIXES, truncation=True, max_length=cutoff_len, return_tensors=None,
                           add_special_tokens=False)["input_ids"]
    return prefix_ids, suffix_ids, tokenizer.convert_tokens_to_ids(special_tokens)


def test_released_suffixes_are_19_and_18_tokens_under_llama2(llama2_dir):
    """The lengths the released modeling code hard-codes into its mask and position ids."""
    pt = ours(load_tokenizer(llama2_dir))
    assert (len(pt.prefix), len(pt.self_suffix), len(pt.next_suffix)) == (2, 19, 18)
    assert pt.overhead == 39 and pt.num_emb_tokens == 8


def test_released_ids_are_what_the_released_code_builds(llama2_dir):
    released_tok = load_tokenizer(llama2_dir)
    prefix, (summarize, predict), emb = released_calls(released_tok)
    tok = load_tokenizer(llama2_dir)
    pt = ours(tok)
    assert list(pt.prefix) == prefix == [tok.bos_token_id, 376]  # <s> and '"'
    assert list(pt.self_suffix) == summarize
    assert list(pt.next_suffix) == predict
    assert tok.convert_tokens_to_ids([f"<s{i}>" for i in range(1, 17)]) == emb == list(range(32000, 32016))
    assert len(tok) == len(released_tok) == 32016  # the model is resized alike
    # the text of the suffixes is what the released modeling code hard-codes, token for token
    assert summarize[:-8] == RELEASED_SUMMARIZE_IDS[:-8] and predict[:-8] == RELEASED_PREDICT_IDS[:-8]
    # its inference (README) builds them as tokenizer(suffix)["input_ids"][1:]: the same ids again
    assert [released_tok(s)["input_ids"][1:] for s in RELEASED_SUFFIXES] == [summarize, predict]


def test_released_checkpoint_vocabulary_gives_the_hard_coded_ids(llama2_dir):
    """The released checkpoint's tokenizer numbers <s1>..<s16> in another order (its <s9> is 32000);
    the ids come from the tokenizer at hand, so under that numbering our suffixes are exactly the
    lists the released modeling code hard-codes."""
    numbered = dict(zip([f"<s{i}>" for i in range(1, 17)], RELEASED_SUMMARIZE_IDS[-8:] + RELEASED_PREDICT_IDS[-8:]))
    tok = load_tokenizer(llama2_dir)
    tok.add_tokens(sorted(numbered, key=numbered.get), special_tokens=True)  # ids 32000.. in that order
    assert tok.convert_tokens_to_ids(list(numbered)) == list(numbered.values())
    pt = ours(tok)
    assert len(tok) == 32016  # nothing added twice
    assert list(pt.self_suffix) == RELEASED_SUMMARIZE_IDS
    assert list(pt.next_suffix) == RELEASED_PREDICT_IDS
