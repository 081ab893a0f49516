"""The one error a user can fix: bad input, a refused configuration, a missing file.

Raised anywhere, it reaches the command line (cli.main), which prints `llara-dist CMD: message`
and exits 2 without a traceback. The message names the file, the record and the reason.
"""


class UserError(ValueError):
    """A refusal: what the user gave cannot be used; the message says why and what to do.
    (A ValueError: the value given is the problem, and callers that catch ValueError still do.)"""


def existing_path(path, what: str):
    """`path` as a Path if it exists, else a refusal naming it and what it should have been. Every
    model and tokenizer here is local: without this check, Hugging Face would take a mistyped
    folder for a Hub repository name and answer with a message about repository ids."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not str(path) or not p.exists():
        raise UserError(f"{path or '(empty)'}: no such {what}")
    return p


def integer_at_least(minimum: int):
    """An argparse `type` for a count option: an integer of at least `minimum`. argparse refuses
    anything else with the option's name (exit 2, no traceback)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    parse.__name__ = f"integer of at least {minimum}"
    return parse
