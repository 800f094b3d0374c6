#!/usr/bin/env bash
# The Fashion-MNIST demo's second step: the CLIP paper's evaluations of the model that
# examples/fashion_mnist_demo.sh trained, each written as a CLIP_benchmark JSON file:
#
#   zero-shot     the 10,000 test images, the 12 held-out templates
#   linear probe  pre-projection image features of the 60,000 training images: the C sweep on a
#                 stratified 20% of them, the refit on all 60,000, the 10,000 test images
#   few-shot      1, 2, 4, 8, 16 images per class, 3 seeds each, and the SVG curve beside the
#                 zero-shot accuracy (the paper's figure 6)
#   retrieval     the captioned retrieval set (fashion-mnist-shards writes it: 100 test images per
#                 class, 5 captions each, no caption given to two images; made here if the data
#                 folder predates it). A caption can only name its class, so within a class
#                 captions and images pair up at random: a perfect class ranker scores about
#                 k/100 on recall@k (README, "Evaluating the trained model")
#
#   examples/fashion_mnist_eval.sh [BUILD_DIR]       (default: build; after fashion_mnist_demo.sh)
#
# Results go to BUILD_DIR/fashion-mnist-eval (FMNIST_EVAL to move it); image features are cached
# there, so a second run encodes nothing. FMNIST_DATA and FMNIST_RUN as for the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
data=${FMNIST_DATA:-$build/fashion-mnist}
run=${FMNIST_RUN:-$build/fashion-mnist-run}
out=${FMNIST_EVAL:-$build/fashion-mnist-eval}
for file in "$build/examples/clip-eval" "$data/info.json" "$run/weights.safetensors"; do
  if [[ ! -e "$file" ]]; then
    echo "fashion_mnist_eval: $file is missing: build, then run examples/fashion_mnist_demo.sh $build" >&2
    exit 1
  fi
done
train="$data/$(sed -n 's/^ *"train": "\(.*\)",$/\1/p' "$data/info.json")"
test="$data/$(sed -n 's/^ *"test": "\(.*\)",$/\1/p' "$data/info.json")"
retrieval="$data/retrieval/00000.tar"
if [[ ! -f "$retrieval" ]]; then
  "$build/examples/fashion-mnist-shards" --out "$data" --retrieval-only --quiet \
    --seed "$(sed -n 's/^ *"seed": \([0-9]*\),$/\1/p' "$data/info.json")"
fi
start=$(date +%s.%N)
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} "$build/examples/clip-eval" \
  --task zeroshot,linear-probe,fewshot,retrieval --model fmnist-vit --weights "$run/weights.safetensors" \
  --pretrained fashion-mnist-run --dataset-name fashion-mnist \
  --train "$train" --test "$test" --retrieval-data "$retrieval" --classes "$data/classes.txt" --templates "$data/templates.txt" \
  --shots 1,2,4,8,16 --seeds 3 --output "$out"
echo "fashion_mnist_eval: $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s; results in $out"
