"""A golden loss curve: 20 steps of one fixed tiny run against the losses kept in golden/loss_curve.json.

The other tests compare runs of the current code with each other (resumed == uninterrupted, 2 ranks
== 1 rank), so a change that moves every run alike passes them all: another data order or packing,
another loss term or scale, another initialisation or optimizer setting. Such a change moves this
curve. After an intended one, regenerate the file and say why the curve moved:

    LLARA_WRITE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

That runs the training twice from nothing, refuses to write unless both give the same losses bit for
bit, writes the file and reports the test as skipped (it compared nothing). Without the variable, a
missing file fails the test.

The run depends on nothing that differs between machines: the tokenizer is trained by the tokenizer_dir
fixture from the shared WikiText file, the model and the data order come from fixed seeds, one rank
runs fp32 on the CPU with one thread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import launch, log_text, metrics, wait, write_run

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "loss_curve.json"
WRITE = "LLARA_WRITE_GOLDEN"
STEPS = 20
# Relative: fp32 rounding is relative to the value, so this is the same ~80 ulps (fp32 epsilon 1.2e-7)
# at every step whatever the loss's scale. It leaves room for a matmul that sums in another order on
# another CPU, and none for a change of what is computed, which moves the curve by far more (the
# losses are not near 0, where a relative bound would be too strict).
RTOL = 1e-5


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory, wiki_docs, write_test_shards, tokenizer_dir, tiny_llama_dir) -> Path:
    """The folder holding run.yaml: 48 WikiText documents in 4 shards, 1 rank, 8 rows of 128 per step."""
    root = tmp_path_factory.mktemp("golden")
    docs = [(key, ids[:16 + (i * 11) % 80], nxt, text) for i, (key, ids, nxt, text) in enumerate(wiki_docs[:48])]
    # adam_eps well above the gradients' rounding noise: Adam's early steps divide by |g| + eps, and
    # would blow another CPU's summation-order noise on near-zero gradients up to full lr steps
    write_run(root, docs, write_test_shards, tiny_llama_dir, data={"num_workers": 0},
              train={"steps": STEPS, "adam_eps": 1e-4, "ckpt_every": STEPS, "tokenizer": str(tokenizer_dir),
                     "seed": 0})
    return root


def losses(root: Path, run_dir: Path) -> list[float]:
    assert wait(launch(root, run_dir, 1)) == [0], log_text(run_dir)
    got = metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    return [m["loss"] for m in got]


def test_loss_curve_equals_the_golden_one(golden_run, tmp_path):
    if os.environ.get(WRITE):
        first, second = losses(golden_run, tmp_path / "first"), losses(golden_run, tmp_path / "second")
        assert first == second, "two runs from nothing differ: the curve is not reproducible, not written"
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"regenerate": f"{WRITE}=1 .venv/bin/python -m pytest -q tests/test_golden.py",
                                      "steps": STEPS, "losses": first}, indent=1) + "\n")
        pytest.skip(f"{WRITE} set: wrote {GOLDEN}, compared nothing")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: write it with {WRITE}=1 (see this file's docstring)"
    want = json.loads(GOLDEN.read_text())
    assert want["steps"] == STEPS and len(want["losses"]) == STEPS
    got = losses(golden_run, tmp_path / "run")
    assert got == pytest.approx(want["losses"], rel=RTOL, abs=0)
    assert got[-1] < got[0]  # the curve is one of learning, not of a run that does nothing
