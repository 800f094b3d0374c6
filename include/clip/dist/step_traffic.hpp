// What one data-parallel training step moves between processes, per rank, from the model's sizes
// alone (no run needed): clip-train prints it at start. Counts are the bytes each rank receives
// with the usual ring algorithms (Open MPI and NCCL pick others for small messages; the volume
// is the same order):
//   features           all-gather of both towers' [B, E]:            2 (B - b) E floats
//   feature gradients  reduce-scatter of both [B, E] shares:         2 (W - 1)/W B E floats
//   parameter grads    all-reduce of P floats (= reduce-scatter + all-gather): 2 (W - 1)/W P
// ZeRO-1 (AdamW moments sharded) moves the same bytes as the all-reduce, as a reduce-scatter of
// the gradients and an all-gather of the updated weights (the GPU trainer in bf16 gathers its
// bf16 copy: half the all-gather's bytes), and keeps 2P/W moment floats per rank instead of 2P.
//
// logits_per_rank() is the one statement of the logits a rank forms per step, [n, B] with n its
// rows (both trainers' loss by rows; without processes to share with, n = B): clip-train prints
// it, the GPU trainer sizes its loss's scratch by it.
#pragma once

#include <cstdint>

#include "clip/dist/communicator.hpp"

namespace clip::dist {

struct StepTraffic {
  double feature_bytes = 0;         // features gathered
  double feature_grad_bytes = 0;    // feature gradients scattered back
  double gradient_bytes = 0;        // parameter gradients summed
  double moment_bytes = 0;          // AdamW moments held per rank, unsharded
  double sharded_moment_bytes = 0;  // the same with ZeRO-1
};

// A rank's logits: its rows of the global batch against all of the batch's columns (in each
// direction, image rows against texts and text rows against images).
struct LogitShape {
  int64_t rows = 0;
  int64_t columns = 0;
};

inline LogitShape logits_per_rank(int64_t batch, int world, int rank) {
  return {batch_slice(batch, world, rank).rows, batch};
}

inline StepTraffic step_traffic(int64_t parameters, int embed_dim, int64_t batch, int world, int rank = 0) {
  const double f = sizeof(float), B = double(batch), E = double(embed_dim), P = double(parameters);
  const double share = double(world - 1) / world;
  const double own = double(batch_slice(batch, world, rank).rows);
  StepTraffic t;
  t.feature_bytes = 2 * (B - own) * E * f;
  t.feature_grad_bytes = 2 * share * B * E * f;
  t.gradient_bytes = 2 * share * P * f;
  t.moment_bytes = 2 * P * f;
  t.sharded_moment_bytes = 2 * P * f / world;
  return t;
}

}  // namespace clip::dist
