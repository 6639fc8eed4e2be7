#!/usr/bin/env bash
# dsi on one machine with one GPU, in about 10 minutes, nothing downloaded:
#
#   1. build random-weight Llama-architecture models from configs on the GPU
#      (a 3.2B target with a 128k vocabulary and a 78M drafter; SIZE=gpu-8b: an 8B target);
#   2. measure their real TTFT/TPOT into an experiment profile ($OUT/gpu.toml);
#   3. check greedy losslessness of every strategy on the device in float32 and
#      bfloat16 against generate(do_sample=False), reporting the match rate
#      (float32 must match exactly; bfloat16 batched and one-token kernels may round differently);
#   4. decisions on the device vs on the host with the 128k vocabulary (bytes moved, CPU time);
#   5. dsi bench with the HF models (and Hugging Face's own generate as peers),
#      and the measured profile as synthetic replicas.
#
#   tools/gpu_bench.sh                                   # cuda:0, results/gpu
#   DEVICE=cpu SIZE=tiny OUT=/tmp/gpu-check tools/gpu_bench.sh   # the same steps on the CPU, tiny models (tests)
#
# Environment: DEVICE (cuda:0), SIZE (gpu | gpu-8b | tiny), OUT (results/gpu), PYTHON (python),
# TOKENS (lossless tokens per generation, 32), BENCH_ARGS (extra dsi bench arguments).
set -euo pipefail

DEVICE=${DEVICE:-cuda:0}
SIZE=${SIZE:-gpu}
OUT=${OUT:-results/gpu}
PYTHON=${PYTHON:-python}
TOKENS=${TOKENS:-32}
BENCH_ARGS=${BENCH_ARGS:-}
MODELS="$OUT/models"
mkdir -p "$OUT"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }
# Steps 3-5 each report on their own: one that fails (a float32 mismatch, say) is named at the
# end and makes the exit status 1, but does not cost the steps after it (a GPU lease is short).
failed=()
try() { "$@" || { echo "!! failed (exit $?): $*" >&2; failed+=("$STEP"); }; }

step "1. build models ($SIZE) on $DEVICE"
if [[ ! -f "$MODELS/target/config.json" || ! -f "$MODELS/drafter/config.json" ]]; then
  "$PYTHON" -m dsi.tools.experiments.gpu build "$MODELS" --size "$SIZE" --device "$DEVICE"
else
  echo "reusing $MODELS"
fi

DTYPE=bfloat16
[[ "$DEVICE" == cpu ]] && DTYPE=float32   # half precision on the CPU is slow and often unsupported

step "2. TTFT/TPOT on $DEVICE ($DTYPE) -> $OUT/gpu.toml"
"$PYTHON" -m dsi.tools.experiments.gpu measure "$MODELS" --device "$DEVICE" --dtype "$DTYPE" \
  --out "$OUT/gpu.toml" --json "$OUT/latencies.json"

STEP="3. greedy losslessness of every strategy, float32 and bfloat16"; step "$STEP"
try "$PYTHON" -m dsi.tools.experiments.gpu lossless "$MODELS" --device "$DEVICE" --dtypes float32,bfloat16 \
  --tokens "$TOKENS" --json "$OUT/lossless.json"

STEP="4. decisions on the device vs on the host"; step "$STEP"
try "$PYTHON" tools/decision_bench.py --model "$MODELS/target" --device "$DEVICE" --dtype "$DTYPE" \
  --json "$OUT/decisions.json"

STEP="5. dsi bench: HF models and their measured profile"; step "$STEP"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
try "$PYTHON" -m dsi bench --experiment "$OUT/gpu.toml" --out "$OUT/bench" --no-progress $BENCH_ARGS

step "done: $OUT"
ls "$OUT"
if ((${#failed[@]})); then
  printf 'failed step: %s\n' "${failed[@]}" >&2
  exit 1
fi
