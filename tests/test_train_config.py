"""The trainer's set-up, without a training run: ranks from the launchers' variables, the batch
split and its refusal before any heavy work, the lr shape, the DeepSpeed config built from the
train config (optimizer per device, `train.deepspeed` overrides and what they may not set).
"""

from __future__ import annotations

import pytest
import torch
from helpers import refused

from llara_dist.config import RunConfig, TrainConfig, load_config
from llara_dist.errors import UserError
from llara_dist.train.distributed import batch_plan, dist_env
from llara_dist.train.engine import deepspeed_config, lr_factor


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
    # port 0: the lone rank's store binds any free port itself, nothing to race for
    assert (e.rank, e.world, e.launcher, e.master_addr, e.master_port) == (0, 1, "single", "127.0.0.1", 0)
    with pytest.raises(UserError, match="MASTER_ADDR/MASTER_PORT are not set"):
        dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(UserError, match="rank 4 is outside world size 2"):
        dist_env({"RANK": "4", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(UserError, match="MASTER_PORT=0 with 2 ranks"):
        dist_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "0"})
    with pytest.raises(UserError, match="MASTER_PORT='x' is not an integer"):
        dist_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "x"})


def test_batch_plan_arithmetic():
    assert batch_plan(256, 8, 4).grad_accum == 8
    assert batch_plan(256, 8, 32).grad_accum == 1
    with pytest.raises(ValueError) as e:
        batch_plan(256, 8, 3)
    msg = str(e.value)
    assert "micro_batch 8 x world 3 = 24 rows per pass" in msg and "256 / 24 = 10.7" in msg
    assert "e.g. 240 or 264" in msg


def test_impossible_batch_refused_before_heavy_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens: a process group would fail, not refuse
    err = refused(["train", f"run_dir={tmp_path}", "train.global_batch=8", "train.micro_batch=2"], capsys)
    assert "micro_batch 2 x world 3 = 6 rows per pass" in err
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
    two = deepspeed_config(TrainConfig(zero_stage=2), batch_plan(256, 8, 4), torch.bfloat16)["zero_optimization"]
    assert two == {"stage": 2}  # no ZeRO-3 entries


def test_zero_stage_choices_are_checked():
    from llara_dist.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["train.zero_stage=1"])
    assert e.value.problems == ["train.zero_stage: 1 is not 2 or 3"]
    with pytest.raises(ConfigError, match="train.offload_params: needs zero_stage 3"):
        load_config(RunConfig, None, ["train.zero_stage=2", "train.offload_params=true"])


def test_deepspeed_config_optimizer_per_device():
    plan = batch_plan(8, 2, 1)

    def adam(gpu, **train):
        params = deepspeed_config(TrainConfig(**train), plan, torch.float32, gpu=gpu)["optimizer"]["params"]
        return {k: params[k] for k in ("torch_adam", "fused") if k in params}

    assert adam(False) == adam(False, offload_optimizer=True) == {"torch_adam": True}  # CPU: torch's AdamW
    assert adam(True) == {"torch_adam": True, "fused": True}  # GPU default: torch's fused AdamW, no JIT build
    assert adam(True, adam_impl="deepspeed") == {"torch_adam": False}  # DeepSpeed's FusedAdam
    assert adam(True, offload_optimizer=True) == {"torch_adam": False}  # offloaded: DeepSpeed's CPU-Adam
    ds = deepspeed_config(TrainConfig(offload_optimizer=True, offload_params=True), plan, torch.bfloat16, gpu=True)
    assert ds["zero_optimization"]["offload_optimizer"] == ds["zero_optimization"]["offload_param"] == \
        {"device": "cpu", "pin_memory": True}
    with pytest.raises(ValueError, match="adam_impl: 'apex' is not one of torch, deepspeed"):
        load_config(RunConfig, None, ["train.adam_impl=apex"])


def test_deepspeed_overrides_merge_and_refusals(tmp_path):
    from llara_dist.config import ConfigError

    knobs = ["train.deepspeed.zero_optimization.stage3_prefetch_bucket_size=50000000",
             "train.deepspeed.zero_optimization.overlap_comm=true", "train.deepspeed.optimizer.type=AdamW",
             "train.deepspeed.zero_optimization.offload_optimizer.buffer_count=8"]
    t = load_config(RunConfig, None, knobs + ["train.grad_clip=0.5"]).train
    ds = deepspeed_config(t, batch_plan(256, 8, 4), torch.bfloat16)
    zero = ds["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 50_000_000 and zero["overlap_comm"] is True
    assert zero["offload_optimizer"] == {"buffer_count": 8}  # no device: DeepSpeed's default, not offloaded
    assert zero["stage"] == 3 and ds["gradient_clipping"] == 0.5 and ds["train_batch_size"] == 256  # kept
    assert ds["optimizer"]["params"]["lr"] == t.lr
    ds["zero_optimization"]["overlap_comm"] = False  # DeepSpeed edits its config: the run config stays
    assert t.deepspeed["zero_optimization"]["overlap_comm"] is True
    # what train.* sets is refused, every key at once, naming the field to use instead
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["train.deepspeed.gradient_clipping=2", "train.deepspeed.train_batch_size=64",
                                      "train.deepspeed.zero_optimization.stage=2", "train.deepspeed.bf16=null",
                                      "train.deepspeed.optimizer.type=Lamb", "train.deepspeed.optimizer.params.lr=1",
                                      "train.deepspeed.zero_optimization.offload_param.device=nvme"])
    assert e.value.problems == [
        "train.deepspeed.gradient_clipping: set by the trainer (gradient_clipping); use train.grad_clip",
        "train.deepspeed.train_batch_size: set by the trainer (train_batch_size); use train.global_batch",
        "train.deepspeed.zero_optimization.stage: set by the trainer (zero_optimization.stage); "
        "use train.zero_stage",
        "train.deepspeed.zero_optimization.offload_param.device: set by the trainer "
        "(zero_optimization.offload_param.device); use train.offload_params",
        "train.deepspeed.bf16: set by the trainer (bf16.enabled); use model.dtype",
        "train.deepspeed.optimizer.type: 'Lamb': the trainer's optimizer is AdamW (train.adam_impl picks its kernel)",
        "train.deepspeed.optimizer.params.lr: set by the trainer (optimizer.params.lr); use train.lr"]
    with pytest.raises(ConfigError, match="train.deepspeed.fp16.enabled: set by the trainer"):  # built in code
        deepspeed_config(TrainConfig(deepspeed={"fp16": {"enabled": True}}), batch_plan(8, 2, 1), torch.float32)
    bad = tmp_path / "run.yaml"
    bad.write_text("train:\n  deepspeed: 5\n")
    with pytest.raises(ConfigError, match="train.deepspeed: expected a mapping"):
        load_config(RunConfig, bad)
