"""Helpers that several test files use: a tiny model and real documents, trainer processes and
what they write, and the watch for host syncs. Fixtures live in conftest.py; these are plain
functions, imported as `from helpers import ...` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# --- a tiny model and real documents -------------------------------------------------------------


def make_docs(tokenizer, shared_data, lengths, seed=0):
    """Real Wikipedia chunks cut to `lengths` tokens; every other one without a next chunk."""
    from llara_dist.data.shards import Doc

    rows = [json.loads(line) for line in (shared_data / "llara_toy_pretrain.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    docs = []
    for i, n in enumerate(lengths):
        row = rows[i % len(rows)]
        ids = tokenizer(row["input"], add_special_tokens=False)["input_ids"]
        start = int(rng.integers(0, max(1, len(ids) - n)))
        nxt = tokenizer(row["output_predict"], add_special_tokens=False)["input_ids"][:50]
        docs.append(Doc(f"d{i}", np.asarray(ids[start:start + n], np.int32),
                        np.unique(np.asarray(nxt, np.int32)) if i % 2 == 0 else None))
    return docs


def load_tiny(preset_name, tokenizer_dir, tiny_llama_dir, attn="sdpa"):
    """(tokenizer with the preset's tokens, preset, the tiny LLaMA in eval mode on CPU fp32, PromptTokens)."""
    from llara_dist.config import ModelConfig, ObjectiveConfig
    from llara_dist.model.decoder import load_model
    from llara_dist.prompts import prompt_tokens, resolve_preset
    from llara_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    preset = resolve_preset(ObjectiveConfig(preset=preset_name))
    model = load_model(ModelConfig(path=str(tiny_llama_dir), attn=attn, dtype="fp32"), tok, preset, device="cpu")
    return tok, preset, model.eval(), prompt_tokens(tok, preset)


def micro_batches(tok, prompt, shared_data):
    """Two packed micro-batches of one row each (3 real documents per row, padding at the end)."""
    from llara_dist.data.batch import build_batch

    docs = make_docs(tok, shared_data, [23, 9, 14, 5, 17, 7])
    return [build_batch([row], prompt, 3 * prompt.overhead + 60, tok.pad_token_id) for row in (docs[:3], docs[3:])]


# --- what a step does, counted another way than llara_dist.train.metrics counts it ----------------------


def allowed_pairs(batch) -> torch.Tensor:
    """[rows, L, L] bool, brute force over the mask rule (docs/objective.md): query i may attend key j
    when both are of one document, j <= i, and not (i NEXT and j SELF); padding attends nothing."""
    from llara_dist.data.batch import SEG_NEXT, SEG_PAD, SEG_SELF

    doc, seg = batch.doc, batch.segment
    i = torch.arange(doc.shape[1])
    allowed = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0) & (i[None, :] <= i[:, None])
    allowed &= ~((seg[:, :, None] == SEG_NEXT) & (seg[:, None, :] == SEG_SELF))
    return allowed & (seg[:, :, None] != SEG_PAD)


def matmul_params(hf_config) -> int:
    """Weights of the decoder layers' linear layers (attention and MLP), the LM head left out, from the
    config alone: an independent derivation of what metrics.flop_rates finds by walking the modules."""
    d, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or d // heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * d * hf_config.intermediate_size  # gate, up, down
    return layers * (attn + mlp)


def full_training_rates(hf_config):
    """metrics.FlopRates of a model whose every weight trains, from its config: 6 per weight (6N)."""
    from llara_dist.train.metrics import FlopRates, _pair_flops

    return FlopRates(6 * matmul_params(hf_config), 6 * hf_config.hidden_size * hf_config.vocab_size,
                     _pair_flops(hf_config))


