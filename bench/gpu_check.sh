#!/usr/bin/env bash
# The prepared GPU check of the attention paths (issue 3): one H100, under 8 minutes.
#   1. llara-dist doctor on the GPU: every path, forward and backward in bf16 against fp32 sdpa
#   2. bench/attn_bench.py: one LLaMA-2-7B attention layer (32 x 128), rows of 1024 with ~5 and
#      ~1.5 documents: sdpa, flex, varlen, two-pass and the plain causal flash ceiling
#
# From a session holding the device (its image has torch, transformers, numpy, pyyaml; nothing
# else is needed, nothing is installed: the repo is put on PYTHONPATH):
#     run(command="bash bench/gpu_check.sh", timeout_s=540)      # results also land in $OUT
# Dry run of the same plumbing on a CPU box (tiny shapes):
#     DEVICE=cpu bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench_out}
PY=${PY:-python3}
mkdir -p "$OUT"

# llara_dist.kernels is the top-level kernels/ folder (setuptools package-dir); without an
# install, mirror that mapping with links in a temporary folder
SITE=$(mktemp -d)
mkdir "$SITE/llara_dist"
for f in "$PWD"/llara_dist/*; do ln -s "$f" "$SITE/llara_dist/"; done
ln -s "$PWD/kernels" "$SITE/llara_dist/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$DEVICE" = cpu ]; then  # the plumbing only: one path, tiny shapes
    DOCTOR_ARGS=(--device cpu --seq-len 128 --attn sdpa)
    BENCH_ARGS=(--device cpu --rows 2 --seq-len 256 --heads 2 --head-dim 16 --iters 1)
else
    DOCTOR_ARGS=(--device cuda --dtype bf16)
    BENCH_ARGS=(--device cuda)
    nvidia-smi -L
fi

status=0
echo "== doctor"
timeout 240 "$PY" -m llara_dist doctor "${DOCTOR_ARGS[@]}" 2>&1 | tee "$OUT/doctor.txt" || status=1
echo "== attention microbenchmark"
timeout 240 "$PY" bench/attn_bench.py "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/attn_bench.txt" || status=1
rm -rf "$SITE"
echo "== gpu_check status $status"
exit $status
