"""Contrastive fine-tuning (RepLLaMA-style): `llara-dist finetune --config FILE [key=value ...]`.

    # tiny CPU run, one process (fp32, gloo)
    DS_ACCELERATOR=cpu llara-dist finetune --config ft.yaml model.path=exported finetune.data=train.jsonl \\
        train.global_batch=4 train.micro_batch=2 finetune.group_size=4 train.steps=20
    # one node, 8 GPUs
    deepspeed --num_gpus 8 --module llara_dist finetune --config ft.yaml
    torchrun --nproc-per-node 8 -m llara_dist finetune --config ft.yaml
    # many nodes: as `train` (launch/), with `finetune` as the command

The config is a FinetuneRunConfig: the trainer's sections (run_dir, objective, model,
train) plus `finetune` (data, group_size, temperature, max lengths, LoRA). The loop is
the trainer's (trainer.Trainer: resume from `latest`, preemption at step boundaries with
exit 42, checkpoints, metrics.jsonl, --ledger); this module gives it the task: groups
of 1 positive + group_size - 1 hard negatives per query (data/finetune_data.py), queries
embedded with the preset's NEXT prompt, passages with its SELF prompt, pooled as at
inference (embed.pool), scores = q . p / temperature, cross-entropy towards the positive.
Each query is scored against every passage of its micro-step: its own group, the other
queries' groups (in-batch negatives) and, with finetune.cross_device, the groups of
all ranks (all-gathered with a gradient). global_batch and micro_batch count queries.
With finetune.grad_cache_chunk the micro-batch's texts go through the model a few at a
time (GradCache, grad_cache_backward): the same loss and gradient, the memory of a sub-batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from llara_dist.config import FinetuneRunConfig
from llara_dist.errors import UserError
from llara_dist.model.embed import embed_batch
from llara_dist.train import trainer


def configure(parser) -> None:
    trainer.configure(parser, FinetuneRunConfig)


def run(args) -> int:
    return trainer.start(args, FinetuneRunConfig, Finetune, "finetune")


class Finetune:
    """The trainer's task for fine-tuning (see pretrain.Pretrain for the interface)."""

    METRICS = ("accuracy",)  # share of queries whose positive scores highest

    def __init__(self, cfg: FinetuneRunConfig, plan):
        from llara_dist.retrieval.finetune_data import read_examples

        self.cfg = cfg
        check_preset(cfg)
        self.examples = read_examples(cfg.finetune.data, cfg.finetune.group_size)  # refused before the model loads
        self.engine_train = engine_train_config(cfg)

    def loader(self, tokenizer, prompt, pad_id: int, plan, rank: int):
        from llara_dist.retrieval.finetune_data import GroupLoader

        return GroupLoader(self.examples, tokenizer, prompt, self.cfg.finetune, plan, rank, pad_id)

    def data_identity(self, loader) -> dict:
        return {"data": self.cfg.finetune.data, "examples": len(loader.examples)}

    def step(self, engine, micro: list, preset, world: int) -> dict:
        ft = self.cfg.finetune
        return finetune_step(engine, micro, preset, world, ft.temperature, ft.cross_device)


def check_preset(cfg: FinetuneRunConfig) -> None:
    """An exported model folder records its prompts (llara.json): fine-tuning with others is refused."""
    from pathlib import Path

    from llara_dist.prompts import resolve_preset
    from llara_dist.retrieval.encode import LLARA_JSON, saved_objective

    saved = saved_objective(cfg.model.path)
    if saved is None:
        return
    meta = Path(cfg.model.path) / LLARA_JSON
    adapted = resolve_preset(saved)
    if adapted != resolve_preset(cfg.objective):
        raise UserError(f"{meta}: the model was adapted with preset {saved.preset!r} and its prompts; "
                         f"this config's objective (preset {cfg.objective.preset!r}) differs: set "
                         f"objective.preset={saved.preset} (and the same custom fields)")


def engine_train_config(cfg: FinetuneRunConfig):
    """The TrainConfig for engine.build_engine: the run's, gathering per module (each decoder layer
    runs twice per backward: see FinetuneRunConfig)."""
    import dataclasses

    return dataclasses.replace(cfg.train, zero3_layer_gather=False)


