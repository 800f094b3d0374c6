#!/usr/bin/env bash
# The one-call GPU check (issue 5): runs ON the GPU machine, in under 5 minutes, from the bundle
# bench/gpu_check_prepare.sh built elsewhere (that machine has the CUDA runtime, cuBLASLt, NCCL,
# PyTorch and Triton, but none of Debian's -dev packages).
#
#   bench/gpu_check.sh [bundle]          (default: build-gpu/bundle beside this script's folder)
#
# 1. nvidia-smi and the bundle's build information;
# 2. every GPU test program (bin/test_cuda_*): exit 0 passes, 77 skips (no GPU), anything else fails
#    (test_cuda_nccl: the NCCL communicator and the Trainer's step through it, one process);
# 3. the kernel benchmarks (clip-bench-cuda-kernels), then the models (clip-bench-cuda-models);
# 4. the same models in PyTorch (bench/pytorch_gpu.py): eager, then torch.compile (training first);
# 5. one table of everything (bench/gpu_check_table.py), with the ratios and targets.
# Each step runs under a timeout cut from one budget (GPU_CHECK_BUDGET_S, default 285 s), so the
# whole stays under 5 minutes and what was measured is printed even when a later step runs out.
#
# Results go to $GPU_CHECK_OUT, else $OUT (the device tool's folder that comes back), else a
# temporary folder: tests.tsv, kernels.json, models.json, pytorch_eager.jsonl,
# pytorch_compile.jsonl, table.md, gpu_check.log (7 files).
# Exit status: 0 every test passed (or was skipped with a GPU present) and every step ran;
# 1 a test failed, a program could not start or a step failed; 77 no GPU here (tests skipped,
# nothing measured). Targets missed are reported in the table, not in the status.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # bench/, or the bundle's scripts/ (same files)
if [[ -d "$here/../bin" ]]; then
  default_bundle=$here/..
  repo=$(cd "$here/../../.." && pwd)  # <repo>/build-gpu/bundle/scripts
else
  repo=$(cd "$here/.." && pwd)
  default_bundle=$repo/build-gpu/bundle
fi
bundle=${1:-$default_bundle}
bundle=$(cd "$bundle" 2>/dev/null && pwd) || { echo "gpu_check: no bundle at ${1:-$default_bundle}: run bench/gpu_check_prepare.sh first" >&2; exit 1; }
out=${GPU_CHECK_OUT:-${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}}
mkdir -p "$out"
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-285}
start=$SECONDS
exec > >(tee "$out/gpu_check.log") 2>&1

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
section() { printf '\n==== %s (t=%ds)\n' "$*" "$((SECONDS - start))"; }
# Seconds a step may take: its share, cut to what the budget has left after `reserve` seconds for
# the steps after it; at least 5.
allow() {
  local share=$1 reserve=${2:-0} left
  left=$((budget - (SECONDS - start) - reserve))
  (( left < share )) && share=$left
  (( share < 5 )) && share=5
  echo "$share"
}

section "GPU check: bundle $bundle, results in $out"
date -u
# The build's commit, nvcc and options (the list of uncommitted files is in the file itself).
sed -e '/^uncommitted/,/^## nvcc/{/^## nvcc/!d;}' -e '/^## needed from/,$d' "$bundle/BUILD_INFO.txt" 2>/dev/null
if command -v nvidia-smi >/dev/null; then
  timeout 20 nvidia-smi || echo "nvidia-smi failed (status $?)"
else
  echo "nvidia-smi: not found"
fi

