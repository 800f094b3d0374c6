// The optimizer on its own: AdamW against PyTorch's step in the golden files (MANIFEST section C)
// and against a double-precision loop over several steps, open_clip's weight-decay groups, the
// learning-rate schedules, and gradient clipping.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numbers>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/clip.hpp"
#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/io/state_dict.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/grad_clip.hpp"
#include "clip/train/schedule.hpp"
#include "golden.hpp"
#include "golden_variants.hpp"
#include "messages.hpp"

namespace {

using clip::Role;
using Values = std::map<std::string, std::vector<float>>;

// The golden step: lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 (MANIFEST section C).
constexpr clip::AdamWOptions golden_adam{1e-3f, 0.9f, 0.98f, 1e-6f, 0.2f};

// name -> values of every float tensor with the given role.
template <class Params>
Values tensor_values(const Params& params, Role wanted = Role::parameter) {
  Values out;
  clip::for_each_tensor(params, [&](const std::string& name, const auto& t, Role role) {
    if constexpr (!clip::is_counter_v<decltype(t)>)
      if (role == wanted) out[name] = std::vector<float>(t.values.begin(), t.values.end());
  });
  return out;
}

// Reads grad.<name> of every trained tensor into `grads` (buffers stay zero).
template <class Params>
void load_gradients(Params& grads, const clip::SafeTensors& file) {
  clip::zero(grads);
  clip::for_each_tensor(grads, [&](const std::string& name, auto& t, Role role) {
    using T = std::remove_cvref_t<decltype(t)>;
    if constexpr (!clip::is_counter_v<T>)
      if (role == Role::parameter) {
        const clip::Tensor g = file.tensor("grad." + name);
        BOOST_TEST_REQUIRE(g.numel() == T::numel, name);
        std::copy(g.values.begin(), g.values.end(), t.data());
      }
  });
}

// Applies AdamW to the stored initial weights and gradients and compares with after.*.
template <class Cfg>
void check_golden_adamw(const std::string& model_file, const std::string& grad_file) {
  auto model_path = clip::test::golden_file(model_file);
  auto grad_path = clip::test::golden_file(grad_file);
  if (!model_path || !grad_path) return;
  using Params = typename clip::Clip<Cfg>::Params;
  const clip::SafeTensors step_file = clip::SafeTensors::open(*grad_path);
  auto params = std::make_unique<Params>(), grads = std::make_unique<Params>();
  clip::load_state_dict(*params, clip::SafeTensors::open(*model_path), clip::Extra::allow);
  load_gradients(*grads, step_file);
  const Values buffers_before = tensor_values(*params, Role::buffer);
  const Values g = tensor_values(*grads);

  // The file records the options it was made with.
  const clip::json::Value opt = clip::json::parse(step_file.metadata().at("optimizer"));
  BOOST_TEST(opt["lr"].as_number() == 1e-3);
  BOOST_TEST(opt["betas"].as_array()[0].as_number() == 0.9);
  BOOST_TEST(opt["betas"].as_array()[1].as_number() == 0.98);
  BOOST_TEST(opt["eps"].as_number() == 1e-6);
  BOOST_TEST(opt["weight_decay"].as_number() == 0.2);

  clip::AdamW<Params> adam(*params, golden_adam);
  adam.step(*params, *grads, 1e-3f);
  BOOST_TEST(adam.steps() == 1);

  double worst = 0;
  std::string worst_name;
  int64_t exact = 0, total = 0;
  for (const auto& [name, got] : tensor_values(*params)) {
    const clip::Tensor after = step_file.tensor("after." + name);
    BOOST_TEST_REQUIRE(after.values.size() == got.size(), name);
    double err = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      err = std::max(err, std::abs(double(got[i]) - after.values[i]));
      exact += got[i] == after.values[i];
    }
    total += static_cast<int64_t>(got.size());
    if (err > worst) worst = err, worst_name = name;
  }
  BOOST_TEST_MESSAGE(model_file << ": AdamW on the stored gradients vs after.*: max |diff| " << worst << " ("
                                << worst_name << "), " << exact << " of " << total << " elements bit-identical");
  BOOST_TEST(worst <= 1e-7, "max |diff| " << worst << " in " << worst_name);
  BOOST_TEST((tensor_values(*params, Role::buffer) == buffers_before), "AdamW left the buffers alone");

