// The CUDA ModifiedResNet's activation plan (include/clip/cuda/resnet_plan.hpp), on the host:
// what it takes equals what forward/backward use (cross-checked against the CPU TrainActs' own
// sizes), every buffer fits its capacity, and buffers live at the same time never overlap.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "clip/config/variants.hpp"
#include "clip/cuda/resnet_plan.hpp"
#include "clip/models/modified_resnet.hpp"
#include "golden_variants.hpp"

using namespace clip;

namespace {

// A 2-byte storage type standing in for bf16 (only its size matters to the plan).
struct Half {
  uint16_t bits;
};

// An arena as kernels/device_buffer.cuh's: 256-byte aligned takes. Planning (no memory) counts
// bytes; otherwise it hands out pointers into a host block and records each [begin, end).
class Recorder {
 public:
  explicit Recorder(std::byte* base = nullptr) : base_(base) {}
  template <class T>
  T* take(int64_t n) {
    BOOST_REQUIRE(n >= 0);
    used_ = (used_ + 255) / 256 * 256;
    const int64_t at = used_;
    used_ += n * static_cast<int64_t>(sizeof(T));
    ranges_.emplace_back(at, used_);
    return base_ ? reinterpret_cast<T*>(base_ + at) : nullptr;
  }
  int64_t used() const { return used_; }
  const std::vector<std::pair<int64_t, int64_t>>& ranges() const { return ranges_; }

 private:
  std::byte* base_;
  int64_t used_ = 0;
  std::vector<std::pair<int64_t, int64_t>> ranges_;
};

// A buffer of the plan: where it starts and how many bytes the tower uses of it.
struct Region {
  std::string name;
  const std::byte* begin;
  int64_t bytes;
};

bool overlap(const Region& a, const Region& b) {
  return a.begin < b.begin + b.bytes && b.begin < a.begin + a.bytes;
}

template <class Cfg, class S>
struct Check {
  using Acts = cuda::ResNetActs<Cfg, S>;
  using Shape = cuda::ResNetShape<Cfg>;
  static constexpr int64_t kConvScratch = 12345;

  // Plans `capacity`, then builds the acts in host memory of exactly the planned size.
  struct Built {
    std::vector<std::byte> memory;
    Recorder recorder;
    Acts acts;
  };
  static std::unique_ptr<Built> build(int64_t capacity, bool training) {
    Recorder plan;
    Acts planned(plan, capacity, training, kConvScratch);
    auto b = std::make_unique<Built>();
    b->memory.resize(static_cast<size_t>(plan.used()) + 1);
    b->recorder = Recorder(b->memory.data());
    b->acts = Acts(b->recorder, capacity, training, kConvScratch);
    BOOST_TEST(b->recorder.used() == plan.used());
    return b;
  }

  static const std::byte* at(const void* p) { return static_cast<const std::byte*>(p); }

  // Every buffer with the bytes a step on `n` images uses of it.
  static std::vector<Region> regions(const Acts& a, int64_t n) {
    constexpr int64_t s = sizeof(S);
    std::vector<Region> r;
    auto add = [&](std::string name, const void* p, int64_t bytes) {
      if (p) r.push_back({std::move(name), at(p), bytes});
    };
    add("images", a.images, 4 * 3 * int64_t{Shape::resolution} * Shape::resolution * n);
    add("c1", a.c1, s * Shape::half * Shape::hw1 * n);
    add("c2", a.c2, s * Shape::half * Shape::hw1 * n);
    add("c3", a.c3, s * Shape::width * Shape::hw1 * n);
    add("stem", a.stem, s * Shape::width * Shape::hw2 * n);
    auto stats = [&](const std::string& name, cuda::BatchNormStats st, int c) {
      add(name + ".mean", st.mean, 4 * c);
      add(name + ".rstd", st.rstd, 4 * c);
    };
    stats("bn1", a.bn1, Shape::half);
    stats("bn2", a.bn2, Shape::half);
    stats("bn3", a.bn3, Shape::width);
    for (int st = 0; st < 4; ++st)
      for (int b = 0; b < Shape::blocks(st); ++b) {
        const auto& k = a.stages[st][b];
        const std::string p = "layer" + std::to_string(st + 1) + "." + std::to_string(b) + ".";
        add(p + "c1", k.c1, s * Shape::mid(st, b) * n);
        add(p + "c2", k.c2, s * Shape::mid(st, b) * n);
        add(p + "c3", k.c3, s * Shape::out(st) * n);
        add(p + "cd", k.cd, s * Shape::out(st) * n);
        add(p + "y", k.y, s * Shape::out(st) * n);
        stats(p + "bn1", k.bn1, Shape::planes(st));
        stats(p + "bn2", k.bn2, Shape::planes(st));
        stats(p + "bn3", k.bn3, 4 * Shape::planes(st));
        stats(p + "bnd", k.bnd, 4 * Shape::planes(st));
      }
    add("a", a.a, s * Shape::scratch() * n);
    add("b", a.b, s * Shape::scratch() * n);
    add("grad_a", a.grad_a, s * Shape::largest_activation() * n);
    add("grad_b", a.grad_b, s * Shape::largest_activation() * n);
    add("conv_scratch", a.conv_scratch, s * a.conv_scratch_elements);
    stats("spare", a.spare, Shape::widest_batchnorm());
    using D = vision_dims<Cfg>;
    const int64_t c = D::pool_width, t = D::pool_tokens, h = D::heads;
    const auto& q = a.pool;
    add("pool.tok", q.tok, s * n * t * c);
    add("pool.keys", q.keys, s * n * t * c);
    add("pool.values", q.values, s * n * t * c);
    add("pool.means", q.means, s * n * c);
    add("pool.query", q.query, s * n * c);
    add("pool.pooled", q.pooled, s * n * c);
    add("pool.lse", q.lse, 4 * n * h);
    add("pool.d_pooled", q.d_pooled, s * n * c);
    add("pool.d_query", q.d_query, s * n * c);
    add("pool.d_keys", q.d_keys, s * n * t * c);
    add("pool.d_values", q.d_values, s * n * t * c);
    add("pool.d_tok", q.d_tok, 4 * n * t * c);
    add("pool.scratch", q.scratch, 4 * n * h);
    return r;
  }

