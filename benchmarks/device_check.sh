#!/usr/bin/env bash
# One script for a machine with a GPU and no network: build the extension (Hopper only), check the
# kernels, time them, print one table. Results land in $OUT (or benchmarks/results).
#
#   bash benchmarks/device_check.sh [--quick] [--only AREA]...
#
# --quick fits 9 minutes on an H100/H200 including the build. Areas, each under its own timeout:
#   build       pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS=nproc)
#   info        python -m lightllm info; fails if the CUDA kernels did not load on a GPU machine
#   selftest    python -m lightllm selftest: every op and backend with a kernel on the card against the
#               reference (GPTQ, LoRA decode with graph replay, every Triton kernel in bf16, optimizers, solver)
#   blockwise   block-wise quantize/dequantize bit for bit against the reference at 2^24+3 values (NaN,
#               inf, zero blocks; 3 block sizes x 3 dtypes) and their bandwidth against a copy
#   smem        the shared memory of every Triton config the wrappers can pick here, compiled ahead of time
#   jit         first-call compile and autotune time of each Triton kernel family (empty cache)
#   speed       one figure per op family against its baseline: GPTQ GEMV vs cuBLAS fp16, AdamW8bit vs
#               torch's fused AdamW, LoRA decode vs F.linear + matmuls, block-wise quantize vs a copy,
#               NF4 GEMV vs cuBLAS bf16 and bitsandbytes, LLM.int8 threshold 6 vs 0 and vs cuBLAS fp16
#   candidates  GPU_VERIFIED entries from the selftest record: JSON, and lines to paste into backends.py
# (blockwise to candidates: benchmarks/device_check_quick.py --area NAME, which runs one by hand.) The
# budgets are in QUICK_BUDGET below; selftest gets what the deadline leaves after the areas after it.
# An area that runs out is marked TIMEOUT and the next one starts.
# Without --quick: build, info, tests (pytest -m gpu), selftest, the benchmark scripts (blockwise, quant,
# gptq, bnb, optim, lora, adapter), smem, jit, candidates, with no timeouts.
#
# Ctrl-C or SIGTERM stops the running area and still prints the table. Exit status 0 only if every
# area passed. The table is also in device_check_summary.txt, the candidates in
# gpu_verified_candidates.json; logs and each area's JSON in device_check/ (packed into
# device_check_logs.tgz when $OUT is set: the device machine returns only a few files).
# Where the copy has no .git, set LIGHTLLM_COMMIT to the commit being checked (it goes into the candidates).
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

QUICK_AREAS="build info selftest blockwise smem jit speed candidates"
FULL_AREAS="build info tests selftest blockwise quant gptq bnb optim lora adapter smem jit candidates"
AREAS=$([ -n "$QUICK" ] && echo "$QUICK_AREAS" || echo "$FULL_AREAS")
for a in ${ONLY[@]+"${ONLY[@]}"}; do
  case " $AREAS " in *" $a "*) ;; *) echo "--only $a: not an area of this mode (areas: $AREAS)" >&2; exit 2 ;; esac
