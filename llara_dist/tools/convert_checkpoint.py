"""Convert a run's checkpoint for a resume on another number of ranks, ahead of time:
`llara-dist convert-checkpoint RUN [--tag stepNNNNNNNN] [--to-world N]`.

A start on another world size than the one that saved converts the latest checkpoint by itself
(rank 0, before the process group; the other ranks wait). For a large model that takes a while
(every parameter's fp32 weights and Adam moments are read and written once more, about 24 bytes
a parameter of disk on top), and this command does it beforehand, on any machine that sees
the run folder, with no GPU. It writes checkpoints/<tag>.universal (DeepSpeed's universal
checkpoint: per parameter, free of the world size) and changes nothing else. `--to-world`
checks that the run's global batch splits over N ranks (the files serve any N).
"""

from __future__ import annotations

import json
from pathlib import Path

from llara_dist.errors import UserError, integer_at_least


def configure(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--tag", help="checkpoint to convert (default: the latest)")
    parser.add_argument("--to-world", type=integer_at_least(1), metavar="N", help="check that the global batch splits over N ranks")
    parser.add_argument("--workers", type=integer_at_least(1), default=2, help="conversion processes (default: %(default)s)")


def run(args) -> int:
    from llara_dist.config import RunConfig, load_config
    from llara_dist.train.checkpoint import CheckpointManager
    from llara_dist.train.distributed import batch_plan

    config = Path(args.run) / "config.yaml"
    if not config.is_file():
        raise UserError(f"{args.run}: not a llara-dist run folder (no config.yaml)")
    cfg = load_config(RunConfig, config)
    manager = CheckpointManager(Path(args.run) / "checkpoints", cfg.train.keep_checkpoints, rank=0)
    tag = args.tag or manager.latest()
    if tag is None or not (manager.folder / tag).is_dir():
        raise UserError(f"{manager.folder}: no checkpoint {tag or '(latest)'} (complete: "
                        f"{', '.join(manager.complete()) or 'none'})")
    if args.to_world:
        plan = batch_plan(cfg.train.global_batch, cfg.train.micro_batch, args.to_world)
        print(f"{args.to_world} rank(s): micro_batch {plan.micro_batch} x grad_accum {plan.grad_accum} x world "
              f"{plan.world} = {plan.global_batch} rows a step")
    print(json.dumps({"universal": str(manager.to_universal(tag, workers=args.workers))}))
    return 0
