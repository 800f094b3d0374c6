// ZeRO-1 on the GPU, its host-side plan (include/clip/cuda/zero1_plan.hpp) on the CPU: the cut is
// the CPU ShardedAdamW's (dist::shard_plan), laid over the GPU's padded weight layout (BatchNorm
// buffers between trained tensors for RN-tiny). A host emulation of the device algorithm of
// kernels/dist/sharded_adamw.cuh over W ranks (staging built from the runs, reduce-scatter as a
// sum of the ranks' staging slices, an element update through the chunk table's shifts, the
// all-gather back through the runs) must give every trained element of every rank the update of
// the summed gradient exactly once and leave the buffers alone. The bf16 path with sharded fp32
// masters (each rank its owned floats; buffers and logit_scale kept fp32 on every rank, packed by
// replicated_masters) is emulated the same way: the master shard updated once by its owner, the
// bf16 image written in place and gathered through the padded slices, logit_scale clamped by its
// owner and broadcast, and the checkpoint gather/scatter of the masters round-trips. And the
// memory arithmetic.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/clip.hpp"
#include "clip/core/bf16.hpp"
#include "clip/cuda/replicated_masters.hpp"
#include "clip/cuda/weight_layout.hpp"
#include "clip/cuda/zero1_plan.hpp"
#include "clip/dist/sharded_adamw.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/init.hpp"
#include "golden_variants.hpp"

