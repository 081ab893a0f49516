"""Watching a run: the progress line and train.log, the time columns of metrics.jsonl, the trackers
(TensorBoard and Weights & Biases, the real packages, offline), `llara-dist status` and `llara-dist plot`.

The unit tests drive MetricsLog directly (no DeepSpeed); one tiny real `llara-dist train` run, preempted
and resumed, is then checked from the outside: train.log, metrics.jsonl, status against the files.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import launch, log_text, metrics, refused, wait

from llara_dist.cli import main as cli_main
from llara_dist.config import ConfigError, RunConfig, load_config
from llara_dist.errors import UserError
from llara_dist.tools.status import run_status
from llara_dist.train.metrics import Console, MetricsLog, read_metrics
from llara_dist.train.preempt import PREEMPT_AT_STEP_ENV, PREEMPTED_EXIT
from llara_dist.train.trackers import TRACKERS, check_installed

ROOT = Path(__file__).resolve().parents[1]
CLOCK = r"\d\d:\d\d:\d\d"


def record(step: int, loss: float, step_s: float = 0.5, **task) -> dict:
    """A row as the trainer hands it to MetricsLog.log."""
    return {"step": step, "loss": loss, **task, "lr": 1e-4 * step, "grad_norm": 0.5, "docs": 16,
            "real_tokens": 900, "fill": 0.88, "tokens_per_s": 900 / step_s, "mfu": None,
            "tokens_total": 900 * step, "docs_total": 16 * step, "step_s": step_s}


def metrics_log(run_dir: Path, steps: int, *overrides: str, resume_step: int = 0, task_metrics=()):
    cfg = load_config(RunConfig, None, [f"run_dir={run_dir}", f"train.steps={steps}", *overrides])
    console = Console(run_dir, enabled=True)
    return MetricsLog(cfg, console, enabled=True, resume_step=resume_step, task_metrics=task_metrics)


# --- the console, train.log and the time columns ----------------------------------------------------


def test_progress_lines_show_task_terms_elapsed_and_eta(tmp_path, capsys):
    from llara_dist.retrieval.finetune import Finetune
    from llara_dist.train.pretrain import Pretrain

    log = metrics_log(tmp_path, 11, task_metrics=Finetune.METRICS)
    log.log(record(1, 2.5, step_s=60.0, accuracy=0.25))
    for step in range(2, 12):
        log.log(record(step, 2.0, step_s=120.0, accuracy=step / 11))
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3  # not a terminal: steps 1, 10 and the last, each on its own line
    assert all(re.match(CLOCK + " step ", line) for line in lines), lines
    # ETA: this start's mean step time x steps left; acc: the fine-tune task's accuracy column
    assert re.search(r"step 1/11 loss 2\.5000 acc 0\.2500 .* eta 0:10:00$", lines[0]), lines[0]
    assert re.search(r"step 10/11 loss 2\.0000 acc 0\.9091 .* eta 0:01:54$", lines[1]), lines[1]
    assert re.search(r"step 11/11 loss 2\.0000 acc 1\.0000 .* eta 0:00:00$", lines[2]), lines[2]
    assert "elapsed 0:00:00" in lines[0]  # elapsed is wall time, not the step times handed in

    log = metrics_log(tmp_path / "pretrain", 1, task_metrics=Pretrain.METRICS)
    log.log(record(1, 3.0, ebae=1.25, ebar=1.5, lm=0.25))
    log.close()
    assert re.search(r"loss 3\.0000 ebae 1\.2500 ebar 1\.5000 lm 0\.2500 lr ", capsys.readouterr().err)

    logged = (tmp_path / "train.log").read_text().splitlines()  # the lines shown, each dated
    assert [line.split(" ", 2)[2] for line in logged] == [line.split(" ", 1)[1] for line in lines]
    assert all(re.match(r"\d{4}-\d\d-\d\d " + CLOCK + " step ", line) for line in logged)


def test_time_columns_and_elapsed_carried_across_a_resume(tmp_path, capsys):
    before = time.time()
    log = metrics_log(tmp_path, 12)
    for step in range(1, 5):
        time.sleep(0.1)
        log.log(record(step, 3.0 - step / 10))
    log.close()  # a crash after step 4; the checkpoint is that of step 2
    log = metrics_log(tmp_path, 12, resume_step=2)
    log.log(record(3, 9.0))
    log.close()
    after = time.time()
    rows, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 9.0  # steps 3-4 redone
    assert all(before <= r["time"] <= after for r in rows)
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    # the resumed start goes on from step 2's elapsed time (>= 0.2 s of sleeping), not from 0
    assert rows[1]["elapsed_s"] >= 0.2
    assert rows[1]["elapsed_s"] < rows[2]["elapsed_s"] < rows[1]["elapsed_s"] + 0.1
    assert not (tmp_path / "tensorboard").exists()  # no tracker unless asked for, installed or not


def test_a_terminal_sees_every_step_and_the_log_only_the_kept_ones(tmp_path, monkeypatch):
    main, side = os.openpty()  # a real terminal for stderr
    with open(side, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        log = metrics_log(tmp_path, 3)
        for step in (1, 2, 3):
            log.log(record(step, 1.0 + step))
        log.close()
    chunks = []  # a read of the terminal returns what has arrived: read until nothing more comes
    while select.select([main], [], [], 0.5)[0]:
        try:
            chunk = os.read(main, 1 << 16)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    shown = b"".join(chunks).decode()
    os.close(main)
    assert re.search(r"\r\x1b\[K" + CLOCK + r" step 2/3 loss 3\.0000 ", shown)  # live, then overwritten
    assert re.search(r"\r\x1b\[K" + CLOCK + r" step 3/3 loss 4\.0000 ", shown)
    logged = (tmp_path / "train.log").read_text()
    assert "step 1/3" in logged and "step 3/3" in logged and "step 2/3" not in logged


def test_console_is_quiet_on_other_ranks(tmp_path, capsys):
    console = Console(tmp_path / "run", enabled=False)
    console.print("resumed from somewhere")
    assert capsys.readouterr().err == "" and not (tmp_path / "run").exists()


# --- trackers ---------------------------------------------------------------------------------------


def test_tracker_names_checked_and_missing_package_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.trackers: 'mlflow' is not one of tensorboard, wandb"):
        load_config(RunConfig, None, ["train.trackers=[tensorboard, mlflow]"])
    for name in TRACKERS:  # the config accepts exactly the trackers there are
        assert load_config(RunConfig, None, [f"train.trackers=[{name}]"]).train.trackers == [name]
    check_installed(list(TRACKERS))  # both installed here
    # without site-packages (python -S) neither package is there: refused, naming the extra to install
    script = ("from llara_dist.train.trackers import check_installed\n"
              "check_installed(['tensorboard', 'wandb'])\n")
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "UserError" in out.stderr
    assert "pip install 'llara-dist[tensorboard]'" in out.stderr and "pip install 'llara-dist[wandb]'" in out.stderr


def test_tensorboard_holds_the_metrics_rows_also_after_a_resume(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = metrics_log(tmp_path, 4, "train.trackers=[tensorboard]")
    for step in range(1, 5):
        log.log(record(step, 4.0 - step / 4))
    log.close()
    log = metrics_log(tmp_path, 4, "train.trackers=[tensorboard]", resume_step=2)  # steps 3 and 4 redone
    for step in (3, 4):
        log.log(record(step, 7.0 + step / 8, step_s=0.25))
    log.close()
    rows, _ = read_metrics(tmp_path / "metrics.jsonl")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "tokens_per_s", "fill", "elapsed_s"} <= set(events.Tags()["scalars"])
    assert "time" not in events.Tags()["scalars"] and "mfu" not in events.Tags()["scalars"]  # clock; None
    for name in ("loss", "lr", "tokens_per_s", "elapsed_s"):
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [r["step"] for r in rows], name
        assert [v for _, v in got] == pytest.approx([r[name] for r in rows], rel=1e-6), name


def wandb_records(run_file: Path) -> list:
    """The Record protobufs of a W&B run file: a 7-byte header (":W&B", magic, version), then a LevelDB
    log: 32 KiB blocks of chunks (crc 4 bytes, length 2, type 1: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return out


def test_wandb_offline_run_holds_our_losses(tmp_path, monkeypatch, capsys):
    import wandb

    for var, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "my-run"
    log = metrics_log(run_dir, 3, "train.trackers=[wandb]", "train.wandb_project=watch-test")
    for step in (1, 2, 3):
        log.log(record(step, 5.0 / step))
    log.close()
    [folder] = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")
    [run_file] = folder.glob("run-*.wandb")
    # finish() may return before W&B's service process has written the file (seen on a loaded machine);
    # the service is shut down, and the file complete, when the process exits: as here
    wandb.teardown()
    records = wandb_records(run_file)
    [run] = [r.run for r in records if r.HasField("run")]
    assert (run.display_name, run.project) == ("my-run", "watch-test")
    history = {r.history.step.num: {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in r.history.item}
               for r in records if r.HasField("history")}
    rows, _ = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(history) == [r["step"] for r in rows]
    for row in rows:
        assert (history[row["step"]]["loss"], history[row["step"]]["lr"]) == (row["loss"], row["lr"])


# --- status and plot ------------------------------------------------------------------------------


def status(run_dir: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as done:
        cli_main(["status", str(run_dir), "--json"])
    assert done.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_status_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    for folder in (tmp_path, tmp_path / "missing"):
        with pytest.raises(SystemExit) as done:
            cli_main(["status", str(folder)])
        assert done.value.code == 2
        assert f"llara-dist status: {folder}: not a llara-dist run folder" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("train: {steps: 5}\n")
    rows = [json.dumps(record(1, 2.0)), "{oops", json.dumps(record(2, 1.9))]  # a bad line before the last
    (tmp_path / "metrics.jsonl").write_text("".join(row + "\n" for row in rows))
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path / 'metrics.jsonl'))}:2: not valid JSON"):
        run_status(tmp_path)


