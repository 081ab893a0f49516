"""`llara-dist` command line: one subcommand per job, each living in its own module.

Every module named below exposes `configure(parser)` (its arguments) and `run(args)`
(returns an exit status). Modules are imported only when their command runs, so
`llara-dist prep` does not pay for importing DeepSpeed.

One error path for every command: a refusal (errors.UserError, or a file that cannot be
opened) prints `llara-dist CMD: message` and exits 2; Ctrl-C outside the training loop exits
130. Neither prints a traceback unless --debug or LLARA_DEBUG=1: tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from llara_dist.errors import UserError
from llara_dist.quiet import VERBOSE_ENV, quiet_third_party, verbose

COMMANDS = {
    "prep": ("llara_dist.data.prep", "tokenize a raw corpus into webdataset shards + manifest"),
    "verify-shards": ("llara_dist.data.verify", "check shards against their manifest: size, sha256, documents, token ids"),
    "bench-data": ("llara_dist.tools.bench_data", "measure shard-to-packed-row throughput and fill"),
    "demo": ("llara_dist.demo", "run the whole pipeline on an embedded tiny default (CPU)"),
    "train": ("llara_dist.train.pretrain", "train with DeepSpeed ZeRO-3 or 2 (resumes from the run folder's latest checkpoint)"),
    "finetune": ("llara_dist.retrieval.finetune", "contrastive fine-tuning (query/passage groups, LoRA) on the trainer's machinery"),
    "doctor": ("llara_dist.tools.doctor", "check the attention kernel paths' parity on this machine (table, exit 1 on failure)"),
    "init-model": ("llara_dist.tools.init_model", "write a small random LLaMA/Mistral/Qwen2 with a tokenizer, for smoke tests"),
    "convert-checkpoint": ("llara_dist.tools.convert_checkpoint",
                           "convert a run's checkpoint ahead of a resume on another number of ranks"),
    "export": ("llara_dist.retrieval.export", "write a Hugging Face model folder from a run's checkpoint"),
    "encode": ("llara_dist.retrieval.encode",
               "embed passages or queries with an exported model: one .npy, or a resumable folder of shards"),
    "search": ("llara_dist.retrieval.search", "search embedding shards with query embeddings (FAISS), into a TREC run"),
    "mine-negatives": ("llara_dist.retrieval.mine",
                       "replace fine-tuning lines' negatives with hard negatives the model ranks high"),
    "make-beir": ("llara_dist.retrieval.beir", "turn fine-tuning JSON lines into a small BEIR-layout retrieval set"),
    "eval": ("llara_dist.retrieval.evaluate", "retrieval metrics of an exported model on a BEIR-layout folder"),
    "status": ("llara_dist.tools.status", "a run's step, loss, speed, ETA, last checkpoint, preempted or finished"),
    "plot": ("llara_dist.tools.plot", "training curves of runs (loss and its terms, lr, tokens/s, fill) into one PNG"),
}

REFUSED_EXIT = 2
INTERRUPTED_EXIT = 130  # the shell's status for a process ended by SIGINT
BROKEN_PIPE_EXIT = 141  # ... and by SIGPIPE
DEBUG_ENV = "LLARA_DEBUG"
# Errors of the operating system that are the user's to fix; their message names the path.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _global_flags(argv: list[str]) -> list[str]:
    """Take out the flags every command accepts, wherever they stand: --debug, --verbose, and the
    --local_rank=N the `deepspeed` launcher appends (its rank is in LOCAL_RANK as well)."""
    rest, it = [], iter(argv)
    for a in it:
        if a == "--debug":
            os.environ[DEBUG_ENV] = "1"
        elif a == "--verbose":
            os.environ[VERBOSE_ENV] = "1"
        elif a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank"):
            os.environ.setdefault("LOCAL_RANK", next(it, "0"))
        else:
            rest.append(a)
    return rest


def _parser() -> argparse.ArgumentParser:
    from llara_dist import __version__

    parser = argparse.ArgumentParser(
        prog="llara-dist",
        description="Post-train a decoder LLM into a dense retriever with LLaRA (EBAE + EBAR), fine-tune it "
                    "contrastively and retrieve with it: prep -> train -> export -> encode / eval, with finetune "
                    "after export. On CPU, `llara-dist demo` runs it all on a tiny default.",
        epilog="Every command also takes --debug (tracebacks for refusals; or LLARA_DEBUG=1) and --verbose "
               "(third-party notices and progress bars). `llara-dist COMMAND --help` lists a command's options.")
    parser.add_argument("--version", action="version", version=f"llara-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help) in COMMANDS.items():
        sub.add_parser(name, help=help, add_help=False)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one command (a name in COMMANDS), its module imported and configured."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"llara-dist {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.configure(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = _global_flags(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _parser()
        if not argv:
            parser.print_help(sys.stderr)
            sys.exit(REFUSED_EXIT)
        parser.parse_args(argv)  # --help and --version exit 0; an unknown command exits 2
        sys.exit(REFUSED_EXIT)
    name = argv[0]
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if not verbose():
        quiet_third_party()
    try:
        args = command_parser(name).parse_intermixed_args(argv[1:])  # key=value overrides before and after --flags
        status = importlib.import_module(COMMANDS[name][0]).run(args) or 0
    except (UserError, *USER_OS_ERRORS) as e:
        if debug:
            raise
        print(f"llara-dist {name}: {e}", file=sys.stderr)
        sys.exit(REFUSED_EXIT)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nllara-dist {name}: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    except BrokenPipeError:  # `llara-dist eval ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail
        sys.exit(BROKEN_PIPE_EXIT)
    sys.exit(status)
