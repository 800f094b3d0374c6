// ZeRO-1 on the GPU, its host-side arithmetic (g++-compilable; the device side is
// kernels/dist/sharded_adamw.cuh): the CPU's cut (dist::shard_plan) laid over the GPU trainer's
// flat buffers, where the trained tensors sit at their layout offsets with BatchNorm buffers
// between them, and the device memory a rank holds with and without ZeRO-1.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/dist/shard_plan.hpp"
#include "clip/train/adamw_math.hpp"

namespace clip::cuda {

struct Zero1Plan {
  dist::ShardPlan shard;                // the cut of the flat sequence of trained tensors
  std::vector<int64_t> layout_offsets;  // each trained tensor's offset in the device buffers
  std::vector<bool> decays;

  // A contiguous run to copy: `n` floats at `at` (within a flat range or the owned floats) and
  // at `layout` in the device buffers.
  struct Run {
    int64_t at, layout, n;
  };

  // The device-buffer runs of the flat range [first, first + n).
  std::vector<Run> runs(int64_t first, int64_t n) const {
    std::vector<Run> out;
    for (const dist::ShardPlan::Piece& k : shard.pieces_of(first, n)) add(out, {k.at, layout_offsets[k.tensor] + k.begin, k.n});
    return out;
  }
  // The device-buffer runs of this rank's owned floats (at: within them).
  std::vector<Run> owned_runs() const {
    std::vector<Run> out;
    for (const dist::ShardPlan::Piece& k : shard.pieces) add(out, {k.at, layout_offsets[k.tensor] + k.begin, k.n});
    return out;
  }
  // This rank's pieces as tensors of the owned buffers (the multi-tensor table of the AdamW and
  // norm kernels over the shard).
  std::vector<TensorSlice> owned_slices() const {
    std::vector<TensorSlice> out;
    for (const dist::ShardPlan::Piece& k : shard.pieces) out.push_back({k.at, k.n, decays[k.tensor]});
    return out;
  }
  // Per chunk of the owned slices' chunk table: layout offset - owned offset (a chunk lies in
  // one piece, so one shift serves all its elements).
  std::vector<int64_t> chunk_shifts(const std::vector<TensorChunk>& chunks) const {
    std::vector<int64_t> out;
    out.reserve(chunks.size());
    const auto& pieces = shard.pieces;  // in increasing `at`
    for (const TensorChunk& c : chunks) {
      auto k = std::upper_bound(pieces.begin(), pieces.end(), c.offset,
                                [](int64_t at, const dist::ShardPlan::Piece& p) { return at < p.at; });
      CLIP_CHECK(k != pieces.begin() && c.offset + c.length <= (k - 1)->at + (k - 1)->n,
                 "a chunk of the ZeRO-1 table at ", c.offset, " is not inside one piece of the shard");
      --k;
      out.push_back(layout_offsets[k->tensor] + k->begin - k->at);
    }
    return out;
  }
  // The layout runs of rank q's slice of bucket i (at: within the slice).
  std::vector<Run> slice_runs(size_t i, int q) const {
    const dist::ShardPlan::Bucket& b = shard.buckets[i];
    const dist::Slice s = dist::batch_slice(b.size, shard.world, q);
    return runs(b.first + s.first, s.rows);
  }

  // The bf16 all-gather of bucket i (master weights sharded): the Communicator moves floats, and
  // a slice may hold an odd number of bf16, so each rank's slice is padded to whole floats in the
  // staging: rank q's `counts[q]` floats, its bf16 from element `first[q]` (a gather only copies
  // bits, so bf16 pairs travel as floats unchanged).
  struct PackedSlices {
    std::vector<int64_t> counts, first;
    int64_t floats = 0;  // the staging the gather needs
  };
  PackedSlices packed_slices(size_t i) const {
    PackedSlices p;
    for (int q = 0; q < shard.world; ++q) {
      const int64_t floats = (dist::batch_slice(shard.buckets[i].size, shard.world, q).rows + 1) / 2;
      p.counts.push_back(floats);
      p.first.push_back(2 * p.floats);
      p.floats += floats;
    }
    return p;
  }

  // Per bucket: whether every tensor it covers has `flag` (per tensor, in visit order), e.g. the
  // image tower's tensors, whose gradients are final before the text tower's backward.
  std::vector<bool> buckets_within(const std::vector<bool>& flag) const {
    CLIP_CHECK(flag.size() == layout_offsets.size(), "a flag per trained tensor: ", layout_offsets.size(), ", got ",
               flag.size());
    std::vector<bool> out;
    for (const dist::ShardPlan::Bucket& b : shard.buckets) {
      bool all = true;
      for (const dist::ShardPlan::Piece& k : shard.pieces_of(b.first, b.size)) all = all && flag[k.tensor];
      out.push_back(all);
    }
    return out;
  }
  // Where bucket i starts in the layout when it is one contiguous run there (its collective can
  // read and write the device buffers in place, without the staging), else -1.
  int64_t contiguous_at(size_t i) const {
    const std::vector<Run> r = runs(shard.buckets[i].first, shard.buckets[i].size);
    return r.size() == 1 ? r[0].layout : -1;
  }