done
wants() { [ ${#ONLY[@]} -eq 0 ] && return 0; for a in "${ONLY[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }

# --quick: each area's timeout in seconds, estimates for an H100 (adjust from a run's table). With a
# 2-3 minute build they leave the selftest about two minutes inside the deadline, which stays under 9 minutes
# with room for timeout's 5 s grace and the summary.
declare -A QUICK_BUDGET=([build]=180 [info]=20 [blockwise]=45 [smem]=35 [jit]=50 [speed]=100 [candidates]=10)
DEADLINE="${DEVICE_CHECK_DEADLINE:-515}"
SELFTEST_OP_TIMEOUT="${SELFTEST_OP_TIMEOUT:-60}"  # per op, inside the selftest's own budget

RESULTS="${OUT:-benchmarks/results}"
LOGDIR="$RESULTS/device_check"
BENCH_OUT="$([ -n "${OUT:-}" ] && echo "$LOGDIR" || echo "$RESULTS")"  # packed with the logs on the device machine
rm -rf "$LOGDIR"  # an earlier run's JSON must not pass for this run's (candidates reads blockwise.json)
mkdir -p "$LOGDIR"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
[ -n "${BNB_PATH:-}" ] && export PYTHONPATH="${BNB_PATH}${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
COMMIT="${LIGHTLLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || true)}"
[ -n "$COMMIT" ] && export LIGHTLLM_COMMIT="$COMMIT"

START=$SECONDS
declare -a SUMMARY
status=0
STOP=""   # the signal that stopped the run
CHILD=""  # the running area's timeout process

on_signal() {  # stop the running area (timeout passes the signal to its whole process group)
  STOP="$1"
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

record() {  # record NAME STATUS SECONDS KEY
  SUMMARY+=("$(printf '%-11s %-8s %6s  %s' "$1" "$2" "$3" "$4")")
  [ "$2" = ok ] || status=1
}

run_area() {  # run_area NAME TIMEOUT COMMAND...: TIMEOUT 0 = none. Sets AREA_STATUS.
  local name="$1" limit="$2"; shift 2
  local log="$LOGDIR/${name}.log" t0=$SECONDS rc tailer st key
  echo "==== $name$([ "$limit" -gt 0 ] && echo " (timeout ${limit}s)") $(date -u +%H:%M:%S)"
  : > "$log"
  # In the background so that a signal reaches the trap at once; timeout puts the command in its own
  # process group and on expiry (or our TERM) signals all of it, the command's children included.
  timeout -k 5 "$limit" "$@" > "$log" 2>&1 < /dev/null &
  CHILD=$!
  tail -n +1 -s 0.5 -f --pid="$CHILD" "$log" &
  tailer=$!
  wait "$CHILD"; rc=$?
  [ -n "$STOP" ] && { wait "$CHILD" 2>/dev/null; rc=$?; }  # the trap cut the first wait short
  CHILD=""
  wait "$tailer" 2>/dev/null
  # An area of device_check_quick.py ends with "==> NAME STATUS | KEY FIGURE".
  st=$(sed -n "s/^==> $name \([A-Za-z]*\) | .*/\1/p" "$log" | tail -n 1)
  key=$(sed -n "s/^==> $name [A-Za-z]* | //p" "$log" | tail -n 1)
  if [ -n "$STOP" ]; then st=STOPPED; key="stopped by SIG$STOP"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then st=TIMEOUT; key="${key:-killed after ${limit}s}"
  elif [ -z "$st" ]; then st=$([ "$rc" -eq 0 ] && echo ok || echo FAIL)
  elif [ "$st" = ok ] && [ "$rc" -ne 0 ]; then st=FAIL
  fi
  [ -z "$key" ] && [ "$st" != ok ] && key="exit status $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-100)"
  [ -z "$key" ] && key="$(area_key "$name" "$log")"
  # The CUDA kernels are what the machine is for: a build that skipped them must not pass quietly.
  if [ "$name" = info ] && [ "$st" = ok ] && grep -q '^GPU 0' "$log" \
      && grep -q '^native   lightllm._C_cuda not loaded' "$log"; then
    st=FAIL; key="lightllm._C_cuda not loaded on $key (see device_check/info.log)"
  fi
  AREA_STATUS=$st
  record "$name" "$st" "$(( SECONDS - t0 ))" "$key"
}

area_key() {  # the key figure of an area that prints no "==>" line
  case "$1" in
    build) grep -o 'Successfully installed.*' "$2" | tail -n 1 ;;
    info) sed -n 's/^GPU [0 ]*//p' "$2" | head -n 1 ;;
    tests) grep -E '[0-9]+ (passed|failed)' "$2" | tail -n 1 ;;
  esac
}

finish() {
  local card
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  {
    echo
    echo "==== device check summary ($([ -n "$QUICK" ] && echo quick || echo full), ${card:-no GPU}, commit" \
         "${COMMIT:-unknown}, $(( SECONDS - START ))s$([ -n "$STOP" ] && echo ", stopped by SIG$STOP"))"
    printf '%-11s %-8s %6s  %s\n' area status seconds "key figure"
    printf '%s\n' "${SUMMARY[@]}"
  } | tee "$RESULTS/device_check_summary.txt"
  for f in gpu_verified_candidates.json selftest_record.json; do
    [ -f "$LOGDIR/$f" ] && cp "$LOGDIR/$f" "$RESULTS/$f"
  done
  if [ -n "${OUT:-}" ]; then
    tar czf "$RESULTS/device_check_logs.tgz" -C "$RESULTS" device_check && rm -rf "$LOGDIR"
  fi
  [ -n "$STOP" ] && exit $([ "$STOP" = INT ] && echo 130 || echo 143)
  exit "$status"
}

limit_for() {  # limit_for AREA: this area's timeout in --quick (0 without), from its budget and the deadline
  [ -z "$QUICK" ] && { echo 0; return; }
  local left=$(( DEADLINE - (SECONDS - START) ))
  if [ "$1" = selftest ]; then  # what the deadline leaves after the budgets of the areas still to come
    local after=0 seen="" a
    for a in $QUICK_AREAS; do
      [ -n "$seen" ] && wants "$a" && after=$(( after + QUICK_BUDGET[$a] ))
      [ "$a" = selftest ] && seen=1
    done
    echo $(( left - after ))
  else
    local b=${QUICK_BUDGET[$1]}
    echo $(( b < left ? b : left ))
  fi
}

area() {  # area NAME COMMAND...: run it within its limit, or record that no time was left
  local name="$1" limit; shift
  [ -n "$STOP" ] && return 1
  limit=$(limit_for "$name")
  if [ -n "$QUICK" ] && [ "$limit" -lt 10 ]; then
    record "$name" SKIPPED 0 "no time left before the ${DEADLINE}s deadline"
    return 1
  fi
  run_area "$name" "$limit" "$@"
}

quick_py() {  # quick_py AREA [ARGS...]: an area of device_check_quick.py, told to stop 5 s before its timeout
  local limit
  limit=$(limit_for "$1")
  area "$1" "$PY" benchmarks/device_check_quick.py --area "$1" --device cuda --out "$LOGDIR" \
    --budget $(( limit > 0 ? limit - 5 : 0 )) "${@:2}"
}

if wants build; then
  area build "$PY" -m pip install --no-build-isolation --no-deps -e .
  if [ "${AREA_STATUS:-}" != ok ]; then
    [ -n "$STOP" ] || echo "build did not pass: the other areas need it; stopping"
    finish
  fi
fi
if wants build || wants info; then
  area info "$PY" -m lightllm info
fi
if [ -z "$QUICK" ] && wants tests; then
  # The GPU tests only: CI runs the CPU suite.
  area tests "$PY" -m pytest tests -q -m gpu -p no:cacheprovider --junitxml="$LOGDIR/tests.xml"
fi
if wants selftest; then
  quick_py selftest --op-timeout "$SELFTEST_OP_TIMEOUT"
fi
if [ -n "$QUICK" ]; then
  for a in blockwise smem jit speed; do
    wants "$a" && quick_py "$a"
  done
else
  if wants blockwise; then
    area blockwise "$PY" benchmarks/bench_blockwise.py --device cuda --out "$BENCH_OUT/bench_blockwise.csv"
  fi
  if wants quant; then
    area quant "$PY" benchmarks/bench_quant_matmul.py --act-order --device cuda \
      --out "$BENCH_OUT/bench_quant_matmul.csv"
    area generate "$PY" benchmarks/bench_generate.py --cuda-graphs --device cuda --out "$BENCH_OUT/bench_generate.csv"
  fi
  if wants gptq; then
    area solver "$PY" benchmarks/bench_gptq_solver.py --device cuda --out "$BENCH_OUT/bench_gptq_solver.csv"
    area demo "$PY" -m lightllm demo --device cuda --json "$LOGDIR/demo.json"
  fi
  if wants bnb; then  # NF4 and LLM.int8 against cuBLAS and bitsandbytes (BNB_PATH), the issue's shapes
    area bnb "$PY" benchmarks/bench_bnb_layers.py --device cuda --sections nf4-matmul int8-linear \
      --shapes 4096x11008 14336x4096 4096x4096 --out "$BENCH_OUT/bench_bnb_layers.csv"
  fi
  if wants optim; then
    area optim "$PY" benchmarks/bench_optim.py --device cuda --out "$BENCH_OUT/bench_optim.csv"
    area optim_bf16 "$PY" benchmarks/bench_optim.py --device cuda --dtype bfloat16 --problems 134m \
      --out "$BENCH_OUT/bench_optim.csv"
  fi
  if wants lora; then
    area lora "$PY" benchmarks/bench_lora.py --device cuda --out "$BENCH_OUT/bench_lora.csv"
  fi
  if wants adapter; then
    area adapter "$PY" benchmarks/bench_adapter.py --device cuda --out "$BENCH_OUT/bench_adapter.csv"
  fi
  for a in smem jit; do
    wants "$a" && quick_py "$a"
  done
fi
if wants candidates; then
  quick_py candidates
fi
finish
