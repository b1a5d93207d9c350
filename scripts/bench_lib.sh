# The step runner of scripts/bench_gpu.sh and scripts/bench_cpu.sh (sourced, not run): each step has its own
# time limit within the script's BUDGET, and `recorded` steps go through benchmarks/record.py. Expects KIND
# (gpu | cpu: the result files' prefix), PY and BUDGET to be set; OUT (default logs/bench_$KIND) and RESULTS
# (default benchmarks/results) may be. The clock starts when it is sourced.
# shellcheck shell=bash

OUT=${OUT:-logs/bench_$KIND}
RESULTS=${RESULTS:-benchmarks/results}
START=$(date +%s)
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=0

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT_S COMMAND...: run it with at most LIMIT_S seconds (less when the budget is nearly spent);
# returns the command's exit status (124: the limit ran out; 125: skipped, the budget was spent)
step() {
  local name=$1 limit=$2
  shift 2
  local rest t0 rc
  rest=$(left)
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 125; fi
  if [ "$rest" -lt 30 ]; then echo "== $name: skipped (budget spent)"; return 125; fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo "== $name (limit ${limit}s) : $*"
  t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  grep -v '^{' "$OUT/$name.log" | grep -vE 'USDT|SyncActivityProfiler|Warning|warn' | tail -60
  grep '^{' "$OUT/$name.log" | tail -1 >"$OUT/$name.json"
  echo "== $name: rc=$rc in $(($(date +%s) - t0)) s"
  return "$rc"
}

# recorded NAME LIMIT_S COMMAND...: step NAME through benchmarks/record.py, which writes $RESULTS/${KIND}_NAME.json
# only when the command succeeds (a failed or timed-out step leaves any earlier file as it was); on success the
# file is also copied to $OUT
recorded() {
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$PY" benchmarks/record.py "${KIND}_$name" --results "$RESULTS" --python "$PY" -- "$@" \
    && cp "$RESULTS/${KIND}_$name.json" "$OUT/"
}