namespace {

using clip::cuda::Zero1Plan;

template <class Cfg>
struct Model {
  std::unique_ptr<typename clip::Clip<Cfg>::Params> params = std::make_unique<typename clip::Clip<Cfg>::Params>();
  clip::cuda::WeightLayout layout{*params};
  std::vector<clip::TensorSlice> trained;
  std::vector<int64_t> numels;
  std::vector<bool> visual;  // per trained tensor: the image tower's
  Model() {
    clip::init_params<Cfg>(*params, 3);
    for (const clip::cuda::WeightEntry& e : layout.entries())
      if (e.role == clip::Role::parameter) {
        trained.push_back({e.offset, e.numel, clip::adamw_decays(e.name, e.rank)});
        numels.push_back(e.numel);
        visual.push_back(e.name.starts_with("visual."));
      }
  }
};

// Rank r's gradient of layout element i (distinct per rank and element, exact in fp32).
float grad(int r, int64_t i) { return static_cast<float>((i * 7 + r * 13) % 101) - 50.0f; }

template <class Cfg>
void check_world(int world, int64_t bucket) {
  Model<Cfg> model;
  const int64_t flat = model.layout.size();
  std::vector<float> init(static_cast<size_t>(flat));
  model.layout.pack(*model.params, init.data());
  std::vector<bool> is_trained(static_cast<size_t>(flat), false);
  for (const clip::TensorSlice& t : model.trained)
    for (int64_t i = 0; i < t.numel; ++i) is_trained[t.offset + i] = true;
  // The update the emulation applies to an owned element: p - g / 1024 (exact).
  std::vector<float> expected = init;
  for (int64_t i = 0; i < flat; ++i)
    if (is_trained[i]) {
      float sum = 0;
      for (int r = 0; r < world; ++r) sum += grad(r, i);
      expected[i] = init[i] - sum / 1024.0f;
    }

  std::vector<Zero1Plan> plans;
  int64_t owned_total = 0;
  int logit_scale_owners = 0;
  const int64_t logit_scale = model.layout.offset(model.params->logit_scale);
  for (int r = 0; r < world; ++r) {
    plans.push_back(clip::cuda::zero1_plan(model.trained, world, r, bucket));
    const clip::dist::ShardPlan cpu = clip::dist::shard_plan(model.numels, world, r, bucket);  // the CPU's cut
    BOOST_TEST(plans[r].shard.owned == cpu.owned);
    BOOST_REQUIRE_EQUAL(plans[r].shard.buckets.size(), cpu.buckets.size());
    for (size_t b = 0; b < cpu.buckets.size(); ++b) {
      BOOST_TEST(plans[r].shard.buckets[b].first == cpu.buckets[b].first);
      BOOST_TEST(plans[r].shard.buckets[b].own.first == clip::dist::batch_slice(cpu.buckets[b].size, world, r).first);
    }
    owned_total += plans[r].shard.owned;
    if (plans[r].owned_position(logit_scale) >= 0) ++logit_scale_owners;
  }
  BOOST_TEST(owned_total == plans[0].shard.total);
  BOOST_TEST(logit_scale_owners == 1);
  const int64_t total = std::accumulate(model.numels.begin(), model.numels.end(), int64_t{0});
  BOOST_TEST(plans[0].shard.total == total);

  // Each rank's device buffers: the weights, its gradients, its owned floats.
  std::vector<std::vector<float>> master(world, init), grads(world), owned(world);
  for (int r = 0; r < world; ++r) {
    grads[r].resize(static_cast<size_t>(flat));
    for (int64_t i = 0; i < flat; ++i) grads[r][i] = is_trained[i] ? grad(r, i) : 0.0f;
    owned[r].assign(static_cast<size_t>(plans[r].shard.owned), 0.0f);
  }
  const auto& buckets = plans[0].shard.buckets;
  // The buckets started after the image tower's backward: only its tensors, and (for the device)
  // one contiguous run; every rank flags the same.
  const std::vector<bool> image_only = plans[0].buckets_within(model.visual);
  int64_t early = 0;
  for (size_t b = 0; b < buckets.size(); ++b) {
    for (int r = 1; r < world; ++r) BOOST_TEST(plans[r].buckets_within(model.visual)[b] == image_only[b]);
    for (const clip::dist::ShardPlan::Piece& k : plans[0].shard.pieces_of(buckets[b].first, buckets[b].size))
      if (image_only[b]) BOOST_TEST(model.visual[k.tensor]);
    early += image_only[b] && plans[0].contiguous_at(b) >= 0;
  }
  if (buckets.size() > 4 && std::is_same_v<Cfg, clip::test::ViTTiny>) BOOST_TEST(early > 0);
  // 1. reduce-scatter per bucket: staging from the runs (a contiguous bucket: the gradient buffer
  // itself, from its layout start), each rank's slice summed over the ranks.
  for (size_t b = 0; b < buckets.size(); ++b) {
    std::vector<std::vector<float>> staging(world, std::vector<float>(static_cast<size_t>(buckets[b].size), -1e9f));
    for (int r = 0; r < world; ++r)
      for (const Zero1Plan::Run& run : plans[r].runs(buckets[b].first, buckets[b].size))
        std::copy_n(grads[r].data() + run.layout, run.n, staging[r].data() + run.at);
    if (const int64_t at = plans[0].contiguous_at(b); at >= 0)
      for (int r = 0; r < world; ++r)
        BOOST_TEST(std::equal(staging[r].begin(), staging[r].end(), grads[r].begin() + at));
    for (int r = 0; r < world; ++r) {
      const auto& mine = plans[r].shard.buckets[b];
      for (int64_t i = 0; i < mine.own.rows; ++i) {
        float sum = 0;
        for (int q = 0; q < world; ++q) sum += staging[q][mine.own.first + i];
        owned[r][mine.owned_at + i] = sum;
      }
    }
  }
  // 3. the update through the chunk table (small chunks: many per piece) and its shifts.
  for (int r = 0; r < world; ++r) {
    const std::vector<clip::TensorSlice> slices = plans[r].owned_slices();
    const std::vector<clip::TensorChunk> chunks = clip::build_chunk_table(slices, 37, plans[r].shard.owned);
    const std::vector<int64_t> shifts = plans[r].chunk_shifts(chunks);
    int64_t covered = 0;
    for (size_t c = 0; c < chunks.size(); ++c) {
      for (int64_t i = 0; i < chunks[c].length; ++i) {
        const int64_t at = chunks[c].offset + i, layout = at + shifts[c];
        BOOST_REQUIRE(is_trained[layout]);
        master[r][layout] -= owned[r][at] / 1024.0f;
      }
      covered += chunks[c].length;
    }
    BOOST_TEST(covered == plans[r].shard.owned);
  }
  // 4. all-gather per bucket: each rank's own runs into its slice, every slice back through the runs.
  // A contiguous bucket is gathered in place: each rank's slice already sits at the bucket's
  // layout start plus the slice's start.
  for (size_t b = 0; b < buckets.size(); ++b) {
    if (const int64_t at = plans[0].contiguous_at(b); at >= 0)
      for (int r = 0; r < world; ++r) {
        const auto& mine = plans[r].shard.buckets[b];
        const std::vector<Zero1Plan::Run> own = plans[r].runs(mine.first + mine.own.first, mine.own.rows);
        BOOST_TEST(own.size() == (mine.own.rows > 0 ? 1u : 0u));
        if (!own.empty()) BOOST_TEST(own[0].layout == at + mine.own.first);
      }
    std::vector<float> staging(static_cast<size_t>(buckets[b].size), -1e9f);
    for (int r = 0; r < world; ++r) {
      const auto& mine = plans[r].shard.buckets[b];
      for (const Zero1Plan::Run& run : plans[r].runs(mine.first + mine.own.first, mine.own.rows))
        std::copy_n(master[r].data() + run.layout, run.n, staging.data() + mine.own.first + run.at);
    }
    for (int r = 0; r < world; ++r)
      for (const Zero1Plan::Run& run : plans[r].runs(buckets[b].first, buckets[b].size))
        std::copy_n(staging.data() + run.at, run.n, master[r].data() + run.layout);
  }
  for (int r = 0; r < world; ++r) {
    int64_t wrong = 0;
    for (int64_t i = 0; i < flat; ++i) wrong += master[r][i] != expected[i];
    BOOST_TEST(wrong == 0, "rank " << r << " of " << world << ": " << wrong << " elements differ");
  }
  // Checkpoints: the owned runs (scatter) of every rank tile the trained elements exactly once.
  std::vector<int> hits(static_cast<size_t>(flat), 0);
  for (int r = 0; r < world; ++r)
    for (const Zero1Plan::Run& run : plans[r].owned_runs())
      for (int64_t i = 0; i < run.n; ++i) ++hits[run.layout + i];
  int64_t bad = 0;
  for (int64_t i = 0; i < flat; ++i) bad += hits[i] != (is_trained[i] ? 1 : 0);
  BOOST_TEST(bad == 0);
}

constexpr float kMaxLogitScale = 4.6051701859880914f;  // ln 100, the clamp's bound

// The bf16 step with sharded masters over `world` emulated ranks (kernels/dist/sharded_adamw.cuh's
// update_sharded_masters, gather_masters and load_masters; DeviceWeights' sharded placement).
template <class Cfg>
void check_sharded_masters(int world, int64_t bucket) {
  Model<Cfg> model;
  const int64_t flat = model.layout.size();
  const int64_t logit_scale = model.layout.offset(model.params->logit_scale);
  std::vector<bool> is_trained(static_cast<size_t>(flat), false);
  for (const clip::TensorSlice& t : model.trained)
    for (int64_t i = 0; i < t.numel; ++i) is_trained[t.offset + i] = true;
  std::vector<float> summed(static_cast<size_t>(flat), 0.0f);  // the reduce-scatter's result, by layout
  for (int64_t i = 0; i < flat; ++i)
    if (is_trained[i])
      for (int r = 0; r < world; ++r) summed[i] += grad(r, i);
  // logit_scale starts where the update overshoots the clamp by 0.25.
  model.params->logit_scale[0] = kMaxLogitScale + summed[logit_scale] / 1024.0f + 0.25f;
  std::vector<float> init(static_cast<size_t>(flat));
  model.layout.pack(*model.params, init.data());
  std::vector<float> expected = init;
  for (int64_t i = 0; i < flat; ++i)
    if (is_trained[i]) expected[i] = init[i] - summed[i] / 1024.0f;
  BOOST_TEST(expected[logit_scale] > kMaxLogitScale);
  expected[logit_scale] = kMaxLogitScale;

  // What every rank keeps in fp32: exactly the buffers and logit_scale.
  const clip::cuda::ReplicatedMasters kept = clip::cuda::replicated_masters(model.layout, {"logit_scale"});
  for (const clip::cuda::WeightEntry& e : model.layout.entries()) {
    const bool keep = e.role == clip::Role::buffer || e.name == "logit_scale";
    BOOST_TEST((kept.position(e.offset) >= 0) == keep, e.name);
    if (keep) BOOST_TEST(kept.position(e.offset) % clip::cuda::WeightLayout::kAlign == 0, e.name << " aligned");
  }
  BOOST_CHECK_THROW(clip::cuda::replicated_masters(model.layout, {"no_such_tensor"}), clip::Error);

  std::vector<Zero1Plan> plans;
  for (int r = 0; r < world; ++r) plans.push_back(clip::cuda::zero1_plan(model.trained, world, r, bucket));
  const int owner = plans[0].owner(logit_scale);
  for (int r = 0; r < world; ++r) {
    BOOST_TEST(plans[r].owner(logit_scale) == owner);
    BOOST_TEST((plans[r].owned_position(logit_scale) >= 0) == (r == owner));
  }
  BOOST_CHECK_THROW(plans[0].owner(flat), clip::Error);  // past every tensor: no owner

  // Each rank after construction: its master shard (load_masters: the owned runs of the host's
  // flat weights), the bf16 copy of everything, the packed fp32 values, its summed gradients.
  using Bits = std::vector<uint16_t>;
  std::vector<std::vector<float>> shard(world), owned_grad(world), replicated(world);
  std::vector<Bits> compute(world, Bits(static_cast<size_t>(flat)));
  for (int r = 0; r < world; ++r) {
    shard[r].assign(static_cast<size_t>(plans[r].shard.owned), -1e9f);
    owned_grad[r].assign(shard[r].size(), 0.0f);
    for (const Zero1Plan::Run& run : plans[r].owned_runs()) {
      std::copy_n(init.data() + run.layout, run.n, shard[r].data() + run.at);
      std::copy_n(summed.data() + run.layout, run.n, owned_grad[r].data() + run.at);
    }
    for (int64_t i = 0; i < flat; ++i) compute[r][i] = clip::float_to_bf16_bits(init[i]);
    replicated[r].resize(static_cast<size_t>(kept.size));
    kept.pack(init.data(), replicated[r].data());
  }
  // 3. AdamW on the shard (p packed as g, m, v), the bf16 image in place through the shifts;
  // logit_scale's owner clamps shard and image and broadcasts the fp32 value.
  for (int r = 0; r < world; ++r) {
    const std::vector<clip::TensorChunk> chunks = clip::build_chunk_table(plans[r].owned_slices(), 37, plans[r].shard.owned);
    const std::vector<int64_t> shifts = plans[r].chunk_shifts(chunks);
    for (size_t c = 0; c < chunks.size(); ++c)
      for (int64_t i = 0; i < chunks[c].length; ++i) {
        const int64_t at = chunks[c].offset + i;
        shard[r][at] -= owned_grad[r][at] / 1024.0f;
        compute[r][at + shifts[c]] = clip::float_to_bf16_bits(shard[r][at]);
      }
  }
  {
    float& mine = shard[owner][plans[owner].owned_position(logit_scale)];
    mine = std::clamp(mine, 0.0f, kMaxLogitScale);
    compute[owner][logit_scale] = clip::float_to_bf16_bits(mine);
    for (int r = 0; r < world; ++r) replicated[r][kept.position(logit_scale)] = mine;
  }
  // 4. the bf16 gather per bucket: each rank's slice runs into its padded place, every other
  // rank's back through theirs.
  const auto& buckets = plans[0].shard.buckets;
  for (size_t b = 0; b < buckets.size(); ++b) {
    const Zero1Plan::PackedSlices k = plans[0].packed_slices(b);
    BOOST_TEST(k.floats <= plans[0].shard.largest_bucket());
    BOOST_REQUIRE_EQUAL(k.counts.size(), static_cast<size_t>(world));
    for (int q = 0; q < world; ++q) {
      const clip::dist::Slice s = clip::dist::batch_slice(buckets[b].size, world, q);
      BOOST_TEST(k.first[q] % 2 == 0);  // a slice starts at a float
      BOOST_TEST(2 * k.counts[q] >= s.rows);
      BOOST_TEST(2 * k.counts[q] <= s.rows + 1);
      if (q + 1 < world) BOOST_TEST(k.first[q] + 2 * k.counts[q] == k.first[q + 1]);
    }
    Bits staging(static_cast<size_t>(2 * k.floats), 0xdead);
    for (int q = 0; q < world; ++q)
      for (const Zero1Plan::Run& run : plans[q].slice_runs(b, q))
        std::copy_n(compute[q].data() + run.layout, run.n, staging.data() + k.first[q] + run.at);
    for (int r = 0; r < world; ++r)
      for (int q = 0; q < world; ++q)
        if (q != r)
          for (const Zero1Plan::Run& run : plans[r].slice_runs(b, q))
            std::copy_n(staging.data() + k.first[q] + run.at, run.n, compute[r].data() + run.layout);
  }
  for (int r = 0; r < world; ++r) {
    int64_t wrong = 0;  // trained: the bf16 of the updated master; the rest untouched
    for (int64_t i = 0; i < flat; ++i) wrong += compute[r][i] != clip::float_to_bf16_bits(expected[i]);
    BOOST_TEST(wrong == 0, "rank " << r << " of " << world << ": " << wrong << " bf16 elements differ");
    std::vector<float> values = init;
    kept.unpack(replicated[r].data(), values.data());
    BOOST_TEST(values[logit_scale] == kMaxLogitScale);
    int64_t moved = 0;  // the buffers (running statistics) are the forward's, not the optimizer's
    for (int64_t i = 0; i < flat; ++i) moved += !is_trained[i] && values[i] != init[i];
    BOOST_TEST(moved == 0);
  }
  // Checkpoints: gather_masters (per bucket, each rank's slice of its shard, all-gathered, back
  // through the bucket runs) plus the replicated values give the unsharded weights; load_masters
  // (the owned runs) takes each rank's shard back.
  std::vector<float> saved(static_cast<size_t>(flat), 0.0f);
  for (size_t b = 0; b < buckets.size(); ++b) {
    std::vector<float> staging(static_cast<size_t>(buckets[b].size), -1e9f);
    for (int q = 0; q < world; ++q) {
      const auto& mine = plans[q].shard.buckets[b];
      std::copy_n(shard[q].data() + mine.owned_at, mine.own.rows, staging.data() + mine.own.first);
    }
    for (const Zero1Plan::Run& run : plans[0].runs(buckets[b].first, buckets[b].size))
      std::copy_n(staging.data() + run.at, run.n, saved.data() + run.layout);
  }
  kept.unpack(replicated[0].data(), saved.data());
  int64_t wrong = 0;  // padding: zero in both
  for (int64_t i = 0; i < flat; ++i) wrong += saved[i] != expected[i];
  BOOST_TEST(wrong == 0, world << " ranks: " << wrong << " gathered master elements differ");
  for (int r = 0; r < world; ++r) {
    std::vector<float> loaded(shard[r].size(), -1e9f);
    for (const Zero1Plan::Run& run : plans[r].owned_runs()) std::copy_n(saved.data() + run.layout, run.n, loaded.data() + run.at);
    BOOST_TEST(loaded == shard[r], "rank " << r << ": the scattered shard differs from the one gathered");
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(gpu_zero1_sharded_masters_emulated_step_vit) {
  for (int world : {1, 2, 3, 4}) {
    check_sharded_masters<clip::test::ViTTiny>(world, clip::dist::kShardBucketFloats);
    check_sharded_masters<clip::test::ViTTiny>(world, 1001);  // odd buckets: odd slices, padded
  }
}

BOOST_AUTO_TEST_CASE(gpu_zero1_sharded_masters_emulated_step_resnet_with_buffers) {
  for (int world : {1, 2, 3, 4}) check_sharded_masters<clip::test::RNTiny>(world, 777);
}

BOOST_AUTO_TEST_CASE(gpu_zero1_cut_and_emulated_step_vit) {
  for (int world : {1, 2, 3}) {
    check_world<clip::test::ViTTiny>(world, clip::dist::kShardBucketFloats);
    check_world<clip::test::ViTTiny>(world, 1000);  // many buckets, cut inside tensors
  }
}

BOOST_AUTO_TEST_CASE(gpu_zero1_cut_and_emulated_step_resnet_with_buffers) {
  for (int world : {1, 2, 4}) check_world<clip::test::RNTiny>(world, 777);
}

BOOST_AUTO_TEST_CASE(cpu_sharded_adamw_holds_the_plans_floats) {
  Model<clip::test::ViTTiny> model;
  clip::dist::LocalCommunicator one;
  clip::dist::ShardedAdamW<typename clip::Clip<clip::test::ViTTiny>::Params> sharded(*model.params, {}, one);
  const Zero1Plan plan = clip::cuda::zero1_plan(model.trained, 1, 0);
  BOOST_TEST(sharded.floats_per_rank() == 3 * plan.shard.owned);
  BOOST_TEST(sharded.unsharded_floats() == 2 * plan.shard.total);
}

BOOST_AUTO_TEST_CASE(gpu_memory_per_rank) {
  const clip::cuda::DeviceStateBytes plain = clip::cuda::device_state_bytes(1000, true);
  BOOST_TEST(plain.master == 4000);
  BOOST_TEST(plain.compute == 2000);
  BOOST_TEST(plain.gradients == 4000);
  BOOST_TEST(plain.moments == 8000);
  BOOST_TEST(plain.total() == 18000);
  const clip::cuda::DeviceStateBytes z = clip::cuda::device_state_bytes(1000, false, 250, 500);
  BOOST_TEST(z.compute == 0);
  BOOST_TEST(z.moments == 2000);
  BOOST_TEST(z.shard_gradients == 1000);
  BOOST_TEST(z.staging == 2000);
  BOOST_TEST(z.total() == 4000 + 4000 + 2000 + 1000 + 2000);
  BOOST_TEST(z.master_shard == 0);
  // bf16 with sharded masters: 128 floats kept whole, the 250 owned floats' masters.
  const clip::cuda::DeviceStateBytes s = clip::cuda::device_state_bytes(1000, true, 250, 500, 128);
  BOOST_TEST(s.master == 512);
  BOOST_TEST(s.master_shard == 1000);
  BOOST_TEST(s.compute == 2000);
  BOOST_TEST(s.total() == 512 + 1000 + 2000 + 4000 + 2000 + 1000 + 2000);
  // fp32 cannot shard its masters (they are the weights the kernels read), nor can a run without ZeRO-1.
  BOOST_CHECK_THROW(clip::cuda::device_state_bytes(1000, false, 250, 500, 128), clip::Error);
  BOOST_CHECK_THROW(clip::cuda::device_state_bytes(1000, true, -1, 0, 128), clip::Error);
}

BOOST_AUTO_TEST_CASE(gpu_zero1_buckets_within_a_tower_and_contiguous) {
  const Zero1Plan by10 = clip::cuda::zero1_plan({{0, 10, true}, {64, 10, false}, {128, 10, true}}, 1, 0, 10);
  BOOST_TEST(by10.buckets_within({true, false, true}) == std::vector<bool>({true, false, true}));
  BOOST_TEST(by10.contiguous_at(0) == 0);
  BOOST_TEST(by10.contiguous_at(1) == 64);
  BOOST_TEST(by10.contiguous_at(2) == 128);
  BOOST_CHECK_THROW(by10.buckets_within({true, false}), clip::Error);
  const Zero1Plan by15 = clip::cuda::zero1_plan({{0, 10, true}, {64, 10, false}, {128, 10, true}}, 2, 1, 15);
  BOOST_TEST(by15.buckets_within({true, true, false}) == std::vector<bool>({true, false}));
  BOOST_TEST(by15.contiguous_at(0) == -1);  // a gap of 54 floats between the tensors
  BOOST_TEST(by15.contiguous_at(1) == -1);
  const Zero1Plan packed = clip::cuda::zero1_plan({{0, 64, true}, {64, 10, false}}, 3, 2, 74);
  BOOST_TEST(packed.contiguous_at(0) == 0);  // adjacent tensors: one run
}

// The blocking fallback of a started reduce-scatter (what a host back end without its own does):
// the result is in place when the call returns.
BOOST_AUTO_TEST_CASE(started_reduce_scatter_falls_back_to_the_blocking_one) {
  clip::dist::LocalCommunicator one;
  const std::vector<float> send = {1.5f, -2.0f, 3.25f};
  std::vector<float> recv(3, 0.0f);
  auto pending = one.start_reduce_scatter_sum(send.data(), recv.data(), {3});
  BOOST_TEST(recv == send);
  pending->wait();
  BOOST_CHECK_THROW(one.start_reduce_scatter_sum(send.data(), recv.data(), {1, 2}), clip::Error);
}

BOOST_AUTO_TEST_CASE(gpu_zero1_plan_refuses_a_chunk_across_pieces) {
  const Zero1Plan plan = clip::cuda::zero1_plan({{0, 10, true}, {64, 10, false}}, 1, 0);
  BOOST_TEST(plan.shard.owned == 20);
  BOOST_CHECK_THROW(plan.chunk_shifts({{5, 10, 1}}), clip::Error);
  const std::vector<int64_t> s = plan.chunk_shifts({{0, 10, 1}, {10, 10, 0}});
  BOOST_TEST(s[0] == 0);
  BOOST_TEST(s[1] == 54);
}
