"""Train LLaRA (EBAE + EBAR) with DeepSpeed ZeRO-3: `llara-dist train --config FILE [key=value ...]`.

    # tiny CPU run, one process (fp32, gloo)
    DS_ACCELERATOR=cpu llara-dist train --config run.yaml model.path=tiny data.shards=shards \\
        train.global_batch=8 train.micro_batch=2 data.seq_len=128 train.steps=20
    # one node, 8 GPUs
    deepspeed --num_gpus 8 --module llara_dist train --config run.yaml
    torchrun --nproc-per-node 8 -m llara_dist train --config run.yaml   # exit 42 lost: use launch/torchrun.sh
    # many nodes: launch/ (sbatch + srun, one task per GPU; or one deepspeed launcher per node)

The loop, resume and preemption are the trainer's (trainer.py); this module is what the
task computes: packed shards, the LLaRA objective, `train_step`. The step loss is the exact mean
over all documents of the global batch: the objective's counts are all-reduced before
the step's backward passes.

Starting in a run folder that holds a checkpoint resumes from `latest`. SIGTERM or
SIGUSR1 make every rank save at the next step boundary and exit with status 42
(preempt.PREEMPTED_EXIT: "checkpoint saved, requeue me"), rank 0 leaving run_dir/PREEMPTED
for launchers that do not pass the status on (launch/torchrun.sh). Exit 2: refused configuration.
"""

from __future__ import annotations

from llara_dist.config import RunConfig
from llara_dist.train import trainer
from llara_dist.train.distributed import BatchPlan
from llara_dist.train.trainer import tokenizer_path

configure = trainer.configure


def run(args) -> int:
    return trainer.start(args, RunConfig, Pretrain, "train")


class Pretrain:
    """The task of `train`: the LLaRA objective over packed shards.

    A task gives the Trainer its data and its per-step work; the loop (resume, preemption,
    checkpoints, metrics, ledger) is the Trainer's. The loader yields this rank's
    micro-batches (each with `.keys`) and has state_dict()/load_state_dict() (its cursor);
    step() returns the step's global numbers: loss, docs, real_tokens, slots, pairs and
    the task's own METRICS.
    """

    METRICS = ("ebae", "ebar", "lm")

    def __init__(self, cfg: RunConfig, plan: BatchPlan):
        from llara_dist.data.loader import reader_plan
        from llara_dist.data.stream import ShardSet
        from llara_dist.data.verify import check_before_training
        from llara_dist.prompts import resolve_preset

        self.cfg = cfg
        self.engine_train = cfg.train  # the TrainConfig build_engine gets (LoRA settings included)
        # Refused here, before any step: missing or resized shards, another tokenizer than the
        # shards'. Every id read must then be a text token of this one (not a preset token).
        self.text_vocab = check_before_training(cfg.data.shards, tokenizer_path(cfg),
                                                resolve_preset(cfg.objective).new_tokens)
        # the split of the shards over ranks and workers (or streams), refused here if it cannot work
        reader_plan(cfg.data, ShardSet.open(cfg.data.shards), global_batch=plan.global_batch,
                    micro_batch=plan.micro_batch, rank=0, world=plan.world)

    def loader(self, tokenizer, prompt, pad_id: int, plan: BatchPlan, rank: int):
        from llara_dist.data.loader import PackedLoader

        return PackedLoader(self.cfg.data, prompt, micro_batch=plan.micro_batch, rank=rank, world=plan.world,
                            global_batch=plan.global_batch,
                            pad_id=pad_id, drop_ids=tuple(sorted(set(tokenizer.all_special_ids))),
                            vocab_size=self.text_vocab)

    def data_identity(self, loader) -> dict:
        """What run.json records about the data."""
        return {"manifest_fingerprint": loader.shards.fingerprint, "data": self.cfg.data.shards}

    def step(self, engine, micro: list, preset, world: int) -> dict:
        from llara_dist.model.objective import Objective

        return train_step(engine, micro, Objective(preset, self.cfg.objective.lm_chunk), world)


def train_step(engine, micro_batches: list, objective, world: int) -> dict:
    """One optimizer step over this rank's micro-batches; returns the step's global numbers.
    `objective`: a model.objective.Objective (counts, sums, combine).

    The counts of all micro-batches of all ranks are all-reduced first, so that each
    micro-batch's combine() is its exact share of the global mean. DeepSpeed would divide
    each backward by grad_accum (switched off: scale_wrt_gas=False) and averages gradients
    over the data-parallel ranks (undone: x world), so the accumulated gradient is that of
    the global mean loss, however the documents are spread.

    The micro-batches (CPU, pinned by the loader on CUDA) are copied without waiting, and
    nothing between the first forward and the last backward reads a GPU value back (each
    read would stall the host until the device drains, so the next micro-batch's kernels
    would start late): the host reads the counts before the step's GPU work and its results
    once, after it. DeepSpeed's own step (gradient norm, clipping) reads at the last micro-batch.
    """
    import torch

    from llara_dist.train.distributed import all_reduce_sum
    from llara_dist.train.metrics import attention_pairs, head_positions

    terms = objective.TERMS
    local = [0.0] * len(terms)
    for b in micro_batches:  # batch metadata, on the CPU
        c = objective.counts(b)
        local = [x + c[t] for x, t in zip(local, terms)]
    counts = dict(zip(terms, (int(x) for x in all_reduce_sum(local, engine.device))))
    # [loss, *parts] summed on the device in float64, as Python floats summed them before
    step_sums = torch.zeros(1 + len(terms), dtype=torch.float64, device=engine.device)
    for b in micro_batches:
        sums = objective.sums(engine, b.to(engine.device, non_blocking=True))
        loss, parts = objective.combine(sums, counts, as_floats=False)
        engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()  # the optimizer steps at the last micro-batch only
        step_sums += torch.stack([loss.detach(), *(parts[t] for t in terms)]).double()
    stats = [sum(b.num_docs for b in micro_batches), sum(b.real_tokens() for b in micro_batches),
             sum(b.input_ids.numel() for b in micro_batches), sum(attention_pairs(b) for b in micro_batches),
             sum(head_positions(b, objective.preset) for b in micro_batches)]  # where the LM head ran: MFU
    total = all_reduce_sum(step_sums.tolist() + stats, engine.device)  # after every backward
    out = {"loss": total[0], **dict(zip(terms, total[1:1 + len(terms)]))}
    out.update(zip(("docs", "real_tokens", "slots", "pairs", "head_positions"), total[1 + len(terms):]))
    out["counts"] = counts
    return out
