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

Ctrl-C (SIGINT) is a preemption the user asks for: the first press saves at the next step
boundary and exits with 42 as above; a second press raises KeyboardInterrupt at once (the
command line reports "interrupted" and exits 130; the last complete checkpoint stands).

Rank 0 also leaves `run_dir/PREEMPTED` (the saved step) once that checkpoint is complete,
and removes it when a run starts in the folder. A launcher that does not pass the exit
status on (torchrun reports any failed rank as its own status 1) can tell "preempted,
requeue me" from a crash by it: launch/torchrun.sh turns its failure into 42 then.

For tests, LLARA_DIST_TEST_PREEMPT_AT_STEP=N makes a process raise SIGUSR1 in itself at the
end of optimizer step N (Preemption.step_done): a signal sent from outside lands at a step
that depends on the machine's speed, and a short run can end before it arrives.
LLARA_DIST_TEST_PREEMPT_SIGNALS=SIGINT,SIGINT raises those instead, one after the other.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

PREEMPTED_EXIT = 42
PREEMPTED_MARKER = "PREEMPTED"  # in the run folder; the launch scripts use the same name
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPT_AT_STEP_ENV = "LLARA_DIST_TEST_PREEMPT_AT_STEP"
PREEMPT_SIGNALS_ENV = "LLARA_DIST_TEST_PREEMPT_SIGNALS"


def mark_preempted(run_dir: Path, step: int) -> None:
    """After the preemption save: `run_dir/PREEMPTED` holds the step (written whole, then renamed)."""
    tmp = Path(run_dir) / f"{PREEMPTED_MARKER}.tmp"
    tmp.write_text(f"{step}\n")
    os.replace(tmp, Path(run_dir) / PREEMPTED_MARKER)


def clear_preempted(run_dir: Path) -> None:
    """A run starts: the folder no longer stands for a stopped, resumable run."""
    (Path(run_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)


class Preemption:
    def __init__(self, signals=SIGNALS):
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self.handler) for s in signals}
        at = os.environ.get(PREEMPT_AT_STEP_ENV, "")
        self._signal_at_step = int(at) if at else None
        names = os.environ.get(PREEMPT_SIGNALS_ENV, "") or "SIGUSR1"
        self._test_signals = [signal.Signals[n.strip()] for n in names.split(",")]

    def handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested:  # the second press: stop now, whatever is running
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":  # every rank of the terminal's process group gets it
                os.write(2, b"\nCtrl-C: saving at the end of this step, then exiting; press Ctrl-C again to "
                            b"abort at once (losing the steps since the last checkpoint)\n")
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    @property
    def interrupted(self) -> bool:
        """The stop was the user's Ctrl-C rather than a scheduler's signal."""
        return self.signal_name == "SIGINT"

    def step_done(self, step: int) -> None:
        """Optimizer step `step` is complete. At the step PREEMPT_AT_STEP_ENV names, a real SIGUSR1 to
        this thread: its handler has run when this returns (raise_signal delivers to the calling
        thread, then runs the Python handlers), so the next should_stop() sees it as it would see
        a scheduler's signal that arrived just then."""
        if step == self._signal_at_step:
            for s in self._test_signals:
                signal.raise_signal(s)

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
