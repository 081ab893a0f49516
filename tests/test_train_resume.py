"""`llara-dist train` as real processes: preemption, exact resume, dead ranks, crashed saves.

Ranks are started the way torchrun/deepspeed start them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), each `python -m llara_dist train`, on CPU with gloo, fp32.
Preemption comes at a named step (LLARA_DIST_TEST_PREEMPT_AT_STEP: a real SIGUSR1 the rank
raises in itself), so where a run stops does not depend on the machine's speed; the launch
tests (test_launch.py, test_slurm.py) send the signals from outside.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import TRAIN_STEPS as STEPS
from helpers import launch, log_text, metrics, wait, wait_for_step

from llara_dist.train.checkpoint import KILL_DURING_SAVE_ENV
from llara_dist.train.preempt import PREEMPT_AT_STEP_ENV, PREEMPTED_EXIT, PREEMPTED_MARKER

pytestmark = pytest.mark.slow


def final_weights(run_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = run_dir / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=(folder / "latest").read_text().strip())


def ledger(run_dir: Path, world: int) -> dict:
    out = {}
    for r in range(world):
        for line in (run_dir / f"ledger-rank{r:05d}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert (rec["step"], r) not in out, f"step {rec['step']} of rank {r} logged twice"
            out[rec["step"], r] = rec["keys"]
    return out


# ZeRO-3 stops between two checkpoints (every 3 steps): the preemption save is its own; ZeRO-2
# right after one: there is nothing more to save
@pytest.mark.parametrize("stage, stop_at", [(3, 4), (2, 3)])
def test_preempt_and_resume_equal_uninterrupted(train_setup, tmp_path, rendezvous, stage, stop_at):
    root, keys = train_setup
    ref = tmp_path / "ref"
    zero = f"train.zero_stage={stage}"
    assert wait(launch(root, ref, 2, "--ledger", zero, env=rendezvous())) == [0, 0], log_text(ref)

    run = tmp_path / "interrupted"
    # rank 1 only gets the signal: the all-reduce stops both
    procs = launch(root, run, 2, "--ledger", zero, env=rendezvous(), rank_env={1: {PREEMPT_AT_STEP_ENV: str(stop_at)}})
    assert wait(procs) == [PREEMPTED_EXIT, PREEMPTED_EXIT], log_text(run)
    assert [m["step"] for m in metrics(run)] == list(range(1, stop_at + 1))
    # rank 0 (which reports) stopped for rank 1's signal
    assert f"a signal on another rank: saved step {stop_at}, exiting with {PREEMPTED_EXIT}" in log_text(run, 0)
    assert (run / "checkpoints" / "latest").read_text() == f"step{stop_at:08d}"
    assert (run / PREEMPTED_MARKER).read_text() == f"{stop_at}\n"

    assert wait(launch(root, run, 2, "--ledger", zero, env=rendezvous())) == [0, 0], log_text(run)
    assert f"step{stop_at:08d} at step {stop_at}" in log_text(run)
    assert not (run / PREEMPTED_MARKER).exists()

    got, want = metrics(run), metrics(ref)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    assert [m["docs"] for m in got] == [m["docs"] for m in want]
    w_run, w_ref = final_weights(run), final_weights(ref)
    assert w_run.keys() == w_ref.keys()
    for name in w_ref:
        assert torch.equal(w_run[name], w_ref[name]), name

    # the ledger: the same documents at the same steps, every document once per epoch
    assert ledger(run, 2) == ledger(ref, 2)
    counts = Counter(k for ks in ledger(run, 2).values() for k in ks)
    assert set(counts) == set(keys)
    assert max(counts.values()) - min(counts.values()) <= 1 and max(counts.values()) >= 2  # >1 epoch

    # keep the last 2 complete checkpoints, nothing partial
    names = sorted(p.name for p in (ref / "checkpoints").iterdir() if p.is_dir())
    assert names == [f"step{STEPS - 3:08d}", f"step{STEPS:08d}"]

    # another world size on this checkpoint: refused with what would be needed
    refused = launch(root, ref, 1, zero, f"train.steps={STEPS + 4}")
    assert wait(refused) == [2]
    assert "written by 2 rank(s) with global batch 8" in log_text(ref)
    assert "start 2 rank(s)" in log_text(ref)
    # and the other ZeRO stage: its shards are laid out differently
    refused = launch(root, ref, 2, f"train.zero_stage={5 - stage}", f"train.steps={STEPS + 4}", env=rendezvous())
    assert wait(refused) == [2, 2]
    assert f"written with train.zero_stage={stage}, and this start has train.zero_stage={5 - stage}" in log_text(ref)


def step_keys(run_dir: Path) -> dict:
    """{step: the sorted document keys of all ranks}: the ledgers of every rank file in the folder (after
    world-size changes, ranks that existed for some steps only)."""
    out: dict = {}
    for path in sorted(run_dir.glob("ledger-rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(rec["keys"])
    return {step: sorted(keys) for step, keys in sorted(out.items())}


@pytest.mark.parametrize("stage", [3, 2])
def test_resume_on_another_world_size(train_setup, tmp_path, rendezvous, stage):
    """With logical data streams, a preempted run goes on on another number of ranks, micro-batch and
    worker count: the same global batches (each step's loss within fp32 summation order of the
    uninterrupted run's), the model and optimizer state carried over through DeepSpeed's universal
    checkpoint, converted by itself at the start. ZeRO-3: 2 ranks -> 4 (micro-batch 2 -> 1) -> 1 (2
    DataLoader workers); ZeRO-2: 2 ranks -> 1."""
    root, keys = train_setup
    settings = ("--ledger", "data.streams=4", "train.steps=6", "train.ckpt_every=100", f"train.zero_stage={stage}",
                # ZeRO-3: several optimizer sub-groups per rank, as a 7B model has on few ranks
                "train.deepspeed={zero_optimization: {sub_group_size: 20000}}" if stage == 3 else "train.seed=0")
    ref = tmp_path / "ref"
    assert wait(launch(root, ref, 2, *settings, env=rendezvous())) == [0, 0], log_text(ref)
    run = tmp_path / "elastic"
    stop = "2" if stage == 3 else "3"
    procs = launch(root, run, 2, *settings, env=rendezvous(), rank_env={0: {PREEMPT_AT_STEP_ENV: stop}})
    assert wait(procs) == [PREEMPTED_EXIT, PREEMPTED_EXIT], log_text(run)
    if stage == 3:
        procs = launch(root, run, 4, *settings, "train.micro_batch=1", env=rendezvous(),
                       rank_env={3: {PREEMPT_AT_STEP_ENV: "4"}})
        assert wait(procs) == [PREEMPTED_EXIT] * 4, log_text(run)
        assert ("at step 2: world 2 -> 4, micro-batch 2 -> 1; the same 8-row global batches continue"
                in log_text(run)), log_text(run)
        assert wait(launch(root, run, 1, *settings, "data.num_workers=2")) == [0], log_text(run)
        assert ("at step 4: world 4 -> 1, micro-batch 1 -> 2, grad accumulation 2 -> 4; the same 8-row global "
                "batches continue" in log_text(run)), log_text(run)
        assert (run / "checkpoints" / "step00000004.universal").is_dir()
    else:
        assert wait(launch(root, run, 1, *settings)) == [0], log_text(run)
        assert ("at step 3: world 2 -> 1, grad accumulation 2 -> 4; the same 8-row global batches continue"
                in log_text(run)), log_text(run)
        assert (run / "checkpoints" / "step00000003.universal").is_dir()
    got, want = metrics(run), metrics(ref)
    assert [m["step"] for m in got] == list(range(1, 7))
    assert [m["docs"] for m in got] == [m["docs"] for m in want]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (g["step"], g["loss"], w["loss"])
    first = int(stop)
    assert got[:first] == [{**w, **{k: g[k] for k in ("time", "elapsed_s", "step_s", "tokens_per_s", "mfu")}}
                           for g, w in zip(got[:first], want[:first])]  # the 2-rank steps: the same run
    w_run, w_ref = final_weights(run), final_weights(ref)
    assert w_run.keys() == w_ref.keys()
    for name in w_ref:
        torch.testing.assert_close(w_run[name], w_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # the ledger: every step's documents those of the uninterrupted run, and so every document of the
    # first epoch once, whatever served it
    assert step_keys(run) == step_keys(ref)
    counts = Counter(k for ks in step_keys(run).values() for k in ks)
    assert set(counts) == set(keys) and max(counts.values()) - min(counts.values()) <= 1

    if stage == 2:
        return
    # ahead of time: convert-checkpoint, for a world size the global batch splits over
    cmd = [sys.executable, "-m", "llara_dist", "convert-checkpoint", str(ref)]
    bad = subprocess.run([*cmd, "--to-world", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "micro_batch 2 x world 3 = 6 rows per pass" in bad.stderr, bad.stderr
    good = subprocess.run([*cmd, "--to-world", "4"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout.splitlines()[-1]) == {"universal": str(ref / "checkpoints" / "step00000006.universal")}
    assert (ref / "checkpoints" / "step00000006.universal" / "zero").is_dir()


def test_dead_rank_ends_the_job(train_setup, tmp_path, rendezvous):
    root, _ = train_setup
    run = tmp_path / "dead"
    procs = launch(root, run, 2, "train.steps=100000", env=rendezvous())
    wait_for_step(run, 1, procs)
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    rc = wait(procs[:1], timeout=120)
    assert rc[0] != 0
    assert time.monotonic() - start < 120


def processes_with(variable: str) -> list[int]:
    """The live processes whose environment holds `variable` (NAME=value)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_sigkill_during_checkpoint_write_keeps_previous(train_setup, tmp_path, rendezvous):
    root, _ = train_setup
    run = tmp_path / "crash"
    steps = "train.steps=6"
    tag = f"LLARA_TEST_RUN={run}"  # in the environment of the trainer and of what it starts
    assert wait(launch(root, run, 1, steps, env={KILL_DURING_SAVE_ENV: "6", "LLARA_TEST_RUN": str(run)})) == \
        [-signal.SIGKILL]
    # its DataLoader worker ends with it (torch's worker watches its parent every 5 s), not later, not never
    deadline = time.monotonic() + 30
    while processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_with(tag)
    folder = run / "checkpoints"
    assert (folder / "latest").read_text() == "step00000003"
    assert (folder / "step00000006.partial").is_dir()  # the interrupted save

    assert wait(launch(root, run, 1, steps)) == [0], log_text(run)
    assert "step00000003 at step 3" in log_text(run)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]  # steps 4-5 of the crashed run redone once
    assert (folder / "latest").read_text() == "step00000006"
    assert not (folder / "step00000006.partial").exists()

    # a resume on 2 ranks that the data refuses is refused before the checkpoint is converted for them
    refused = launch(root, run, 2, "train.steps=8", "data.reset_cursor=true", "data.num_workers=64", env=rendezvous())
    assert wait(refused) == [2, 2]
    assert "every reader needs at least one shard" in log_text(run)
    assert not list(folder.glob("*.universal"))


