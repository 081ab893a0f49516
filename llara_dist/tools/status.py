"""Where a training run stands, from its folder alone: `llara-dist status RUN_DIR [--json]`.

    step       40/100
    loss       2.3518
    tokens/s   51234
    mfu        41.2%
    elapsed    1:02:11
    eta        1:33:16
    checkpoint step00000040 (step 40)
    preempted  no
    finished   no
    last step  2026-12-06 05:41:07 (12 s ago)

Read from run_dir: config.yaml (train.steps), metrics.jsonl (the last row; the ETA from the mean
step time of the last ETA_WINDOW rows), checkpoints/latest and PREEMPTED (see train/preempt.py).
A run is finished when its last logged step is train.steps. A torn last line of metrics.jsonl (a run
killed while writing it, or one still writing it) is left out, and `note` says so.
Works for `train` and `finetune` runs, while they run or after; nothing is written.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import yaml

from llara_dist.errors import UserError

ETA_WINDOW = 20  # steps whose mean time gives the ETA: recent speed, past the first (compiling) steps


def configure(parser) -> None:
    parser.add_argument("run_dir", help="run folder (run_dir of a train or finetune run)")
    parser.add_argument("--json", action="store_true", help="print the status as one JSON object")


def run(args) -> int:
    status = run_status(Path(args.run_dir))
    print(json.dumps(status, indent=1) if args.json else describe(status))
    return 0


def run_status(run_dir: Path) -> dict:
    """Everything `status` shows, as a JSON-ready dict (durations in seconds, None where unknown)."""
    from llara_dist.train.checkpoint import CheckpointManager
    from llara_dist.train.metrics import read_metrics, torn_line_note
    from llara_dist.train.preempt import PREEMPTED_MARKER

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        what = "no such folder" if not run_dir.exists() else "no config.yaml in it, which every run writes at its start"
        raise UserError(f"{run_dir}: not a llara-dist run folder ({what})")
    # A config that cannot be read is refused, not passed over: the run's length is in it alone, and
    # without it status could not tell a finished run from a stopped one, nor give step/total or an
    # ETA; export reads the same file, so it is damage the user must fix anyway.
    data = config_path.read_bytes()  # bytes: yaml refuses text that is not UTF-8 itself, at a position
    try:
        config = yaml.safe_load(data) or {}
    except yaml.YAMLError as e:
        if getattr(e, "problem_mark", None) is not None:  # a syntax error: where the parser saw it
            where, reason = f":{e.problem_mark.line + 1}", e.problem
        elif isinstance(e, yaml.reader.ReaderError):  # a byte that is not UTF-8: its offset, and no mark
            line = data[:e.position].count(b"\n") + 1
            where, reason = f":{line}", str(e).split("\n")[0]
        else:
            where, reason = "", str(e).split("\n")[0]
        raise UserError(f"{config_path}{where}: not valid YAML ({reason})") from None
    try:
        steps = int(config["train"]["steps"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{config_path}: no train.steps; is {run_dir} a llara-dist run folder?") from None
    metrics_path = run_dir / "metrics.jsonl"
    rows, torn = read_metrics(metrics_path)
    last = rows[-1] if rows else {}
    step = int(last.get("step", 0))
    finished = step == steps
    recent = [r["step_s"] for r in rows[-ETA_WINDOW:] if isinstance(r.get("step_s"), (int, float))]
    eta = 0.0 if finished else (sum(recent) / len(recent) * (steps - step) if recent else None)

    tag = CheckpointManager(run_dir / "checkpoints", keep=0, rank=0).latest()  # a dangling `latest` raises
    found = re.fullmatch(r"step(\d+)", tag or "")
    marker = run_dir / PREEMPTED_MARKER
    preempted_at = marker.read_text().strip() if marker.is_file() else None
    return {
        "run_dir": str(run_dir), "step": step, "steps": steps, "loss": last.get("loss"),
        "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu"), "elapsed_s": last.get("elapsed_s"),
        "eta_s": eta, "checkpoint": {"tag": tag, "step": int(found[1]) if found else None} if tag else None,
        "preempted": preempted_at is not None,
        "preempted_step": int(preempted_at) if preempted_at and preempted_at.isdigit() else None,
        "finished": finished, "updated": last.get("time"),
        "left_out": torn_line_note(metrics_path, torn) if torn is not None else None,
    }


def describe(status: dict) -> str:
    """The status as aligned `name value` lines."""
    from llara_dist.train.metrics import hms

    def number(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    def duration(seconds) -> str:
        return "-" if seconds is None else hms(seconds)

    checkpoint = status["checkpoint"]
    preempted = "no"
    if status["preempted"]:
        at = status["preempted_step"]
        preempted = f"yes, saved step {at} (start it again to resume)" if at is not None else "yes"
    updated = "-"
    if status["updated"] is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["updated"]))
        updated = f"{stamp} ({hms(max(0.0, time.time() - status['updated']))} ago)"
    lines = [
        ("run", status["run_dir"]),
        ("step", f"{status['step']}/{status['steps']}"),
        ("loss", number(status["loss"], ".4f")),
        ("tokens/s", number(status["tokens_per_s"], ".0f")),
        ("mfu", number(status["mfu"], ".1%")),
        ("elapsed", duration(status["elapsed_s"])),
        ("eta", duration(status["eta_s"])),
        ("checkpoint", f"{checkpoint['tag']} (step {checkpoint['step']})" if checkpoint else "none yet"),
        ("preempted", preempted),
        ("finished", "yes" if status["finished"] else "no"),
        ("last step", updated),
    ]
    if status["left_out"]:
        lines.append(("note", status["left_out"]))
    return "\n".join(f"{name:<10} {value}" for name, value in lines)
