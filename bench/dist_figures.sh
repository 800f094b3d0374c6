#!/usr/bin/env bash
# Issue 10's two CPU figures, with clip-train (bench/README.md, "Data parallel"):
#
#   bench/dist_figures.sh BUILD_DIR losses       the Fashion-MNIST demo's first 50 steps (its
#        settings, examples/fashion_mnist_demo.sh), one process of 2 threads, then mpirun -np 2
#        of 1 thread each: the losses step by step and their largest relative difference.
#   bench/dist_figures.sh BUILD_DIR throughput   ViT-B/32 training steps, batch 16 global: 1
#        process x 2 threads and 2 processes x 1 thread, interleaved (A B A B), each run STEPS
#        steps (default 6); pairs/s is the median over each run's steps after its first.
#
# Needs BUILD_DIR/examples/clip-train and the demo's shards in BUILD_DIR/fashion-mnist (the demo
# makes them). Prints the load average with each figure. Runs under BUILD_DIR/dist-figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:?usage: bench/dist_figures.sh BUILD_DIR losses|throughput}
what=${2:?usage: bench/dist_figures.sh BUILD_DIR losses|throughput}
data=$build/fashion-mnist
work=$build/dist-figures
train="$data/$(sed -n 's/^ *"train": "\(.*\)",$/\1/p' "$data/info.json")"
mpi=(mpirun -np 2 --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 -x OMP_WAIT_POLICY=passive)
if ((EUID == 0)); then mpi+=(--allow-run-as-root); fi
export OMP_WAIT_POLICY=passive

# run NAME RANKS ARGS...: one clip-train run into $work/NAME; prints its wall time.
run() {
  local name=$1 ranks=$2
  shift 2
  rm -rf "${work:?}/$name"
  local t0=$SECONDS launcher=()
  if ((ranks > 1)); then launcher=("${mpi[@]}"); fi
  OMP_NUM_THREADS=2 "${launcher[@]}" "$build/examples/clip-train" "$@" --train-data "$train" --checkpoint-every 0 \
    --quiet --output "$work/$name" > "$work/$name.log" 2>&1 || { cat "$work/$name.log"; return 1; }
  echo "$name: $((SECONDS - t0)) s wall; load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

mkdir -p "$work"
case $what in
  losses)
    # The demo's schedule for its 6 epochs (batch 128: 468 steps an epoch, warmup half of one).
    demo=(--model fmnist-vit --batch-size 128 --epochs 6 --lr 1.4e-3 --wd 0.1 --warmup 234 --seed 0
          --min-crop-scale 1 --max-shift 2 --stop-at 50)
    run fmnist_1x2 1 "${demo[@]}"
    run fmnist_2x1 2 "${demo[@]}"
    python3 - "$work/fmnist_1x2/metrics.jsonl" "$work/fmnist_2x1/metrics.jsonl" <<'EOF'
import json, sys
def losses(path):
    return {r["step"]: r for r in map(json.loads, open(path)) if r.get("type") == "train"}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
worst = 0.0
for s in sorted(a):
    rel = abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"])
    worst = max(worst, rel)
    print(f"step {s:3d}  1x2 {a[s]['loss']:.7f}  2x1 {b[s]['loss']:.7f}  rel {rel:.1e}  world {b[s]['world_size']}")
print(f"{len(a)} steps; largest relative difference of the losses: {worst:.2e}")
print(f"pairs/s (median): 1x2 {sorted(r['samples_per_s'] for r in a.values())[len(a)//2]:.1f}, "
      f"2x1 {sorted(r['samples_per_s'] for r in b.values())[len(b)//2]:.1f}")
EOF
    ;;
  throughput)
    steps=${STEPS:-6}
    vit=(--model ViT-B/32 --batch-size 16 --steps 1000 --lr 1e-4 --seed 0 --stop-at "$steps")
    for round in 1 2; do
      run "vitb32_1x2_$round" 1 "${vit[@]}"
      run "vitb32_2x1_$round" 2 "${vit[@]}"
    done
    python3 - "$work" <<'EOF'
import json, statistics, sys
def rate(name):
    rows = [r for r in map(json.loads, open(f"{sys.argv[1]}/{name}/metrics.jsonl")) if r.get("type") == "train"]
    return statistics.median(r["samples_per_s"] for r in rows[1:])
for config in ("1x2", "2x1"):
    print(config, "pairs/s per run:", ", ".join(f"{rate(f'vitb32_{config}_{i}'):.2f}" for i in (1, 2)))
one = statistics.mean(rate(f"vitb32_1x2_{i}") for i in (1, 2))
two = statistics.mean(rate(f"vitb32_2x1_{i}") for i in (1, 2))
print(f"ViT-B/32, batch 16: 1 process x 2 threads {one:.2f} pairs/s, 2 processes x 1 thread {two:.2f} pairs/s, "
      f"ratio {two / one:.3f}")
EOF
    ;;
  *) echo "dist_figures: say losses or throughput" >&2; exit 2 ;;
esac
