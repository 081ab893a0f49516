"""Quiet by default: third-party notices a user cannot act on stay hidden unless --verbose.

transformers' informational warnings (e.g. the `mean_resizing` notice when the preset's tokens are
added), DeepSpeed's info-level log lines and every library's progress bars. Warnings and errors of
our own, and third-party errors, still print.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

VERBOSE_ENV = "LLARA_VERBOSE"
# Deprecation notices raised inside the libraries (e.g. peft asking transformers for a renamed
# attribute at every LoRA run): news for their maintainers, nothing a user can change.
THIRD_PARTY_MODULES = r"(transformers|peft|deepspeed|torch|accelerate|huggingface_hub|safetensors)(\.|$)"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_third_party() -> None:
    """Before the libraries load (they read these at import); child processes inherit them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:  # already imported: its settings were read then
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").addFilter(_not_cpu_fallback_notice)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_MODULES)


def _not_cpu_fallback_notice(record: logging.LogRecord) -> bool:
    """DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to
    detect it.", a warning printed at its import (transformers imports it for every model) on any
    machine without CUDA: there the CPU is the expected choice, and it is not worth a line each command."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


@contextlib.contextmanager
def quiet_stdout():
    """Swallow what a library prints to stdout (e.g. DeepSpeed's checkpoint conversion narrates
    each file it reads), unless --verbose."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
