"""Preemption: a signal only sets a flag; the ranks agree at a step boundary, save, and exit.

    PREEMPTED_EXIT = 42      # "preempted, checkpoint saved, requeue me"

SIGTERM (what SLURM and most schedulers send before a kill) and SIGUSR1 (what
`#SBATCH --signal=USR1@120` or `scancel --signal=USR1` sends) call `Preemption.handler`,
which does nothing but set a flag, so no save, collective or file write is ever
interrupted half-way, and a second signal during the save only sets the flag again.
At each step boundary `should_stop()` all-reduces the flag (MAX): a signal seen by any
rank stops all ranks at the same step.

Prefer SIGUSR1 when the signal reaches DataLoader workers too (a process-group kill):
torch's workers die on SIGTERM, but inherit this handler for SIGUSR1.
"""

from __future__ import annotations

import signal

import torch

PREEMPTED_EXIT = 42
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self, signals=SIGNALS):
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self.handler) for s in signals}

    def handler(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, device=None) -> bool:
        """True on every rank if any rank got a signal (one all-reduce)."""
        import torch.distributed as dist

        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def ignore_from_now(self) -> None:
        """After the last save: a late signal must not kill the process during its shutdown
        (Python restores the default handlers while finalizing), which would turn the
        documented exit status into 'killed by SIGTERM'."""
        for s in self._previous:
            signal.signal(s, signal.SIG_IGN)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h)