  // The gradients were consumed (zeroed); the moments are the first step's: m = 0.1 g, v = 0.02 g^2.
  const Values m = tensor_values(adam.m()), v = tensor_values(adam.v()), zeroed = tensor_values(*grads);
  bool grads_zero = true, moments_ok = true;
  for (const auto& [name, gv] : g) {
    for (float x : zeroed.at(name)) grads_zero &= x == 0.0f;
    for (size_t i = 0; i < gv.size(); ++i) {
      const double v_ref = 0.02 * double(gv[i]) * gv[i];
      moments_ok &= m.at(name)[i] == 0.1f * gv[i];
      moments_ok &= std::abs(v.at(name)[i] - v_ref) <= 1e-6 * v_ref;
    }
  }
  BOOST_TEST(grads_zero, "AdamW::step leaves the gradients at zero");
  BOOST_TEST(moments_ok, "m = 0.1 g and v = 0.02 g^2 after the first step");
}

// The golden file's decay groups against AdamW::decays, name by name.
template <class Cfg>
void check_decay_groups(const std::string& grad_file) {
  auto path = clip::test::golden_file(grad_file);
  if (!path) return;
  using Params = typename clip::Clip<Cfg>::Params;
  const clip::SafeTensors file = clip::SafeTensors::open(*path);
  auto names = [&](const char* key) {
    std::vector<std::string> out;
    const clip::json::Value list = clip::json::parse(file.metadata().at(key));
    for (const clip::json::Value& v : list.as_array()) out.push_back(v.as_string());
    std::sort(out.begin(), out.end());
    return out;
  };
  const std::vector<std::string> no_decay = names("no_decay_params"), decay = names("decay_params");
  std::vector<std::string> ours_no_decay, ours_decay;
  auto params = std::make_unique<Params>();
  clip::for_each_tensor(*params, [&](const std::string& name, const auto& t, Role role) {
    if (role != Role::parameter) return;
    (clip::AdamW<Params>::decays(name, std::remove_cvref_t<decltype(t)>::rank) ? ours_decay : ours_no_decay)
        .push_back(name);
  });
  std::sort(ours_decay.begin(), ours_decay.end());
  std::sort(ours_no_decay.begin(), ours_no_decay.end());
  BOOST_TEST_MESSAGE(grad_file << ": " << decay.size() << " decayed, " << no_decay.size() << " not decayed");
  BOOST_TEST(ours_decay == decay, boost::test_tools::per_element());
  BOOST_TEST(ours_no_decay == no_decay, boost::test_tools::per_element());
}

// A small Params: two trained tensors (one in each decay group) and a buffer.
struct Toy {
  clip::Param<3, 5> weight;  // decayed
  clip::Param<7> bias;       // not decayed (rank 1)
  clip::Param<4> stats;      // buffer

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "layer.weight", weight, Role::parameter);
    f(prefix + "layer.bias", bias, Role::parameter);
    f(prefix + "layer.stats", stats, Role::buffer);
  }
};

// One trained tensor of R x 1000 floats.
template <int R>
struct Flat {
  clip::Param<R, 1000> w;
  template <class F>
  void visit(F&& f, const std::string& prefix) { f(prefix + "w", w, Role::parameter); }
};
using Big = Flat<300>;   // 300,000 floats: 19 chunks, on every thread
using Small = Flat<2>;   // its first 2,000 floats, in one piece

