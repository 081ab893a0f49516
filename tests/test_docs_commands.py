"""The docs cannot drift from the code: every command line in README.md and docs/*.md (and in what
`--help` shows, the command modules' docstrings, and in the headers of configs/) goes through the real
argument parser of its command.

A doc's commands are its code lines (fenced or indented blocks; `\\` continuations joined, a synopsis's
`[...]` continuation lines too) and its inline `code` spans. Each line is split as the shell would
(leading VAR=value assignments kept aside, `# comments` dropped, `&&`/`;` chains cut into commands):

- `llara-dist CMD ...`, `python -m llara_dist CMD ...`, `deepspeed/torchrun ... -m|--module llara_dist
  CMD ...`: CMD is a command of cli.COMMANDS and every --flag is one of its options (the values of
  flags with choices or a type checked too, `a|b|{a,b}` alternatives each). A complete code line is
  parsed by the command's parser exactly as cli.main builds it (cli.command_parser); a synopsis (`[...]`,
  `PATH...`, `a|b`) or an inline span is checked by its flags only, but `train` and `finetune` are
  always parsed: their key=value overrides must name real config keys with values of the right
  type, and a `--config configs/X.yaml` must load.
- `launch/*.sh` and `sbatch launch/train.sbatch`: the script exists; the arguments a script hands
  its trainer ("$@" after ENTRY, or after the sbatch script's CMD with `--config $CONFIG`) parse as
  that command's arguments.
- `make X`: X is a target of the Makefile.

Nothing is skipped silently: per file, the commands checked are at least those a plain regular
expression finds in the raw text, so a new doc line cannot escape. Besides: every repository path
a doc names exists, and docs/architecture.md names every module of the package.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llara_dist.cli import COMMANDS, command_parser
from llara_dist.config import ConfigError, FinetuneRunConfig, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_CLASSES = {"train": RunConfig, "finetune": FinetuneRunConfig}
# Set by a run config file of the user's own (`--config ft.yaml`), which a doc line cannot show.
KEYS_OF_OWN_FILE = ("finetune.data",)
GLOBAL_FLAGS = ("--debug", "--verbose")  # cli._global_flags takes them out before any command parses
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.\.\.)?$")  # FILE, DIR, N, PATH...
CHAIN = {"&&", "||", ";", "|"}  # `|` outside brackets: inside, it separates a synopsis's alternatives

# The independent count: plain regular expressions over a doc's raw text.
COMMAND_NAMES = "|".join(sorted(map(re.escape, COMMANDS), key=len, reverse=True))
GREP = {
    "llara-dist": re.compile(rf"(?:llara-dist|llara_dist) (?:{COMMAND_NAMES})(?![\w-])"),
    "make": re.compile(r"(?<![\w-])make [a-z][\w-]*"),
    # a launch script starting a line or an inline span (after VAR=value and sbatch options), with arguments
    "launch": re.compile(r"(?:^[ \t]*|`)(?:[A-Z_]+=(?:\"[^\"]*\"|\S+) +)*(?:sbatch +(?:--\S+ +)*)?"
                         r"launch/[\w/.-]+\.(?:sh|sbatch)(?= +[^\s`#])", re.MULTILINE),
}
REPO_PATH = re.compile(r"(?<![\w./-])(?:launch|bench|configs|hostfiles|tests|llara_dist|kernels|docs)/[\w./*-]*")


@dataclass
class Report:
    """What one doc's lines gave: problems, and how many commands of each kind were checked."""

    doc: str
    problems: list[str] = field(default_factory=list)
    checked: Counter = field(default_factory=Counter)


# --- reading a doc ---------------------------------------------------------------------------------


def code_and_prose(text: str) -> tuple[list[tuple[int, str]], str]:
    """The code lines (line number, text) of fenced and indented blocks, and the rest of the text with
    code lines blanked (line numbers kept) for its inline spans."""
    lines = text.splitlines()
    prose = list(lines)
    code: list[tuple[int, str]] = []
    fenced = indented = False
    previous_blank = True
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced, prose[i] = not fenced, ""
            continue
        blank = not line.strip()
        if fenced or (line.startswith("    ") and not blank and (previous_blank or indented)):
            indented = not fenced
            code.append((i + 1, line))
            prose[i] = ""
        elif not blank:
            indented = False
        previous_blank = blank
    return code, "\n".join(prose)


