"""Check the joint-prompt attention paths on this machine before spending GPU hours.

    llara-dist doctor                          # a tiny random LLaMA, every path available here
    llara-dist doctor --model /models/llama-2-7b --layers 2 --attn flex
    llara-dist doctor --device cuda --dtype bf16

For each path: forward, the SELF/NEXT embedding states of every document of packed rows
(1, 2 and many documents) against separate, unpacked, plainly causal passes in fp32 (stock
HF sdpa); backward (where the path has one here), the gradient of the LLaRA loss against
the fp32 `sdpa` path. Prompts are synthetic ids shaped like the released preset (the
kernels do not care which tokens they are), so any model folder works, tokenizer or not.

Errors are relative: max |x - ref| / max |ref| (forward), ||g - g_ref|| / ||g_ref|| (backward).
Bounds: fp32 1e-4 both. Low precision: the dense `sdpa` path in that dtype sets the baseline
(its own bounds: 5e-2 forward, 1e-1 backward), and every other path must be within 2x the
baseline's error (+1e-3). Exit status 1 if any check fails, 2 if --attn cannot run here.
Each row is printed (flushed) as soon as it is measured and the summary last, so a run cut by a
timeout (a cold flex compile in bench/gpu_check.sh) keeps the rows it measured.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from llara_dist.config import ObjectiveConfig
from llara_dist.data.batch import build_batch
from llara_dist.data.shards import Doc
from llara_dist.errors import UserError, existing_path
from llara_dist.kernels import registry
from llara_dist.model.decoder import DTYPES, default_device, forward_hidden, gather_states, resolve_dtype, set_attention
from llara_dist.model.objective import batch_counts, combine, loss_sums
from llara_dist.prompts import PromptTokens, resolve_preset

FP32_BOUND = 1e-4
LOW_BOUND = {"forward": 5e-2, "backward": 1e-1}


def configure(p) -> None:
    p.add_argument("--model", default="", help="Hugging Face model folder (default: a tiny random LLaMA)")
    p.add_argument("--attn", default="", choices=["", *registry.PATHS], help="check one path (default: all here)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--layers", type=int, default=2, help="keep only the first N decoder layers (speed)")
    p.add_argument("--seq-len", type=int, default=384, help="tokens per packed row")
    p.add_argument("--seed", type=int, default=0)


@dataclass
class Row:
    path: str
    device: str
    dtype: str
    check: str
    error: float | None = None
    bound: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool | None:
        return None if self.error is None else self.error <= self.bound


def tiny_model(vocab: int = 512):
    from transformers import LlamaForCausalLM

    from llara_dist.model.tiny import tiny_llama_config

    return LlamaForCausalLM(tiny_llama_config(vocab, hidden=128, layers=2, heads=4, kv_heads=2))


def load(path: str, layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if not path:
        return tiny_model()
    existing_path(path, "model folder")
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = min(layers, config.num_hidden_layers)
    # use_kernels=False: HF's own layers, not Hub kernels (see modeling.load_model)
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32, use_kernels=False)


def synthetic(vocab: int, seq_len: int, k: int, rng) -> tuple[PromptTokens, list[list[Doc]]]:
    """A released-shaped prompt (2 + 19 + 18 tokens) and rows of 1, 2 and many documents."""
    ids = lambda n: tuple(int(x) for x in rng.integers(3, vocab, n))  # noqa: E731
    prompt = PromptTokens(ids(2), ids(19), ids(18), k)
    room = seq_len - prompt.overhead

    def doc(i, n):
        nxt = np.unique(rng.integers(3, vocab, 40)).astype(np.int32) if i % 3 else None
        return Doc(f"d{i}", rng.integers(3, vocab, max(n, 1)).astype(np.int32), nxt)

    many = max(1, seq_len // (prompt.overhead + 12))
    rows = [[doc(0, room - 7)],
            [doc(1, room // 2 - prompt.overhead), doc(2, room // 3)],
            [doc(3 + i, 12 - i % 5) for i in range(many)]]
    return prompt, rows


def separate_states(model, prompt: PromptTokens, docs: list[Doc], device) -> torch.Tensor:
    """[D, 2, k, H]: SELF and NEXT states from unpacked passes with stock causal HF sdpa."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    k, out = prompt.num_emb_tokens, []
    with torch.no_grad():
        for d in docs:
            pair = []
            for suffix in (prompt.self_suffix, prompt.next_suffix):
                ids = torch.tensor([list(prompt.prefix) + d.ids.tolist() + list(suffix)], device=device)
                pair.append(model.get_decoder()(input_ids=ids).last_hidden_state[0, -k:].float())
            out.append(torch.stack(pair))
    model.set_attn_implementation(saved)
    return torch.stack(out)


