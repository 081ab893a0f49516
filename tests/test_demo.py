"""`make demo` end to end: the command README gives, on the embedded default (CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_demo(out):
    proc = subprocess.run([sys.executable, "-m", "llara_dist", "demo", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_demo_runs_the_whole_job(tmp_path):
    out = tmp_path / "demo"
    run_demo(out)
    # run again in the same folder: it trains afresh, it does not resume the finished run and reprint it
    (out / "run" / "left-over").write_text("")
    proc = run_demo(out)
    assert not (out / "run" / "left-over").exists()
    assert f"the previous demo run in {out / 'run'} removed: training afresh" in proc.stdout
    for i, name in enumerate(("corpus", "tokenizer", "prep", "train", "export", "evaluate"), 1):
        assert f"[{i}/6] {name}:" in proc.stdout
    # the loss falls: mean of the first 5 steps against the last 5
    first, last = map(float, re.search(r"first 5 steps ([\d.]+) -> last 5 steps ([\d.]+)", proc.stdout).groups())
    assert last < first - 0.5
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "step00000040"
    assert (out / "export" / "llara.json").is_file() and (out / "export" / "config.json").is_file()
    table = proc.stdout[proc.stdout.index("model       "):]
    trained = [float(x) for x in re.search(r"^\s*trained\s+([\d. ]+)$", table, re.M).group(1).split()]
    assert len(trained) == 4 and all(0.0 <= x <= 1.0 for x in trained)