# ---- the bundle's libraries, and the CUDA ones it expects the machine to have -------------------
section "shared libraries"
ld_path=$bundle/lib
missing() {  # the libraries one program cannot find with ld_path
  LD_LIBRARY_PATH=$ld_path ldd "$1" 2>/dev/null | awk '/not found/ {print $1}'
}
mapfile -t programs < <(find "$bundle/bin" -maxdepth 1 -type f -perm -u+x | sort)
if [[ ${#programs[@]} -eq 0 ]]; then
  fail "no programs in $bundle/bin"
fi
lost=$(for p in "${programs[@]}"; do missing "$p"; done | sort -u)
if [[ -n "$lost" ]]; then
  # The CUDA libraries may live in the CUDA toolkit's folder or in PyTorch's nvidia-* wheels.
  echo "not on the loader's path: $(echo "$lost" | tr '\n' ' '); searching the CUDA folders and Python's site-packages"
  mapfile -t roots < <("$python" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
  roots+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64 /usr/local/lib)
  for lib in $lost; do
    for root in "${roots[@]}"; do
      [[ -d "$root" ]] || continue
      found=$(find "$root" -maxdepth 5 -name "$lib" -print -quit 2>/dev/null)
      if [[ -n "$found" ]]; then
        ld_path=$ld_path:$(dirname "$found")
        echo "  $lib: $found"
        break
      fi
    done
  done
fi
for p in "${programs[@]}"; do
  still=$(missing "$p")
  [[ -z "$still" ]] || fail "$(basename "$p") cannot find: $(echo "$still" | tr '\n' ' ')"
done
echo "LD_LIBRARY_PATH for the bundle's programs: $ld_path"
run_bin() { LD_LIBRARY_PATH=$ld_path "$@"; }  # only the bundle's programs get it (not Python)

# The tests' data: golden files and the tokenizer's vocabulary.
if [[ -z "${CLIP_GOLDEN_DIR:-}" ]]; then
  for d in "$bundle/golden" "$repo/shared/golden" "$repo/../shared/golden"; do
    [[ -d "$d" ]] && export CLIP_GOLDEN_DIR=$d && break
  done
fi
export CLIP_DATA_DIR=${CLIP_DATA_DIR:-$repo/data}
echo "CLIP_GOLDEN_DIR=${CLIP_GOLDEN_DIR:-(none found)} CLIP_DATA_DIR=$CLIP_DATA_DIR"

# ---- 1. GPU tests ------------------------------------------------------------------------------
section "GPU tests"
: > "$out/tests.tsv"
tests_end=$((SECONDS + $(allow 75 200)))
skipped=0 ran=0
for p in "${programs[@]}"; do
  name=$(basename "$p")
  [[ "$name" == test_cuda_* ]] || continue
  left=$((tests_end - SECONDS))
  if (( left < 5 )); then
    printf '%s\tnot run (time)\t0\n' "$name" >> "$out/tests.tsv"
    fail "$name: not run, the tests' time is spent"
    continue
  fi
  t0=$SECONDS
  echo "---- $name (timeout ${left}s)"
  run_bin timeout --kill-after=5 "$left" "$p" --log_level=test_suite --report_level=short --color_output=false
  rc=$?
  case $rc in
    0) status=pass ;;
    77) status=skip; skipped=$((skipped + 1)) ;;
    124|137) status=timeout; fail "$name: timed out after ${left}s" ;;
    *) status="fail($rc)"; fail "$name: exit status $rc" ;;
  esac
  ran=$((ran + 1))
  printf '%s\t%s\t%d\n' "$name" "$status" "$((SECONDS - t0))" >> "$out/tests.tsv"
done
cat "$out/tests.tsv"
if (( ran == 0 )); then
  fail "no GPU test programs (bin/test_cuda_*) in the bundle"
elif [[ "$(grep -P '^test_cuda_runtime\t' "$out/tests.tsv" | cut -f2)" == skip ]] || (( skipped == ran )); then
  echo "no GPU: every GPU test skipped (exit 77), so nothing is measured."
  if (( failures > 0 )); then
    echo "gpu_check: NO GPU on this machine, and $failures failure(s) listed above as FAIL: (exit 1)"
    exit 1
  fi
  echo "gpu_check: NO GPU on this machine (exit 77)"
  exit 77
elif (( skipped > 0 )); then
  fail "$skipped GPU test program(s) skipped on a machine where others ran"
fi

# ---- 2. kernel benchmarks -------------------------------------------------------------------------
bench() {  # name seconds json-out extra-args...
  local name=$1 seconds=$2 json=$3
  shift 3
  if [[ ! -x "$bundle/bin/$name" ]]; then
    fail "$name is not in the bundle"
    return
  fi
  run_bin timeout --kill-after=5 "$seconds" "$bundle/bin/$name" --benchmark_out="$json" \
    --benchmark_out_format=json --benchmark_counters_tabular=true "$@"
  local rc=$?
  (( rc == 0 )) || fail "$name: exit status $rc (124: timed out after ${seconds}s)"
}
section "kernel benchmarks"
bench clip-bench-cuda-kernels "$(allow 25 175)" "$out/kernels.json" --benchmark_min_time=0.05

# ---- 3. model benchmarks --------------------------------------------------------------------------
section "model benchmarks"
bench clip-bench-cuda-models "$(allow 70 105)" "$out/models.json" --benchmark_min_time=0.5

# ---- 4. PyTorch, eager then torch.compile ----------------------------------------------------------
pytorch() {  # jsonl-out seconds args...
  local json=$1 seconds=$2
  shift 2
  # The script stops starting cases 20 s before the hard timeout; output is line-buffered JSON.
  timeout --kill-after=5 "$seconds" "$python" "$here/pytorch_gpu.py" --budget-s "$((seconds - 20))" "$@" | tee "$json"
  local rc=${PIPESTATUS[0]}
  (( rc == 0 )) || echo "pytorch_gpu.py $*: exit status $rc (124: timed out after ${seconds}s; what it printed is kept)"
}
section "PyTorch eager"
pytorch "$out/pytorch_eager.jsonl" "$(allow 45 60)" --modes eager
section "PyTorch torch.compile (training first: its target is against compile)"
pytorch "$out/pytorch_compile.jsonl" "$(allow 110 5)" --modes compile --kinds train,image,text --iters 5

# ---- 5. the table ----------------------------------------------------------------------------------
section "table"
"$python" "$here/gpu_check_table.py" --tests "$out/tests.tsv" --models "$out/models.json" \
  --kernels "$out/kernels.json" --pytorch "$out/pytorch_eager.jsonl" "$out/pytorch_compile.jsonl" | tee "$out/table.md"

section "done in $((SECONDS - start)) s"
if (( failures > 0 )); then
  echo "gpu_check: FAILED ($failures failure(s), listed above as FAIL:)"
  exit 1
fi
echo "gpu_check: every GPU test passed; results in $out"
