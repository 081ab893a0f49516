"""The launcher wrappers (launch/train.sh, launch/train_multinode.sh, launch/torchrun.sh) and hostfiles.

Real launches of 2 CPU ranks (DS_ACCELERATOR=cpu, gloo) running launch/probe.py: the
single-node wrapper with a preemption signal, and the one-launcher-per-node form
(`--no_ssh --node_rank`) with an `--include` filter over a hostfile. The torchrun wrapper
runs the real trainer (tiny LLaMA): preempted, exit 42, resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import metrics, wait_for_step

from llara_dist.train.preempt import PREEMPTED_EXIT, PREEMPTED_MARKER

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HOSTFILES = sorted((ROOT / "hostfiles").glob("*.txt"))


def launch_env(**extra) -> dict:
    """The environment for a launch script; a real launch of several ranks takes the rendezvous
    fixture's variables (MASTER_PORT of a store this process hosts) among `extra`."""
    # the scripts expect the virtualenv's tools (deepspeed, python) on PATH, as when it is active
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, PATH=path, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def probe_lines(text: str, key: str = "rank_sum") -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [d for d in lines if key in d]


def test_single_node_wrapper_forwards_preemption(tmp_path, rendezvous):
    """2 ranks via `deepspeed --num_gpus 2`; SIGTERM to the wrapper -> USR1 to the ranks -> exit 42."""
    log = tmp_path / "launch.log"
    env = launch_env(GPUS=2, ENTRY=f"launch/probe.py --until-signal {tmp_path}", **rendezvous())
    with open(log, "w") as out:
        proc = subprocess.Popen([str(ROOT / "launch" / "train.sh")], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT)  # ENTRY is relative to the caller's folder
    try:
        deadline = time.monotonic() + 120
        while len(probe_lines(log.read_text())) < 2:
            assert proc.poll() is None, f"launcher ended early ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"ranks did not start:\n{log.read_text()}"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)  # what a scheduler sends; the runner alone would exit 1
        status = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    started = probe_lines(text)
    assert sorted(r["rank"] for r in started) == [0, 1] and {r["world"] for r in started} == {2}, text
    assert {r["rank_sum"] for r in started} == {1}
    assert status == 42, text  # the trainers' "preempted, requeue me" passed through launch.py and the runner
    assert text.rstrip().endswith("[launch] preempted: every rank saved its checkpoint (exit 42); start the same "
                                  "command again to resume"), text[-2000:]
    stopped = probe_lines(text, "preempted_at_step")
    assert sorted(r["rank"] for r in stopped) == [0, 1] and len({r["preempted_at_step"] for r in stopped}) == 1
    assert (tmp_path / "preempted").exists()


def test_one_launcher_per_node_with_include(tmp_path, rendezvous):
    """Two `--no_ssh --node_rank` launchers over a 2-node hostfile, INCLUDE picks one slot on each."""
    env = launch_env(ENTRY="launch/probe.py", HOSTFILE="hostfiles/localhost-2x2.txt",
                     INCLUDE="node-a:1@node-b:0", **rendezvous())
    procs = [subprocess.Popen([str(ROOT / "launch" / "train_multinode.sh")], env=dict(env, NODE_RANK=str(n)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) for n in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=150)[0])
        finally:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    lines = [probe_lines(o) for o in outs]
    assert [[r["rank"] for r in node] for node in lines] == [[0], [1]], "\n".join(outs)  # node rank order
    assert [node[0]["devices"] for node in lines] == ["1", "0"]  # the included slots
    assert {r["world"] for node in lines for r in node} == {2}
    assert {r["rank_sum"] for node in lines for r in node} == {1}
    assert "--no_ssh --node_rank 1" in outs[1]


