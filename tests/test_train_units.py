"""Trainer parts without a training run: ranks from launchers, batch arithmetic, lr shape, FLOPs.

Plus one 2-rank gloo job (torch.multiprocessing) for the preemption flag agreement and the
checkpoint manager's atomic `latest` and keep-K on a real DeepSpeed engine.
"""

from __future__ import annotations

import argparse
import os
import signal
import traceback

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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
    # port 0: the lone rank's store binds any free port itself, nothing to race for
    assert (e.rank, e.world, e.launcher, e.master_addr, e.master_port) == (0, 1, "single", "127.0.0.1", 0)
    with pytest.raises(RuntimeError, match="MASTER_ADDR/MASTER_PORT are not set"):
        dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(RuntimeError, match="rank 4 is outside world size 2"):
        dist_env({"RANK": "4", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(RuntimeError, match="MASTER_PORT=0 with 2 ranks"):
        dist_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "0"})
    with pytest.raises(RuntimeError, match="MASTER_PORT='x' is not an integer"):
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
    two = deepspeed_config(TrainConfig(zero_stage=2), batch_plan(256, 8, 4), torch.bfloat16)["zero_optimization"]
    assert two == {"stage": 2}  # no ZeRO-3 entries


def test_zero_stage_choices_are_checked():
    from llara_dist.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["train.zero_stage=1"])
    assert e.value.problems == ["train.zero_stage: 1 is not 2 or 3"]
    with pytest.raises(ConfigError, match="train.offload_params: needs zero_stage 3"):
        load_config(RunConfig, None, ["train.zero_stage=2", "train.offload_params=true"])


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


def _gather_sync_worker(rank, world, port, paths, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import partition_parameters as pp

    from llara_dist.engine import build_engine, init_distributed

    init_distributed(dist_env(), timeout_s=60)
    t = TrainConfig(global_batch=1, micro_batch=1, lr=0.1, warmup_steps=0)
    torch.manual_seed(0)
    engine = build_engine(torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.Linear(300, 400)), t,
                          deepspeed_config(t, batch_plan(1, 1, 1), torch.float32))

    class Stream:  # the host's waits on the device's stream, counted
        syncs = 0

        def synchronize(self):
            Stream.syncs += 1

        def wait_stream(self, other):  # device-side ordering: no host wait
            pass

    accelerator = get_accelerator()  # pretend to be a GPU: data on a stream must be waited for
    accelerator.resolves_data_dependency, accelerator.current_stream = (lambda: False), Stream

    # 120k weights per Linear: over DeepSpeed's persistence threshold (1e5), so gathered at each forward
    def forward() -> tuple[int, torch.Tensor]:
        before = Stream.syncs
        with torch.no_grad():
            y = engine(torch.ones(2, 400))
        return Stream.syncs - before, y

    patched = forward()
    for cls in (pp.NoGatherHandle, pp.NoGatherCoalescedHandle):
        cls.wait = cls.wait.original  # DeepSpeed's own waits
    torch.save({"patched": patched, "deepspeed": forward(),
                "shadow_kept": not accelerator.resolves_data_dependency()}, out)


def test_single_rank_gathers_do_not_wait_on_the_host(tmp_path, run_ranks):
    """ZeRO-3 on one rank: DeepSpeed's 'gather' of a parameter already on its device waits on the host
    for the stream (a sync per module on a GPU); ours completes the handle without it, same outputs."""
    run = run_ranks(_gather_sync_worker, 1, None, tmp_path / "run.pt")
    (ours, y_ours), (theirs, y_theirs) = run["patched"], run["deepspeed"]
    assert ours == 0 and theirs >= 1, (ours, theirs)  # DeepSpeed waits for each (coalesced) gather
    assert torch.equal(y_ours, y_theirs)
    assert run["shadow_kept"]  # our wait restores whatever the accelerator said before


@pytest.mark.slow
def test_preemption_agreement_and_checkpoint_manager(tmp_path, spawn_ranks):
    spawn_ranks(_gloo_worker, 2, tmp_path / "ckpt")


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


def test_batch_carries_its_lm_targets():
    from llara_dist.batch import lm_targets

    b = _batch()
    where = lm_targets(b).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(b.lm_index, where) and b.lm_index.dtype == torch.int64
    # each text token is a target, predicted from the token before it (the last prefix token for the first)
    assert b.lm_index.numel() == 5 + 9 + 3 + 20 + 1 + 1
    assert torch.equal(b.lm_index[:5], torch.tensor([1, 2, 3, 4, 5]))  # row 0: prefix at 0-1, text at 2-6