def joint_states(model, batch) -> torch.Tensor:
    with torch.no_grad():
        h = forward_hidden(model, batch)
        return torch.stack([gather_states(h, batch.self_emb), gather_states(h, batch.next_emb)], 1).float()


def loss_grads(model, batch, preset) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss, _ = combine(loss_sums(model, batch, preset), batch_counts(batch, preset), preset)
    loss.backward()
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def rel_max(x, ref) -> float:
    return float((x - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def rel_norm(x, ref) -> float:
    return float((x - ref).norm() / ref.norm().clamp(min=1e-12))


def run_checks(model, prompt, rows, device, dtype: torch.dtype, paths, report=None) -> list[Row]:
    """Every check of every path; `model` is fp32 and is moved to `device`. `report` is called with
    each row as soon as it is measured (a run killed by a timeout keeps what it printed)."""
    preset = resolve_preset(ObjectiveConfig(preset="released"))  # max-pooled BoW + LM loss: every part
    docs = [d for row in rows for d in row]
    seq_len = max(sum(len(d.ids) + prompt.overhead for d in row) for row in rows)
    # no tokenizer here: the synthetic ids are >= 3, and no result depends on the id in padding (tokenizer.pad_id)
    batch = build_batch(rows, prompt, seq_len, pad_id=0).to(device)
    ref = model.to(device).eval()
    ref_fwd = separate_states(ref, prompt, docs, device)
    set_attention(ref, "sdpa", device)
    ref_grad = loss_grads(ref, batch, preset)
    low = dtype != torch.float32
    test_model = copy.deepcopy(ref).to(dtype) if low else ref
    dev, dt = torch.device(device).type, {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    out: list[Row] = []

    def add(row: Row) -> None:
        out.append(row)
        if report is not None:
            report(row)

    baseline: dict[str, float] = {}
    for path in sorted(paths, key=lambda p: p != "sdpa"):  # the sdpa baseline first
        why = registry.why_unavailable(path, device, dtype=dtype)
        if why is not None:
            add(Row(path, dev, dt, "forward", note=f"skipped: {why}"))
            continue
        set_attention(test_model, path, device)
        checks = [("forward", lambda: rel_max(joint_states(test_model, batch), ref_fwd))]
        why_bwd = registry.why_unavailable(path, device, backward=True, dtype=dtype)
        if why_bwd is None and (low or path != "sdpa"):  # fp32 sdpa is the backward reference itself
            checks.append(("backward", lambda: rel_norm(loss_grads(test_model, batch, preset), ref_grad)))
        for name, measure in checks:
            err = measure()
            if not low:
                bound = FP32_BOUND
            elif path == "sdpa":
                bound, baseline[name] = LOW_BOUND[name], err
            else:
                bound = 2 * baseline.get(name, LOW_BOUND[name] / 2) + 1e-3
            add(Row(path, dev, dt, f"{name} vs fp32 {'separate passes' if name == 'forward' else 'sdpa'}",
                    err, bound))
        if why_bwd is not None:
            add(Row(path, dev, dt, "backward", note=f"skipped: {why_bwd}"))
    return out


def print_header() -> None:
    head = f"{'path':9} {'device':6} {'dtype':8} {'check':34} {'rel err':>9} {'bound':>9}  result"
    print(head)
    print("-" * len(head), flush=True)


def print_row(r: Row) -> None:
    err = f"{r.error:9.2e}" if r.error is not None else f"{'-':>9}"
    bound = f"{r.bound:9.2e}" if r.bound is not None else f"{'-':>9}"
    result = {True: "pass", False: "FAIL", None: r.note}[r.ok]
    print(f"{r.path:9} {r.device:6} {r.dtype:8} {r.check:34} {err} {bound}  {result}", flush=True)


def run(args) -> int:
    device = torch.device(args.device) if args.device else default_device()
    if args.seq_len < 128:
        raise UserError(f"--seq-len {args.seq_len}: must be at least 128 (rows of 1, 2 and many documents)")
    dtype = resolve_dtype(args.dtype, device)
    if args.attn:
        registry.check_path(args.attn, device, dtype=dtype)
    torch.manual_seed(args.seed)
    model = load(args.model, args.layers)
    vocab = model.get_input_embeddings().num_embeddings
    prompt, rows = synthetic(vocab, args.seq_len, 8, np.random.default_rng(args.seed))
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {where}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{'model ' + args.model if args.model else 'tiny random LLaMA'}")
    print_header()  # then each row as it is measured: a cold flex compile may be cut by a timeout
    results = run_checks(model, prompt, rows, device, dtype, [args.attn] if args.attn else registry.PATHS,
                         report=print_row)
    failed = [r for r in results if r.ok is False]
    print(f"\n{len(failed)} failed, {sum(r.ok is True for r in results)} passed, "
          f"{sum(r.ok is None for r in results)} skipped")
    return 1 if failed else 0
