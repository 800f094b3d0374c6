// ZeRO-1's cut of the trained tensors across the ranks: the one source of the cut for the CPU's
// ShardedAdamW (sharded_adamw.hpp) and the GPU trainer's (kernels/dist/sharded_adamw.cuh), so the
// two shard alike and their checkpoints gather the same elements from the same ranks.
//
// The trained tensors, in visit order, form one flat sequence of `total` floats, cut into buckets
// of `bucket_floats` (one collective each); each bucket is split across the W ranks as a batch is
// (batch_slice), and rank r keeps its slice of every bucket, stored back to back ("owned" floats).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/dist/communicator.hpp"

namespace clip::dist {

inline constexpr int64_t kShardBucketFloats = int64_t{1} << 22;  // 16 MiB of the flat sequence

struct ShardPlan {
  struct Bucket {
    int64_t first, size;  // in the flat sequence
    int64_t owned_at;     // where this rank's slice starts among its owned floats
    Slice own;            // this rank's slice, within the bucket
  };
  struct Piece {          // a run of one tensor
    int tensor;
    int64_t begin, n;     // within the tensor
    int64_t at;           // among the owned floats (pieces), or within a flat range (pieces_of)
  };

  std::vector<int64_t> offsets, numels;  // each tensor's place in the flat sequence
  std::vector<Bucket> buckets;
  std::vector<Piece> pieces;             // this rank's slices, cut at tensor boundaries
  int64_t total = 0, owned = 0, bucket_floats = kShardBucketFloats;
  int world = 1, rank = 0;

  // The largest bucket: the staging a collective of one bucket needs.
  int64_t largest_bucket() const { return std::min(bucket_floats, total); }

  // The tensor runs covering the flat range [first, first + n); `at` counts from `first`.
  std::vector<Piece> pieces_of(int64_t first, int64_t n) const {
    std::vector<Piece> out;
    for (size_t t = 0; t < offsets.size(); ++t) {
      const int64_t lo = std::max(offsets[t], first), hi = std::min(offsets[t] + numels[t], first + n);
      if (lo < hi) out.push_back({static_cast<int>(t), lo - offsets[t], hi - lo, lo - first});
    }
    return out;
  }
};

// The cut of tensors of `numels` floats (in visit order) for rank `rank` of `world`.
inline ShardPlan shard_plan(const std::vector<int64_t>& numels, int world, int rank,
                            int64_t bucket_floats = kShardBucketFloats) {
  CLIP_CHECK(bucket_floats > 0, "a ZeRO-1 bucket needs at least one float, got ", bucket_floats);
  ShardPlan p;
  p.world = world, p.rank = rank, p.bucket_floats = bucket_floats;
  for (int64_t n : numels) {
    CLIP_CHECK(n >= 0, "a tensor cannot have ", n, " elements");
    p.offsets.push_back(p.total);
    p.numels.push_back(n);
    p.total += n;
  }
  for (int64_t b0 = 0; b0 < p.total; b0 += bucket_floats) {
    const int64_t size = std::min(bucket_floats, p.total - b0);
    const Slice own = batch_slice(size, world, rank);
    p.buckets.push_back({b0, size, p.owned, own});
    for (ShardPlan::Piece k : p.pieces_of(b0 + own.first, own.rows)) {
      k.at += p.owned;
      p.pieces.push_back(k);
    }
    p.owned += own.rows;
  }
  return p;
}

}  // namespace clip::dist