def test_relative_paths_mean_the_callers_folder(tmp_path, tokenizer_dir):
    """launch/train.sh started in another folder than the repository, with a relative --config whose
    train.tokenizer is relative too, and a relative data.shards=... override: the trainer looks for all
    three in the caller's folder. No shards are there, so the trainer refuses at start-up (no model, no
    process group), naming where it looked: the override's folder under the caller's, past a tokenizer
    it found there."""
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    shutil.copytree(tokenizer_dir, work / "tok")
    (work / "configs" / "run.yaml").write_text("train:\n  tokenizer: tok\ndata:\n  shards: from-config\n")
    res = subprocess.run([str(ROOT / "launch" / "train.sh"), "--config", "configs/run.yaml", "data.shards=given"],
                         cwd=work, env=launch_env(GPUS=1), capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "llara-dist train: " in res.stderr, res.stderr[-3000:]
    refusal = res.stderr[res.stderr.index("llara-dist train: "):]  # the message and its list of problems
    assert f"data.shards={work / 'given'}: no manifest.json there" in refusal, res.stderr[-3000:]
    assert str(ROOT / "given") not in res.stderr and "cannot read config" not in res.stderr


@pytest.mark.parametrize("hostfile", HOSTFILES, ids=[h.name for h in HOSTFILES])
def test_example_hostfiles_parse(hostfile):
    """Every example hostfile is valid for deepspeed's own parser: one `host slots=N` per node."""
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(hostfile))
    assert pool and len(pool) >= 2 and all(n > 0 for n in pool.values()), pool


def test_include_exclude_forms():
    """The INCLUDE/EXCLUDE strings the docs show select what they say (deepspeed's parser)."""
    from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion

    pool = fetch_hostfile(str(ROOT / "hostfiles" / "2x8.txt"))
    every = list(range(8))
    assert parse_inclusion_exclusion(pool, "", "") == {"gpu-node-1": every, "gpu-node-2": every}
    assert parse_inclusion_exclusion(pool, "gpu-node-1:0,1,2,3@gpu-node-2", "") == {
        "gpu-node-1": [0, 1, 2, 3], "gpu-node-2": every}
    assert parse_inclusion_exclusion(pool, "", "gpu-node-2:7") == {"gpu-node-1": every, "gpu-node-2": every[:7]}
    assert parse_inclusion_exclusion(pool, "", "gpu-node-1") == {"gpu-node-2": every}
    with pytest.raises(ValueError):
        parse_inclusion_exclusion(pool, "gpu-node-1", "gpu-node-2")  # never both


