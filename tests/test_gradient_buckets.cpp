// The gradient buckets (include/clip/dist/gradient_buckets.hpp), without other processes: where
// cut() puts the bucket boundaries, the flat ranges the GPU trainer sums (every trained tensor of a
// model's device layout in exactly one range of its own tower, never one of the other tower's),
// the CPU buckets over a Params (packed, in place, a sum over one process leaving the gradients
// as they are, a sum over two equal ranks doubling every float once), and the logits a rank
// forms (dist::logits_per_rank, which clip-train prints).
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "clip/clip.hpp"
#include "clip/cuda/weight_layout.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/dist/gradient_buckets.hpp"
#include "clip/dist/step_traffic.hpp"
#include "golden_variants.hpp"
#include "messages.hpp"

namespace {

using clip::dist::GradientBuckets;
constexpr int64_t K = GradientBuckets::kBucketFloats;

std::vector<std::pair<size_t, size_t>> cuts(const std::vector<int64_t>& sizes) {
  std::vector<std::pair<size_t, size_t>> out;
  for (const GradientBuckets::Cut& c : GradientBuckets::cut(sizes)) out.emplace_back(c.begin, c.end);
  return out;
}

std::vector<std::pair<int64_t, int64_t>> ranges(const std::vector<GradientBuckets::FlatTensor>& tensors) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (const GradientBuckets::FlatRange& r : GradientBuckets::flat_ranges(tensors)) out.emplace_back(r.first, r.n);
  return out;
}

using Pairs = std::vector<std::pair<size_t, size_t>>;
using Ranges = std::vector<std::pair<int64_t, int64_t>>;

}  // namespace

BOOST_AUTO_TEST_CASE(cut_packs_consecutive_tensors_and_isolates_large_ones) {
  BOOST_TEST(cuts({}).empty());
  BOOST_TEST((cuts({5}) == Pairs{{0, 1}}));
  // 10 + 20 packed; K alone; 30 + (K - 30) exactly fill one; 1 opens the next, closed by the
  // large K + 5; 7 alone at the end.
  BOOST_TEST((cuts({10, 20, K, 30, K - 30, 1, K + 5, 7}) == Pairs{{0, 2}, {2, 3}, {3, 5}, {5, 6}, {6, 7}, {7, 8}}));
  // A run that overflows by one float is cut before the tensor that overflows it.
  BOOST_TEST((cuts({K / 2, K / 2, 1}) == Pairs{{0, 2}, {2, 3}}));
  BOOST_TEST((cuts({K / 2, K / 2 + 1, 3}) == Pairs{{0, 1}, {1, 3}}));
  BOOST_CHECK_THROW(GradientBuckets::cut({3, -1}), clip::Error);
}

BOOST_AUTO_TEST_CASE(flat_ranges_span_gaps_but_never_a_tensor_of_the_other_set) {
  // Selected tensors with alignment gaps between them form one range; the unselected tensor at
  // 128 breaks the run; the large one is alone; unsorted input is sorted by offset.
  const std::vector<GradientBuckets::FlatTensor> tensors = {
      {256 + K + 64, 3, true}, {0, 10, true}, {64, 20, true}, {128, 5, false}, {192, 8, true}, {256, K, true},
  };
  BOOST_TEST((ranges(tensors) == Ranges{{0, 84}, {192, 8}, {256, K}, {256 + K + 64, 3}}));
  // The complement: the one unselected tensor.
  std::vector<GradientBuckets::FlatTensor> flipped = tensors;
  for (auto& t : flipped) t.selected = !t.selected;
  BOOST_TEST((ranges(flipped) == Ranges{{128, 5}}));
  // A run longer than a bucket is cut by the floats each tensor adds, its gap included.
  BOOST_TEST((ranges({{0, K / 2, true}, {K / 2 + 64, K / 2 - 64, true}, {K, 1, true}}) == Ranges{{0, K}, {K, 1}}));
  BOOST_TEST(ranges({}).empty());
  BOOST_CHECK_THROW(GradientBuckets::flat_ranges({{0, 100, true}, {64, 10, true}}), clip::Error);  // overlap
}