def test_plot_overlays_runs_at_the_size_asked(tmp_path, capsys):
    import matplotlib.image

    from llara_dist.tools.plot import panels

    runs = []
    for name, scale in (("seed0", 1.0), ("seed1", 1.3)):
        run = tmp_path / name
        run.mkdir()
        rows = [{**record(s, scale * (4.0 / (1 + s / 10)), ebae=2.0 / scale / (1 + s), ebar=2.5 / (1 + s),
                          lm=3.0), "time": 1.7e9 + s, "elapsed_s": float(s)} for s in range(1, 41)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    assert panels({"a": read_metrics(runs[0] / "metrics.jsonl")[0]}) == [
        "loss", "ebae", "ebar", "lm", "lr", "tokens_per_s", "fill"]
    out = tmp_path / "curves.png"
    with pytest.raises(SystemExit) as done:
        cli_main(["plot", *map(str, runs), "--out", str(out), "--width", "1234", "--height", "777"])
    assert done.value.code == 0
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (777, 1234)
    pixels = (image[:, :, :3] * 255).round().astype(int).reshape(-1, 3)
    assert (pixels < 250).any(axis=1).mean() > 0.02  # curves, axes and text, not a white page
    assert len({tuple(p) for p in pixels}) > 100  # two runs in two colours, anti-aliased
    with pytest.raises(SystemExit) as done:
        cli_main(["plot", str(tmp_path / "nothing"), "--out", str(out)])
    assert done.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


TORN = '{"step": 3, "loss": 2.'  # what a run killed while appending step 3's row leaves


def write_metrics(run_dir: Path, steps: int, tail: str = "") -> Path:
    """run_dir as a run of 5 steps leaves it: config.yaml, and metrics.jsonl of steps 1 to `steps`, then
    `tail`; returns the metrics file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("train: {steps: 5}\n")
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(record(s, 3.0 - s / 10)) + "\n" for s in range(1, steps + 1)) + tail)
    return path


def test_status_and_plot_leave_out_a_torn_last_line_and_say_so(tmp_path, capsys):
    run = tmp_path / "run"
    # cut short, with or without a newline after it; or whole but without its newline (still being written)
    for tail in (TORN, TORN + "\n", json.dumps(record(3, 2.7))):
        path = write_metrics(run, 2, tail)
        got = status(run, capsys)
        assert (got["step"], got["loss"], got["finished"]) == (2, 2.8, False)
        assert got["left_out"].startswith(f"{path}:3: left out a last line cut short"), got
        with pytest.raises(SystemExit) as done:
            cli_main(["status", str(run)])
        assert done.value.code == 0
        assert re.search(rf"^note +{re.escape(str(path))}:3: left out ", capsys.readouterr().out, re.M)
        with pytest.raises(SystemExit) as done:
            cli_main(["plot", str(run), "--out", str(tmp_path / "curves.png")])
        assert done.value.code == 0 and (tmp_path / "curves.png").is_file()
        assert f"plot: {path}:3: left out a last line cut short" in capsys.readouterr().err
    write_metrics(run, 2)
    assert status(run, capsys)["left_out"] is None


def test_status_and_plot_refuse_a_bad_line_before_the_last(tmp_path, capsys):
    path = write_metrics(tmp_path / "run", 1, TORN + "\n" + json.dumps(record(3, 2.7)) + "\n")  # damage
    for argv in (["status", str(tmp_path / "run")], ["plot", str(path), "--out", str(tmp_path / "p.png")]):
        assert f"{path}:2: not valid JSON" in refused(argv, capsys)
    assert not (tmp_path / "p.png").exists()
    path.write_text(json.dumps(record(1, 2.0)) + "\n[1, 2]\n" + json.dumps(record(2, 1.9)) + "\n")
    assert f"{path}:2: not a row of a step" in refused(["status", str(tmp_path / "run")], capsys)


def test_status_refuses_a_config_that_is_not_yaml(tmp_path, capsys):
    write_metrics(tmp_path, 2)
    config = tmp_path / "config.yaml"
    config.write_text("run_dir: runs/a\ntrain:\n  steps: [5\n  lr: 1e-4\n")  # the list is not closed
    err = refused(["status", str(tmp_path)], capsys)
    assert f"{config}:4: not valid YAML (expected ',' or ']', but got ':')" in err
    config.write_bytes(b"train: {steps: 5}\nrun_dir: caf\xe9\n")  # Latin-1, not UTF-8
    err = refused(["status", str(tmp_path)], capsys)
    assert f"{config}:2: not valid YAML (unacceptable character #x00e9" in err


def test_plot_writes_png_files_only(tmp_path, capsys):
    run = tmp_path / "run"
    path = write_metrics(run, 2)
    before = path.read_bytes()
    for out in (path, run / "config.yaml", tmp_path / "curves.jpg", tmp_path / "curves"):
        err = refused(["plot", str(run), "--out", str(out)], capsys)
        assert f"--out {out}: not a .png file name" in err
    assert path.read_bytes() == before and not (tmp_path / "curves.jpg").exists()
    assert (run / "config.yaml").read_text() == "train: {steps: 5}\n"
    err = refused(["plot", str(run), "--out", str(tmp_path / "p.png"), "--width", "199"], capsys)
    assert "argument --width: 199: must be at least 200" in err
    with pytest.raises(SystemExit) as done:
        cli_main(["plot", str(run), "--out", str(tmp_path / "curves.PNG")])
    assert done.value.code == 0 and (tmp_path / "curves.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resume_drops_a_torn_last_line_and_refuses_a_bad_one_before_it(tmp_path, capsys):
    log = metrics_log(tmp_path, 4)
    for step in (1, 2):
        log.log(record(step, 3.0))
    log.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write(TORN)  # killed while appending step 3; the checkpoint is step 2's
    capsys.readouterr()
    log = metrics_log(tmp_path, 4, resume_step=2)
    log.log(record(3, 2.5))
    log.close()
    rows, torn = read_metrics(path)
    assert ([r["step"] for r in rows], rows[-1]["loss"], torn) == ([1, 2, 3], 2.5, None)
    said = f"{path}:3: dropped a last line cut short by the crash; its step is redone"
    assert said in capsys.readouterr().err and said in (tmp_path / "train.log").read_text()

    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{oops\n" + "".join(lines[1:]))  # damage, not a crash: refused
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:2: not valid JSON"):
        metrics_log(tmp_path, 4, resume_step=3)


@pytest.mark.slow
def test_a_real_run_resumes_over_a_torn_last_line(train_setup, tmp_path):
    """A tiny `llara-dist train` (1 rank) killed while appending step 5's row: the resume drops the torn
    line, says so, redoes the step and logs each step once; a bad line before the last is refused."""
    root, _ = train_setup
    run = tmp_path / "run"
    assert wait(launch(root, run, 1, "--ledger", "train.steps=4", "train.ckpt_every=2")) == [0], log_text(run)
    path, ledger = run / "metrics.jsonl", run / "ledger-rank00000.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({**metrics(run)[-1], "step": 5})[:40])
    with open(ledger, "a") as f:
        f.write('{"step": 5, "keys": ["a')
    assert wait(launch(root, run, 1, "--ledger", "train.steps=6", "train.ckpt_every=2")) == [0], log_text(run)
    assert [r["step"] for r in metrics(run)] == list(range(1, 7))
    log = (run / "train.log").read_text()
    assert f"{path}:5: dropped a last line cut short by the crash; its step is redone" in log
    assert log.index("resumed from") < log.index("dropped a last line") < log.index("step 6/6")
    assert f"{ledger}:5: dropped a last line cut short by the crash" in log_text(run)
    assert [json.loads(line)["step"] for line in ledger.read_text().splitlines()] == list(range(1, 7))

    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + "{oops\n" + "".join(lines[2:]))  # damage, not a crash
    assert wait(launch(root, run, 1, "train.steps=8", "train.ckpt_every=2")) == [2], log_text(run)
    shown = log_text(run)
    assert f"llara-dist train: {path}:3: not valid JSON" in shown and "Traceback" not in shown, shown[-3000:]


@pytest.mark.slow
def test_a_real_run_preempted_and_resumed(train_setup, tmp_path, capsys):
    """One tiny `llara-dist train` (1 rank), preempted at step 4 and resumed to step 6: train.log,
    metrics.jsonl's time columns, and status against the files the run wrote."""
    root, _ = train_setup
    run = tmp_path / "run"
    steps = ("train.steps=6", "train.ckpt_every=3")
    assert wait(launch(root, run, 1, *steps, env={PREEMPT_AT_STEP_ENV: "4"})) == [PREEMPTED_EXIT], log_text(run)
    stopped = status(run, capsys)
    assert (stopped["step"], stopped["steps"], stopped["finished"]) == (4, 6, False)
    assert stopped["preempted"] and stopped["preempted_step"] == 4
    assert stopped["checkpoint"] == {"tag": "step00000004", "step": 4}  # the preemption's own save
    assert stopped["loss"] == metrics(run)[-1]["loss"] and stopped["eta_s"] > 0

    assert wait(launch(root, run, 1, *steps)) == [0], log_text(run)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(isinstance(r["time"], float) and r["time"] > 1.7e9 for r in rows)
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0  # carried over the restart: never back to 0

    log = (run / "train.log").read_text()
    shown = log_text(run)  # what the two starts printed (stderr)
    for line in log.splitlines():  # every logged line was on the console, there after its clock time
        assert line.split(" ", 1)[1] in shown, line
    assert "SIGUSR1: saved step 4, exiting with 42 (requeue to resume)" in log
    assert f"resumed from {run / 'checkpoints' / 'step00000004'} at step 4" in log
    assert re.search(r" step 1/6 loss .* eta ", log) and re.search(r" step 6/6 loss .* eta 0:00:00", log)
    assert log.index("exiting with 42") < log.index("resumed from") < log.index("step 6/6")

    done = status(run, capsys)
    last = rows[-1]
    assert (done["step"], done["finished"], done["preempted"], done["eta_s"]) == (6, True, False, 0.0)
    assert (done["loss"], done["tokens_per_s"], done["elapsed_s"], done["updated"]) == (
        last["loss"], last["tokens_per_s"], last["elapsed_s"], last["time"])
    assert done["mfu"] is None  # CPU: no peak known
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert done["checkpoint"]["tag"] == latest and (run / "checkpoints" / latest).is_dir()
    with pytest.raises(SystemExit):
        cli_main(["status", str(run)])
    text = capsys.readouterr().out
    assert re.search(r"^step +6/6$", text, re.M) and re.search(rf"^checkpoint +{latest} \(step 6\)$", text, re.M)
