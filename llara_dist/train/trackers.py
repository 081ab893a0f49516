"""Metric trackers beside metrics.jsonl, each off unless `train.trackers` names it.

    train.trackers=[tensorboard]        run_dir/tensorboard/ (pip install 'llara-dist[tensorboard]')
    train.trackers=[tensorboard,wandb]  also Weights & Biases (pip install 'llara-dist[wandb]')

Rank 0 feeds them through train.metrics.MetricsLog: `log(step, scalars)` once per step with the
numeric columns of the metrics.jsonl row, `close()` at the end. A tracker asked for whose package
is missing is refused when the run starts (`check_installed`), not after the model has loaded.

TensorBoard: a resumed run purges the events of the steps after its checkpoint (they are redone),
as metrics.jsonl drops their rows. Weights & Biases: one W&B run per start, named after the run
folder, in project `train.wandb_project`; W&B accepts no step below one it has seen, so a resumed
start could not redo the steps a crash lost in the same W&B run. WANDB_MODE=offline keeps it on
disk (`wandb sync` uploads it later), under WANDB_DIR if set, else in the run folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from llara_dist.errors import UserError


class TensorBoardTracker:
    package = "tensorboard"

    def __init__(self, run_dir: Path, resume_step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of a step >= it that an earlier start wrote are hidden from readers
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    package = "wandb"

    def __init__(self, run_dir: Path, resume_step: int, config: dict):
        import wandb

        # console="off": W&B would otherwise wrap stderr, where the trainer's own lines go
        settings = wandb.Settings(console="off", quiet=True)
        self.run = wandb.init(project=config["train"]["wandb_project"], name=run_dir.name, config=config,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), settings=settings)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}  # config.TrainConfig.check lists the names


def check_installed(names: list[str]) -> None:
    """Refuse trackers whose package is not installed (found, not imported: importing wandb takes a second)."""
    missing = [name for name in names if importlib.util.find_spec(TRACKERS[name].package) is None]
    if missing:
        raise UserError("train.trackers: " + "; ".join(
            f"{name} is asked for but the {TRACKERS[name].package} package is not installed: "
            f"pip install 'llara-dist[{name}]'" for name in missing))


def open_trackers(names: list[str], run_dir: Path, resume_step: int, config: dict) -> list:
    """The trackers `names` asks for, each named once, ready to log."""
    return [TRACKERS[name](Path(run_dir), resume_step, config) for name in dict.fromkeys(names)]