def test_multinode_wrapper_builds_the_launcher_command():
    """DRY_RUN prints the deepspeed command the wrapper would run; bad settings stop it early."""
    env = launch_env(DRY_RUN=1, HOSTFILE="hostfiles/2x8.txt", EXCLUDE="gpu-node-2:7", MASTER_PORT=29600)
    res = subprocess.run([str(ROOT / "launch" / "train_multinode.sh"), "--config", "run.yaml", "train.lr=2e-5"],
                         env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert ("deepspeed --hostfile hostfiles/2x8.txt --master_port 29600 --exclude gpu-node-2:7 --no_local_rank "
            "--module llara_dist train --config run.yaml train.lr=2e-5") in res.stderr
    bad = subprocess.run([str(ROOT / "launch" / "train_multinode.sh")], env=dict(env, NODE_RANK="0"),
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert bad.returncode == 2 and "NODE_RANK needs MASTER_ADDR" in bad.stderr
    missing = subprocess.run([str(ROOT / "launch" / "train_multinode.sh")], env=dict(env, HOSTFILE="nope.txt"),
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert missing.returncode == 2 and "nope.txt not found" in missing.stderr


def test_preempted_status_matches_the_trainer():
    """The launch scripts and the probe use the trainer's exit status (and marker) for "preempted"."""
    sbatch = (ROOT / "launch" / "train.sbatch").read_text()
    assert f"PREEMPTED_EXIT={PREEMPTED_EXIT} " in sbatch
    assert f"PREEMPTED_EXIT = {PREEMPTED_EXIT} " in (ROOT / "launch" / "probe.py").read_text()
    torchrun = (ROOT / "launch" / "torchrun.sh").read_text()
    assert f"PREEMPTED_EXIT={PREEMPTED_EXIT} " in torchrun and f"PREEMPTED_MARKER={PREEMPTED_MARKER} " in torchrun


def torchrun_cmd(root: Path, *args: str) -> list[str]:
    return [str(ROOT / "launch" / "torchrun.sh"), "--config", str(root / "run.yaml"), *args]


def test_torchrun_wrapper_turns_preemption_into_42_and_resumes(train_setup, tmp_path):
    """2 trainer ranks under torchrun: SIGTERM to the wrapper -> USR1 to the ranks -> they save and
    exit 42 -> torchrun says 1 -> RUN_DIR/PREEMPTED -> 42. The same command resumes and finishes."""
    root, _ = train_setup
    run, log = tmp_path / "run", tmp_path / "launch.log"
    env = launch_env(GPUS=2, RUN_DIR=run)
    # far more steps than the run can take while the signal travels: it ends by the signal only
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun_cmd(root, "train.steps=100000"), env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_step(run, 2, [proc])
        except AssertionError as e:
            raise AssertionError(f"{e}; the launch log:\n{log.read_text()[-4000:]}") from None
        proc.send_signal(signal.SIGTERM)  # what a scheduler sends
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert status == PREEMPTED_EXIT, text
    assert "[launch] got preemption signal: USR1 to ranks" in text
    assert "[launch] torchrun exited 1;" in text  # what torchrun alone tells the caller
    stopped = metrics(run)[-1]["step"]
    assert stopped >= 2
    assert f"SIGUSR1: saved step {stopped}, exiting with {PREEMPTED_EXIT}" in text, text
    assert (run / PREEMPTED_MARKER).read_text() == f"{stopped}\n"
    assert (run / "checkpoints" / "latest").read_text() == f"step{stopped:08d}"

    # the same command with a reachable end: it resumes there and finishes
    end = stopped + 2
    with open(log, "a") as out:
        again = subprocess.run(torchrun_cmd(root, f"train.steps={end}"), env=env, stdout=out,
                               stderr=subprocess.STDOUT, timeout=240)
    text = log.read_text()
    assert again.returncode == 0, text
    assert f"resumed from {run / 'checkpoints'}/step{stopped:08d} at step {stopped}" in text
    assert not (run / PREEMPTED_MARKER).exists()
    assert [m["step"] for m in metrics(run)] == list(range(1, end + 1))


def test_torchrun_wrapper_keeps_a_crash_a_crash(train_setup, tmp_path):
    """A marker left from an earlier preemption is removed before the start: a run that then fails
    (here a refused batch split, exit 2 under torchrun's 1) is not reported as preempted."""
    root, _ = train_setup
    run = tmp_path / "run"
    run.mkdir()
    (run / PREEMPTED_MARKER).write_text("3\n")
    res = subprocess.run(torchrun_cmd(root, "train.global_batch=6"), env=launch_env(GPUS=2, RUN_DIR=run),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "micro_batch 2 x world 2 = 4 rows per pass" in res.stderr
    assert not (run / PREEMPTED_MARKER).exists()


def test_torchrun_wrapper_builds_the_command_and_refuses_bad_settings(tmp_path):
    """DRY_RUN prints the torchrun command (standalone on one node, static rendezvous on many)."""
    def wrapper(*args, **env):
        return subprocess.run([str(ROOT / "launch" / "torchrun.sh"), *args], env=launch_env(DRY_RUN=1, **env),
                              capture_output=True, text=True, timeout=30)

    one = wrapper("--config", "run.yaml", "train.lr=2e-5", GPUS=2, RUN_DIR="runs/a")
    assert one.returncode == 0, one.stderr
    assert ("torchrun --standalone --nproc-per-node 2 --module llara_dist train --config run.yaml train.lr=2e-5 "
            "run_dir=runs/a") in one.stderr
    many = wrapper(GPUS=8, RUN_DIR="runs/a", NNODES=2, NODE_RANK=1, MASTER_ADDR="10.0.0.1")
    assert many.returncode == 0, many.stderr
    assert ("torchrun --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500 --nproc-per-node 8 "
            "--module llara_dist train run_dir=runs/a") in many.stderr
    for bad, why in [(wrapper(GPUS=2), "set RUN_DIR"),
                     (wrapper("run_dir=x", GPUS=2, RUN_DIR="a"), "give the run folder as RUN_DIR, not run_dir=x"),
                     (wrapper(GPUS=2, RUN_DIR="a", NNODES=2), "NNODES=2 needs NODE_RANK and MASTER_ADDR")]:
        assert bad.returncode != 0 and why in bad.stderr, bad.stderr
