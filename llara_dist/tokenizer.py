"""Train a small byte-level BPE tokenizer (demo and tests: nothing can be downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from llara_dist.errors import UserError, existing_path


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2000):
    """Train on `texts`, save a Hugging Face tokenizer folder, return the loaded tokenizer.

    LLaMA-like specials: <unk>=0, <s>=1 (bos), </s>=2 (eos); <pad>=3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str | Path):
    """The tokenizer of a local folder (a model folder, or a tokenizer's own)."""
    from transformers import AutoTokenizer

    folder = existing_path(path, "tokenizer folder")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(f"{path}: holds no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - any loading problem is the folder's (a broken tokenizer.json, ...)
        raise UserError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e})") from None


def pad_id(tokenizer) -> int:
    """The id that fills padding slots: the tokenizer's pad token, else unk, else eos, else 0.

    LLaMA-2's tokenizer has no pad token. Padding slots are outside every document: no real
    token attends them and no loss reads them (data/batch.py), so which id fills them changes no
    result. Unk is the fallback because the released LLaRA code pads with it
    (`tokenizer.pad_token = tokenizer.unk_token`), so an exported model pads as there.
    """
    for tid in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def with_pad_token(tokenizer):
    """Give a tokenizer without a pad token pad_id's token as its pad token (for Hugging Face's
    own padding: `tokenizer.pad`, `padding=True`); returns it. No token is added: the pad token
    is one the tokenizer already has (its unk or eos: special already), so its ids stay as they were."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id(tokenizer))
    return tokenizer