namespace {

// The GPU trainer's plan (kernels/models/cuda_trainer.cuh, plan_gradient_sums) on a model's
// device layout: image tower ("visual.") and the rest.
template <class Cfg>
void check_layout_ranges() {
  auto params = std::make_unique<typename clip::Clip<Cfg>::Params>();
  const clip::cuda::WeightLayout layout(*params);
  std::vector<GradientBuckets::FlatTensor> image, text;
  for (const clip::cuda::WeightEntry& e : layout.entries()) {
    if (e.role != clip::Role::parameter) continue;
    const bool visual = e.name.starts_with("visual.");
    image.push_back({e.offset, e.numel, visual});
    text.push_back({e.offset, e.numel, !visual});
  }
  const auto image_ranges = GradientBuckets::flat_ranges(image), text_ranges = GradientBuckets::flat_ranges(text);
  BOOST_TEST(!image_ranges.empty());
  BOOST_TEST(!text_ranges.empty());
  auto covering = [](const std::vector<GradientBuckets::FlatRange>& rs, const clip::cuda::WeightEntry& e) {
    int n = 0;
    for (const auto& r : rs) {
      const bool inside = e.offset >= r.first && e.offset + e.numel <= r.first + r.n;
      const bool touches = e.offset < r.first + r.n && e.offset + e.numel > r.first;
      BOOST_TEST((inside || !touches), e.name << " is cut by a range");
      n += inside;
    }
    return n;
  };
  int64_t summed = 0;
  for (const clip::cuda::WeightEntry& e : layout.entries()) {
    if (e.role != clip::Role::parameter) continue;
    const bool visual = e.name.starts_with("visual.");
    BOOST_TEST(covering(image_ranges, e) == (visual ? 1 : 0), Cfg::name << ": " << e.name);
    BOOST_TEST(covering(text_ranges, e) == (visual ? 0 : 1), Cfg::name << ": " << e.name);
    summed += e.numel;
  }
  BOOST_TEST(summed == clip::parameter_count(*params));
  for (const auto* rs : {&image_ranges, &text_ranges})
    for (const auto& r : *rs) BOOST_TEST((r.n > 0 && r.first + r.n <= layout.size()));
}

}  // namespace

BOOST_AUTO_TEST_CASE(gpu_plan_covers_each_trained_tensor_once_in_its_tower) {
  check_layout_ranges<clip::test::ViTTiny>();
  check_layout_ranges<clip::test::RNTiny>();
}

namespace {

struct Grads {
  clip::Param<3, 5> small_a;
  clip::Param<5> running_mean;  // a buffer: never summed
  clip::Param<7> small_b;
  clip::Param<K + 1> large;     // its own bucket, summed in place
  clip::Param<2> small_c;

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "visual.a", small_a, clip::Role::parameter);
    f(prefix + "visual.bn.running_mean", running_mean, clip::Role::buffer);
    f(prefix + "visual.b", small_b, clip::Role::parameter);
    f(prefix + "large", large, clip::Role::parameter);
    f(prefix + "c", small_c, clip::Role::parameter);
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(cpu_buckets_follow_the_cuts_and_a_one_process_sum_keeps_the_gradients) {
  auto g = std::make_unique<Grads>();
  int64_t k = 0;
  clip::for_each_tensor(*g, [&](const std::string&, auto& t, clip::Role) {
    for (int64_t i = 0; i < t.numel; ++i) t.data()[i] = 0.5f * float(++k % 101);
  });
  const auto before = std::make_unique<Grads>(*g);
  GradientBuckets image(*g, [](const std::string& name) { return name.starts_with("visual."); });
  GradientBuckets rest(*g, [](const std::string& name) { return !name.starts_with("visual."); });
  BOOST_TEST(image.bucket_count() == 1u);  // a and b packed (the buffer is not trained)
  BOOST_TEST(image.floats() == 15 + 7);
  BOOST_TEST(rest.bucket_count() == 2u);   // large alone, then c
  BOOST_TEST(rest.floats() == K + 1 + 2);
  clip::dist::LocalCommunicator one;
  image.start(one);
  rest.start(one);
  image.finish();
  rest.finish();
  BOOST_CHECK_THROW((image.start(one), image.start(one)), clip::Error);
  image.finish();
  BOOST_TEST(std::equal(g->large.data(), g->large.data() + g->large.numel, before->large.data()));
  BOOST_TEST(std::equal(g->small_a.data(), g->small_a.data() + 15, before->small_a.data()));
  BOOST_TEST(std::equal(g->small_b.data(), g->small_b.data() + 7, before->small_b.data()));
  BOOST_TEST(std::equal(g->small_c.data(), g->small_c.data() + 2, before->small_c.data()));
}

namespace {

// Two ranks that hold equal gradients, as seen from one of them: every sum doubles its floats,
// when waited for (as a back end that overlaps would finish it). Records where each sum ran.
class TwinCommunicator final : public clip::dist::Communicator {
 public:
  std::vector<std::pair<const float*, int64_t>> sums;

