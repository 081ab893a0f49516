"""Trainer parts without a training run: ranks from launchers, batch arithmetic, lr shape, FLOPs.

Plus one 2-rank gloo job (torch.multiprocessing) for the preemption flag agreement and the
checkpoint manager's atomic `latest` and keep-K on a real DeepSpeed engine.
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from llara_dist.batch import SEG_NEXT, SEG_PAD, SEG_SELF, build_batch
from llara_dist.config import RunConfig, TrainConfig, load_config
from llara_dist.data.shards import Doc
from llara_dist.engine import batch_plan, deepspeed_config, dist_env, lr_factor
from llara_dist.metrics import attention_pairs, matmul_params, train_flops
from llara_dist.prompts import PromptTokens


@pytest.mark.parametrize("environ, want", [
    # deepspeed launcher and torchrun
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"},
     (3, 4, 1, "node1", 29500, "torchrun/deepspeed")),
    # srun, one task per process; RANK wins over SLURM_* when a launcher runs inside an allocation
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
      "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}, (5, 8, 1, "n0", 1234, "slurm")),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"},
     (1, 2, 0, "n0", 1234, "slurm")),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
     (0, 2, 0, "a", 1, "torchrun/deepspeed")),
])
def test_dist_env_from_launchers(environ, want):
    e = dist_env(environ)
    assert (e.rank, e.world, e.local_rank, e.master_addr, e.master_port, e.launcher) == want


def test_dist_env_single_and_errors():
    e = dist_env({})
    assert (e.rank, e.world, e.launcher, e.master_addr) == (0, 1, "single", "127.0.0.1") and e.master_port > 0
    with pytest.raises(RuntimeError, match="MASTER_ADDR/MASTER_PORT are not set"):
        dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(RuntimeError, match="rank 4 is outside world size 2"):
        dist_env({"RANK": "4", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def test_batch_plan_arithmetic():
    assert batch_plan(256, 8, 4).grad_accum == 8
    assert batch_plan(256, 8, 32).grad_accum == 1
    with pytest.raises(ValueError) as e:
        batch_plan(256, 8, 3)
    msg = str(e.value)
    assert "micro_batch 8 x world 3 = 24 rows per pass" in msg and "256 / 24 = 10.7" in msg
    assert "e.g. 240 or 264" in msg


def test_impossible_batch_refused_before_heavy_work(monkeypatch, capsys, tmp_path):
    from llara_dist import train

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens: a process group would fail, not refuse
    args = argparse.Namespace(config=None, ledger=False,
                              overrides=[f"run_dir={tmp_path}", "train.global_batch=8", "train.micro_batch=2"])
    assert train.run(args) == train.REFUSED_EXIT
    assert "micro_batch 2 x world 3 = 6 rows per pass" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_lr_warmup_then_decay():
    t = TrainConfig(steps=110, warmup_steps=10, lr=1.0, decay="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, t) for s in range(110)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # rising warm-up
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # falling after
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cosine at 0.5
    lin = TrainConfig(steps=20, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lr_factor(10, lin) == pytest.approx(0.5)


def test_deepspeed_config_from_train_config():
    t = load_config(RunConfig, None, ["train.grad_clip=0.5", "train.offload_optimizer=true",
                                      "train.weight_decay=0.1"]).train
    ds = deepspeed_config(t, batch_plan(256, 8, 4), torch.bfloat16)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (256, 8, 8)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["weight_decay"] == 0.1


def _batch():
    prompt = PromptTokens(prefix=(1, 7), self_suffix=(5, 6, 90), next_suffix=(8, 91), num_emb_tokens=1)
    rng = np.random.default_rng(0)
    rows = [[Doc(f"d{r}{i}", rng.integers(10, 80, n).astype(np.int32), None) for i, n in enumerate(lens)]
            for r, lens in enumerate([[5, 9, 3], [20], [1, 1]])]
    return build_batch(rows, prompt, 40, 0)


def test_attention_pairs_match_the_mask():
    b = _batch()
    # brute force over the mask rule: same document, j <= i, not (NEXT query, SELF key)
    doc, seg = b.doc[:, :, None], b.segment
    i = torch.arange(b.input_ids.shape[1])
    allowed = (doc == b.doc[:, None, :]) & (b.doc[:, :, None] >= 0) & (i[None, :] <= i[:, None])
    allowed &= ~((seg[:, :, None] == SEG_NEXT) & (seg[:, None, :] == SEG_SELF))
    allowed &= (seg[:, :, None] != SEG_PAD)
    assert attention_pairs(b) == int(allowed.sum())
    # by hand, one document of text length t=2+5=7, S=3, N=2: 10*11/2 + 2*7 + 3 = 72
    assert b.text_len[0] == 7 and (10 * 11 // 2 + 2 * 7 + 3) == 72


def test_train_flops_by_hand():
    from llara_dist.tiny import tiny_llama_config

    c = tiny_llama_config(vocab_size=100, hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16)
    # per layer: q 8x8, o 8x8, k 8x4, v 8x4 (1 kv head of dim 4), mlp 3x8x16; head 8x100
    n = 2 * (64 + 64 + 32 + 32 + 384) + 800
    assert matmul_params(c) == n == 1952
    # 10 tokens, 30 pairs: 6 N T + 3 (fwd+bwd) x 4 x heads x head_dim x layers x pairs
    assert train_flops(c, 10, 30) == 6 * 1952 * 10 + 3 * 4 * 2 * 4 * 2 * 30


def _gloo_worker(rank, world, port, folder):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from llara_dist.checkpoint import CheckpointManager
    from llara_dist.engine import build_engine, full_state_dict, init_distributed
    from llara_dist.preempt import Preemption

    init_distributed(dist_env(), timeout_s=60)
    # preemption: a signal to rank 1 only stops both ranks at the same boundary
    pre = Preemption()
    assert not pre.should_stop()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal is harmless
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
def test_preemption_agreement_and_checkpoint_manager(tmp_path):
    from llara_dist.engine import _free_port

    mp.spawn(_gloo_worker, args=(2, _free_port(), tmp_path / "ckpt"), nprocs=2)
