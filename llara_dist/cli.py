"""`llara-dist` command line: one subcommand per job, each living in its own module.

Every module named below exposes `configure(parser)` (its arguments) and `run(args)`
(returns an exit status). Modules are imported only when their command runs, so
`llara-dist prep` does not pay for importing DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "prep": ("llara_dist.data.prep", "tokenize a raw corpus into webdataset shards + manifest"),
    "verify-shards": ("llara_dist.data.verify", "check shards against their manifest: size, sha256, documents, token ids"),
    "bench-data": ("llara_dist.tools.bench_data", "measure shard-to-packed-row throughput and fill"),
    "demo": ("llara_dist.demo", "run the whole pipeline on an embedded tiny default (CPU)"),
    "train": ("llara_dist.train.pretrain", "train with DeepSpeed ZeRO-3 or 2 (resumes from the run folder's latest checkpoint)"),
    "finetune": ("llara_dist.retrieval.finetune", "contrastive fine-tuning (query/passage groups, LoRA) on the trainer's machinery"),
    "doctor": ("llara_dist.tools.doctor", "check the attention kernel paths' parity on this machine (table, exit 1 on failure)"),
    "export": ("llara_dist.retrieval.export", "write a Hugging Face model folder from a run's checkpoint"),
    "encode": ("llara_dist.retrieval.encode", "embed passages or queries with an exported model into a .npy file"),
    "make-beir": ("llara_dist.retrieval.beir", "turn fine-tuning JSON lines into a small BEIR-layout retrieval set"),
    "eval": ("llara_dist.retrieval.evaluate", "retrieval metrics of an exported model on a BEIR-layout folder"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="llara-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help) in COMMANDS.items():
        sub.add_parser(name, help=help, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"llara-dist {name}", description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.configure(cmd)
    args = cmd.parse_intermixed_args(argv[1:])  # key=value overrides before and after --flags
    sys.exit(module.run(args) or 0)
