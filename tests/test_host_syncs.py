"""No host sync inside a step, seen on CPU: helpers.SyncWatch records the operations whose CUDA form
makes the host wait for the device, over a micro-batch's forward, loss and backward, over one step of
the real ZeRO-3 engine, and DeepSpeed's one-rank gathers (patches.skip_local_gather_syncs).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import SyncWatch, load_tiny, micro_batches

from llara_dist.config import TrainConfig
from llara_dist.train.distributed import batch_plan, dist_env
from llara_dist.train.engine import deepspeed_config


def _gather_sync_worker(rank, world, port, paths, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import partition_parameters as pp

    from llara_dist.train.distributed import init_distributed
    from llara_dist.train.engine import build_engine

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


@pytest.mark.parametrize("preset_name, attn, frozen_head", [("released", "sdpa", False), ("paper", "two-pass", False),
                                                             ("released", "sdpa", True)])
def test_micro_batch_path_reads_nothing_back(preset_name, attn, frozen_head, tokenizer_dir, tiny_llama_dir,
                                             shared_data):
    """Forward, loss and backward of a micro-batch: nothing that would wait for a GPU."""
    from llara_dist.data.batch import lm_targets
    from llara_dist.model.objective import batch_counts, combine, loss_sums

    tok, preset, model, prompt = load_tiny(preset_name, tokenizer_dir, tiny_llama_dir, attn=attn)
    model.train().lm_head.weight.requires_grad_(not frozen_head)  # frozen: LoRA's LM-loss path
    b = micro_batches(tok, prompt, shared_data)[0]
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
    from llara_dist.model.objective import Objective
    from llara_dist.train.distributed import init_distributed
    from llara_dist.train.engine import build_engine, zero3_loading
    from llara_dist.train.pretrain import train_step

    init_distributed(dist_env(), timeout_s=60)
    train = TrainConfig(global_batch=2, micro_batch=1, lr=1e-3, warmup_steps=0,
                        deepspeed={"zero_optimization": {"stage3_prefetch_bucket_size": 12345}})
    ds = deepspeed_config(train, batch_plan(2, 1, world), torch.float32)
    tokenizer_dir, tiny_llama_dir, shared_data = paths
    with zero3_loading(ds):
        tok, preset, model, prompt = load_tiny("released", tokenizer_dir, tiny_llama_dir)
    engine = build_engine(model.train(), train, ds)
    micro = micro_batches(tok, prompt, shared_data)
    with SyncWatch() as watch:
        engine.module.register_forward_pre_hook(lambda *_: watch.events.append(("forward", [])))  # a marker
        result = train_step(engine, micro, Objective(preset, lm_chunk=16), world)
    torch.save({"events": watch.events, "result": result, "prefetch": engine.zero_prefetch_bucket_size()}, out)


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
