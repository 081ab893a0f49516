#!/usr/bin/env bash
# The one prepared GPU check: one H100, under 8 minutes, the most valuable figures first.
#   1. train_bench: bench/train_bench.py at 2 layers, end-to-end ZeRO-3 training steps on both workloads,
#      every path against the same-shape baseline (with and without fused ops on both sides), a profile
#      of each configuration, activation checkpointing, fused ops and compiled layers on the best path;
#      not the released recipe's own engine (stage 2 has it), to leave stage 2 its time
#   2. train_bench_deep: dpr through 8 layers in 16-row micro-batches: the released recipe as its README
#      runs it (one example a micro-batch, checkpointing, ZeRO-1: its own engine, first), the
#      same-shape baseline and baseline+fused, sdpa and flex, flex+fused and compiled layers: the
#      headline ratios and MFU (attention's share nearer a full 7B's), and whether compiled layers share
#      one graph (the "graphs compiled" in its summary; 8 if each layer compiles its own)
#   Both time 2 interleaved rounds of 5 steps after a warm-up step per configuration and report the
#   spread (min-max); their summaries say "within spread" where a difference is not a gain.
#   3. doctor: llara-dist doctor on the GPU, every path, forward and backward in bf16 against fp32 sdpa
#   (not run unless named in STAGES: train_bench_mb16, stage 1's dpr at 16-row micro-batches;
#    train_bench_module, stage 1's dpr with ZeRO-3 gathering per module (train.zero3_layer_gather=false);
#    train_bench_zero2, train_bench_mb16 under ZeRO-2 (train.zero_stage=2);
#    train_bench_long, 480-word chunks in rows of 4096;
#    host_overhead, bench/host_overhead.py: the host's time per decoder layer, by gathering;
#    attn_bench, bench/attn_bench.py: one LLaMA-2-7B attention layer (32 x 128), rows of 1024 with
#    ~5 and ~1.5 documents: sdpa, flex, varlen, two-pass and the plain causal flash ceiling)
# STAGES picks some (default: 1-3, in that order). check.txt holds the environment, each stage's
# end and every failure. $OUT holds at most 8 files, at most 2 folders down, so the results are
# quick to copy off a GPU machine: keep it that way (tests/test_kernels.py counts them). Each stage has a time cap and tees its output to $OUT as it goes (the train bench also writes its
# JSON and table after every configuration), so a stage cut short keeps what it measured.
#
# On a GPU machine the repo goes on PYTHONPATH (no install); where its Python lacks DeepSpeed, copy
# DeepSpeed and what it needs as wheels in .whl/ along (docs/performance.md says how to build them):
#     bash bench/gpu_check.sh   # results in $OUT (bench_out/)
# Dry run of the same plumbing on a CPU box (tiny shapes; PY picks another interpreter):
#     DEVICE=cpu bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench_out}
PY=${PY:-python3}
TOTAL_S=${TOTAL_S:-470}  # every stage ends by then; the rest of 8 minutes is start-up and slack
STAGES=${STAGES:-train_bench train_bench_deep doctor}
WHEELS=${WHEELS:-.whl}  # wheels of what the machine's Python lacks (deepspeed, pydantic, ...)
mkdir -p "$OUT"

# No install: the repo goes on PYTHONPATH. llara_dist/kernels is a link to the top-level kernels/
# folder; a copy of the tree that dropped the link gets it back.
[[ -e llara_dist/kernels ]] || ln -s ../kernels llara_dist/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d)  # unpacked wheels, and the outputs kept out of $OUT
trap 'rm -rf "$SCRATCH"' EXIT

status=0
CHECK="$OUT/check.txt"
: >"$CHECK"
fail() { echo "!! $*" | tee -a "$CHECK"; status=1; }

# DeepSpeed: the image's own, else the carried wheels unpacked into $SCRATCH/whl (ahead of site-packages)
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)"; then
    if ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
        if "$PY" -m pip --version >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/whl" "$WHEELS"/*.whl
        else  # no pip on the image: a wheel is a zip archive, and unpacked on the path it imports the same
            for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$SCRATCH/whl" || break; done
        fi
        export PYTHONPATH="$PYTHONPATH:$SCRATCH/whl"
    fi
fi
if said=$("$PY" -c "import deepspeed; print(deepspeed.__version__)" 2>&1); then
    HAVE_DS=1 DS_LINE="deepspeed ${said##*$'\n'}"
else
    HAVE_DS=0 DS_LINE="deepspeed: ${said##*$'\n'}"
    fail "NO DEEPSPEED, the training benchmark cannot run (${said##*$'\n'}). Carry the wheels \
($WHEELS); docs/performance.md says how to build them"
fi