void fill_normal(Toy& t, std::mt19937& rng, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  for (float& x : t.weight.values) x = normal(rng);
  for (float& x : t.bias.values) x = normal(rng);
  for (float& x : t.stats.values) x = normal(rng);
}

}  // namespace

BOOST_AUTO_TEST_CASE(adamw_reproduces_pytorch_step_vit) {
  check_golden_adamw<clip::test::ViTTiny>("vit_tiny.safetensors", "vit_tiny_grad.safetensors");
}

BOOST_AUTO_TEST_CASE(adamw_reproduces_pytorch_step_resnet) {
  check_golden_adamw<clip::test::RNTiny>("rn_tiny.safetensors", "rn_tiny_grad.safetensors");
}

BOOST_AUTO_TEST_CASE(decay_groups_match_golden_files) {
  check_decay_groups<clip::test::ViTTiny>("vit_tiny_grad.safetensors");
  check_decay_groups<clip::test::RNTiny>("rn_tiny_grad.safetensors");
  // The rule itself, on names no golden model has.
  BOOST_TEST(!clip::adamw_decays("visual.layer1.0.downsample.1.weight", 1));  // a BatchNorm gain: rank 1
  BOOST_TEST(!clip::adamw_decays("visual.attnpool.k_proj.bias", 1));
  BOOST_TEST(clip::adamw_decays("token_embedding.weight", 2));
  BOOST_TEST(!clip::adamw_decays("something_ln_like.weight", 2));  // open_clip matches substrings
}

// Ten steps with varying gradients and learning rates against the same update in double.
BOOST_AUTO_TEST_CASE(adamw_matches_double_precision_over_steps) {
  std::mt19937 rng(7);
  Toy params, grads;
  fill_normal(params, rng, 1.0f);
  const std::vector<float> stats(params.stats.values.begin(), params.stats.values.end());
  const clip::AdamWOptions opt{2e-2f, 0.8f, 0.95f, 1e-3f, 0.5f};
  clip::AdamW<Toy> adam(params, opt);

  auto trained = [](Toy& t) {
    std::vector<float*> out;
    for (float& x : t.weight.values) out.push_back(&x);
    for (float& x : t.bias.values) out.push_back(&x);
    return out;
  };
  std::vector<double> p, m, v;
  for (float* x : trained(params)) p.push_back(*x), m.push_back(0), v.push_back(0);
  const size_t n_weight = clip::Param<3, 5>::numel;
  double worst = 0;
  for (int step = 1; step <= 10; ++step) {
    fill_normal(grads, rng, step % 3 == 0 ? 1e-4f : 0.3f);  // also gradients near eps
    const float lr = 0.02f / step;
    std::vector<float*> g = trained(grads);
    for (size_t i = 0; i < p.size(); ++i) {
      const double gi = *g[i], wd = i < n_weight ? 0.5 : 0.0;
      p[i] *= 1 - double(lr) * wd;
      m[i] = 0.8 * m[i] + 0.2 * gi;
      v[i] = 0.95 * v[i] + 0.05 * gi * gi;
      const double mhat = m[i] / (1 - std::pow(0.8, step)), denom = std::sqrt(v[i] / (1 - std::pow(0.95, step))) + 1e-3;
      p[i] -= double(lr) * mhat / denom;
    }
    adam.step(params, grads, lr);
    std::vector<float*> got = trained(params);
    for (size_t i = 0; i < p.size(); ++i) worst = std::max(worst, std::abs(*got[i] - p[i]) / (1 + std::abs(p[i])));
    for (float* x : trained(grads)) BOOST_TEST_REQUIRE(*x == 0.0f);
  }
  BOOST_TEST_MESSAGE("AdamW vs double over 10 steps: max |diff| / (1 + |p|) = " << worst);
  BOOST_TEST(worst <= 1e-6);
  BOOST_TEST(adam.steps() == 10);
  BOOST_TEST(std::equal(stats.begin(), stats.end(), params.stats.values.begin()), "buffers untouched");
}

