#!/usr/bin/env bash
# Builds what bench/gpu_check.sh runs, on a machine WITHOUT a GPU, into a bundle that travels.
#
#   bench/gpu_check_prepare.sh [build-dir]        (default: build-gpu; run from anywhere)
#
# 1. configures a separate build folder: -Dnative=false (the GPU machine's CPU may lack AVX-512),
#    -Dcuda=enabled, -Dgpu_check=true, -Dvariants=ViT-B/32,ViT-B/16,ViT-L/14,RN50;
# 2. builds only the GPU tests (tests/cuda/test_cuda_*; the host tests test_cuda_host_* run in CI
#    on any machine) and the two CUDA benchmarks;
# 3. fills <build-dir>/bundle: bin/ (the programs, stripped), lib/ (every shared library they need
#    that is neither the CUDA toolkit's or driver's nor glibc's: Boost.Test, Google Benchmark,
#    ICU, turbojpeg, zlib, gomp, stdc++, gcc_s ...), BUILD_INFO.txt (nvcc --version, the git
#    commit and state, the build options, what each program links) and a copy of the Python
#    scripts, so bench/gpu_check.sh can run from the bundle alone.
#
# Environment: JOBS (ninja -j, default 1: the build machine is shared), NICE (default 10),
# ALLOW_PARTIAL=1 (bundle the programs that built when others failed to compile),
# GOLDEN_FILES="vit_tiny.safetensors ..." (golden files to put in bundle/golden, from
# $CLIP_GOLDEN_DIR or ../shared/golden; the GPU machine has no copy of ../shared).
# Building four variants' CUDA models takes a long time on two cores; run it in the background.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
build=${1:-build-gpu}
jobs=${JOBS:-1}
niceness=${NICE:-10}
variants='ViT-B/32,ViT-B/16,ViT-L/14,RN50'

say() { printf 'gpu_check_prepare: %s\n' "$*" >&2; }

command -v nvcc >/dev/null || { say "nvcc not found: put the CUDA toolkit's bin on PATH"; exit 1; }

options=(-Dbuildtype=release -Dnative=false -Dcuda=enabled -Dgpu_check=true -Dbenchmarks=enabled
         -Dtests=true -Dexamples=false "-Dvariants=$variants")
if [[ -f "$build/build.ninja" ]]; then
  say "reconfiguring $build"
  meson configure "$build" "${options[@]}"
else
  say "configuring $build"
  meson setup "$build" "${options[@]}"
fi