class GatherRows(torch.autograd.Function):
    """all_gather along dim 0 with a gradient: [n, H] per rank -> [world x n, H], rank order.

    Every rank's loss reads every rank's rows, so the gradient of rank r's rows is the
    sum over ranks of their incoming gradients' slice r: all_reduce SUM, then our slice
    (gloo has no reduce_scatter, which torch.distributed.nn's all_gather needs).
    """

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def contrastive_sums(q: torch.Tensor, p: torch.Tensor, temperature: float, group_size: int, first_query: int):
    """q [M, H] queries, p [P, H] passages in group order; query i's positive is p[(first_query + i) x G].

    Returns (sum of the M cross-entropies, number of queries whose positive scores highest), both
    0-d tensors on q's device (a Python number would make the host wait for the GPU).
    """
    scores = q @ p.T / temperature  # [M, P]
    target = (first_query + torch.arange(q.shape[0], device=q.device)) * group_size  # [M]
    loss = F.cross_entropy(scores.float(), target, reduction="sum")
    return loss, (scores.argmax(1) == target).sum()


def finetune_step(engine, micro_batches: list, preset, world: int, temperature: float, cross_device: bool) -> dict:
    """One optimizer step over this rank's micro-batches of query groups; returns the step's global numbers.

    The loss is the mean cross-entropy over all queries of the global batch. Each backward
    carries its micro-batch's share (sum / global queries); DeepSpeed's division by
    grad_accum is off and its average over ranks is undone (x world), as in pretrain.train_step.
    With cross-device negatives a query on rank r is scored against the passages of all
    ranks at the same micro-step (the loader makes them one contiguous slice of the batch).
    Micro-batches that come in sub-batches (finetune.grad_cache_chunk) take the same loss's
    gradient one sub-batch at a time (grad_cache_backward).
    """
    import torch.distributed as dist

    from llara_dist.train.distributed import all_reduce_sum
    from llara_dist.train.metrics import attention_pairs

    gather = cross_device and world > 1
    rank = dist.get_rank() if gather else 0
    queries = sum(b.num_queries for b in micro_batches)
    global_queries = queries * world  # every rank has the same micro_batch x grad_accum queries
    step_sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # [loss, hits], read after the step

    def micro_step_loss(q, p, group: int):  # q [M, H], p [M x G, H] of this rank -> (its share of the loss, hits)
        if gather:
            p = GatherRows.apply(p)  # [world x M x G, H]
        ce, hit = contrastive_sums(q, p, temperature, group, rank * q.shape[0])  # rank 0 of 1 without gather
        return ce / global_queries, hit

    for a, b in enumerate(micro_batches):
        group = b.num_passages // b.num_queries
        if b.query_chunks:  # finetune.grad_cache_chunk: the loader cut the texts into sub-batches
            chunks = [(kind, c.to(engine.device, non_blocking=True))
                      for kind, part in (("query", b.query_chunks), ("passage", b.passage_chunks)) for c in part]
            n = len(b.query_chunks)
            loss, hit = grad_cache_backward(
                engine, preset, chunks, lambda e: micro_step_loss(torch.cat(e[:n]), torch.cat(e[n:]), group),
                scale=world, boundary=a == len(micro_batches) - 1)
        else:
            q = embed_batch(engine, b.queries.to(engine.device, non_blocking=True), "query", preset)
            p = embed_batch(engine, b.passages.to(engine.device, non_blocking=True), "passage", preset)
            loss, hit = micro_step_loss(q, p, group)
            engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()  # the optimizer steps at the last micro-batch only
        step_sums += torch.stack([loss.detach(), hit]).double()
    ran = [x for b in micro_batches for x in (b.query_chunks + b.passage_chunks or [b.queries, b.passages])]
    stats = [sum(x.num_docs for x in ran), sum(x.real_tokens() for x in ran), sum(x.input_ids.numel() for x in ran),
             sum(attention_pairs(x) for x in ran)]
    total = all_reduce_sum(step_sums.tolist() + stats, engine.device)  # after every backward
    out = {"loss": total[0], "accuracy": total[1] / global_queries}
    out.update(zip(("docs", "real_tokens", "slots", "pairs"), total[2:]))
    return out