// With a zero gradient, a decayed tensor shrinks by exactly (1 - lr wd); a no-decay one stays.
BOOST_AUTO_TEST_CASE(adamw_decay_is_decoupled) {
  Toy params, grads;
  params.weight.fill(0.75f);
  params.bias.fill(0.75f);
  clip::zero(grads);
  clip::AdamW<Toy> adam(params, {1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f});
  adam.step(params, grads, 1e-2f);
  for (float x : params.weight.values) BOOST_TEST(x == 0.75f * float(1.0 - 1e-2 * 0.1));
  for (float x : params.bias.values) BOOST_TEST(x == 0.75f);
}

// Large tensors run chunked on every thread; the result equals the same update on small copies.
BOOST_AUTO_TEST_CASE(adamw_chunks_and_threads_do_not_change_results) {
  auto big = std::make_unique<Big>(), big_g = std::make_unique<Big>();
  Small small, small_g;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (float& x : big->w.values) x = normal(rng);
  for (float& x : big_g->w.values) x = normal(rng) * 1e-3f;
  std::copy_n(big->w.data(), 2000, small.w.data());
  std::copy_n(big_g->w.data(), 2000, small_g.w.data());
  clip::AdamW<Big> a(*big);
  clip::AdamW<Small> b(small);
  for (int s = 0; s < 3; ++s) {
    for (int64_t i = 0; i < 2000; ++i) small_g.w[i] = big_g->w[i] = float(s + 1) * 1e-3f * float(i % 7);
    a.step(*big, *big_g, 1e-3f);
    b.step(small, small_g, 1e-3f);
  }
  BOOST_TEST(std::equal(small.w.values.begin(), small.w.values.end(), big->w.data()));
}

// Sparse gradients (as the token embedding's): blocks whose g, m and v are zero take the short
// path (p *= 1 - lr wd), with results bit-identical to the full update of every element; moments
// written through m()/v() (a resumed checkpoint) are seen.
BOOST_AUTO_TEST_CASE(adamw_quiet_blocks_are_exact) {
  auto p = std::make_unique<Big>(), g = std::make_unique<Big>();
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (float& x : p->w.values) x = normal(rng);
  clip::zero(*g);
  const int64_t n = decltype(Big::w)::numel;
  std::vector<float> rp(p->w.values.begin(), p->w.values.end()), rg(n, 0.0f), rm(n, 0.0f), rv(n, 0.0f);
  const clip::AdamWOptions opt{1e-2f, 0.9f, 0.98f, 1e-6f, 0.1f};
  clip::AdamW<Big> adam(*p, opt);
  std::uniform_int_distribution<int64_t> row(0, 299);
  for (int step = 1; step <= 6; ++step) {
    for (int r = 0; r < 3; ++r) {  // three rows of 1000 get a gradient this step
      const int64_t first = row(rng) * 1000;
      for (int64_t i = first; i < first + 1000; ++i) rg[i] = g->w[i] = normal(rng) * 1e-2f;
    }
    if (step == 4) {  // a moment written from outside, in a block that has been quiet so far
      int64_t quiet = -1;
      for (int64_t i = 0; i < n && quiet < 0; i += 1024)
        if (adam.m().w[i] == 0.0f && rm[i] == 0.0f && rg[i] == 0.0f) quiet = i;
      BOOST_TEST_REQUIRE(quiet >= 0);
      adam.m().w[quiet] = rm[quiet] = 0.5f;
      adam.v().w[quiet] = rv[quiet] = 0.25f;
    }
    adam.step(*p, *g, 1e-2f);
    const double lr = 1e-2, bc1 = 1 - std::pow(0.9, step), bc2 = 1 - std::pow(0.98, step);
    const clip::detail::AdamWScalars s{float(1 - lr * 0.1), 0.9f,  float(1 - 0.9), 0.98f, float(1 - 0.98),
                                       float(-(lr / bc1)),  float(std::sqrt(bc2)), 1e-6f, 1.0f};
    for (int64_t i = 0; i < n; ++i) clip::detail::adamw_element(rp[i], rg[i], rm[i], rv[i], s);
    BOOST_TEST_REQUIRE(std::equal(rp.begin(), rp.end(), p->w.data()), "step " << step);
    BOOST_TEST_REQUIRE(std::equal(rm.begin(), rm.end(), adam.m().w.data()), "step " << step);
    BOOST_TEST_REQUIRE(std::equal(rv.begin(), rv.end(), adam.v().w.data()), "step " << step);
  }
}

