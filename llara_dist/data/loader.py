"""The loader the trainer uses: shards -> packed micro-batches, resumable exactly.

    loader = PackedLoader(cfg.data, prompt, micro_batch=8, rank=rank, world=world, pad_id=pad_id)
    loader.load_state_dict(saved)         # optional, before iterating
    for batch in loader:                  # endless; every batch has micro_batch rows
        ...
        saved = loader.state_dict()       # the cursor of everything consumed so far

Each rank runs W = max(num_workers, 1) readers (stream.Reader), one per DataLoader
worker (or one in the main process when num_workers == 0); each reader feeds its
own Packer and makes whole batches, which carry the reader's cursor after them.
Workers hand their batches to the trainer process through shared-memory slots (_Slots).
torch's DataLoader takes batches from its workers strictly round robin from worker 0,
so the loader keeps, per reader, the cursor of the last batch it handed out, and
which reader is next; on restore worker j becomes reader (j + next) % W and the
sequence goes on exactly. Prefetched but unconsumed batches never count.

A cursor belongs to one world size, rank, worker count, seed and manifest; another
one is refused (documents would be lost or repeated), and `data.reset_cursor=true`
starts the data order afresh instead. seq_len, pack_buffer and the prompt may
change on resume: no document is lost, the rows just differ from then on.

With `data.streams = S > 0` the readers are S logical streams instead, fixed for the run:
stream s reads its shards (every S-th, as a reader does) and packs its own rows, and every
optimizer step takes G / S rows (`turn` micro-batches) from each stream. Rank r serves streams
r, r + world, r + 2 world, ... and its workers split them. A micro-batch is then rows of one
stream, the same micro-batches make a step whatever the world size and worker count, and the
cursor is the streams' own: states saved by the ranks of one world size restore onto another
(`load_state_dict` takes them all). Such a cursor is whole only at a step boundary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from llara_dist.config import DataConfig
from llara_dist.data.batch import PackedBatch, build_batch
from llara_dist.data.pack import Packer
from llara_dist.data.stream import Reader, ShardSet
from llara_dist.errors import UserError
from llara_dist.prompts import PromptTokens

STATE_VERSION = 1
_COUNTERS = ("rows", "docs", "text_tokens", "real_tokens", "slots", "truncated")


class ReaderBatches:
    """One reader and its packer, as an endless stream of batches carrying their cursor."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, prompt: PromptTokens, *, micro_batch: int,
                 reader: int, num_readers: int, pad_id: int, drop_ids: tuple[int, ...] = (),
                 cursor: dict | None = None):
        cursor = cursor or {}
        self.cfg, self.prompt, self.micro_batch = cfg, prompt, micro_batch
        self.pad_id, self.drop_ids, self.reader_id = pad_id, tuple(drop_ids), reader
        self.reader = Reader(shards, cfg.seed, reader, num_readers, cursor)
        self.packer = Packer(cfg.seq_len, prompt.overhead, cfg.pack_buffer)
        if "buffer" in cursor:
            self.packer.load(cursor["buffer"])
        self.counters = {k: int(cursor.get("counters", {}).get(k, 0)) for k in _COUNTERS}

    def cursor(self) -> dict:
        return {"reader": self.reader_id, **self.reader.cursor(), "counters": dict(self.counters),
                "buffer": self.packer.state()}

    def __iter__(self) -> Iterator[PackedBatch]:
        docs = iter(self.reader)
        packer, max_text = self.packer, self.packer.max_text
        while True:
            rows = []
            for _ in range(self.micro_batch):
                while not packer.full:
                    packer.add(next(docs))
                rows.append(packer.pop_row())
            batch = build_batch(rows, self.prompt, self.cfg.seq_len, self.pad_id, self.drop_ids)
            c = self.counters
            c["rows"] += batch.rows
            c["docs"] += batch.num_docs
            c["text_tokens"] += batch.text_tokens()
            c["real_tokens"] += batch.real_tokens()
            c["slots"] += batch.input_ids.numel()
            c["truncated"] += sum(len(d.ids) > max_text for row in rows for d in row)
            batch.reader, batch.cursor = self.reader_id, self.cursor()
            yield batch


class _WorkerReaders(torch.utils.data.IterableDataset):
    """DataLoader worker j runs the readers of group (j + first) % W of this rank and hands its
    batches over through that group's shared-memory slots."""

    def __init__(self, make, first: int, workers: int, slots: list["_Slots"]):
        self.make, self.first, self.workers, self.slots = make, first, workers, slots

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        j = info.id if info is not None else 0
        local = (j + self.first) % self.workers
        for batch in self.make(local):
            yield self.slots[local].put(batch)


def _convert(batch: PackedBatch, fn) -> PackedBatch:
    """Apply fn to every array field."""
    return PackedBatch(**{name: fn(getattr(batch, name)) if name in _ARRAYS else getattr(batch, name)
                          for name in _FIELDS})