  // The rank that owns the trained element at `layout` (updates its master and moments).
  int owner(int64_t layout) const {
    for (size_t t = 0; t < layout_offsets.size(); ++t) {
      if (layout < layout_offsets[t] || layout >= layout_offsets[t] + shard.numels[t]) continue;
      const int64_t flat = shard.offsets[t] + (layout - layout_offsets[t]);
      const dist::ShardPlan::Bucket& b = shard.buckets[static_cast<size_t>(flat / shard.bucket_floats)];
      for (int q = 0; q < shard.world; ++q) {
        const dist::Slice s = dist::batch_slice(b.size, shard.world, q);
        if (flat - b.first >= s.first && flat - b.first < s.first + s.rows) return q;
      }
    }
    CLIP_FAIL("layout offset ", layout, " is not an element of a trained tensor: no rank owns it");
  }

  // Where this rank holds the element at `layout` (a trained tensor's element) among its owned
  // floats, or -1 when another rank does.
  int64_t owned_position(int64_t layout) const {
    for (const dist::ShardPlan::Piece& k : shard.pieces) {
      const int64_t lo = layout_offsets[k.tensor] + k.begin;
      if (layout >= lo && layout < lo + k.n) return k.at + (layout - lo);
    }
    return -1;
  }

 private:
  static void add(std::vector<Run>& out, Run r) {  // adjacent runs merge (one copy instead of two)
    if (!out.empty() && out.back().at + out.back().n == r.at && out.back().layout + out.back().n == r.layout)
      out.back().n += r.n;
    else
      out.push_back(r);
  }
};

// `trained`: every trained tensor's (layout offset, numel, decay) in visit order.
inline Zero1Plan zero1_plan(const std::vector<TensorSlice>& trained, int world, int rank,
                            int64_t bucket_floats = dist::kShardBucketFloats) {
  Zero1Plan p;
  std::vector<int64_t> numels;
  for (const TensorSlice& t : trained) {
    numels.push_back(t.numel);
    p.layout_offsets.push_back(t.offset);
    p.decays.push_back(t.decay);
  }
  p.shard = dist::shard_plan(numels, world, rank, bucket_floats);
  return p;
}

// The GPU trainer's per-rank device memory for weights and optimizer, in bytes. Without ZeRO-1
// every buffer is over the flat layout (`flat` floats, BatchNorm buffers included). ZeRO-1's
// moments and summed gradients cover the rank's `owned` floats, plus one bucket of staging
// (`staging` floats) for the collectives. The fp32 master weights:
//   - fp32 (no bf16 copy): whole on every rank: they ARE the weights the kernels read, so they
//     cannot be sharded; AdamW writes the rank's shard of them and the all-gather the rest;
//   - bf16 under ZeRO-1: the rank's owned floats only (`master_shard`), plus the `replicated`
//     floats every rank keeps in fp32 (BatchNorm buffers, logit_scale: replicated_masters.hpp);
//     the bf16 copy is what is all-gathered.
struct DeviceStateBytes {
  int64_t master = 0, master_shard = 0, compute = 0, gradients = 0, moments = 0, shard_gradients = 0, staging = 0;
  int64_t total() const { return master + master_shard + compute + gradients + moments + shard_gradients + staging; }
};

// `owned` < 0: without ZeRO-1. `replicated` >= 0 (ZeRO-1 with a bf16 copy only): the masters are
// sharded and that many floats stay whole.
inline DeviceStateBytes device_state_bytes(int64_t flat, bool bf16_copy, int64_t owned = -1, int64_t staging = 0,
                                           int64_t replicated = -1) {
  CLIP_CHECK(replicated < 0 || (bf16_copy && owned >= 0), "the fp32 master weights are sharded only under ZeRO-1 "
             "with a bf16 compute copy (in fp32 they are the weights the kernels read)");
  DeviceStateBytes b;
  b.master = 4 * (replicated < 0 ? flat : replicated);
  b.master_shard = replicated < 0 ? 0 : 4 * owned;
  b.compute = bf16_copy ? 2 * flat : 0;
  b.gradients = 4 * flat;
  if (owned < 0) {
    b.moments = 8 * flat;
  } else {
    b.moments = 8 * owned;
    b.shard_gradients = 4 * owned;
    b.staging = 4 * staging;
  }
  return b;
}

}  // namespace clip::cuda
