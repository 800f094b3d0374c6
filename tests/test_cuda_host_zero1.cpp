// ZeRO-1 on the GPU, its host-side plan (include/clip/cuda/zero1_plan.hpp) on the CPU: the cut is
// the CPU ShardedAdamW's (dist::shard_plan), laid over the GPU's padded weight layout (BatchNorm
// buffers between trained tensors for RN-tiny). A host emulation of the device algorithm of
// kernels/dist/sharded_adamw.cuh over W ranks (staging built from the runs, reduce-scatter as a
// sum of the ranks' staging slices, an element update through the chunk table's shifts, the
// all-gather back through the runs) must give every trained element of every rank the update of
// the summed gradient exactly once and leave the buffers alone; and the memory arithmetic.
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "clip/clip.hpp"
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
  Model() {
    clip::init_params<Cfg>(*params, 3);
    for (const clip::cuda::WeightEntry& e : layout.entries())
      if (e.role == clip::Role::parameter) {
        trained.push_back({e.offset, e.numel, clip::adamw_decays(e.name, e.rank)});
        numels.push_back(e.numel);
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
  // 1. reduce-scatter per bucket: staging from the runs, each rank's slice summed over the ranks.
  for (size_t b = 0; b < buckets.size(); ++b) {
    std::vector<std::vector<float>> staging(world, std::vector<float>(static_cast<size_t>(buckets[b].size), -1e9f));
    for (int r = 0; r < world; ++r)
      for (const Zero1Plan::Run& run : plans[r].runs(buckets[b].first, buckets[b].size))
        std::copy_n(grads[r].data() + run.layout, run.n, staging[r].data() + run.at);
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
  for (size_t b = 0; b < buckets.size(); ++b) {
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

}  // namespace

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
}

BOOST_AUTO_TEST_CASE(gpu_zero1_plan_refuses_a_chunk_across_pieces) {
  const Zero1Plan plan = clip::cuda::zero1_plan({{0, 10, true}, {64, 10, false}}, 1, 0);
  BOOST_TEST(plan.shard.owned == 20);
  BOOST_CHECK_THROW(plan.chunk_shifts({{5, 10, 1}}), clip::Error);
  const std::vector<int64_t> s = plan.chunk_shifts({{0, 10, 1}, {10, 10, 0}});
  BOOST_TEST(s[0] == 0);
  BOOST_TEST(s[1] == 54);
}
