"""Training curves of one or more runs in one PNG: `llara-dist plot RUN [RUN ...] --out curves.png`.

    llara-dist plot runs/llara --out curves.png
    llara-dist plot runs/a runs/b --out compare.png --width 1800 --height 1000

One panel per column against the step: the loss, then the loss's terms (whatever task columns the
runs' metrics.jsonl hold: ebae, ebar, lm for `train`, accuracy for `finetune`), then lr, tokens/s and
fill. Several runs are overlaid, each in its colour, with a legend of their folder names. A RUN is
a run folder or its metrics.jsonl. The image is exactly --width x --height pixels; --out must end in .png.
A torn last line of a metrics.jsonl (a run killed while writing it, or one still writing it) is left
out, and said so on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llara_dist.errors import UserError, integer_at_least

# the trainer's own columns of a metrics.jsonl row (train/trainer.py); any other numeric column is a
# term of the task's loss or a task metric, and gets a panel after the loss
LOOP_COLUMNS = {"step", "loss", "lr", "grad_norm", "docs", "real_tokens", "fill", "tokens_per_s", "mfu",
                "tokens_total", "docs_total", "step_s", "time", "elapsed_s"}
AFTER_TERMS = ("lr", "tokens_per_s", "fill")  # panels after the loss and its terms
TITLES = {"lr": "learning rate", "tokens_per_s": "tokens/s"}
DPI = 100
MIN_PIXELS = 200  # the smallest --width and --height: room for the panels' titles and ticks
COLUMNS = 3  # panels per row


def configure(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their metrics.jsonl)")
    parser.add_argument("--out", required=True, help="PNG file to write (its name ends in .png)")
    parser.add_argument("--width", type=integer_at_least(MIN_PIXELS), default=1500, help="image width in pixels")
    parser.add_argument("--height", type=integer_at_least(MIN_PIXELS), default=900, help="image height in pixels")


def run(args) -> int:
    # PNG only, and by its name: a mistyped --out (a run's metrics.jsonl, its config.yaml) is refused
    # before anything is read or written, never overwritten with an image
    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: not a .png file name (plot writes PNG images only)")
    curves = {label: rows for label, rows in zip(labels(args.runs), map(load_run, args.runs))}
    plot(curves, Path(args.out), args.width, args.height)
    print(f"wrote {args.out}")
    return 0


def load_run(run: str) -> list[dict]:
    from llara_dist.train.metrics import read_metrics, torn_line_note

    path = Path(run)
    path = path if path.is_file() else path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run}: no metrics.jsonl (not a run folder, or a run that has not logged a step yet)")
    rows, torn = read_metrics(path)
    if torn is not None:
        print(f"plot: {torn_line_note(path, torn)}", file=sys.stderr)
    if not rows:
        raise UserError(f"{path}: holds no step yet")
    return rows


def labels(runs: list[str]) -> list[str]:
    """The legend: each run's folder name, or its whole path where two runs share a name."""
    folders = [Path(r).resolve() if Path(r).is_dir() else Path(r).resolve().parent for r in runs]
    names = [f.name for f in folders]
    return [name if names.count(name) == 1 else str(folder) for name, folder in zip(names, folders)]


def panels(curves: dict[str, list[dict]]) -> list[str]:
    """The columns to plot, in order: loss, the task's columns (first seen first), lr, tokens/s, fill."""
    terms: dict[str, None] = {}
    for rows in curves.values():
        for row in rows:
            terms.update((k, None) for k, v in row.items() if k not in LOOP_COLUMNS and _is_number(v))
    present = {k for rows in curves.values() for row in rows for k, v in row.items() if _is_number(v)}
    return [c for c in ("loss", *terms, *AFTER_TERMS) if c in present]


def plot(curves: dict[str, list[dict]], out: Path, width: int, height: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none used
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = panels(curves)
    # one colour per run in every panel: a panel that only some runs have (finetune's accuracy) must
    # not give a run the colour the legend shows for another
    colours = {label: f"C{i}" for i, label in enumerate(curves)}
    rows_of_panels = -(-len(columns) // COLUMNS)
    fig, axes = plt.subplots(rows_of_panels, COLUMNS, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    for ax, column in zip(axes.flat, columns):
        for label, rows in curves.items():
            points = [(r["step"], r[column]) for r in rows if _is_number(r.get(column))]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.2, color=colours[label])
        ax.set_title(TITLES.get(column, column))
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if column == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")  # no bbox_inches="tight": the image keeps the size asked for
    plt.close(fig)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