BOOST_AUTO_TEST_CASE(adamw_rejects_bad_options) {
  Toy t;
  BOOST_TEST(clip::test::message_of([&] { clip::AdamW<Toy>(t, {1e-3f, 1.0f, 0.98f, 1e-6f, 0.2f}); })
                 .find("betas") != std::string::npos);
  BOOST_TEST(clip::test::message_of([&] { clip::AdamW<Toy>(t, {1e-3f, 0.9f, 0.98f, 0.0f, 0.2f}); })
                 .find("eps") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(schedules_follow_open_clip) {
  // Warmup: base * (step + 1) / warmup.
  BOOST_TEST(clip::cosine_lr(0, 1e-3f, 10, 110) == 1e-4f);
  BOOST_TEST(clip::cosine_lr(4, 1e-3f, 10, 110) == 5e-4f);
  BOOST_TEST(clip::cosine_lr(9, 1e-3f, 10, 110) == 1e-3f);
  // Cosine: base * (1 + cos(pi e / es)) / 2 from step `warmup`.
  BOOST_TEST(clip::cosine_lr(10, 1e-3f, 10, 110) == 1e-3f);
  BOOST_TEST(clip::cosine_lr(60, 1e-3f, 10, 110) == 5e-4f);
  BOOST_TEST(clip::cosine_lr(35, 1e-3f, 10, 110) ==
                 float(0.5 * (1 + std::cos(std::numbers::pi * 25 / 100)) * 1e-3));
  BOOST_TEST(clip::cosine_lr(109, 1e-3f, 10, 110) > 0.0f);
  BOOST_TEST(clip::cosine_lr(110, 1e-3f, 10, 110) == 0.0f);
  BOOST_TEST(clip::cosine_lr(500, 1e-3f, 10, 110) == 0.0f);  // past the end: stays at 0
  BOOST_TEST(clip::cosine_lr(0, 2e-3f, 0, 100) == 2e-3f);    // no warmup
  for (int64_t s = 11; s < 110; ++s)
    BOOST_TEST_REQUIRE(clip::cosine_lr(s, 1e-3f, 10, 110) < clip::cosine_lr(s - 1, 1e-3f, 10, 110));
  // Constant after warmup.
  BOOST_TEST(clip::const_lr(1, 1e-3f, 4) == 5e-4f);
  BOOST_TEST(clip::const_lr(4, 1e-3f, 4) == 1e-3f);
  BOOST_TEST(clip::const_lr(1000, 1e-3f) == 1e-3f);
  BOOST_TEST(clip::test::message_of([] { clip::cosine_lr(0, 1e-3f, 10, 10); }).find("more steps") !=
             std::string::npos);
}

namespace {

struct ManyChunks {  // 7 + 3 chunks of the norm's 16384 floats, a buffer between the trained tensors
  clip::Param<5, 20000> weight;
  clip::Param<3> running_mean;
  clip::Param<40000> bias;

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "weight", weight, clip::Role::parameter);
    f(prefix + "running_mean", running_mean, clip::Role::buffer);
    f(prefix + "bias", bias, clip::Role::parameter);
  }
};

}  // namespace