  static void all_inside(const Built& b, const std::vector<Region>& rs) {
    const std::byte* lo = b.memory.data();
    const std::byte* hi = lo + b.recorder.used();
    for (const Region& r : rs) BOOST_TEST((r.begin >= lo && r.begin + r.bytes <= hi), r.name << " lies outside the arena");
  }

  static void training(int64_t capacity) {
    auto b = build(capacity, true);
    const Acts& a = b->acts;
    // What the constructor takes is exactly the buffers listed (plus alignment padding).
    const std::vector<Region> rs = regions(a, capacity);
    int64_t listed = 0;
    for (const Region& r : rs) listed += r.bytes;
    BOOST_TEST(listed <= b->recorder.used());
    BOOST_TEST(b->recorder.used() - listed < 256 * int64_t(b->recorder.ranges().size()));
    BOOST_TEST(int64_t(rs.size()) == int64_t(b->recorder.ranges().size()));
    // Per image, the S buffers are the CPU TrainActs' (without recompute) with the pool's own
    // tensors instead of the CPU pool's and the images kept as fp32 NCHW elsewhere.
    constexpr int64_t cpu = ModifiedResNet<Cfg>::TrainActs::floats_per_sample(false);
    using Pool = typename ModifiedResNet<Cfg>::Pool;
    constexpr int64_t images = 3 * int64_t{Shape::resolution} * Shape::resolution;
    BOOST_TEST(Acts::storage_per_sample(true) - Acts::PoolActs::storage_per_sample(true) ==
               cpu - images - Pool::train_floats_per_sample);
    // The total: S and float per image, plus the per-model statistics and scratch.
    const int64_t expected = int64_t(sizeof(S)) * (Acts::storage_per_sample(true) * capacity + a.conv_scratch_elements) +
                             4 * (images * capacity + Acts::PoolActs::floats_per_sample(true) * capacity +
                                  Shape::statistics_floats() + 2 * Shape::widest_batchnorm());
    BOOST_TEST(listed == expected);
    // In training every buffer is its own (backward reads them all).
    all_inside(*b, rs);
    for (size_t i = 0; i < rs.size(); ++i)
      for (size_t j = i + 1; j < rs.size(); ++j)
        BOOST_TEST(!overlap(rs[i], rs[j]), rs[i].name << " overlaps " << rs[j].name);
    // A smaller batch uses the front of each buffer: still inside.
    all_inside(*b, regions(a, std::max<int64_t>(1, capacity / 2)));
  }