# --- GradCache (finetune.grad_cache_chunk) ---------------------------------------------------------

class RngReplay:
    """Save and restore the random state that dropout draws from: the CPU generator, and the
    CUDA one of `device` when it is a GPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def save(self) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None

    def restore(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.device)


def padded_count(count: int, device) -> int:
    """The most sub-batches any rank holds (all-reduce MAX; `count` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())  # a host wait per micro-batch, before its first pass: small beside its passes


def grad_cache_backward(engine, preset, chunks: list, loss_fn: Callable, scale: float, boundary: bool) -> tuple:
    """Back-propagate loss_fn over the embeddings of `chunks` into the engine's gradients, one chunk at a time.

    A contrastive loss couples every text of its batch, so one backward through the whole batch
    keeps the activations of all its texts. Its gradient reaches the model only through the
    embeddings, though: dL/dtheta = sum_k (dL/de_k) . (de_k/dtheta). So: (1) embed every chunk
    with no graph kept; (2) compute the loss from those embeddings (made leaves) and dL/de_k;
    (3) embed each chunk again with a graph and (4) back-propagate (e_k . dL/de_k) through it with
    engine.backward. Memory: one chunk's activations plus the embeddings; cost: one more forward.

    Dropout (LoRA's) must draw the same mask in (3) as in (1), or the cached gradient belongs to
    another embedding: the RNG state is saved before each chunk's first pass and restored before
    its second, and at the end set to where (1) left it (a resumed run draws what the
    uninterrupted one did). DeepSpeed places the accumulation boundary by counting one backward
    per micro-batch; here a micro-batch takes one per chunk, so it is set explicitly: only the
    last backward of the step (`boundary`: the caller's last micro-batch) is the boundary, and the
    caller's engine.step() after each micro-batch steps the optimizer there only. ZeRO-3 gathers
    each module's weights in a collective when it runs and reduces its gradients in one at each
    backward, so all ranks run as many chunks as the rank with the most: the others repeat their
    first chunk with a zero cached gradient.

    chunks: [(kind, PackedBatch on the engine's device)], kind "query" or "passage" (embed.embed_batch);
    loss_fn(embeddings) -> (loss, *more): embeddings is one [n_k, H] tensor per chunk, in order; the loss
    is a 0-d tensor and the rest is returned as it is (detached). The gradient that reaches the
    engine is scale x dloss/dtheta.
    """
    if not chunks:
        raise ValueError("grad_cache_backward needs at least one sub-batch")
    rng = RngReplay(engine.device)
    count = padded_count(len(chunks), engine.device)
    schedule = chunks + [chunks[0]] * (count - len(chunks))  # symmetry for ZeRO-3: a zero-weighted repeat

    states, cached = [], []
    with torch.no_grad():  # 1. no graph: only the [n_k, H] embeddings stay
        for kind, batch in schedule:
            states.append(rng.save())
            cached.append(embed_batch(engine, batch, kind, preset))
    end_state = rng.save()

    leaves = [e.requires_grad_() for e in cached[:len(chunks)]]  # 2. the loss and its gradient at the embeddings
    loss, *more = loss_fn(leaves)
    loss.backward()
    grads = [e.grad if e.grad is not None else torch.zeros_like(e) for e in leaves]
    grads += [torch.zeros_like(e) for e in cached[len(chunks):]]
    del cached, leaves

    for k, ((kind, batch), state, grad) in enumerate(zip(schedule, states, grads)):  # 3. and 4.
        rng.restore(state)  # the first pass's dropout mask again
        engine.set_gradient_accumulation_boundary(boundary and k == count - 1)
        emb = embed_batch(engine, batch, kind, preset)
        engine.backward((emb * grad).sum() * scale, scale_wrt_gas=False)
    rng.restore(end_state)  # as after the first pass (the replays consumed the same draws)
    return (loss.detach(), *(m.detach() if isinstance(m, torch.Tensor) else m for m in more))
