#!/usr/bin/env bash
# One script for a machine with a GPU and no network: build the extension (Hopper only), run the GPU
# tests and the benchmarks, print a short table. Results land in $OUT (or benchmarks/results).
#
#   bash benchmarks/device_check.sh [--quick] [--only AREA]...
#
# Areas: build, tests, blockwise, quant, gptq, optim, lora, adapter (default: all). --quick stays under 6 minutes on an H100
# including the build; later issues add areas and keep that bound.
# A bitsandbytes baseline is used when importable; point BNB_PATH at an unpacked (trimmed) wheel
# to put it on PYTHONPATH, since the device machine has no bitsandbytes and no network.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=""
ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick" ;;
    --only) shift; ONLY+=("${1:?--only needs an area}") ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
wants() { [ ${#ONLY[@]} -eq 0 ] && return 0; for a in "${ONLY[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }

RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
[ -n "${BNB_PATH:-}" ] && export PYTHONPATH="${BNB_PATH}${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

declare -a SUMMARY
status=0
step() {  # step NAME COMMAND...: run, time, record pass/fail
  local name="$1"; shift
  local t0=$(date +%s)
  echo "==== $name"
  "$@" 2>&1 | tee "$RESULTS/device_check_${name}.log"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-12s %-6s %4ds' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo FAIL)" "$(( $(date +%s) - t0 ))")")
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

if wants build; then
  step build pip install --no-build-isolation --no-deps -e . || { echo "build failed: stopping"; exit 1; }
  step info python -m lightllm info
fi
if wants tests; then
  # The GPU tests only: CI runs the CPU suite, and the device's minutes are scarce.
  step tests python -m pytest tests -q -m gpu -p no:cacheprovider \
    --junitxml="$RESULTS/device_check_tests.xml"
fi
if wants blockwise; then
  step blockwise python benchmarks/bench_blockwise.py $QUICK --device cuda --out "$RESULTS/bench_blockwise.csv"
fi
if wants quant; then
  step quant python benchmarks/bench_quant_matmul.py $QUICK --act-order --device cuda --out "$RESULTS/bench_quant_matmul.csv"
  # CUDA graphs (torch.compile per model) only in the full run: --quick keeps its time bound.
  step generate python benchmarks/bench_generate.py $QUICK $([ -z "$QUICK" ] && echo --cuda-graphs) \
    --device cuda --out "$RESULTS/bench_generate.csv"
fi

if wants gptq; then
  step solver python benchmarks/bench_gptq_solver.py --device cuda --out "$RESULTS/bench_gptq_solver.csv"
  step demo python -m lightllm demo --device cuda --json "$RESULTS/demo.json"
fi

if wants optim; then
  step optim python benchmarks/bench_optim.py $QUICK --device cuda --out "$RESULTS/bench_optim.csv"
  step optim_bf16 python benchmarks/bench_optim.py $QUICK --device cuda --dtype bfloat16 --problems 134m \
    --out "$RESULTS/bench_optim.csv"
fi

if wants lora; then
  step lora python benchmarks/bench_lora.py $QUICK --device cuda --out "$RESULTS/bench_lora.csv"
fi

if wants adapter; then
  step adapter python benchmarks/bench_adapter.py $QUICK --device cuda --out "$RESULTS/bench_adapter.csv"
fi

echo
echo "==== device check summary ($(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'), $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
printf '%s\n' "${SUMMARY[@]}"
exit "$status"