def counted_train_flops(hf_config, tokens: int) -> int:
    """torch's own FLOP count (torch.utils.flop_counter: every matmul run) of a forward and backward of
    a random model of `hf_config` over one sequence of `tokens` tokens. Eager attention multiplies all
    tokens x tokens query-key pairs (the causal mask hides half, it skips none): the pass does `tokens`
    tokens and tokens**2 pairs."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    # a copy: from_config writes the attention choice into the config it is given
    model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), attn_implementation="eager")
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.zeros(1, tokens, dtype=torch.long)).logits.sum().backward()
    return counter.get_total_flops()


def flops_per_token_and_pair(hf_config) -> tuple[float, float]:
    """(a, b) with counted_train_flops(tokens) = a * tokens + b * pairs, solved from two lengths."""
    c4, c8 = counted_train_flops(hf_config, 4), counted_train_flops(hf_config, 8)
    per_pair = (c8 - 2 * c4) / 32  # c4 = 4a + 16b, c8 = 8a + 64b
    return (c4 - 16 * per_pair) / 4, per_pair


# --- `llara-dist train` as real processes ----------------------------------------------------------

TRAIN_STEPS = 12  # the train_setup fixture's run length


def write_run(root: Path, docs, write_test_shards, tiny_llama_dir, data: dict, train: dict) -> Path:
    """root/shards (docs in 4 shards) and root/run.yaml: a tiny fp32 LLaMA, the released preset, and
    the data and train sections given; returns root."""
    write_test_shards(root / "shards", docs, 4)
    config = {
        "data": {"shards": str(root / "shards"), "seq_len": 128, "pack_buffer": 8, **data},
        "model": {"path": str(tiny_llama_dir), "dtype": "fp32"},
        "objective": {"preset": "released"},
        "train": {"global_batch": 8, "micro_batch": 2, "lr": 1e-3, "warmup_steps": 2, **train},
    }
    (root / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    return root


def launch(root: Path, run_dir: Path, world: int, *args: str, env: dict | None = None,
           rank_env: dict | None = None) -> list[subprocess.Popen]:
    """`world` trainer processes on root/run.yaml; several ranks need `env` from the rendezvous fixture
    (the store they join), a lone rank binds any free port itself (MASTER_PORT=0). `rank_env` maps a
    rank to variables for that rank alone."""
    run_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        e = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
             **(env or {}), **(rank_env or {}).get(rank, {})}
        log = open(run_dir / f"log-rank{rank}.txt", "a")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llara_dist", "train", "--config", str(root / "run.yaml"),
             f"run_dir={run_dir}", *args], env=e, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait(procs, timeout: float = 240) -> list[int]:
    """The exit statuses; a process still running at the deadline is killed (and reads as killed)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def metrics(run_dir: Path) -> list[dict]:
    """run_dir/metrics.jsonl, one dict per logged step ([] before the first)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(run_dir: Path, step: int, procs, timeout: float = 180) -> None:
    """Until rank 0 has logged `step`; every process must still run meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics(run_dir) and metrics(run_dir)[-1]["step"] >= step:
            return
        assert all(p.poll() is None for p in procs), f"a process ended early: {[p.poll() for p in procs]}"
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir}: step {step} not reached")


def log_text(run_dir: Path, rank: int = 0) -> str:
    return (run_dir / f"log-rank{rank}.txt").read_text()


# --- host syncs: what would make the CPU wait for the GPU, seen on CPU -------------------

class SyncWatch(TorchDispatchMode):
    """Records the operations whose CUDA form makes the host wait for the device: a value read
    back (item, float, int, bool, tolist, cpu, numpy) or an output size that depends on the data
    (nonzero, unique, masked_select, boolean-mask indexing, repeat_interleave without output_size).

    The CPU stand-in for torch.cuda.set_sync_debug_mode("error"): it sees the operations, not the
    device, so a copy between host and device (.to) is not among them.
    """

    READ_BACK = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                 "unique_consecutive", "is_nonzero", "equal"}
    TO_HOST = {"tolist", "cpu", "numpy"}  # Tensor methods whose CPU form dispatches nothing

    def __enter__(self):
        self.events = []  # (operation, the Python functions on the stack, innermost last)
        self._methods = _HostCopies(self)
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._methods.__exit__(*exc)
        return super().__exit__(*exc)

    def record(self, name: str) -> None:
        self.events.append((name, [f"{f.filename}:{f.name}" for f in traceback.extract_stack()[:-2]]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[1]
        if (name in self.READ_BACK
                or (name == "repeat_interleave" and kwargs.get("output_size") is None)
                or (name in ("index", "index_put", "index_put_")
                    and any(i is not None and i.dtype == torch.bool for i in args[1]))):
            self.record(name)
        return func(*args, **kwargs)


class _HostCopies(TorchFunctionMode):
    def __init__(self, watch: SyncWatch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SyncWatch.TO_HOST:
            self.watch.record(func.__name__)
        return func(*args, **(kwargs or {}))


# --- refusals ------------------------------------------------------------------------------------


def refused(argv: list[str], capsys) -> str:
    """Run `llara-dist ARGV` in this process and check that it refused as every command must: exit 2,
    one `llara-dist CMD: ...` message on stderr, no traceback. Returns what it printed to stderr."""
    import pytest

    from llara_dist.cli import main

    capsys.readouterr()  # what earlier calls printed is not this command's
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    command = next(a for a in argv if not a.startswith("-"))
    assert f"llara-dist {command}: " in err and "Traceback" not in err, err[-3000:]
    return err
