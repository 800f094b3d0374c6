#!/usr/bin/env bash
# Fuzzes every target (or the ones named) for N minutes each, one after another on one core:
#   tests/fuzz/run_all.sh N [target...]
# from the repository root, after building the targets:
#   CXX=clang++-14 meson setup build-fuzz -Dfuzz=true -Dtests=false -Dexamples=false \
#     -Dbenchmarks=disabled -Dcuda=disabled && ninja -C build-fuzz
# New inputs go to build-fuzz/fuzz-work/<target> (seeded from tests/fuzz/corpus/<target>, which
# stays as it is); crashes, leaks and timeouts to build-fuzz/fuzz-findings/. Each target's last
# lines (executions, exec/s, coverage) are appended to build-fuzz/fuzz-summary.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
minutes=${1:?usage: tests/fuzz/run_all.sh MINUTES [target...]}
shift
build=${FUZZ_BUILD:-build-fuzz}
targets=("$@")
if ((${#targets[@]} == 0)); then
  for exe in "$build"/tests/fuzz/fuzz_*; do [[ -x $exe && -f $exe ]] && targets+=("${exe##*/fuzz_}"); done
fi
mkdir -p "$build/fuzz-findings" "$build/fuzz-logs"
status=0
for target in "${targets[@]}"; do
  work="$build/fuzz-work/$target"
  mkdir -p "$work"
  dict=()
  [[ -f tests/fuzz/dict/$target.dict ]] && dict=(-dict="tests/fuzz/dict/$target.dict")
  log="$build/fuzz-logs/$target.log"
  echo "== $target: $minutes min ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
  start=$(date +%s)
  "$build/tests/fuzz/fuzz_$target" "$work" "tests/fuzz/corpus/$target" "${dict[@]}" \
    -max_total_time=$((minutes * 60)) -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$build/fuzz-findings/$target-" > "$log" 2>&1
  rc=$?
  seconds=$(($(date +%s) - start))
  runs=$(grep -oE 'stat::number_of_executed_units: +[0-9]+' "$log" | awk '{print $2}')
  rate=$(grep -oE 'stat::average_exec_per_sec: +[0-9]+' "$log" | awk '{print $2}')
  cov=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -o 'cov: [0-9]*' | awk '{print $2}')
  ft=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -o 'ft: [0-9]*' | awk '{print $2}')
  line="$target seconds=$seconds runs=${runs:-?} exec_per_s=${rate:-?} cov=${cov:-?} ft=${ft:-?} exit=$rc"
  echo "$line" | tee -a "$build/fuzz-summary.txt"
  if ((rc != 0)); then
    status=1
    grep -E 'ERROR|runtime error|SUMMARY|Test unit written' "$log" | head -5
  fi
done
exit $status
