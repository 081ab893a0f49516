"""What a run shows while it runs (rank 0): per-step metrics, the console and its log; MFU.

- `Console`: the trainer's lines to stderr, each also appended to run_dir/train.log (kept across
  resumes, so the log holds the whole run's story, each line dated).
- `MetricsLog`: one row per step in run_dir/metrics.jsonl (the step's numbers, `time`: Unix
  seconds, `elapsed_s`: running time of the run), the same numbers to the trackers the config asks
  for (train/trackers.py), and a progress line: clock time, step, loss, the task's own terms
  (`task.METRICS`), lr, speed, elapsed time and an ETA from this start's mean step time.

`elapsed_s` counts the time each start ran, from when its trainer begins (Console: model loading
included, Python's imports not), carried over from the row of the step a start resumes from: the
time between starts is not in it, nor the steps a crash lost after its last checkpoint (their
redoing is).

MFU = model FLOPs of the step / (step time x ranks x peak FLOP/s). Model FLOPs count the matmuls
where they are applied (`FlopRates`):

- each linear weight of the decoder layers at every real token (padding is not credited): 2 per
  weight for the forward, 2 for the gradient of its input, 2 for its own gradient when it trains.
  So a trained weight costs 6, a frozen one (LoRA's base weights) 4, and a frozen one whose input
  needs no gradient 2 (under LoRA, the first layer's q, k, v projections read the frozen
  embeddings through a frozen norm);
- the LM head only at the positions the objective applies it to (`head_positions`: each
  document's 2 x k embedding positions, and with the LM loss its text tokens), at the same 6, 4
  or 2 per weight; fine-tuning applies it nowhere (a step result without `head_positions`: 0);
- attention's score and value products of the (query, key) pairs the packed mask really allows (a
  document attends only itself, NEXT tokens skip SELF): 3 (forward + backward) x 4 x heads x
  head_dim x layers per pair.

Not counted: the model call's own LM head at each row's last position (decoder.forward_hidden asks
for the logits of one position, which nothing uses: forward only, wasted), recomputation under
activation checkpointing, and whatever a configuration does beyond the objective's need (the
benchmark's baseline applies the head at every position): model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llara_dist.errors import UserError

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


def _head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


@dataclass(frozen=True)
class FlopRates:
    """Model FLOPs of one training pass (forward + backward) per unit of work, for one model and what
    of it trains: per real token (the decoder layers' linear layers), per position the LM head is
    applied at, per attention (query, key) pair."""

    per_token: int
    per_head_position: int
    per_pair: int

    def step(self, real_tokens: int, pairs: int, head_positions: int) -> float:
        return float(self.per_token * real_tokens + self.per_head_position * head_positions
                     + self.per_pair * pairs)


def _pair_flops(hf_config) -> int:
    return 3 * 4 * hf_config.num_attention_heads * _head_dim(hf_config) * hf_config.num_hidden_layers


# the linear layers that read a decoder layer's normed input (LLaMA, Mistral, Qwen2)
INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def flop_rates(model) -> FlopRates:
    """The rates of `model` as it trains: a HF causal LM, peft-wrapped under LoRA, ZeRO-3-partitioned
    or not, or a DeepSpeed engine around it. Each nn.Linear (LoRA's adapters and base layers included)
    costs 2 per weight forward, 2 more where its input needs a gradient, 2 more where it trains."""
    core = getattr(model, "module", model)  # a DeepSpeed engine's model
    head = core.get_output_embeddings()
    in_head = {id(m) for m in head.modules()}
    no_input_grad = _linears_reading_frozen_input(core)
    per_token = per_head = 0
    for m in core.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        w = m.weight
        n = getattr(w, "ds_numel", w.numel())  # ZeRO-3 leaves a partitioned weight empty
        cost = 2 * n * (1 + (id(m) not in no_input_grad) + w.requires_grad)
        if id(m) in in_head:
            per_head += cost
        else:
            per_token += cost
    return FlopRates(per_token, per_head, _pair_flops(core.config))


def _linears_reading_frozen_input(core) -> set[int]:
    """ids of the linear layers whose input needs no gradient: with the input embeddings and the first
    layer's input norm frozen (LoRA), what reads that norm's output (the first layer's q, k, v and
    their LoRA A; not LoRA B, which reads A's trained output). Empty when anything upstream trains."""
    from llara_dist.model.decoder import decoder_layers

    layers = decoder_layers(core)
    embeddings = core.get_input_embeddings()
    if not layers or any(p.requires_grad for p in embeddings.parameters()):
        return set()
    first = layers[0]
    norm = getattr(first, "input_layernorm", None)
    if norm is None or any(p.requires_grad for p in norm.parameters()):
        return set()
    out = set()
    for name, m in first.named_modules():
        parts = name.split(".")
        if isinstance(m, torch.nn.Linear) and any(p in INPUT_PROJECTIONS for p in parts) and "lora_B" not in parts:
            out.add(id(m))
    return out


def head_positions(batch, preset) -> int:
    """Positions the objective applies the LM head to (objective.loss_sums): the 2 x k embedding
    positions of every document (EBAE and EBAR alike, a document without a next chunk included), and
    with an LM loss each LM target (its text tokens)."""
    return 2 * batch.self_emb.numel() + (batch.lm_index.numel() if preset.lm_weight else 0)


# short names on the progress line; a metric not here shows under its own name
LABELS = {"accuracy": "acc"}


def hms(seconds: float) -> str:
    """A duration as H:MM:SS (days first when there are some)."""
    return str(datetime.timedelta(seconds=round(seconds)))


class Console:
    """The trainer's lines (rank 0): each to stderr and appended to run_dir/train.log; other ranks stay quiet.

    A transient line (the progress display between logged steps) shows only on a terminal, where the
    next line overwrites it, and is not logged. On the terminal a line starts with the clock time
    (HH:MM:SS), in train.log with the date and time.
    """

    def __init__(self, run_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "train.log"
        self.started = time.time()  # this start: elapsed time counts from here
        self.tty = sys.stderr.isatty()
        self._transient = False  # a transient line is on the terminal

    def print(self, line: str, transient: bool = False) -> None:
        if not self.enabled:
            return
        now = time.localtime()
        shown = f"{time.strftime('%H:%M:%S', now)} {line}"
        if transient:
            if self.tty:
                print("\r\033[K" + shown, end="", file=sys.stderr, flush=True)
                self._transient = True
            return
        print(("\r\033[K" if self._transient else "") + shown, file=sys.stderr, flush=True)
        self._transient = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # opened per line: lines are few, and each is on disk at once
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', now)} {line}\n")

    def close(self) -> None:
        if self.enabled and self._transient:
            print(file=sys.stderr, flush=True)
            self._transient = False


class MetricsLog:
    """Rank 0 writes: metrics.jsonl (one JSON object per step), the trackers asked for, a progress line.

    `cfg`: the run config (run_dir, train.steps, train.trackers, the config trackers record);
    `task_metrics`: the task's own columns (task.METRICS), shown on the progress line.
    """

    def __init__(self, cfg, console: Console, enabled: bool, resume_step: int = 0, task_metrics=()):
        from llara_dist.config import to_dict
        from llara_dist.train.trackers import open_trackers

        self.enabled, self.total = enabled, cfg.train.steps
        self.console, self.task_metrics = console, tuple(task_metrics)
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        self.trackers = []
        self.step_seconds, self.steps_here = 0.0, 0  # this start's steps, for the ETA
        if not enabled:
            return
        torn = truncate_after(self.path, resume_step)  # steps after the checkpoint are redone
        if torn is not None:  # the step being written when the run died; the checkpoint is older
            console.print(torn_line_dropped(self.path, torn))
        self.elapsed_before = last_elapsed(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        self.trackers = open_trackers(cfg.train.trackers, Path(cfg.run_dir), resume_step, to_dict(cfg))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        now = time.time()
        record = {**record, "time": now, "elapsed_s": self.elapsed_before + now - self.console.started}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        # numbers only, and not the clock: a Unix time is no curve (and float32 would round it to minutes)
        scalars = {k: float(v) for k, v in record.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(step, scalars)
        self.step_seconds += record["step_s"]
        self.steps_here += 1
        eta = self.step_seconds / self.steps_here * (self.total - step)
        line = progress_line(record, self.total, self.task_metrics, eta)
        logged = step == 1 or step % 10 == 0 or step == self.total
        self.console.print(line, transient=not logged)

    def close(self) -> None:
        """Close the file and the trackers; a tracker that fails to close is reported, not raised: the
        run's exit status (0, or 42 after a preemption) must not turn into a crash at the very end."""
        self.console.close()
        if not self.enabled:
            return
        self.file.close()
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:  # whatever a third-party tracker raises
                self.console.print(f"warning: closing the {type(tracker).__name__} failed: {e}")


def progress_line(record: dict, total: int, task_metrics: tuple, eta_s: float) -> str:
    """One step on one line: step, loss and the task's terms, lr, speed, elapsed time, ETA."""
    terms = "".join(f" {LABELS.get(k, k)} {record[k]:.4f}" for k in task_metrics if record.get(k) is not None)
    mfu = f" mfu {record['mfu']:.1%}" if record.get("mfu") is not None else ""
    return (f"step {record['step']}/{total} loss {record['loss']:.4f}{terms} lr {record['lr']:.2e} "
            f"gnorm {record['grad_norm']:.3f} docs {record['docs']} fill {record['fill']:.2f} "
            f"tok/s {record['tokens_per_s']:.0f}{mfu} "
            f"elapsed {hms(record['elapsed_s'])} eta {hms(eta_s)}")


def last_elapsed(path: Path) -> float:
    """`elapsed_s` of the last row of a metrics.jsonl (0 without one: a fresh run, or rows written before
    the column existed)."""
    rows, _ = read_metrics(path)
    return float(rows[-1].get("elapsed_s", 0.0)) if rows else 0.0


def read_metrics(path: Path) -> tuple[list[dict], int | None]:
    """The rows of a metrics.jsonl ([] before the first) and the number of a torn last line left out
    (None without one; see read_step_rows, which refuses any other line that is not a metrics row)."""
    rows, torn = read_step_rows(path)
    return [row for _, row in rows], torn


def read_step_rows(path: Path) -> tuple[list[tuple[str, dict]], int | None]:
    """The rows of a JSON lines file a run appends one step at a time (metrics.jsonl, a ledger), each with
    its line as written, and the number of a torn last line left out (None without one).

    A run killed while appending leaves its last line cut short: without its newline, or not valid JSON.
    That is what a crash leaves, not damage, and a reader of a running run may catch a line half written:
    it is left out. Any other line that is not a JSON object with an integer step is damage: refused,
    naming the file and the line. Blank lines are passed over."""
    if not path.is_file():
        return [], None
    with open(path, "rb") as f:  # one read: a running trainer may append meanwhile
        lines = f.read().split(b"\n")
    # what follows the last newline is b"" for a whole file, else a line the writer did not finish
    numbered = [(n, raw) for n, raw in enumerate(lines, 1) if raw.strip()]
    last = numbered[-1][0] if numbered else None
    rows = []
    for n, raw in numbered:
        try:
            text = raw.decode("utf-8").rstrip("\r")
            row = json.loads(text)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
            if n == last:
                return rows, n
            raise UserError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if n == len(lines):  # valid, but its newline is missing: the write did not finish
            return rows, n
        if not isinstance(row, dict) or not _is_step(row.get("step")):
            raise UserError(f"{path}:{n}: not a row of a step (a JSON object with an integer step)")
        rows.append((text, row))
    return rows, None


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def torn_line_dropped(path: Path, number: int) -> str:
    """What a resume says of the torn last line it dropped (truncate_after)."""
    return f"{path}:{number}: dropped a last line cut short by the crash; its step is redone"


def torn_line_note(path: Path, number: int) -> str:
    """What a reader says of the torn last line it left out."""
    return f"{path}:{number}: left out a last line cut short (a run killed while writing it, or still writing it)"


def truncate_after(path: Path, step: int) -> int | None:
    """Drop the rows of steps after `step` (logged by a run that died before its next checkpoint: they
    are redone) and a torn last line (the step being written when it died: redone too). Returns that
    line's number (None without one), for the caller to say so. Atomic: a crash meanwhile keeps the file."""
    rows, torn = read_step_rows(path)
    kept = "".join(text + "\n" for text, row in rows if row["step"] <= step).encode()
    if path.is_file() and kept != path.read_bytes():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(kept)
        os.replace(tmp, path)
    return torn


class StepTimer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
