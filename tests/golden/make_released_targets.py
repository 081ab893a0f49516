"""Writes released_targets.json: the BoW target sets that the released LLaRA code builds for the toy data.

It runs the released code's own data logic, not ours: the lines below are copied from FlagEmbedding
(github.com/FlagOpen/FlagEmbedding, commit 7ed43d67ec03fbe5c31c0992dbfa941fb1860549):

- `research/LLARA/pretrain/run.py`: the tokenizer (pad = unk, left padding, <s1>..<s16> added);
- `research/LLARA/pretrain/data.py`: `TrainDatasetForEmbedding.__init__` and `__getitem__` (the input ids,
  the stop-word filter) and `EmbedCollator.__call__` (the target texts tokenized, cut to `cutoff_len`);
- `research/LLARA/pretrain/modeling.py`: `torch.unique(temp_output_ids[temp_output_ids > 2])`, the set
  each BoW term averages over.

Two changes, both forced here and neither changing an id: the tokenizer is the fast one of
`../shared/data/llama2-tokenizer` (the released code loads Meta's slow SentencePiece one; this folder
gives SentencePiece's ids, see its LICENSE-NOTE.md), and `nltk.corpus.stopwords.words("english")` is read
from nltk_data's `packages/corpora/stopwords.zip` (github.com/nltk/nltk_data), given as an argument,
as nltk's word-list reader reads it (non-blank lines).

Settings: README's `--cutoff_len 128` and the argument's default 512, with and without
`--remove_stop_words` (the README trains with it). One example per micro-batch, as in the README.

    .venv/bin/python tests/golden/make_released_targets.py /path/to/nltk_data/packages/corpora/stopwords.zip
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

HERE = Path(__file__).parent
SHARED = HERE.parent.parent.parent / "shared" / "data"
DATA = SHARED / "llara_toy_pretrain.jsonl"
TOKENIZER = SHARED / "llama2-tokenizer"
OUT = HERE / "released_targets.json"
CUTOFFS = (128, 512)


def nltk_english(zip_path: str) -> list[str]:
    raw = zipfile.ZipFile(zip_path).read("stopwords/english").decode("utf-8")
    return [line for line in raw.splitlines() if line.strip()]


def released_tokenizer():
    # run.py
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    special_tokens = ['<s1>', '<s2>', '<s3>', '<s4>', '<s5>', '<s6>', '<s7>', '<s8>',
                      '<s9>', '<s10>', '<s11>', '<s12>', '<s13>', '<s14>', '<s15>', '<s16>', ]
    current_vocab = tokenizer.get_vocab()
    tokens_to_add = [token for token in special_tokens if token not in current_vocab]
    if tokens_to_add:
        tokenizer.add_special_tokens({'additional_special_tokens': tokens_to_add})
    return tokenizer


class Dataset:
    """data.py, TrainDatasetForEmbedding (the json file read without `datasets`: the same rows in order)."""

    def __init__(self, tokenizer, rows, cutoff_len, remove_stop_words, stop_words):
        self.dataset = rows
        self.remove_stop_words = remove_stop_words
        self.stop_words = list(stop_words)
        self.stop_words.extend(['!', ',', '.', '?'])
        self.max_length = cutoff_len
        self.tokenizer = tokenizer
        self.prefix = '"'
        self.suffix = ['", summarize the above passage within eight words: <s1><s2><s3><s4><s5><s6><s7><s8>',
                       '", predict the following passage within eight words: <s9><s10><s11><s12><s13><s14><s15><s16>']
        self.prefix_ids = self.tokenizer(self.prefix, truncation=True, max_length=self.max_length,
                                         return_tensors=None)['input_ids']
        self.suffix_ids = self.tokenizer(self.suffix, truncation=True, max_length=self.max_length,
                                         return_tensors=None, add_special_tokens=False)['input_ids']

    def __getitem__(self, item):
        prefix_ids = self.prefix_ids
        inp = self.dataset[item]['input']
        suffix_ids_summarize = self.suffix_ids[0]
        suffix_ids_predict = self.suffix_ids[1]
        oup_summarize = self.dataset[item]['output_summarize']
        oup_predict = self.dataset[item]['output_predict']
        input_ids = self.tokenizer(inp,
                                   truncation=True,
                                   max_length=self.max_length - len(prefix_ids) - len(suffix_ids_summarize) - len(
                                       suffix_ids_predict),
                                   padding=False,
                                   return_tensors=None,
                                   add_special_tokens=False)
        result = dict()
        result['input_ids'] = prefix_ids + input_ids['input_ids'] + suffix_ids_summarize + suffix_ids_predict
        if self.remove_stop_words:
            oup_summarize = re.sub(r'[\W_]+', ' ', oup_summarize)
            oup_summarize = ' '.join([word for word in oup_summarize.split() if word.lower() not in self.stop_words])
            oup_predict = re.sub(r'[\W_]+', ' ', oup_predict)
            oup_predict = ' '.join([word for word in oup_predict.split() if word.lower() not in self.stop_words])
        return result, oup_summarize, oup_predict


def collate_targets(tokenizer, cutoff_len, outputs_summarize, outputs_predict):
    """data.py, EmbedCollator.__call__: the two target tokenizations."""
    outputs_summarize_collated = tokenizer(outputs_summarize, padding=True, truncation=True,
                                           max_length=cutoff_len, return_tensors="pt")
    outputs_predict_collated = tokenizer(outputs_predict, padding=True, truncation=True,
                                         max_length=cutoff_len, return_tensors="pt")
    return outputs_summarize_collated['input_ids'], outputs_predict_collated['input_ids']


def target_set(temp_output_ids: torch.Tensor) -> list[int]:
    """modeling.py: the ids one BoW term averages over."""
    return torch.unique(temp_output_ids[temp_output_ids > 2]).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stopwords_zip", help="nltk_data's packages/corpora/stopwords.zip")
    args = parser.parse_args()
    stop_words = nltk_english(args.stopwords_zip)
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = released_tokenizer()
    settings = []
    for cutoff_len in CUTOFFS:
        for remove in (False, True):
            ds = Dataset(tokenizer, rows, cutoff_len, remove, stop_words)
            docs = []
            for i in range(len(rows)):
                result, summarize, predict = ds[i]
                s_ids, p_ids = collate_targets(tokenizer, cutoff_len, [summarize], [predict])
                docs.append({"input_ids": result["input_ids"], "summarize": target_set(s_ids[0]),
                             "predict": target_set(p_ids[0])})
            settings.append({"cutoff_len": cutoff_len, "remove_stop_words": remove, "docs": docs})
    out = {
        "what": "BoW target sets (summarize = EBAE, predict = EBAR) and input ids the released LLaRA pretraining "
                "code builds for ../shared/data/llara_toy_pretrain.jsonl under ../shared/data/llama2-tokenizer; "
                "written by tests/golden/make_released_targets.py",
        "released_code": "github.com/FlagOpen/FlagEmbedding@7ed43d67ec03fbe5c31c0992dbfa941fb1860549 research/LLARA/pretrain",
        "stop_words": {"source": "github.com/nltk/nltk_data packages/corpora/stopwords.zip stopwords/english",
                       "words": len(stop_words)},
        "settings": settings,
    }
    OUT.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}: {len(settings)} settings x {len(rows)} documents")


if __name__ == "__main__":
    main()