# The targets: every GPU test program and the CUDA benchmarks (nothing else: the CPU tests and
# programs are not needed there and would cost hours here).
mapfile -t targets < <(meson introspect "$build" --targets | python3 -c '
import json, os, sys
root = os.path.realpath(sys.argv[1])
for t in json.load(sys.stdin):
    if t["type"] != "executable":
        continue
    gpu_test = t["name"].startswith("test_cuda_") and not t["name"].startswith("test_cuda_host_")
    if gpu_test or t["name"].startswith("clip-bench-cuda-"):
        for f in t["filename"]:
            print(os.path.relpath(os.path.realpath(f), root))
' "$build")
if [[ ${#targets[@]} -eq 0 ]]; then
  say "no GPU targets in $build: is the CUDA back end enabled (meson found nvcc and cuBLASLt)?"
  exit 1
fi
say "building ${#targets[@]} programs with ninja -j $jobs at nice $niceness: ${targets[*]}"
start=$SECONDS
# -k 0: build every program that compiles, so one failure reports all the others too.
if ! nice -n "$niceness" ninja -C "$build" -j "$jobs" -k 0 "${targets[@]}"; then
  built=()
  for t in "${targets[@]}"; do
    if [[ -x "$build/$t" && "$build/$t" -nt "$build/build.ninja" ]]; then built+=("$t"); else say "NOT BUILT: $t"; fi
  done
  if [[ "${ALLOW_PARTIAL:-0}" != 1 ]]; then
    say "the build failed (see above); ALLOW_PARTIAL=1 bundles the ${#built[@]} programs that did build"
    exit 1
  fi
  say "ALLOW_PARTIAL=1: bundling the ${#built[@]} programs that built"
  targets=("${built[@]}")
fi
say "built in $((SECONDS - start)) s"

bundle=$build/bundle
rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib" "$bundle/scripts"
for t in "${targets[@]}"; do
  cp "$build/$t" "$bundle/bin/"
  # Host symbols only: the device code (fatbin) is kept; the bundle must stay small to travel.
  strip --strip-unneeded "$bundle/bin/$(basename "$t")"
done
cp bench/gpu_check.sh bench/pytorch_gpu.py bench/torch_clip_models.py bench/gpu_check_table.py "$bundle/scripts/"

# Golden files for the GPU tests that read them: only those GOLDEN_FILES names (the four model
# files are 76 MB, more than the device tool carries with everything else: choose).
golden_src=${CLIP_GOLDEN_DIR:-$repo/../shared/golden}
for f in ${GOLDEN_FILES:-}; do
  mkdir -p "$bundle/golden"
  cp "$golden_src/$f" "$bundle/golden/" || { say "no golden file $golden_src/$f"; exit 1; }
done

# Libraries the GPU machine provides itself (CUDA toolkit, driver, NCCL) or must not be replaced
# (glibc and the dynamic loader): never bundled.
provided='^(libcuda|libcudart|libcublas|libcublasLt|libnccl|libnvrtc|libnvJitLink|libcudnn|libnvidia-|libc|libm|libpthread|libdl|librt|libresolv|libutil|ld-linux-x86-64|linux-vdso)\.so'
needed_from_gpu_machine=()
for exe in "$bundle"/bin/*; do
  while read -r name _ path _; do
    [[ -n "$name" ]] || continue
    name=${name##*/}  # the loader is listed by its path
    if [[ "$name" =~ $provided ]]; then
      needed_from_gpu_machine+=("$name")
      continue
    fi
    if [[ "$path" == "not" || -z "$path" || ! -e "$path" ]]; then
      say "$(basename "$exe") needs $name, which is not found here"
      exit 1
    fi
    cp -L "$path" "$bundle/lib/$name"
  done < <(ldd "$exe" | awk '/=>/ {print $1, $2, $3, $4} !/=>/ {print $1, "", "", ""}')
done

# What the bundle needs from the GPU machine, for gpu_check.sh to check before it runs anything.
printf '%s\n' "${needed_from_gpu_machine[@]}" | sort -u | grep -v -E '^(linux-vdso|ld-linux)' > "$bundle/needs.txt" || true

{
  echo "# built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n) ($(uname -m))"
  echo "## git"
  git rev-parse HEAD 2>/dev/null || echo "(not a git checkout)"
  if [[ -n "$(git status --porcelain 2>/dev/null)" ]]; then
    echo "uncommitted changes:"
    git status --porcelain
  fi
  echo "## nvcc --version"
  nvcc --version
  echo "## host compiler"
  c++ --version | head -1
  echo "## build options"
  meson introspect "$build" --buildoptions | python3 -c '
import json, sys
for o in json.load(sys.stdin):
    if o["section"] in ("user", "core", "base") and o["name"] in (
            "buildtype", "optimization", "b_ndebug", "cuda", "native", "variants", "gpu_check",
            "benchmarks", "tests", "examples", "cpp_std"):
        print(o["name"], "=", o["value"])'
  echo "## CUDA compile flags"
  python3 -c '
import json, sys
for c in json.load(open(sys.argv[1])):
    if c["file"].endswith(".cu"):
        print(" ".join(a for a in c["command"].split() if a.startswith(("-gencode", "-std", "-O", "-Xcompiler", "-D"))))
        break' "$build/compile_commands.json" || true
  echo "## needed from the GPU machine"
  cat "$bundle/needs.txt"
  echo "## bundled libraries"
  ls "$bundle/lib"
  echo "## programs"
  ls -l "$bundle/bin"
} > "$bundle/BUILD_INFO.txt"

size_kib=$(du -sk "$bundle" | cut -f1)
say "bundle: $bundle, $((size_kib / 1024)) MiB"
if (( size_kib > 60 * 1024 )); then
  say "WARNING: the bundle is over 60 MiB: the device tool carries at most 64 MiB with the working tree"
fi
say "run on the GPU machine (carry $bundle): bench/gpu_check.sh $bundle"