def logical_lines(code: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Code lines with `\\` continuations joined, and a synopsis's lines that start with `[` joined to
    the command above them."""
    out: list[tuple[int, str]] = []
    continued, previous = False, None
    for number, line in code:
        text = line.strip()
        if out and (continued or (text.startswith("[") and number == previous + 1)):
            out[-1] = (out[-1][0], out[-1][1] + " " + text)
        elif text:
            out.append((number, text))
        continued, previous = text.endswith("\\"), number
        if continued:
            out[-1] = (out[-1][0], out[-1][1][:-1].rstrip())
    return out


def inline_spans(prose: str) -> list[tuple[int, str]]:
    """`code` spans of the prose (line number of their start, text), within a paragraph."""
    return [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"`([^`]+)`", prose) if "\n\n" not in m.group(1)]


def commands_of(text: str) -> list[list[str]]:
    """One shell line as the commands of its `&&`/`;` chain, each as words, comments dropped."""
    out: list[list[str]] = [[]]
    depth = 0  # of the synopsis's brackets
    for word in shlex.split(text, comments=True):
        if word in CHAIN and depth == 0:
            out.append([])
            continue
        depth += word.count("[") - word.count("]")
        out[-1].append(word[:-1] if word.endswith(";") else word)
        if word.endswith(";"):
            out.append([])
    return [words for words in out if words]


# --- checking one command --------------------------------------------------------------------------


@functools.cache
def parser_of(name: str):
    return command_parser(name)


def is_synopsis(words: list[str]) -> bool:
    """Usage lines: optional parts in brackets, `a|b` alternatives, `{a,b}` choices, `PATH...`."""
    for w in words:
        if "=" in w and not w.startswith("["):  # key=value: a YAML list value is not a bracket
            continue
        if w.startswith(("[", "{")) or w.endswith(("]", "...")) or "|" in w:
            return True
    return False


def llara_argv(words: list[str]) -> list[str] | None:
    """The command line after the program: `llara-dist ...` or `... -m|--module llara_dist ...`."""
    if words[0] == "llara-dist" or words[0].endswith("/llara-dist"):
        return words[1:]
    for i, w in enumerate(words[:-1]):
        if w in ("-m", "--module") and words[i + 1] == "llara_dist":
            return words[i + 2:]
    return None


def flag_problems(parser, words: list[str]) -> list[str]:
    """Every --flag is an option of the parser (exact: argparse would take an abbreviation); a literal
    value of a flag with choices or a type is one of them / converts (each of `a|b` or `{a,b}`)."""
    options = parser._option_string_actions  # argparse's own table of option strings to actions
    problems = []
    for i, word in enumerate(words):
        bare = word.strip("[]")
        if not re.match(r"^--?[A-Za-z]", bare):
            continue
        flag, _, attached = bare.partition("=")
        action = options.get(flag)
        if action is None:
            problems.append(f"{flag}: no such option of `{parser.prog}`")
            continue
        if action.nargs == 0:
            continue
        value = attached or (words[i + 1].strip("[]") if i + 1 < len(words) else "")
        if not value or value.startswith("-") or PLACEHOLDER.match(value):
            continue
        alternatives = value[1:-1].split(",") if value.startswith("{") else value.split("|")
        for alt in alternatives:
            if action.choices is not None and alt not in action.choices:
                problems.append(f"{flag} {alt}: not one of {', '.join(map(str, action.choices))}")
            elif action.type is not None:
                try:
                    action.type(alt)
                except (TypeError, ValueError) as e:
                    problems.append(f"{flag} {alt}: {e}")
    return problems


def config_problems(name: str, args) -> list[str]:
    """train/finetune: overrides name real keys with values of the right type; a configs/ file loads."""
    path, own_file = None, args.config is not None and not args.config.startswith("configs/")
    if args.config is not None and not own_file:
        path = ROOT / args.config
        if not path.is_file():
            return [f"--config {args.config}: no such file"]
    try:
        load_config(CONFIG_CLASSES[name], path, args.overrides)
    except ConfigError as e:
        return [p for p in e.problems if not (own_file and p.split(":", 1)[0] in KEYS_OF_OWN_FILE)]
    return []


def check_llara(argv: list[str], full: bool) -> list[str]:
    """One llara-dist command line (after the program); `full`: parse it whole, else its flags only."""
    argv = [w for w in argv if w not in GLOBAL_FLAGS]
    name = argv[0]
    if PLACEHOLDER.match(name.rstrip(":")):  # `llara-dist CMD: message`, `llara-dist COMMAND --help`: any command
        return []
    if name not in COMMANDS:
        return [f"{name!r} is not a llara-dist command (cli.COMMANDS)"]
    parser = parser_of(name)
    problems = flag_problems(parser, argv[1:])
    # an inline span naming only the command is a mention, not a command line to run
    whole = full or (name in CONFIG_CLASSES and len(argv) > 1)
    if not whole or is_synopsis(argv) or {"-h", "--help"} & set(argv):
        return problems
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_intermixed_args(argv[1:])
    except SystemExit:
        return problems + [f"argparse: {err.getvalue().strip().splitlines()[-1]}"]
    return problems + (config_problems(name, args) if name in CONFIG_CLASSES else [])


def launch_entry(env: dict[str, str], default: str) -> list[str] | None:
    """The llara-dist command a launcher runs: ENTRY/CMD from the line's environment, else the
    script's default; None for another program (the probe)."""
    return llara_argv(shlex.split(env.get("ENTRY", default)) or ["-"])


@functools.cache
def script_text(path: str) -> str | None:
    file = ROOT / path
    return file.read_text() if file.is_file() else None


def check_command(words: list[str], full: bool, report: Report) -> list[str]:
    """One command (its words): which kind it is, counted, and its problems."""
    env = {}
    while words and ENV_ASSIGNMENT.match(words[0]):
        key, value = words[0].split("=", 1)
        env[key] = value
        words = words[1:]
    problems = []
    for key in ("ENTRY", "CMD"):  # what a launcher is told to run is a command line itself
        if key in env:
            problems += check_command(shlex.split(env[key]), False, report)
    if not words:
        return problems
    if words[0] in ("eval", "bash", "sh", "exec"):
        words = [w.removeprefix("$(").removesuffix(")") for w in words[1:]] or ["-"]
    argv = llara_argv(words)
    if argv is not None:
        if argv and not argv[0].startswith("-"):
            report.checked["llara-dist"] += 1
            problems += check_llara(argv, full)
        return problems
    if words[0] == "make":
        report.checked["make"] += 1
        makefile = (ROOT / "Makefile").read_text()
        targets = set(re.findall(r"^([\w.-]+):(?!=)", makefile, re.MULTILINE))
        return problems + [f"make {t}: no such target in the Makefile" for t in words[1:]
                           if "=" not in t and t not in targets]
    sbatch = words[0] == "sbatch"
    if sbatch:  # sbatch [--option=value ...] SCRIPT [ARGS]
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[1:]
        if not words:
            return problems + ["sbatch without a script"]
    if not re.match(r"launch/\S+\.(?:sh|sbatch)$", words[0]):  # a mention of the folder or the probe
        return problems
    report.checked["launch"] += 1
    script, args = words[0], words[1:]
    text = script_text(script)
    if text is None:
        return problems + [f"{script}: no such script"]
    if is_synopsis(args):
        return problems
    if sbatch:  # train.sbatch: CMD (default: the trainer, with --config $CONFIG) gets "$@"
        if "CMD" in env:
            return problems
        default = re.search(r"-m llara_dist [\w-]+", text)
        if default is None or "--config $CONFIG" not in text or '"$@"' not in text:
            return problems + [f"{script}: no trainer with --config $CONFIG and \"$@\" found in it"]
        entry = launch_entry({}, default.group(0))
        config = ["--config", env["CONFIG"]] if "CONFIG" in env else []
        return problems + [f"{script}: {p}" for p in check_llara(entry + config + args, True)]
    if '$ENTRY "$@"' not in text:  # a script that runs no trainer (local_cluster.sh)
        return problems
    common = script_text("launch/common.sh") or ""
    default = re.search(r"^ENTRY=\$\{ENTRY:-(.*)\}$", common, re.MULTILINE)
    if default is None:
        return problems + ["launch/common.sh: no default ENTRY=${ENTRY:-...} found"]
    entry = launch_entry(env, default.group(1))
    if entry is None:
        return problems
    return problems + [f"{script}: {p}" for p in check_llara(entry + args, True)]


def markdown_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, line, whether it is a whole command line: a code line, not an inline span)."""
    code, prose = code_and_prose(text)
    return [(n, line, True) for n, line in logical_lines(code)] + [(n, s, False) for n, s in inline_spans(prose)]


def config_header_lines(text: str) -> list[tuple[int, str, bool]]:
    """A configs/ file's header: its command lines are the comments indented under `#`, the other
    comments prose with inline spans."""
    lines = text.splitlines()
    code = [(n, line[1:]) for n, line in enumerate(lines, 1) if line.startswith("#   ")]
    prose = "\n".join(line[1:] if line.startswith("#") and not line.startswith("#   ") else "" for line in lines)
    return [(n, line, True) for n, line in logical_lines(code)] + [(n, s, False) for n, s in inline_spans(prose)]


def check_text(name: str, text: str, lines: list[tuple[int, str, bool]], count: bool = True) -> Report:
    """Check every command of `lines`; then (`count`) hold the number of each kind against a plain
    search of `text`."""
    report = Report(name)
    for number, line, full in lines:
        try:
            commands = commands_of(line)
        except ValueError as e:  # unbalanced quotes: only a problem in what should be a command
            if any(g.search(line) for g in GREP.values()):
                report.problems.append(f"{name}:{number}: {line}\n    cannot split: {e}")
            continue
        for words in commands:
            for problem in check_command(words, full, report):
                report.problems.append(f"{name}:{number}: {line}\n    {problem}")
    for kind, pattern in GREP.items() if count else ():
        found = [(text.count("\n", 0, m.start()) + 1, m.group(0).strip(" `")) for m in pattern.finditer(text)]
        if report.checked[kind] < len(found):
            report.problems.append(
                f"{name}: {report.checked[kind]} {kind} commands checked, but a plain search finds {len(found)}; "
                "one is in a place the test does not read (prose outside `code`?):\n"
                + "\n".join(f"  line {n}: {m}" for n, m in found))
    return report


def check_doc(doc: Path) -> Report:
    text = doc.read_text()
    return check_text(str(doc.relative_to(ROOT)), text, markdown_lines(text))


# --- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_in_the_doc_parses(doc):
    report = check_doc(doc)
    assert not report.problems, "\n".join(report.problems)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_in_the_help_text_parses(name):
    """`llara-dist CMD --help` shows the module's docstring, examples included. Not counted against a
    plain search: a docstring is prose for developers too, where `make` is a verb and an example may
    sit in a comment."""
    text = importlib.import_module(COMMANDS[name][0]).__doc__
    report = check_text(f"{COMMANDS[name][0]} docstring", text, markdown_lines(text), count=False)
    assert not report.problems, "\n".join(report.problems)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_command_in_a_config_header_parses(config):
    text = config.read_text()
    report = check_text(f"configs/{config.name}", text, config_header_lines(text))
    assert not report.problems, "\n".join(report.problems)
    assert report.checked["llara-dist"] + report.checked["launch"] >= 2, report.checked


def test_the_docs_hold_commands_of_every_kind():
    """The extraction itself works: the docs together give many commands of each kind."""
    total = Counter()
    for doc in DOCS:
        total.update(check_doc(doc).checked)
    assert total["llara-dist"] >= 50 and total["launch"] >= 10 and total["make"] >= 5, total


def test_a_drifted_line_is_caught():
    """The checks fail on what a doc could get wrong: a renamed flag, a wrong choice, an unknown
    config key or a value of the wrong type, a missing script or make target."""
    report = Report("example")
    bad = {"llara-dist prep --input a --format wikitxt --tokenizer t --out o": "invalid choice: 'wikitxt'",
           "llara-dist export --run r --out o --dtype fp64|bf16": "--dtype fp64: not one of",
           "llara-dist encode --model m --inputs c.jsonl --kind passage --out p.npy": "--inputs: no such option",
           "llara-dist train --config run.yaml train.learning_rate=1e-5": "train.learning_rate: unknown key",
           "llara-dist finetune --config configs/repllama-lora-finetune.yaml train.steps=many":
               "train.steps: expected an integer",
           "GPUS=2 launch/train.sh --config run.yaml train.micro_batch=two": "train.micro_batch: expected an integer",
           "CONFIG=run.yaml sbatch --nodes=2 launch/train.sbatch data.seqlen=512": "data.seqlen: unknown key",
           "llara-dist train --config configs/nope.yaml": "--config configs/nope.yaml: no such file",
           "llara-dist prep --input PATH... --out DIR [--chunk-tokens N | --seq-lenn L [--preset P]]":
               "--seq-lenn: no such option",
           "llara-dist init-model OUT --arch {llama,gpt2} --tokenizer DIR": "--arch gpt2: not one of",
           "launch/nope.sh --config run.yaml": "launch/nope.sh: no such script",
           "make tests": "make tests: no such target",
           "llara-dist serve --model m": "'serve' is not a llara-dist command"}
    for line, expected in bad.items():
        problems = [p for words in commands_of(line) for p in check_command(words, True, report)]
        assert any(expected in p for p in problems), (line, problems)
    good = ["DS_ACCELERATOR=cpu llara-dist train --config run.yaml train.global_batch=8 train.micro_batch=2",
            "ENTRY=\"--module llara_dist finetune\" launch/train.sh --config ft.yaml train.lr=3e-4"]
    for line in good:
        assert [p for words in commands_of(line) for p in check_command(words, True, report)] == [], line


def test_repository_paths_named_in_the_docs_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for m in REPO_PATH.finditer(text):
            path = m.group(0).rstrip(".,:")
            if not re.search(r"[./*]", path.split("/", 1)[1]):  # `docs/s`: documents per second
                continue
            if not any(ROOT.glob(path)) and not (ROOT / path).exists():
                missing.append(f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {path}")
    assert not missing, "\n".join(missing)


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p for p in (ROOT / "llara_dist").rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    modules += [p for p in (ROOT / "kernels").glob("*.py")]
    assert len(modules) > 30
    unnamed = [str(p.relative_to(ROOT)) for p in modules if not re.search(rf"(?<!\w){re.escape(p.name)}", page)]
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"
