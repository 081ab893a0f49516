"""Shared fixtures: the real sample data, a small tokenizer trained on it, tiny models, shards and runs.

Plain functions that several test files use are in helpers.py."""

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
def released_prompt(tokenizer_dir):
    """The released preset's PromptTokens under the test tokenizer (its tokens added)."""
    from llara_dist.config import ObjectiveConfig
    from llara_dist.prompts import add_special_tokens, prompt_tokens, resolve_preset
    from llara_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    preset = resolve_preset(ObjectiveConfig(preset="released"))
    add_special_tokens(tok, preset)
    return prompt_tokens(tok, preset)


@pytest.fixture(scope="session")
def wikitext_shards(tmp_path_factory, tokenizer_dir, shared_data) -> Path:
    """WikiText under the 2000-token test tokenizer, 5 shards of 100 documents (the last smaller).
    Shared by every test: copy it before changing it."""
    from llara_dist.data.prep import PrepSettings, prep

    out = tmp_path_factory.mktemp("integrity") / "shards"
    prep(PrepSettings(inputs=[str(shared_data / "wikitext2_valid.txt")], format="wikitext", tokenizer=str(tokenizer_dir),
                      out=str(out), shard_docs=100), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random 2-layer LLaMA (hidden 64) over the test tokenizer's vocabulary, saved to disk.

    Its vocabulary is the base tokenizer's; loading code resizes it for a preset's new tokens.
    """
    from llara_dist.model.tiny import save_tiny_llama
    from llara_dist.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    return save_tiny_llama(out, vocab_size=len(load_tokenizer(tokenizer_dir)))


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory, tiny_llama_dir, tokenizer_dir) -> Path:
    """A model folder as export writes it, for the `released` preset: its tokens in the tokenizer and
    the embeddings (each process that loaded the bare tiny model would draw its own rows for them),
    and llara.json. Read-only: every test may load it, none may change it."""
    import json

    from helpers import load_tiny

    out = tmp_path_factory.mktemp("encoder") / "model"
    tokenizer, _, model, _ = load_tiny("released", tokenizer_dir, tiny_llama_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "llara.json").write_text(json.dumps({"objective": {"preset": "released"}}))
    return out


# --- shards for the stream / pack / loader tests (written here, not by prep) ---------


def _write_test_shards(folder: Path, docs: list, n_shards: int, tokenizer: str = "") -> Path:
    """Deal `docs` [(key, ids, next_ids or None, text)] into n_shards contiguous shards + manifest."""
    import hashlib

    from llara_dist.data import shards

    folder.mkdir(parents=True, exist_ok=True)
    bounds = [round(i * len(docs) / n_shards) for i in range(n_shards + 1)]
    entries = []
    for i in range(n_shards):
        part = docs[bounds[i]:bounds[i + 1]]
        path = folder / shards.shard_name(i)
        shards.write_shard(path, [shards.encode_sample(k, ids, nxt, text, {"article": 0, "chunk": 0, "source": "t"})
                                  for k, ids, nxt, text in part])
        entries.append({"name": path.name, "docs": len(part), "tokens": sum(len(d[1]) for d in part),
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    shards.write_manifest(folder, {
        "version": 1, "shards": entries, "docs": len(docs), "tokens": sum(e["tokens"] for e in entries),
        "tokenizer": {"name_or_path": tokenizer}, "chunking": {}, "format": "test", "inputs": [],
        "skipped": {}, "truncated": {}})
    return folder


@pytest.fixture(scope="session")
def write_test_shards():
    """write(folder, docs, n_shards, tokenizer="") -> folder; docs are (key, ids, next_ids|None, text)."""
    return _write_test_shards


@pytest.fixture(scope="session")
def wiki_docs(shared_data, tokenizer_dir) -> list:
    """Real WikiText prose as ~100-word documents (key, ids, next_ids|None, text); last of an article has no next."""
    from llara_dist.data.formats import Reader
    from llara_dist.data.shards import make_key
    from llara_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    docs = []
    for a, article in enumerate(Reader([str(shared_data / "wikitext2_valid.txt")], "wikitext")):
        words = article.text.split()
        chunks = [" ".join(words[i:i + 100]) for i in range(0, len(words), 100)]
        ids = tok(chunks, add_special_tokens=False)["input_ids"] if chunks else []
        for c, text in enumerate(chunks):
            docs.append((make_key("wiki", a, c), ids[c], ids[c + 1] if c + 1 < len(chunks) else None, text))
    return docs


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory, wiki_docs, write_test_shards, tokenizer_dir, tiny_llama_dir):
    """(folder holding run.yaml and its shards, the documents' keys): 40 short WikiText documents in
    4 shards (rows hold 1-2 of them); the run: helpers.TRAIN_STEPS steps of 8 rows, fp32, 1 or 2 ranks."""
    from helpers import TRAIN_STEPS, write_run

    root = tmp_path_factory.mktemp("train")
    docs = [(key, ids[:10 + (i * 7) % 60], nxt, text) for i, (key, ids, nxt, text) in enumerate(wiki_docs[:40])]
    write_run(root, docs, write_test_shards, tiny_llama_dir, data={"num_workers": 1},
              train={"steps": TRAIN_STEPS, "ckpt_every": 3, "keep_checkpoints": 2, "tokenizer": str(tokenizer_dir),
                     "collective_timeout_s": 30})
    return root, [d[0] for d in docs]


@pytest.fixture(scope="session")
def rendezvous():
    """rendezvous() -> the environment for the ranks of one launch this test starts: MASTER_ADDR and
    MASTER_PORT of a fresh c10d store that this process hosts (as torchrun's agent does), and
    TORCHELASTIC_USE_AGENT_STORE=True, so that every rank, rank 0 included, joins it as a client.

    Why not a port found free and handed to rank 0 to bind: it stays unbound for the seconds the
    ranks take to start, and another process (other tests, anything on a shared machine) can take
    it; rank 0 then fails with EADDRINUSE after a minute. This port is bound before any rank starts
    and stays bound until the session ends. One store per launch: ranks of a second launch in the
    same store would find the first one's keys."""
    from torch.distributed import TCPStore

    stores = []

    def host() -> dict:
        stores.append(TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False))
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(stores[-1].port),
                "TORCHELASTIC_USE_AGENT_STORE": "True"}

    yield host
    stores.clear()


def _leave_cleanly(rank: int, worker, *args) -> None:
    """Run worker(rank, *args), then leave the process group together: a rank that exits while the
    others still use the group can die in its C++ teardown ("terminate called without an active
    exception", SIGABRT), which fails the launch although the work was done."""
    import torch.distributed as dist

    worker(rank, *args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def spawn_ranks(rendezvous):
    """spawn(worker, world, *args): run worker(rank, world, port, *args) in `world` gloo ranks
    in-process (torch.multiprocessing), joined through a fresh hosted store (see rendezvous)."""
    def spawn(worker, world: int, *args):
        from unittest import mock

        import torch.multiprocessing as mp

        env = rendezvous()
        with mock.patch.dict(os.environ, env):  # the spawned ranks inherit it; this process gets its own back
            mp.spawn(_leave_cleanly, args=(worker, world, int(env["MASTER_PORT"]), *args), nprocs=world)

    return spawn


@pytest.fixture(scope="session")
def run_ranks(spawn_ranks):
    """run(worker, world, paths, out): spawn `world` gloo ranks of worker(rank, world, port, paths, out)
    in-process (torch.multiprocessing), then load what rank 0 saved to `out`."""
    def run(worker, world: int, paths, out):
        import torch

        spawn_ranks(worker, world, paths, out)
        return torch.load(out, weights_only=False)

    return run