  int rank() const override { return 0; }
  int size() const override { return 2; }
  void all_reduce_sum(float* data, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) data[i] *= 2;
  }
  void all_reduce_sum(double*, int64_t) override { BOOST_FAIL("no double sum expected"); }
  std::unique_ptr<clip::dist::PendingCollective> start_all_reduce_sum(float* data, int64_t n) override {
    struct Deferred final : clip::dist::PendingCollective {
      TwinCommunicator* comm;
      float* data;
      int64_t n;
      Deferred(TwinCommunicator* c, float* d, int64_t count) : comm(c), data(d), n(count) {}
      void wait() override { comm->all_reduce_sum(data, n); }
    };
    sums.emplace_back(data, n);
    return std::make_unique<Deferred>(this, data, n);
  }
  void all_gather(float*, const std::vector<int64_t>&) override { BOOST_FAIL("no gather expected"); }
  void reduce_scatter_sum(const float*, float*, const std::vector<int64_t>&) override { BOOST_FAIL("no scatter expected"); }
  void broadcast(void*, int64_t, int) override { BOOST_FAIL("no broadcast expected"); }
  void barrier() override {}
  [[noreturn]] void abort(int code) override { std::exit(code); }
  std::string describe() const override { return "twin"; }
};

constexpr int64_t kInPlace = GradientBuckets::kInPlaceFloats;

struct MixedGrads {
  clip::Param<3, 5> small_a;
  clip::Param<kInPlace> mid;  // in a bucket with a and b, but summed where it lies
  clip::Param<7> small_b;

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "a", small_a, clip::Role::parameter);
    f(prefix + "mid", mid, clip::Role::parameter);
    f(prefix + "b", small_b, clip::Role::parameter);
  }
};

}  // namespace

// On the CPU a tensor of at least kInPlaceFloats is summed where it lies, even inside a bucket of
// small ones; the small ones go packed; every float is summed exactly once, packed or not.
BOOST_AUTO_TEST_CASE(cpu_buckets_sum_large_tensors_in_place_and_every_float_once) {
  BOOST_TEST(cuts({15, kInPlace, 7}) == (std::vector<std::pair<size_t, size_t>>{{0, 3}}));  // one bucket
  auto g = std::make_unique<MixedGrads>();
  int64_t k = 0;
  clip::for_each_tensor(*g, [&](const std::string&, auto& t, clip::Role) {
    for (int64_t i = 0; i < t.numel; ++i) t.data()[i] = 0.25f * float(++k % 97);
  });
  const auto before = std::make_unique<MixedGrads>(*g);
  GradientBuckets all(*g, [](const std::string&) { return true; });
  BOOST_TEST(all.bucket_count() == 2u);  // mid alone, a and b packed
  BOOST_TEST(all.floats() == 15 + kInPlace + 7);
  TwinCommunicator twin;
  all.start(twin);
  BOOST_TEST(twin.sums.size() == 2u);
  BOOST_TEST((twin.sums[0].first == g->mid.data() && twin.sums[0].second == kInPlace));  // in place
  BOOST_TEST(twin.sums[1].second == 15 + 7);                                            // the packed rest
  all.finish();
  const auto doubled = [](const float* now, const float* was, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
      if (now[i] != 2 * was[i]) return false;
    return true;
  };
  BOOST_TEST(doubled(g->small_a.data(), before->small_a.data(), 15));
  BOOST_TEST(doubled(g->mid.data(), before->mid.data(), kInPlace));
  BOOST_TEST(doubled(g->small_b.data(), before->small_b.data(), 7));
}

BOOST_AUTO_TEST_CASE(logits_per_rank_are_the_ranks_rows_by_the_batch) {
  const auto check = [](int64_t batch, int world, int rank, int64_t rows) {
    const clip::dist::LogitShape s = clip::dist::logits_per_rank(batch, world, rank);
    BOOST_TEST(s.rows == rows, batch << " over " << world << ", rank " << rank);
    BOOST_TEST(s.columns == batch);
  };
  check(8, 1, 0, 8);  // one process: [B, B]
  check(8, 2, 0, 4);  // clip-train's test prints [4, 8]
  check(8, 2, 1, 4);
  check(10, 3, 0, 4);
  check(10, 3, 2, 3);
  BOOST_CHECK_THROW(clip::dist::logits_per_rank(8, 2, 2), clip::Error);
}

// --sync-bn's collective per pass: both trainers refuse slices that split into unequal numbers
// of micro-batches, naming the rank that differs.
BOOST_AUTO_TEST_CASE(synced_batchnorm_needs_equal_micro_batch_counts) {
  using clip::dist::check_equal_micro_batch_counts;
  BOOST_CHECK_NO_THROW(check_equal_micro_batch_counts(10, 2, 3));   // rows 4, 3, 3: 2 passes each
  BOOST_CHECK_NO_THROW(check_equal_micro_batch_counts(9, 9, 2));    // rows 5, 4: one pass each
  BOOST_CHECK_NO_THROW(check_equal_micro_batch_counts(9, 2, 1));    // one process
  const std::string m = clip::test::message_of([] { check_equal_micro_batch_counts(9, 2, 2); });  // rows 5, 4: 3 vs 2
  BOOST_TEST(m.find("same number of micro-batches") != std::string::npos, m);
  BOOST_TEST(m.find("gives rank 0 3 and rank 1 2") != std::string::npos, m);
}