// Data parallel: W ranks holding the summed gradients share the norm's chunks; each rank's
// partial sums cover its chunks only, and their sum gives every rank the one-process bits.
BOOST_AUTO_TEST_CASE(gradient_norm_shared_by_ranks_has_the_one_process_bits) {
  std::mt19937 rng(5);
  auto g = std::make_unique<ManyChunks>();
  std::normal_distribution<float> normal(0.0f, 3.0f);
  clip::for_each_tensor(*g, [&](const std::string&, auto& t, clip::Role) {
    for (float& x : t.values) x = normal(rng);
  });
  const double one = clip::gradient_norm(*g);
  for (int world : {2, 3, 4, 10, 11}) {  // 11: a rank without chunks
    std::vector<std::vector<double>> partials(static_cast<size_t>(world));
    for (int r = 0; r < world; ++r)  // what each rank contributes to the all-reduce
      clip::gradient_norm(*g, r, world, [&](double* p, int64_t n) { partials[r].assign(p, p + n); });
    std::vector<double> summed(partials[0].size(), 0.0);
    size_t owners = 0;
    for (const auto& p : partials) {
      for (size_t c = 0; c < p.size(); ++c) summed[c] += p[c];
      owners += static_cast<size_t>(std::count_if(p.begin(), p.end(), [](double x) { return x != 0; }));
    }
    BOOST_TEST(summed.size() == 10u);
    BOOST_TEST(owners == summed.size(), "every chunk summed by exactly one of " << world << " ranks");
    for (int r = 0; r < world; ++r) {
      const double shared = clip::gradient_norm(*g, r, world, [&](double* p, int64_t n) { std::copy_n(summed.data(), n, p); });
      BOOST_TEST(shared == one, "rank " << r << " of " << world);  // bit for bit
    }
  }
}

BOOST_AUTO_TEST_CASE(gradient_clipping_by_global_norm) {
  std::mt19937 rng(11);
  Toy g;
  fill_normal(g, rng, 2.0f);
  double sq = 0;  // the trained tensors only; the buffer does not count
  for (float x : g.weight.values) sq += double(x) * x;
  for (float x : g.bias.values) sq += double(x) * x;
  const double norm = std::sqrt(sq);
  BOOST_TEST(clip::gradient_norm(g) == norm, boost::test_tools::tolerance(1e-12));

  // Below the limit: untouched, factor 1.
  Toy h = g;
  BOOST_TEST(clip::clip_gradient_norm(h, norm * 2) == norm, boost::test_tools::tolerance(1e-12));
  BOOST_TEST((h.weight.values == g.weight.values && h.bias.values == g.bias.values));
  BOOST_TEST(clip::clip_factor(norm, 0.0) == 1.0f);  // 0: off

  // Above: scaled to max_norm / (norm + 1e-6), as torch.nn.utils.clip_grad_norm_.
  const std::vector<float> stats(g.stats.values.begin(), g.stats.values.end());
  BOOST_TEST(clip::clip_gradient_norm(g, 1.0) == norm, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(clip::gradient_norm(g) == 1.0 / (1.0 + 1e-6 / norm), boost::test_tools::tolerance(1e-6));
  BOOST_TEST(std::equal(stats.begin(), stats.end(), g.stats.values.begin()), "buffers are not gradients");

  // AdamW's grad_scale is the same clipping without the extra pass: identical weights.
  Toy p1, p2, g1 = h, g2 = h;
  fill_normal(p1, rng, 1.0f);
  p2 = p1;
  const float factor = clip::clip_factor(clip::gradient_norm(g1), 0.5);
  BOOST_TEST(factor < 1.0f);
  clip::scale_gradients(g1, factor);
  clip::AdamW<Toy> a1(p1), a2(p2);
  a1.step(p1, g1, 1e-3f);
  a2.step(p2, g2, 1e-3f, factor);
  BOOST_TEST((p1.weight.values == p2.weight.values && p1.bias.values == p2.bias.values));

  Toy bad = h;
  bad.bias[3] = NAN;
  BOOST_TEST(clip::test::message_of([&] { clip::clip_gradient_norm(bad, 1.0); }).find("NaN") != std::string::npos);
}