{
    date -u
    [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
for name in ("triton", "tokenizers", "peft", "flash_attn"):
    try:
        print(f"{name} {__import__(name).__version__}")
    except Exception as e:  # noqa: BLE001 - a version line, not a check
        print(f"{name}: {type(e).__name__}")
EOF
    echo "$DS_LINE"
} 2>&1 | tee -a "$CHECK"

if [ "$DEVICE" = cpu ]; then  # the plumbing only: tiny shapes
    TRAIN_ARGS=(--shape tiny --device cpu --seq-len 256 --rows 4 --micro-batch 2 --warmup 0 --steps 1 --profile)
    MB_ARGS=(--shape tiny --device cpu --seq-len 256 --rows 4 --micro-batch 4 --warmup 0 --steps 1 --no-released-recipe)
    LONG_ARGS=(--shape tiny --device cpu --seq-len 512 --rows 2 --micro-batch 2 --warmup 0 --steps 1 --paths sdpa
               --no-released-recipe)
    MODULE_ARGS=(--shape tiny --device cpu --seq-len 256 --rows 4 --micro-batch 2 --warmup 0 --steps 1
                 --no-released-recipe)
    DEEP_ARGS=(--shape tiny --device cpu --seq-len 256 --rows 4 --micro-batch 4 --warmup 0 --steps 1 --layers 4 --paths sdpa)
    HOST_ARGS=(--device cpu --depths 1 2 --rounds 1 --steps 1)
    DOCTOR_ARGS=(--device cpu --seq-len 128 --attn sdpa)
    BENCH_ARGS=(--device cpu --rows 2 --seq-len 256 --heads 2 --head-dim 16 --iters 1)
else
    TRAIN_ARGS=(--device cuda --profile --no-released-recipe)
    MB_ARGS=(--device cuda --micro-batch 16 --no-released-recipe)
    LONG_ARGS=(--device cuda --seq-len 4096 --rows 8 --micro-batch 2 --paths sdpa flex varlen --no-released-recipe)
    MODULE_ARGS=(--device cuda --no-released-recipe)
    DEEP_ARGS=(--device cuda --layers 8 --micro-batch 16 --paths sdpa flex --no-compare-dswait)
    HOST_ARGS=(--device cuda --rounds 1)
    DOCTOR_ARGS=(--device cuda --dtype bf16)
    BENCH_ARGS=(--device cuda)
fi

# stage NAME CAP_S COMMAND...: run under min(CAP_S, what is left of TOTAL_S), output to $OUT/NAME.txt
stage() {
    local name=$1 cap=$2 budget=$(( TOTAL_S - SECONDS ))
    shift 2
    [ $budget -gt "$cap" ] && budget=$cap
    if [ $budget -lt 30 ]; then fail "$name: no time left (${budget}s)"; return 1; fi
    echo "== $name (budget ${budget}s, ${SECONDS}s elapsed)"
    timeout -k 10 "$budget" "$@" 2>&1 | tee "$OUT/$name.txt"  # SIGKILL 10 s after a SIGTERM it ignores
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || fail "$name: exit status $rc$([ "$rc" -eq 124 ] && echo ", cut at ${budget}s")"
    echo "$name: exit status $rc at ${SECONDS}s" >>"$CHECK"
    return "$rc"
}
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# 1-2. at most 2.5 + 4 minutes (estimated for one H100, not yet timed there: docs/performance.md, the
# gpu_check.sh stages); each writes its table after every configuration, so a cut keeps what it measured
if [ $HAVE_DS = 1 ]; then
    if wanted train_bench && ! stage train_bench 150 "$PY" bench/train_bench.py "${TRAIN_ARGS[@]}" \
            --out "$OUT/train_bench"; then  # cut short: the table so far, which its log ends without
        { echo "== train_bench table so far"; cat "$OUT/train_bench/bench.md" 2>/dev/null; } | tee -a "$OUT/train_bench.txt"
    fi
    rm -f "$OUT/train_bench/bench.md"  # in its log (8 files at most in $OUT)
    # the tables are at the end of their logs; their JSON stays behind
    wanted train_bench_deep && stage train_bench_deep 245 "$PY" bench/train_bench.py "${DEEP_ARGS[@]}" \
        --docs dpr --no-compare-checkpointing --out "$SCRATCH/deep"
fi
# 3. correctness of every path on the device; then the stages run only when named
wanted doctor && stage doctor 60 "$PY" -m llara_dist doctor "${DOCTOR_ARGS[@]}"
if [ $HAVE_DS = 1 ]; then
    wanted train_bench_mb16 && stage train_bench_mb16 150 "$PY" bench/train_bench.py "${MB_ARGS[@]}" --docs dpr \
        --paths sdpa --no-compare-checkpointing --no-compare-compiled --out "$SCRATCH/mb16"
    wanted train_bench_module && stage train_bench_module 150 "$PY" bench/train_bench.py "${MODULE_ARGS[@]}" --docs dpr \
        --paths sdpa --no-zero3-layer-gather --no-compare-checkpointing --out "$SCRATCH/module"
    wanted train_bench_zero2 && stage train_bench_zero2 200 "$PY" bench/train_bench.py "${MB_ARGS[@]}" --docs dpr \
        --paths sdpa --zero-stage 2 --no-compare-checkpointing --out "$SCRATCH/zero2"
    wanted train_bench_long && stage train_bench_long 150 "$PY" bench/train_bench.py "${LONG_ARGS[@]}" \
        --docs chunks --no-compare-checkpointing --no-compare-fused --out "$SCRATCH/long"
    wanted host_overhead && stage host_overhead 200 "$PY" bench/host_overhead.py "${HOST_ARGS[@]}" --out "$SCRATCH/host"
fi
wanted attn_bench && stage attn_bench 150 "$PY" bench/attn_bench.py "${BENCH_ARGS[@]}"
echo "== gpu_check status $status after ${SECONDS}s" | tee -a "$CHECK"
exit $status
