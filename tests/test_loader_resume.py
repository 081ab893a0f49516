"""PackedLoader: run k batches, save, restore into a FRESH loader, and get exactly the batches an
uninterrupted loader gives next (DataLoader workers 0 and 2, one and two simulated ranks)."""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import fields

import pytest
import torch

from llara_dist.config import DataConfig
from llara_dist.data.batch import PackedBatch
from llara_dist.data.loader import PackedLoader, _InSlot, _jsonable, _Slots

K, M = 7, 9  # batches before the save, batches compared after it (both cross an epoch)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, wiki_docs, write_test_shards):
    """5 documents a shard: readers' epochs end often."""
    return write_test_shards(tmp_path_factory.mktemp("shards"), wiki_docs[:30], 6)


def make(folder, prompt, *, workers=0, world=1, rank=0, micro_batch=2, **extra) -> PackedLoader:
    cfg = DataConfig(**{"shards": str(folder), "seq_len": 256, "num_workers": workers, "pack_buffer": 6,
                        "seed": 7, **extra})
    return PackedLoader(cfg, prompt, micro_batch=micro_batch, rank=rank, world=world, pad_id=3, drop_ids=(0, 1, 2, 3))


def take(loader: PackedLoader, n: int) -> list[PackedBatch]:
    it = iter(loader)
    out = list(itertools.islice(it, n))
    it.close()  # shuts the DataLoader workers down, with batches still prefetched
    return out


def assert_same(a: PackedBatch, b: PackedBatch) -> None:
    for f in fields(PackedBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert _jsonable(x) == _jsonable(y), f.name


@pytest.mark.parametrize("workers,world,rank", [(0, 1, 0), (2, 1, 0), (0, 2, 0), (0, 2, 1), (2, 2, 1)])
def test_resume_gives_the_same_next_batches(folder, released_prompt, workers, world, rank):
    def loader():
        return make(folder, released_prompt, workers=workers, world=world, rank=rank)

    straight = loader()
    expected = take(straight, K + M)
    first = loader()
    head = take(first, K)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    for a, b in zip(head, expected):
        assert_same(a, b)

    fresh = loader()
    fresh.load_state_dict(state)
    assert fresh.stats == first.stats
    tail = take(fresh, M)
    for a, b in zip(tail, expected[K:]):
        assert_same(a, b)
    assert fresh.stats == straight.stats
    assert fresh.stats["rows"] == 2 * (K + M)
    assert fresh.stats["docs"] == sum(b.num_docs for b in expected)
    assert max(b.cursor["epoch"] for b in expected) >= 1
    assert {b.reader for b in expected} == {rank * max(workers, 1) + j for j in range(max(workers, 1))}


@pytest.mark.parametrize("slots", ["shared", "too small", "no shared memory"])
def test_worker_hand_over_changes_nothing(folder, released_prompt, monkeypatch, slots):
    """One worker reads as reader 0 of 1, as the main process does with none: the same batches and
    cursors, whether they come through the shared-memory slots or (slots too small, or none to be
    had) the queue."""
    if slots == "too small":
        monkeypatch.setattr(PackedLoader, "_slot_bytes", lambda self: 64)
    if slots == "no shared memory":
        def full(self):
            raise RuntimeError("unable to write to file </torch_1_2_3>: No space left on device (28)")
        monkeypatch.setattr(torch.Tensor, "share_memory_", full)
    in_process = take(make(folder, released_prompt, workers=0), K + M)
    worker = make(folder, released_prompt, workers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = take(worker, K + M)
    assert any("no shared memory" in str(w.message) for w in caught) == (slots == "no shared memory")
    for a, b in zip(got, in_process, strict=True):
        assert_same(a, b)
        assert all(a.cursor["buffer"][k].dtype == b.cursor["buffer"][k].dtype for k in ("ids", "next", "lens"))
    assert max(b.cursor["epoch"] for b in in_process) >= 1


def test_slot_reuse_beyond_the_prefetch_is_an_error(folder, released_prompt):
    """A slot rewritten before the trainer copied it out (more batches in flight than the slots)
    is refused, never read as a mix of two batches."""
    batches = take(make(folder, released_prompt), _Slots.COUNT + 1)
    slots = _Slots(1 << 16)
    sent = [slots.put(b) for b in batches]  # the last one overwrites the first one's slot
    assert all(isinstance(item, _InSlot) for item in sent)
    assert_same(slots.take(sent[-1]), batches[-1])
    with pytest.raises(RuntimeError, match=f"slot of batch 0 holds batch {_Slots.COUNT}.*prefetch_factor"):
        slots.take(sent[0])


def test_cursor_from_another_setup_refused(folder, released_prompt):
    loader = make(folder, released_prompt, world=2, rank=0)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError) as e:
        make(folder, released_prompt, world=1, rank=0).load_state_dict(state)
    msg = str(e.value)
    assert "world 2 -> 1" in msg and "data.reset_cursor=true" in msg and "not re-split" in msg

    workers = make(folder, released_prompt, workers=2, world=1)
    take(workers, 1)
    with pytest.raises(ValueError, match=r"num_workers 2 -> 0.*data\.reset_cursor=true"):
        make(folder, released_prompt, workers=0, world=1).load_state_dict(workers.state_dict())

    reset = make(folder, released_prompt, world=1, rank=0, reset_cursor=True)
    reset.load_state_dict(state)  # ignored: the data order starts afresh
    assert_same(take(reset, 1)[0], take(make(folder, released_prompt, world=1), 1)[0])


def test_every_document_once_per_epoch_across_readers(folder, released_prompt, wiki_docs):
    """Two ranks x two workers; one document per row so the consumed order is the read order."""
    loaders = [make(folder, released_prompt, workers=2, world=2, rank=r, micro_batch=1, pack_buffer=1) for r in (0, 1)]
    its = [iter(lo) for lo in loaders]
    epoch0, epochs = [], {}
    while len(epochs) < 4 or min(epochs.values()) < 1:
        for it in its:  # the ranks step together
            batch = next(it)
            epochs[batch.reader] = batch.cursor["epoch"]
            if batch.cursor["epoch"] == 0:
                epoch0 += batch.keys
    for it in its:
        it.close()
    assert sorted(epoch0) == sorted(k for k, *_ in wiki_docs[:30])


def test_too_few_shards_refused(folder, released_prompt):
    with pytest.raises(ValueError, match=r"6 shard\(s\) for 8 readers"):
        make(folder, released_prompt, workers=4, world=2)


def test_bench_data_prints_one_json_line(folder, tokenizer_dir, capsys):
    """The benchmark command end to end on a tiny budget (its figures are not checked: speed
    is measured by running it, see docs/performance.md)."""
    from llara_dist.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench-data", "--shards", str(folder), "--tokenizer", str(tokenizer_dir), "--seq-len", "256",
              "--workers", "0", "--rows", "8", "--micro-batch", "2", "--baseline-docs", "6", "--repeat", "3"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["rows"] >= 3 * 8 and out["baseline_docs"] == 6 and out["text_tokens"] > 0
    assert 0 < out["fill"] <= 1 and 0 < out["baseline_fill"] <= 1
    assert {"cpu_tokens_per_s", "baseline_cpu_tokens_per_s", "cpu_speedup"} <= set(out)  # None on so tiny a run
    ratios = sorted(x / y for x, y in out["rounds"])
    assert len(ratios) == 3 and out["speedup"] == pytest.approx(ratios[1], abs=0.05)