  static void eval(int64_t capacity) {
    auto b = build(capacity, false);
    const Acts& a = b->acts;
    const int64_t n = capacity;
    constexpr int64_t s = sizeof(S);
    BOOST_TEST(a.images == nullptr);
    BOOST_TEST(a.grad_b == nullptr);
    BOOST_TEST(a.pool.d_tok == nullptr);
    all_inside(*b, regions(a, n));
    // The per-image S elements are the ones listed.
    const int64_t expected = s * (Acts::storage_per_sample(false) * n + a.conv_scratch_elements);
    BOOST_TEST(b->recorder.used() >= expected);
    BOOST_TEST(b->recorder.used() - expected < 256 * int64_t(b->recorder.ranges().size()));
    // Live together in a block: its input x, the shared convolution area, the downsample's, the
    // scratch a and b, the shortcut (grad_a) and its output y.
    const Region shared{"shared", at(a.c1), s * Shape::shared_convolution() * n};
    const Region sa{"a", at(a.a), s * Shape::scratch() * n}, sb{"b", at(a.b), s * Shape::scratch() * n};
    const Region shortcut{"grad_a", at(a.grad_a), s * Shape::largest_activation() * n};
    const std::byte* input = at(a.stem);
    for (int st = 0; st < 4; ++st)
      for (int bl = 0; bl < Shape::blocks(st); ++bl) {
        const auto& k = a.stages[st][bl];
        BOOST_TEST((k.c1 == a.c1 && k.c2 == a.c1 && k.c3 == a.c1));
        std::vector<Region> live{{"x", input, s * Shape::in_channels(st, bl) * Shape::in_size(st, bl) * Shape::in_size(st, bl) * n},
                                 shared, sa, sb, shortcut, {"y", at(k.y), s * Shape::out(st) * n}};
        if (k.cd) live.push_back({"cd", at(k.cd), s * Shape::out(st) * n});
        BOOST_TEST(Shape::shared_convolution() >= std::max(Shape::mid(st, bl), Shape::out(st)));
        for (size_t i = 0; i < live.size(); ++i)
          for (size_t j = i + 1; j < live.size(); ++j)
            BOOST_TEST(!overlap(live[i], live[j]), "layer" << st + 1 << "." << bl << ": " << live[i].name << " overlaps "
                                                             << live[j].name);
        input = at(k.y);
      }
    // The stem: images are the caller's; c (shared), a and its output.
    BOOST_TEST(!overlap(shared, {"stem", at(a.stem), s * Shape::width * Shape::hw2 * n}));
    BOOST_TEST(!overlap(sa, {"stem", at(a.stem), s * Shape::width * Shape::hw2 * n}));
    BOOST_TEST(a.features_map() == a.stages[3].back().y);
    // Eval takes less than training.
    Recorder train_plan;
    Acts train(train_plan, capacity, true, kConvScratch);
    BOOST_TEST(b->recorder.used() < train_plan.used());
  }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_host_resnet_plan)

BOOST_AUTO_TEST_CASE(training_plan_keeps_every_tensor_apart_and_matches_the_cpu_sizes) {
  Check<test::RNTiny, float>::training(1);
  Check<test::RNTiny, float>::training(5);
  Check<test::RNTiny, Half>::training(4);
  Check<variants::RN50, Half>::training(3);
  Check<variants::RN50x4, float>::training(2);
  Check<variants::RN101, Half>::training(2);
}

BOOST_AUTO_TEST_CASE(eval_plan_shares_only_buffers_that_are_never_live_together) {
  Check<test::RNTiny, float>::eval(1);
  Check<test::RNTiny, Half>::eval(3);
  Check<variants::RN50, Half>::eval(2);
  Check<variants::RN50x16, float>::eval(1);
  Check<variants::RN101, Half>::eval(2);
}

BOOST_AUTO_TEST_CASE(shapes_follow_the_cpu_tower) {
  using Shape = cuda::ResNetShape<variants::RN50>;
  using Host = ModifiedResNet<variants::RN50>;
  static_assert(Shape::in_size(0, 0) == 56 && Shape::out_size(0) == 56);
  static_assert(Shape::in_size(1, 0) == 56 && Shape::out_size(1) == 28 && Shape::in_size(1, 1) == 28);
  static_assert(Shape::out_size(3) == 7 && Shape::largest_activation() == 256 * 56 * 56);
  static_assert(Shape::in_channels(1, 0) == 256 && Shape::in_channels(1, 1) == 512 && Shape::planes(1) == 128);
  static_assert(Host::FirstBlock<2>::stride == Shape::stride(2, 0) && Host::RestBlock<2>::stride == Shape::stride(2, 1));
  static_assert(Host::FirstBlock<0>::has_downsample == Shape::downsample(0, 0) &&
                Host::RestBlock<0>::has_downsample == Shape::downsample(0, 1));
  static_assert(Host::stage_size(2) == Shape::in_size(2, 0) && Host::stage_out_size(2) == Shape::out_size(2));
  // Capacity 0 plans nothing that a step would use.
  Recorder plan;
  cuda::ResNetActs<test::RNTiny, float> acts(plan, 0, true, 0);
  BOOST_TEST(acts.capacity == 0);
  BOOST_CHECK_THROW((cuda::ResNetActs<test::RNTiny, float>(plan, -1, true, 0)), clip::Error);
}

BOOST_AUTO_TEST_SUITE_END()