def test_lora_trains_only_the_adapters(train_setup, tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    root, _ = train_setup
    run = tmp_path / "lora"
    # paper preset: the released one's LM-loss recompute through the frozen head fails under ZeRO-3 (docs/training.md)
    args = ("train.steps=2", "train.lora_r=4", "objective.preset=paper", "train.activation_checkpointing=true")
    assert wait(launch(root, run, 1, *args)) == [0], log_text(run)
    weights = final_weights(run)
    base = load_file(tiny_llama_dir / "model.safetensors")
    frozen = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(weights[frozen], base["model.layers.0.self_attn.q_proj.weight"])
    lora_b = [k for k in weights if "lora_B" in k]
    assert len(lora_b) == 2 * 7  # 2 layers x 7 target modules
    assert all(weights[k].abs().sum() > 0 for k in lora_b)  # peft starts B at zero: these were trained

    # without activation checkpointing ZeRO-3 gathers per module (by layer it fails in DeepSpeed's backward of
    # the frozen weights), and asking for gathering by layer is refused
    plain = tmp_path / "lora-plain"
    assert wait(launch(root, plain, 1, "train.steps=1", "train.lora_r=4", "objective.preset=paper")) == [0], \
        log_text(plain)
    refused = tmp_path / "lora-by-layer"
    assert wait(launch(root, refused, 1, "train.lora_r=4", "train.zero3_layer_gather=true")) == [2]
    assert "gathering by layer fails in the backward of the frozen weights" in log_text(refused)
