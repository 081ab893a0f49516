"""Checkpoints: the DeepSpeed engine state plus one named dict of loop state per rank.

Layout of `run_dir/checkpoints/` (must be on a filesystem all ranks share):

    latest                        the tag of the newest COMPLETE checkpoint (DeepSpeed's format)
    step00000500/                 engine state (DeepSpeed: model, optimizer partitions, scheduler)
        loop_state-rank00000.pt   {step, tokens, docs, rng, config, plan, data cursor} of rank 0
    step00001000.partial/         a save in progress, or one a crash interrupted
    step00000500.universal/       the same state in DeepSpeed's universal layout, per parameter and
                                  free of the world size: written to resume on another one

A save writes into `<tag>.partial`; when every rank has written its part (barrier),
rank 0 renames the folder to `<tag>` and then replaces `latest` atomically (write a
temporary file, fsync, rename). A crash or SIGKILL at any moment therefore leaves
`latest` naming the previous complete checkpoint; the next save removes what a crashed
one left. Only the last K complete ones are kept.

Resuming on another number of ranks goes through DeepSpeed's universal checkpoint: the
tag's state converted once (`to_universal`, one process, no process group; by itself at such
a resume, or ahead of it with `llara-dist convert-checkpoint`), then loaded by an engine built
with `checkpoint.load_universal`, which re-partitions fp32 weights, Adam moments and step
over the new ranks. The loop state (step, tokens, documents) is the same on every rank;
each rank takes its own RNG state where it existed before, rank 0's otherwise.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from llara_dist.errors import UserError

LATEST = "latest"
PARTIAL = ".partial"
UNIVERSAL = ".universal"
_TAG = re.compile(r"^step(\d{8})$")
# Test hook: SIGKILL this process after its engine state is written, before the checkpoint is complete.
KILL_DURING_SAVE_ENV = "LLARA_DIST_TEST_KILL_DURING_SAVE"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, folder: str | Path, keep: int, rank: int):
        self.folder = Path(folder)
        self.keep, self.rank = keep, rank

    def latest(self) -> str | None:
        """Tag of the newest complete checkpoint, or None for a fresh run."""
        path = self.folder / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.folder / tag).is_dir():
            raise UserError(f"{path} names {tag!r} but {self.folder / tag} does not exist")
        return tag

    def loop_state_path(self, tag: str, rank: int | None = None) -> Path:
        return self.folder / tag / f"loop_state-rank{self.rank if rank is None else rank:05d}.pt"

    def read_loop_state(self, tag: str, rank: int | None = None) -> dict:
        path = self.loop_state_path(tag, rank)
        if not path.is_file():
            raise UserError(f"{path}: checkpoint {tag!r} has no loop state for rank "
                                    f"{self.rank if rank is None else rank} (written by fewer ranks?)")
        return torch.load(path, map_location="cpu", weights_only=False)

    def save(self, engine, step: int, loop_state: dict) -> str:
        """Collective: every rank calls it. Returns the tag once the checkpoint is complete and `latest`."""
        import torch.distributed as dist

        tag = tag_of(step)
        partial = tag + PARTIAL
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob("*" + PARTIAL):  # left by crashed saves
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.folder), tag=partial, save_latest=False)
        torch.save(loop_state, self.loop_state_path(partial))
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()  # every rank's part is on disk
        if self.rank == 0:
            final = self.folder / tag
            if final.exists():  # the same step saved again (e.g. the end of a resumed, finished run)
                shutil.rmtree(final)
            os.replace(self.folder / partial, final)
            _atomic_write(self.folder / LATEST, tag)
            self._prune()
        dist.barrier()  # nobody exits (or gets killed by its launcher) before `latest` is updated
        return tag

    def load(self, engine, tag: str, saved_world: int, world: int) -> dict:
        """Engine state and this rank's loop state (RNG restored); on another world size than the one
        that saved, from the universal checkpoint (the engine built to read it), with the data cursors of
        all saving ranks in "data_all"."""
        resharded = saved_world != world
        path, _ = engine.load_checkpoint(str(self.folder), tag=tag + UNIVERSAL if resharded else tag)
        if path is None:
            raise UserError(f"{self.folder / tag}: DeepSpeed could not load this checkpoint")
        if resharded:
            from llara_dist import patches

            patches.unshare_adam_steps(engine)
        state = self.read_loop_state(tag, rank=self.rank if self.rank < saved_world else 0)
        set_rng_state(state["rng"])
        if resharded:
            state["data_all"] = [self.read_loop_state(tag, r)["data"] for r in range(saved_world)]
        return state

    def to_universal(self, tag: str, workers: int = 2) -> Path:
        """`<tag>.universal`: the checkpoint in DeepSpeed's universal layout (one process, CPU, no process
        group; complete or absent, as a save)."""
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        from llara_dist.quiet import quiet_stdout

        out, tmp = self.folder / (tag + UNIVERSAL), self.folder / (tag + UNIVERSAL + PARTIAL)
        if out.is_dir():
            return out
        shutil.rmtree(tmp, ignore_errors=True)
        with quiet_stdout():  # it narrates every file
            # inject_missing_state: ZeRO-1/2 checkpoints lack the info the converter asserts on
            ds_to_universal(argparse.Namespace(
                input_folder=str(self.folder / tag), output_folder=str(tmp), num_extract_workers=workers,
                num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                inject_missing_state=True))
        (self.folder / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer: we name tags
        os.replace(tmp, out)
        return out

    def complete(self) -> list[str]:
        """Complete checkpoint tags, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and _TAG.match(p.name))

    def _prune(self) -> None:
        current = self.latest()
        for tag in self.complete()[:-self.keep]:
            if tag != current:
                shutil.rmtree(self.folder / tag, ignore_errors=True)
                shutil.rmtree(self.folder / (tag + UNIVERSAL), ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
