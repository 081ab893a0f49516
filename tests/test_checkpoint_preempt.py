"""One 2-rank gloo job (torch.multiprocessing): the preemption flag agreed by all-reduce, and the
checkpoint manager's atomic `latest` and keep-K on a real DeepSpeed engine.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from llara_dist.config import TrainConfig
from llara_dist.train.distributed import batch_plan, dist_env
from llara_dist.train.engine import deepspeed_config


def _gloo_worker(rank, world, port, folder):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from llara_dist.train.checkpoint import CheckpointManager
    from llara_dist.train.distributed import init_distributed
    from llara_dist.train.engine import build_engine, full_state_dict
    from llara_dist.train.preempt import Preemption

    init_distributed(dist_env(), timeout_s=60)
    # preemption: a signal to rank 1 only stops both ranks at the same boundary
    pre = Preemption()
    assert not pre.should_stop()
    if rank == 1:  # raise_signal: to this thread, its handler run before the call returns
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)  # a second signal is harmless
    assert pre.should_stop()
    assert pre.requested == (rank == 1)
    pre.restore()

    # checkpoints: keep-K, atomic latest, a stale partial save cleaned, loop state per rank
    t = TrainConfig(global_batch=2, micro_batch=1, lr=0.1, warmup_steps=0, keep_checkpoints=2)
    ds = deepspeed_config(t, batch_plan(2, 1, world), torch.float32)
    torch.manual_seed(0)
    engine = build_engine(torch.nn.Linear(4, 3), t, ds)
    manager = CheckpointManager(folder, keep=2, rank=rank)
    if rank == 0:
        (folder / "step00000007.partial").mkdir(parents=True)  # left by a crash
    for step in (1, 2, 3):
        x = torch.full((1, 4), float(step + rank))
        engine.backward(engine(x).sum())
        engine.step()
        manager.save(engine, step, {"step": step, "rank": rank, "rng": {}})
    assert manager.complete() == ["step00000002", "step00000003"]
    assert manager.latest() == "step00000003"
    assert not (folder / "step00000007.partial").exists()
    weights = full_state_dict(engine.module)
    engine.backward(engine(torch.ones(1, 4)).sum())
    engine.step()
    state = manager.read_loop_state("step00000003")
    assert state == {"step": 3, "rank": rank, "rng": {}}
    stepped = full_state_dict(engine.module)
    assert not torch.equal(stepped["weight"], weights["weight"])
    engine.load_checkpoint(str(folder), tag=manager.latest())
    for name, w in full_state_dict(engine.module).items():
        assert torch.equal(w, weights[name]), name
    dist.barrier()


@pytest.mark.slow
def test_preemption_agreement_and_checkpoint_manager(tmp_path, spawn_ranks):
    spawn_ranks(_gloo_worker, 2, tmp_path / "ckpt")


def test_preempt_at_step_is_the_real_signal_at_that_step(monkeypatch):
    """The tests' stop at a named step goes through the installed handler, at that step and not before."""
    from llara_dist.train.preempt import PREEMPT_AT_STEP_ENV, Preemption

    monkeypatch.setenv(PREEMPT_AT_STEP_ENV, "3")
    pre = Preemption()
    try:
        for step in (1, 2):
            pre.step_done(step)
            assert not pre.should_stop()
        pre.step_done(3)
        assert pre.should_stop() and pre.signal_name == "SIGUSR1"
    finally:
        pre.restore()
