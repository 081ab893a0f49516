"""Logical data streams (data.streams): the micro-batches of every optimizer step are the same whatever the
number of ranks and DataLoader workers, and the cursors saved by the ranks of one world size restore onto
another, the data going on as if nothing had changed."""

from __future__ import annotations

import itertools

import pytest

from llara_dist.config import DataConfig
from llara_dist.data.loader import PackedLoader
from llara_dist.errors import UserError

STREAMS, GLOBAL_BATCH, MICRO_BATCH = 4, 8, 1  # each stream gives 2 micro-batches a step


@pytest.fixture(scope="module")
def folder(tmp_path_factory, wiki_docs, write_test_shards):
    """8 shards of 5 documents: every stream reads 2 a epoch, and 10 steps cross several epochs."""
    return write_test_shards(tmp_path_factory.mktemp("shards"), wiki_docs[:40], 8)


def loaders(folder, prompt, world: int, workers: int, global_batch=GLOBAL_BATCH, streams=STREAMS,
            micro_batch=MICRO_BATCH):
    cfg = DataConfig(shards=str(folder), seq_len=256, num_workers=workers, pack_buffer=6, seed=7, streams=streams)
    return [PackedLoader(cfg, prompt, micro_batch=micro_batch, rank=r, world=world, pad_id=3, drop_ids=(0, 1, 2, 3),
                         global_batch=global_batch) for r in range(world)]


def run(folder, prompt, world: int, workers: int, steps: int, states=None, micro_batch=MICRO_BATCH, streams=STREAMS):
    """(per step, the sorted micro-batches of all ranks as (document keys, token ids)), the ranks' states.
    With micro-batches of several rows, each row counts as a micro-batch of its own (its token ids; the
    keys of the whole micro-batch), so that splits of the same rows into micro-batches compare."""
    ranks = loaders(folder, prompt, world, workers, micro_batch=micro_batch, streams=streams)
    for loader in ranks:
        if states is not None:
            loader.load_state_dict(states)
    its = [iter(loader) for loader in ranks]
    per_rank = GLOBAL_BATCH // (world * micro_batch)
    out = []
    for _ in range(steps):
        batches = [b for it in its for b in itertools.islice(it, per_rank)]
        if micro_batch == 1:
            out.append(sorted((tuple(b.keys), b.input_ids.flatten().tolist()) for b in batches))
        else:
            out.append(sorted(row.tolist() for b in batches for row in b.input_ids))
    saved = [loader.state_dict() for loader in ranks]
    for it in its:
        it.close()
    return out, saved


def test_the_steps_do_not_depend_on_ranks_or_workers(folder, released_prompt):
    reference, _ = run(folder, released_prompt, 2, 0, 10)
    assert all(len(step) == GLOBAL_BATCH // MICRO_BATCH for step in reference)
    assert len({key for step in reference for keys, _ in step for key in keys}) == 40  # every document, epochs on
    for world, workers in ((1, 0), (1, 2), (4, 1)):
        assert run(folder, released_prompt, world, workers, 10)[0] == reference, (world, workers)


def test_cursors_saved_at_one_world_size_resume_at_another(folder, released_prompt):
    reference, _ = run(folder, released_prompt, 2, 0, 10)
    first, states = run(folder, released_prompt, 2, 2, 4)
    assert first == reference[:4]
    on_one, _ = run(folder, released_prompt, 1, 2, 6, states)  # a node gone: 2 ranks -> 1
    assert on_one == reference[4:]
    on_four, states4 = run(folder, released_prompt, 4, 0, 3, states)  # more nodes: 2 ranks -> 4
    assert on_four == reference[4:7]
    back, _ = run(folder, released_prompt, 1, 0, 3, states4)  # and down again: 4 -> 1
    assert back == reference[7:]
    # the micro-batch too: the same rows a step, split 4 x 2 instead of 8 x 1
    rows = [sorted(ids for _, ids in step) for step in reference]
    assert run(folder, released_prompt, 1, 2, 6, states, micro_batch=2)[0] == rows[4:]
    assert run(folder, released_prompt, 2, 0, 3, states4, micro_batch=2)[0] == rows[7:]


def test_four_ranks_with_two_workers_each_take_up_two_ranks_cursors(folder, released_prompt):
    """8 streams: 4 ranks of 2 DataLoader workers serve them as 2 ranks of 1 worker did."""
    reference, _ = run(folder, released_prompt, 2, 1, 6, streams=8)
    first, states = run(folder, released_prompt, 2, 1, 3, streams=8)
    assert first == reference[:3]
    assert run(folder, released_prompt, 4, 2, 3, states, streams=8)[0] == reference[3:]


def test_splits_that_cannot_work_are_refused_with_their_arithmetic(folder, released_prompt):
    with pytest.raises(UserError, match=r"data\.streams=4 cannot be shared evenly by 3 ranks"):
        loaders(folder, released_prompt, 3, 0, global_batch=12)
    with pytest.raises(UserError, match=r"2 streams, which its data\.num_workers=3 DataLoader workers cannot share"):
        loaders(folder, released_prompt, 2, 3)
    with pytest.raises(UserError, match=r"global_batch must be a multiple of 4 x 1 = 4"):
        loaders(folder, released_prompt, 2, 0, global_batch=6)
    with pytest.raises(UserError, match=r"8 shard\(s\) for 16 readers"):
        loaders(folder, released_prompt, 1, 0, global_batch=16, streams=16)


def test_a_stream_cursor_is_saved_at_step_boundaries_only_and_needs_every_rank(folder, released_prompt):
    loader = loaders(folder, released_prompt, 2, 0)[0]
    it = iter(loader)
    next(it)  # 1 of the rank's 4 micro-batches of the step
    with pytest.raises(RuntimeError, match="step boundary"):
        loader.state_dict()
    it.close()
    _, states = run(folder, released_prompt, 2, 0, 1)
    with pytest.raises(UserError, match=r"no saved cursor of stream\(s\) \[1, 3\]"):
        loaders(folder, released_prompt, 1, 0)[0].load_state_dict(states[:1])  # rank 1's streams are missing
    with pytest.raises(UserError, match="global_batch 8 -> 16"):
        loaders(folder, released_prompt, 1, 0, global_batch=16)[0].load_state_dict(states)
