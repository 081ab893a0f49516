"""Host time per decoder layer of a training step: what a host-bound GPU waits for.

    python bench/host_overhead.py --device cpu --out /tmp/host_overhead    # ~3 minutes on 2 cores
    python bench/host_overhead.py --device cuda --out bench_out/host       # part of bench/gpu_check.sh

The `host` shape of bench/train_bench.py has LLaMA's modules at hidden 32: next to no arithmetic, so
a step's time is the host's own work (Python, the dispatcher, DeepSpeed's ZeRO-3 hooks and, on a GPU,
kernel launches), the same work per layer as at hidden 4096. Each variant runs train_bench (dpr,
our sdpa path and the baseline, the real ZeRO-3 engine) in a fresh process, since ZeRO-3 installs
its hooks once per engine, at two depths; rounds alternate the variants and each figure is the best
round's (a busy machine only adds time). Host time per layer and micro-batch: the slope between depths:

    module   DeepSpeed's ZeRO-3 default: a gather/release hook pair at every module (each linear, norm)
    layer    train.zero3_layer_gather (the trainer's default): one hook pair per decoder layer (FSDP's unit);
             its `sdpa+compiled` row adds model.compile_layers, each layer's forward compiled whole
    zero2    train.zero_stage=2: ZeRO-2, the weights whole on every rank, nothing gathered

Output: host_overhead.json and the Markdown table (also on stdout).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"module": ["--no-zero3-layer-gather"], "layer": ["--zero3-layer-gather", "--compare-compiled"],
            "zero2": ["--zero-stage", "2", "--no-compare-compiled"]}
CONFIGS = ("sdpa", "baseline", "sdpa+compiled")  # train_bench rows read back: ours, the released way
ROWS, MICRO_BATCH, SEQ_LEN = 8, 4, 256  # a step of train_bench: ROWS // MICRO_BATCH micro-batches


def run_bench(device: str, layers: int, extra: list[str], steps: int, out: Path) -> dict[str, float]:
    """One train_bench process: median step seconds of each of CONFIGS that it ran."""
    cmd = [sys.executable, str(Path(__file__).with_name("train_bench.py")), "--shape", "host", "--device", device,
           "--layers", str(layers), "--seq-len", str(SEQ_LEN), "--rows", str(ROWS), "--micro-batch", str(MICRO_BATCH),
           "--docs", "dpr", "--paths", "sdpa", "--steps", str(steps), "--no-compare-checkpointing",
           "--no-compare-fused", "--no-released-recipe", "--rounds", "1",  # the rounds are this script's own
           "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads((out / "bench.json").read_text())["workloads"][0]["results"]
    return {r["config"]: r["step_s"] for r in results if r["config"] in CONFIGS}


def summarise(samples: dict, depths: tuple[int, int], micro_batches: int) -> list[dict]:
    """Per variant and config: the step seconds at each depth, the least over the rounds (a busy machine
    only adds time; each round's figure is the median of its steps); the slope as host
    milliseconds per decoder layer per micro-batch (forward, backward and the optimizer's share), and
    what is left at no layers per micro-batch (embedding, LM head, loss, the step's epilogue)."""
    lo, hi = depths
    rows = []
    for variant in VARIANTS:
        for config in (c for c in CONFIGS if c in samples[variant][lo][0]):
            at = {d: min(s[config] for s in samples[variant][d]) for d in depths}
            per_layer = (at[hi] - at[lo]) / (hi - lo)  # seconds per layer per step
            rows.append({"variant": variant, "config": config, "step_s": at,
                         "ms_per_layer": per_layer / micro_batches * 1e3,
                         "ms_outside_layers": (at[lo] - lo * per_layer) / micro_batches * 1e3})
    return rows


def markdown(report: dict) -> str:
    lo, hi = report["depths"]
    lines = [f"Host time of a training step, `host` shape (hidden 32), {report['device']}, "
             f"{report['micro_batches']} micro-batches of {MICRO_BATCH} rows of {SEQ_LEN}, "
             f"best of {report['rounds']} rounds "
             f"(each the median of {report['steps']} steps)", "",
             f"| variant | config | step s, {lo} layers | step s, {hi} layers | host ms per layer per micro-batch "
             "| host ms per micro-batch outside the layers |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['config']} | {r['step_s'][lo]:.3f} | {r['step_s'][hi]:.3f} | "
              f"{r['ms_per_layer']:.2f} | {r['ms_outside_layers']:.1f} |" for r in report["rows"]]
    by = {(r["variant"], r["config"]): r["ms_per_layer"] for r in report["rows"]}
    lines += [""] + [f"- {c}: host time per layer, against ZeRO-3 gathering by module: by layer "
                     f"{by[('layer', c)] / by[('module', c)]:.2f}x, ZeRO-2 {by[('zero2', c)] / by[('module', c)]:.2f}x"
                     for c in ("sdpa", "baseline")]
    if ("layer", "sdpa+compiled") in by:
        ratio = by[("layer", "sdpa+compiled")] / by[("module", "sdpa")]
        lines.append(f"- sdpa with compiled layers (gathering by layer): {ratio:.2f}x")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--depths", type=int, nargs=2, default=(2, 8), help="decoder layers of the two runs")
    p.add_argument("--rounds", type=int, default=3, help="runs of every variant at every depth")
    p.add_argument("--steps", type=int, default=7, help="timed steps per run (train_bench --steps)")
    p.add_argument("--out", default="bench_out/host_overhead")
    args = p.parse_args(argv)
    lo, hi = args.depths
    if not 0 < lo < hi:
        p.error(f"--depths {lo} {hi}: need 0 < first < second")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = {v: {d: [] for d in args.depths} for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for depth in args.depths:
                for variant, extra in VARIANTS.items():
                    got = run_bench(args.device, depth, extra, args.steps, Path(tmp))
                    samples[variant][depth].append(got)
                    print(f"round {r + 1}, {depth} layers, {variant}: "
                          + ", ".join(f"{c} {s:.3f} s" for c, s in got.items()), file=sys.stderr, flush=True)
    report = {"device": args.device, "depths": [lo, hi], "rounds": args.rounds, "steps": args.steps,
              "micro_batches": ROWS // MICRO_BATCH, "samples": samples,
              "rows": summarise(samples, (lo, hi), micro_batches=ROWS // MICRO_BATCH)}
    (out / "host_overhead.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    (out / "host_overhead.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
