// How a batch of `total` rows splits over `world` processes: rank r's contiguous rows. Below
// both the data loader (which prepares a rank's rows) and the distributed layer (which trains on
// them), so both split alike from one definition.
#pragma once

#include <algorithm>
#include <cstdint>

#include "clip/core/error.hpp"

namespace clip {

// A rank's contiguous share of `total` items: the first total % W ranks take one more, so the
// slices differ by at most one and the global order is rank 0's rows, then rank 1's, ...
struct Slice {
  int64_t first = 0;
  int64_t rows = 0;
};

inline Slice batch_slice(int64_t total, int world, int rank) {
  CLIP_CHECK(world > 0 && rank >= 0 && rank < world, "rank ", rank, " is not in a world of ", world, " processes");
  const int64_t base = total / world, extra = total % world;
  return {rank * base + std::min<int64_t>(rank, extra), base + (rank < extra ? 1 : 0)};
}

}  // namespace clip