_FIELDS = tuple(f.name for f in fields(PackedBatch))
_ARRAYS = {f.name for f in fields(PackedBatch) if f.type in ("torch.Tensor", torch.Tensor)}
_PREFETCH = 2  # DataLoader prefetch_factor: batches a worker may run ahead of the trainer


class _Slots:
    """Shared memory through which one DataLoader worker hands its batches' arrays to the trainer.

    Through torch's queue a ~350 KB batch costs 0.4-0.7 ms of CPU more than its ~4 KB of
    metadata (pickling, a pipe in 64 KB pieces, unpickling: docs/performance-record.md); here the
    worker copies batch n's arrays (the cursor's buffer included) into slot n % S, the queue
    carries where they lie, and the trainer copies them out. The DataLoader sends a worker
    the request for its batch n only after the trainer took its batch n - _PREFETCH, and the
    trainer copies each batch out before it asks for the next: batch n - _PREFETCH - 1 is out
    before n is written, so S = _PREFETCH + 1 slots need no lock. Each slot's header says which
    batch it holds (-1 while written), and the trainer checks it before and after its copy,
    so a reuse that breaks this reasoning is an error, never a silent mix. A batch larger
    than a slot goes through the queue as numpy arrays instead (torch would ship each
    tensor through a shared-memory file of its own, ~0.5 ms apiece).
    """

    COUNT, HEADER = _PREFETCH + 1, 8

    def __init__(self, nbytes: int):
        self.nbytes = nbytes  # per slot, header included; 0: none, every batch goes through the queue
        self.mem = torch.zeros(self.COUNT * nbytes, dtype=torch.uint8).share_memory_() if nbytes else None
        self.sent = 0  # batches put (worker side)

    @classmethod
    def for_workers(cls, workers: int, nbytes: int) -> list["_Slots"]:
        try:
            return [cls(nbytes) for _ in range(workers)]
        except RuntimeError as e:  # /dev/shm full or small (containers default to 64 MB)
            warnings.warn(f"loader: no shared memory for the batch hand-over ({e}); "
                          "batches go through the DataLoader's queue, slower")
            return [cls(0) for _ in range(workers)]

    def _slot(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        mem = self.mem.numpy()[(n % self.COUNT) * self.nbytes:][:self.nbytes]
        return mem[:self.HEADER].view(np.int64), mem[self.HEADER:]

    def put(self, batch: PackedBatch):
        """Worker side: the batch's arrays into the next slot; what the queue carries."""
        arrays = {name: getattr(batch, name).numpy() for name in _ARRAYS}
        buffer = batch.cursor["buffer"]
        arrays.update({("buffer", k): v for k, v in buffer.items() if isinstance(v, np.ndarray)})
        layout, at = [], 0
        for key, a in arrays.items():
            at = -(-at // 8) * 8  # every array 8-byte aligned
            layout.append((key, a.dtype, a.shape, at, a.nbytes))
            at += a.nbytes
        if at > self.nbytes - self.HEADER:
            return _convert(batch, torch.Tensor.numpy)
        n, self.sent = self.sent, self.sent + 1
        header, data = self._slot(n)
        header[0] = -1
        for (_, _, _, start, size), a in zip(layout, arrays.values()):
            data[start:start + size] = a.reshape(-1).view(np.uint8)
        header[0] = n
        rest = {k: v for k, v in buffer.items() if not isinstance(v, np.ndarray)}
        bare = PackedBatch(**{name: None if name in _ARRAYS else getattr(batch, name) for name in _FIELDS})
        bare.cursor = {**batch.cursor, "buffer": rest}
        return _InSlot(n, layout, bare)

    def take(self, item) -> PackedBatch:
        """Trainer side: the batch, as tensors that own their memory."""
        if not isinstance(item, _InSlot):
            return _convert(item, torch.from_numpy)
        header, data = self._slot(item.n)
        if header[0] != item.n:
            raise RuntimeError(f"loader: shared-memory slot of batch {item.n} holds batch {header[0]}: "
                               "the DataLoader ran further ahead than its prefetch_factor allows")
        arrays = {key: data[start:start + size].view(dtype).reshape(shape).copy()
                  for key, dtype, shape, start, size in item.layout}
        if header[0] != item.n:
            raise RuntimeError(f"loader: shared-memory slot of batch {item.n} was rewritten while read")
        batch = item.batch
        for name in _ARRAYS:
            setattr(batch, name, torch.from_numpy(arrays.pop(name)))
        batch.cursor["buffer"].update({k: v for (_, k), v in arrays.items()})
        return batch


class _InSlot:
    """What the queue carries for a batch in a slot: its number, its arrays' layout, the rest."""

    def __init__(self, n: int, layout: list, batch: PackedBatch):
        self.n, self.layout, self.batch = n, layout, batch

    @property
    def reader(self) -> int:
        return self.batch.reader


def _as_is(x):
    return x


@dataclass(frozen=True)
class ReaderPlan:
    """Which readers a rank runs: `groups[j]` are the reader ids worker j runs, taking `turn`
    batches from each in turn; reader ids are global reader numbers out of `num_readers`."""

    groups: tuple[tuple[int, ...], ...]
    num_readers: int
    turn: int
    streams: bool  # logical streams (data.streams), not one reader per rank and worker


def reader_plan(cfg: DataConfig, shards: ShardSet, *, global_batch: int | None, micro_batch: int, rank: int,
                world: int) -> ReaderPlan:
    """The rank's readers; a split that cannot work is refused with its arithmetic."""
    workers = max(cfg.num_workers, 1)
    S = cfg.streams
    if not S:
        shards.check_readers(world * workers, world, workers)
        return ReaderPlan(tuple((rank * workers + j,) for j in range(workers)), world * workers, 1, False)
    if global_batch is None:
        raise ValueError("data.streams needs the global batch")
    problems = []
    if S % world:
        problems.append(f"data.streams={S} cannot be shared evenly by {world} ranks: start a number of ranks "
                        f"that divides {S}")
    elif (S // world) % workers:
        problems.append(f"each of the {world} ranks serves {S // world} streams, which its data.num_workers="
                        f"{cfg.num_workers} DataLoader workers cannot share evenly: set data.num_workers to a "
                        f"divisor of {S // world}")
    if global_batch % (S * micro_batch):
        problems.append(f"train.global_batch={global_batch} rows a step from data.streams={S} streams in "
                        f"micro-batches of {micro_batch} (train.micro_batch): each stream gives "
                        f"global_batch / streams rows a step, in whole micro-batches, so global_batch must be a "
                        f"multiple of {S} x {micro_batch} = {S * micro_batch}")
    if problems:
        raise UserError("cannot split the data:\n  - " + "\n  - ".join(problems))
    shards.check_readers(S, world, workers)
    mine = tuple(range(rank, S, world))
    return ReaderPlan(tuple(mine[j::workers] for j in range(workers)), S, global_batch // (S * micro_batch), True)


class PackedLoader:
    def __init__(self, cfg: DataConfig, prompt: PromptTokens, *, micro_batch: int, rank: int, world: int,
                 pad_id: int, drop_ids: tuple[int, ...] = (), pin_memory: bool | None = None,
                 vocab_size: int | None = None, global_batch: int | None = None):
        """`vocab_size`: every token id read must be below it (default: the manifest's vocabulary size).
        `global_batch`: rows per optimizer step of all ranks (needed with data.streams)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.cfg, self.prompt, self.micro_batch = cfg, prompt, micro_batch
        self.rank, self.world, self.pad_id, self.drop_ids = rank, world, pad_id, tuple(drop_ids)
        self.global_batch = global_batch
        self.workers = max(cfg.num_workers, 1)
        self.shards = ShardSet.open(cfg.shards, vocab_size)
        self.plan = reader_plan(cfg, self.shards, global_batch=global_batch, micro_batch=micro_batch, rank=rank,
                                world=world)
        self._worker_of = {r: j for j, group in enumerate(self.plan.groups) for r in group}
        self._cursors: dict[int, dict | None] = dict.fromkeys(self._worker_of)  # per reader, last consumed
        self._next = 0  # worker whose batch comes next
        self._taken = 0  # batches handed out (streams: a cursor is whole at a step boundary only)
        # page-locked batches: a non_blocking copy to the GPU then leaves the host free (default: on CUDA)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def _setup(self) -> dict:
        """What a cursor is tied to."""
        if self.plan.streams:  # a stream packs row by row: its cursor at a step boundary is free of the micro-batch
            return {"streams": self.cfg.streams, "global_batch": self.global_batch, "seed": self.cfg.seed,
                    "manifest": self.shards.fingerprint}
        return {"world": self.world, "rank": self.rank, "num_workers": self.cfg.num_workers,
                "seed": self.cfg.seed, "manifest": self.shards.fingerprint}

    def _slot_bytes(self) -> int:
        """Room for a batch of micro_batch x seq_len tokens with plenty to spare: its per-token
        arrays take 29 bytes a token, its target sets and the packer's buffer usually less than
        as much again. A larger batch goes through the queue instead."""
        return 96 * self.micro_batch * self.cfg.seq_len

    def _group_batches(self, local: int) -> Iterator[PackedBatch]:
        """The batches of worker `local`'s readers: `turn` from each in turn."""
        readers = [iter(ReaderBatches(self.shards, self.cfg, self.prompt, micro_batch=self.micro_batch, reader=r,
                                      num_readers=self.plan.num_readers, pad_id=self.pad_id, drop_ids=self.drop_ids,
                                      cursor=self._cursors[r]))
                   for r in self.plan.groups[local]]
        while True:
            for reader in readers:
                for _ in range(self.plan.turn):
                    yield next(reader)

    def __iter__(self) -> Iterator[PackedBatch]:
        if self.cfg.num_workers == 0:
            source = self._group_batches(0)
        else:
            slots = _Slots.for_workers(self.workers, self._slot_bytes())
            readers = _WorkerReaders(self._group_batches, self._next, self.workers, slots)
            loader = torch.utils.data.DataLoader(readers, batch_size=None, num_workers=self.workers,
                                                 collate_fn=_as_is, prefetch_factor=_PREFETCH)
            source = (slots[self._worker_of[b.reader]].take(b) for b in loader)
        if self.pin_memory:
            source = (_convert(b, torch.Tensor.pin_memory) for b in source)
        try:
            for batch in source:
                self._cursors[batch.reader] = batch.cursor
                self._next = (self._worker_of[batch.reader] + 1) % self.workers
                self._taken += 1
                yield batch
        except UserError as e:
            raise UserError(_own_message(e)) from None

    def state_dict(self) -> dict:
        if self.plan.streams:
            per_step = self.global_batch // (self.world * self.micro_batch)  # this rank's batches a step
            if self._taken % per_step:
                raise RuntimeError(f"loader: a stream cursor is whole at a step boundary only ({self._taken} "
                                   f"batches taken, {per_step} a step)")
            return {"version": STATE_VERSION, "setup": self._setup(), "next": 0,
                    "streams": {str(s): _jsonable(c) for s, c in self._cursors.items()}}
        return {"version": STATE_VERSION, "setup": self._setup(), "next": self._next,
                "readers": _jsonable(list(self._cursors.values()))}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """A state this loader's rank saved; with data.streams, the states of all ranks of the saving run
        (a list), whatever its world size."""
        if self.cfg.reset_cursor:
            return  # data.reset_cursor=true: the data order starts afresh
        states = state if isinstance(state, list) else [state]
        if not states or any(not isinstance(s, dict) or s.get("version") != STATE_VERSION for s in states):
            raise UserError(f"data cursor: not a version-{STATE_VERSION} PackedLoader state")
        if self.plan.streams or "streams" in states[0]:
            self._load_streams(states)
            return
        state = states[0]
        self._check_setup(state["setup"], "a cursor is not re-split across world sizes, ranks, worker counts, seeds "
                                          "or manifests (documents would be lost or repeated)")
        self._cursors = {r: None if c is None else dict(c) for r, c in zip(self._cursors, state["readers"])}
        self._next = int(state["next"])

    def _check_setup(self, saved: dict, why: str) -> None:
        """Refuse a cursor saved under another setup (_setup's keys: what it is tied to), saying `why`."""
        now = self._setup()
        diff = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if diff:
            raise UserError(f"data cursor: saved under another data setup ({', '.join(diff)}); {why}. Resume with "
                            f"the saved setup, or set data.reset_cursor=true to restart the data order from the "
                            f"beginning")

    def _load_streams(self, states: list[dict]) -> None:
        self._check_setup(states[0]["setup"], "with logical streams the world size, worker count and micro-batch may "
                                              "change, not the streams, the global batch, the seed or the manifest")
        cursors = {int(s): c for state in states for s, c in state["streams"].items()}
        missing = [s for s in self._cursors if s not in cursors]
        if missing:
            raise UserError(f"data cursor: no saved cursor of stream(s) {missing}: the states of every rank "
                            f"that saved are needed")
        self._cursors = {s: None if cursors[s] is None else dict(cursors[s]) for s in self._cursors}
        self._next = 0

    @property
    def stats(self) -> dict:
        """Counters of everything consumed since the data began (carried through resumes)."""
        total = {k: 0 for k in _COUNTERS}
        for c in self._cursors.values():
            for k in _COUNTERS:
                total[k] += c["counters"][k] if c else 0
        slots = total.pop("slots")
        total["fill"] = total.pop("real_tokens") / slots if slots else 0.0
        return total


def _jsonable(x):
    """Arrays to lists, recursively (batch cursors keep the packer's buffer as arrays)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x.tolist() if isinstance(x, np.ndarray) else x


def _own_message(e: UserError) -> str:
    """A refusal raised in a DataLoader worker comes back with the worker's traceback in its message
    (torch's ExceptionWrapper: "Caught UserError in DataLoader worker process 0. Original Traceback
    ... UserError: <message>"): the user is owed the message alone."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    return text.rpartition(f"{UserError.__module__}.{UserError.__name__}: ")[2].rstrip("\n")
