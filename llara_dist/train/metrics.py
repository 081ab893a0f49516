"""Per-step metrics: metrics.jsonl, a one-line progress display, TensorBoard when installed; MFU.

MFU = model FLOPs of the step's real tokens / (step time x ranks x peak FLOP/s). Model
FLOPs are the usual 6N per token for the matmul weights (LM head included, as if applied
at every token) plus the attention score and value products of the pairs the packed mask
really allows (a document attends only itself, NEXT tokens skip SELF): 3 (forward +
backward) x 4 x heads x head_dim x layers per (query, key) pair. Recomputation under
activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

# dense bf16 peak TFLOP/s by device-name substring; the first match wins
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
               ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))


def peak_flops(configured_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: configured, else looked up for a known GPU; None if unknown (CPU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((t * 1e12 for key, t in PEAK_TFLOPS if key in name), None)


def attention_pairs(batch) -> int:
    """(query, key) pairs the joint-prompt mask allows, summed over the batch's documents.

    A document of T = prefix + text tokens, S SELF and N NEXT tokens: the first T + S tokens
    attend causally; each NEXT token attends the T text tokens and the NEXT tokens up to itself.
    """
    t = batch.text_len  # [D]
    a = t + batch.self_len
    n = batch.next_len
    return int((a * (a + 1) // 2 + n * t + n * (n + 1) // 2).sum())


def matmul_params(hf_config) -> int:
    """Weights of the linear layers (attention, MLP, LM head): the N of 6N."""
    d, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or d // heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * d * hf_config.intermediate_size  # gate, up, down
    return layers * (attn + mlp) + d * hf_config.vocab_size


def train_flops(hf_config, real_tokens: int, pairs: int) -> float:
    """Model FLOPs of one training pass (forward + backward) over the given tokens and pairs."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    dense = 6 * matmul_params(hf_config) * real_tokens
    attention = 3 * 4 * heads * head_dim * hf_config.num_hidden_layers * pairs
    return float(dense + attention)


class MetricsLog:
    """Rank 0 writes: metrics.jsonl (one JSON object per step), TensorBoard, a progress line."""

    def __init__(self, run_dir: str | Path, total_steps: int, enabled: bool, resume_step: int = 0):
        self.enabled, self.total = enabled, total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tty = sys.stderr.isatty()
        self.tb = None
        if not enabled:
            return
        truncate_after(self.path, resume_step)  # steps logged after the checkpoint will be redone
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional
            self.tb = None
        self.file = open(self.path, "a")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        mfu = f" mfu {record['mfu']:.1%}" if record.get("mfu") is not None else ""
        line = (f"step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"gnorm {record['grad_norm']:.3f} docs {record['docs']} fill {record['fill']:.2f} "
                f"tok/s {record['tokens_per_s']:.0f}{mfu}")
        if self.tty:
            print("\r" + line, end="\n" if step == self.total else "", file=sys.stderr, flush=True)
        elif step == 1 or step % 10 == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            if self.tty:
                print(file=sys.stderr)
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop records of steps after `step` (logged by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


class StepTimer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