# --- host syncs: what would make the CPU wait for the GPU, seen on CPU -------------------

class SyncWatch(TorchDispatchMode):
    """Records the operations whose CUDA form makes the host wait for the device: a value read
    back (item, float, int, bool, tolist, cpu, numpy) or an output size that depends on the data
    (nonzero, unique, masked_select, boolean-mask indexing, repeat_interleave without output_size).

    The CPU stand-in for torch.cuda.set_sync_debug_mode("error"): it sees the operations, not the
    device, so a copy between host and device (.to) is not among them.
    """

    READ_BACK = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                 "unique_consecutive", "is_nonzero", "equal"}
    TO_HOST = {"tolist", "cpu", "numpy"}  # Tensor methods whose CPU form dispatches nothing

    def __enter__(self):
        self.events = []  # (operation, the Python functions on the stack, innermost last)
        self._methods = _HostCopies(self)
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._methods.__exit__(*exc)
        return super().__exit__(*exc)

    def record(self, name: str) -> None:
        self.events.append((name, [f"{f.filename}:{f.name}" for f in traceback.extract_stack()[:-2]]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[1]
        if (name in self.READ_BACK
                or (name == "repeat_interleave" and kwargs.get("output_size") is None)
                or (name in ("index", "index_put", "index_put_")
                    and any(i is not None and i.dtype == torch.bool for i in args[1]))):
            self.record(name)
        return func(*args, **kwargs)


class _HostCopies(TorchFunctionMode):
    def __init__(self, watch: SyncWatch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SyncWatch.TO_HOST:
            self.watch.record(func.__name__)
        return func(*args, **(kwargs or {}))


def _micro_batches(tok, prompt, shared_data):
    from test_parity import make_docs

    docs = make_docs(tok, shared_data, [23, 9, 14, 5, 17, 7])
    return [build_batch([row], prompt, 3 * prompt.overhead + 60, tok.pad_token_id) for row in (docs[:3], docs[3:])]


@pytest.mark.parametrize("preset_name, attn, frozen_head", [("released", "sdpa", False), ("paper", "two-pass", False),
                                                             ("released", "sdpa", True)])
def test_micro_batch_path_reads_nothing_back(preset_name, attn, frozen_head, tokenizer_dir, tiny_llama_dir,
                                             shared_data):
    """Forward, loss and backward of a micro-batch: nothing that would wait for a GPU."""
    from llara_dist.batch import lm_targets
    from llara_dist.objective import batch_counts, combine, loss_sums
    from test_parity import setup

    tok, preset, model, prompt = setup(preset_name, tokenizer_dir, tiny_llama_dir, attn=attn)
    model.train().lm_head.weight.requires_grad_(not frozen_head)  # frozen: LoRA's LM-loss path
    b = _micro_batches(tok, prompt, shared_data)[0]
    counts = batch_counts(b, preset)  # metadata, read on the CPU before the batch moves
    with SyncWatch() as watch:
        sums = loss_sums(model, b, preset, lm_chunk=16)  # several LM chunks
        loss, parts = combine(sums, counts, preset, as_floats=False)
        loss.backward()
    assert watch.events == []
    assert loss.requires_grad and all(p.ndim == 0 for p in parts.values())
    # the watch sees what the step path used to do
    with SyncWatch() as watch:
        combine(sums, counts, preset)  # parts as floats: one read per term
        lm_targets(b).reshape(-1).nonzero()
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))
        b.input_ids[b.segment == 0]
        loss.detach().tolist()
    assert [name for name, _ in watch.events] == ["_local_scalar_dense"] * 3 + ["nonzero", "repeat_interleave",
                                                                                "index", "tolist"]


def _step_worker(rank, world, port, paths, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from llara_dist import objective
    from llara_dist.engine import build_engine, init_distributed, zero3_loading
    from llara_dist.train import train_step
    from test_parity import setup

    init_distributed(dist_env(), timeout_s=60)
    train = TrainConfig(global_batch=2, micro_batch=1, lr=1e-3, warmup_steps=0,
                        deepspeed={"zero_optimization": {"stage3_prefetch_bucket_size": 12345}})
    ds = deepspeed_config(train, batch_plan(2, 1, world), torch.float32)
    tokenizer_dir, tiny_llama_dir, shared_data = paths
    with zero3_loading(ds):
        tok, preset, model, prompt = setup("released", tokenizer_dir, tiny_llama_dir)
    engine = build_engine(model.train(), train, ds)
    micro = _micro_batches(tok, prompt, shared_data)
    with SyncWatch() as watch:
        engine.module.register_forward_pre_hook(lambda *_: watch.events.append(("forward", [])))  # a marker
        result = train_step(engine, micro, preset, world, objective, lm_chunk=16)
    torch.save({"events": watch.events, "result": result, "prefetch": engine.zero_prefetch_bucket_size()}, out)


# how the engine holds the weights: ZeRO-3 gathering per module (DeepSpeed's way), per decoder layer
# (train.zero3_layer_gather, the default), the same with each layer compiled whole (model.compile_layers),
# and ZeRO-2 (train.zero_stage=2: whole on every rank): (ZeRO stage, gather by layer, compile layers)
GATHERINGS = {"module": (3, False, False), "layer": (3, True, False), "compiled": (3, True, True),
              "zero2": (2, True, False)}


def _gathering_worker(rank, world, port, paths, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from deepspeed.utils import z3_leaf_module

    from llara_dist import fused, objective
    from llara_dist.engine import build_engine, init_distributed, zero3_loading
    from llara_dist.train import train_step
    from test_parity import setup

    init_distributed(dist_env(), timeout_s=60)
    tokenizer_dir, tiny_llama_dir, shared_data = paths
    got = {}
    for name, (stage, by_layer, compiled) in GATHERINGS.items():
        # every weight partitioned, however small (DeepSpeed keeps those under 1e5 elements whole)
        small = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {}
        train = TrainConfig(global_batch=2 * world, micro_batch=1, lr=1e-3, warmup_steps=0, zero_stage=stage,
                            zero3_layer_gather=by_layer, deepspeed=small)
        ds = deepspeed_config(train, batch_plan(2 * world, 1, world), torch.float32)
        torch.manual_seed(0)
        with zero3_loading(ds):
            tok, preset, model, prompt = setup("released", tokenizer_dir, tiny_llama_dir)
        engine = build_engine(model.train(), train, ds)
        if compiled:
            fused.compile_layers(engine)
        micro = _micro_batches(tok, prompt, shared_data)
        layers = engine.module.model.layers
        got[name] = {"losses": [train_step(engine, micro, preset, world, objective, lm_chunk=16)["loss"]
                                for _ in range(3)],
                     "leaves": [z3_leaf_module(m) for m in layers],
                     "partitioned": sum(hasattr(p, "ds_id") for p in engine.module.parameters()),
                     "prefetch": engine.zero_prefetch_bucket_size(),
                     "layer_numel": sum(p.ds_numel for p in layers[0].parameters()) if stage == 3 else None,
                     "hooked_linears": sum(bool(m._forward_pre_hooks) for m in layers.modules()
                                           if isinstance(m, torch.nn.Linear))}
    train = TrainConfig(global_batch=2 * world, micro_batch=1, deepspeed={"zero_optimization": {
        "stage3_prefetch_bucket_size": 12345}})  # the user's prefetch stays
    ds = deepspeed_config(train, batch_plan(2 * world, 1, world), torch.float32)
    with zero3_loading(ds):
        _, _, model, _ = setup("released", tokenizer_dir, tiny_llama_dir)
    got["user_prefetch"] = build_engine(model.train(), train, ds).zero_prefetch_bucket_size()
    torch.save(got, out)


@pytest.mark.slow
def test_gathering_by_layer_or_zero2_trains_the_same(tmp_path, run_ranks, tokenizer_dir, tiny_llama_dir,
                                                     shared_data):
    """Two ranks. train.zero3_layer_gather: ZeRO-3 gathers each decoder layer at once (no hooks on the
    linears inside); train.zero_stage=2: nothing is partitioned nor hooked. Three optimizer steps give the
    losses of DeepSpeed's per-module gathering (the first bit for bit; then to fp32 rounding: the
    gradients reach their buckets in another grouping, so the norm sums in another order); and with
    each layer compiled whole over the weights ZeRO-3 gathers, to the compiled code's rounding."""
    run = run_ranks(_gathering_worker, 2, (tokenizer_dir, tiny_llama_dir, shared_data), tmp_path / "run.pt")
    module, layer, compiled, zero2 = (run[name] for name in GATHERINGS)
    assert module["leaves"] == [False] * len(module["leaves"]) and module["hooked_linears"] > 0
    assert layer["leaves"] == [True] * len(layer["leaves"]) and layer["hooked_linears"] == 0
    assert module["partitioned"] == layer["partitioned"] > 0 and zero2["partitioned"] == 0
    assert zero2["hooked_linears"] == 0 and not any(zero2["leaves"])
    # ZeRO-3 prefetches a whole layer ahead when it gathers by layer, else DeepSpeed's default (5e7)
    assert layer["prefetch"] == layer["layer_numel"] > 0 and module["prefetch"] == 50_000_000
    assert run["user_prefetch"] == 12345
    for other in (layer, zero2):
        assert other["losses"][0] == module["losses"][0]
        assert other["losses"] == pytest.approx(module["losses"], rel=1e-6, abs=0)
    assert compiled["losses"] == pytest.approx(module["losses"], rel=1e-5, abs=0)
    assert module["losses"][2] < module["losses"][0]  # and it trains


def test_layer_gather_refuses_a_model_without_layer_classes():
    from llara_dist.engine import gather_by_layer

    with pytest.raises(ValueError, match="train.zero3_layer_gather: Sequential names no decoder layer class"):
        gather_by_layer(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert gather_by_layer(torch.nn.Sequential(torch.nn.Linear(2, 2)), required=False) == []  # unset: per module


@pytest.mark.slow
def test_train_step_reads_back_before_and_after_the_gpu_work_only(tmp_path, run_ranks, tokenizer_dir,
                                                                   tiny_llama_dir, shared_data):
    """One step of the real ZeRO-3 engine (1 rank, gloo): our code reads the counts before the first
    forward and the results after the last backward, nothing in between (DeepSpeed's reads are its own)."""
    run = run_ranks(_step_worker, 1, (tokenizer_dir, tiny_llama_dir, shared_data), tmp_path / "run.pt")
    assert run["prefetch"] == 12345  # train.deepspeed reached the engine
    assert run["result"]["loss"] > 0 and run["result"]["docs"] == 6
    ours = [(name, next((f.rsplit(":", 1)[1] for f in reversed(stack) if "/llara_dist/" in f), ""))
            for name, stack in run["events"] if not any("/deepspeed/" in f for f in stack)]
    forward = ("forward", "")  # the marker: each micro-batch's model call
    first = ours.index(forward)
    # before: the batches' counts (CPU tensors: the batches are still on the host), all-reduced and read
    assert ours[:first] == [("_local_scalar_dense", "batch_counts")] * 4 + [("tolist", "all_reduce_sum")]
    # from the first forward: nothing read until the last backward and step are queued; then the host
    # batches' statistics (CPU again), the step's sums and their all-reduce
    assert ours[first:] == [forward] * 2 + [("_local_scalar_dense", "real_tokens")] * 2 + \
        [("_local_scalar_dense", "attention_pairs")] * 2 + [("tolist", "train_step"), ("tolist", "all_reduce_sum")]


@pytest.mark.parametrize("lora", [False, True])
def test_forward_hidden_is_the_decoders_final_output(lora, tokenizer_dir, tiny_llama_dir, shared_data):
    """The decoder's output taken by a hook equals, bit for bit, the model's own last hidden state."""
    from llara_dist.kernels import registry
    from llara_dist.engine import apply_lora
    from llara_dist.modeling import forward_hidden
    from test_parity import setup

    tok, preset, model, prompt = setup("released", tokenizer_dir, tiny_llama_dir)
    if lora:  # through peft's wrappers
        model = apply_lora(model, TrainConfig(lora_r=4))
    b = _micro_batches(tok, prompt, shared_data)[1]
    with torch.no_grad():
        h = forward_hidden(model, b)
        mask = registry.prepare("sdpa", b.doc, b.segment)
        every = model(input_ids=b.input_ids, position_ids=b.position, llara_mask=mask, use_cache=False,
                      logits_to_keep=1, output_hidden_states=True).hidden_states
    assert h.shape == b.input_ids.shape + (model.config.hidden_size,) and torch.equal(h, every[-1])
    assert not torch.equal(h, every[-2])  # the final norm's output, not the last layer's
