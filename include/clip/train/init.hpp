// Initial weights for training from scratch, for any variant: the distributions of OpenAI's
// CLIP.__init__ and initialize_parameters, and PyTorch's default initialisation of the layers
// those leave alone.
//
//   text:   token_embedding N(0, 0.02), positional_embedding N(0, 0.01), text_projection
//           N(0, C^-0.5); per block in_proj N(0, C^-0.5), out_proj and c_proj
//           N(0, C^-0.5 (2L)^-0.5), c_fc N(0, (2C)^-0.5)
//   ViT:    class_embedding, positional_embedding, proj N(0, C^-0.5) (C: vision width); blocks
//           keep nn.MultiheadAttention's xavier_uniform in_proj and nn.Linear's defaults
//   ResNet: attnpool positional_embedding N(0, C^-0.5), q/k/v/c_proj weights N(0, C^-0.5)
//           (C: pool width); bn3 gain of every bottleneck 0 (each residual branch starts off)
//   PyTorch defaults: Linear and Conv2d weights U(+-1/sqrt(fan_in)) (kaiming_uniform, a = sqrt(5)),
//           Linear biases U(+-1/sqrt(fan_in)); attention in/out biases 0; LayerNorm and
//           BatchNorm gain 1, bias 0; running_mean 0, running_var 1, num_batches_tracked 0
//   logit_scale = ln(1 / 0.07) (temperature 0.07)
//
// Every tensor is recognised by its state_dict name; a name no rule covers is an error, so a new
// layer cannot silently keep uninitialised memory. The values come from std::mt19937_64 streams
// seeded by (seed, tensor, block of 64K elements), so they depend on the seed alone, not on the
// thread count, and large models initialise in parallel.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <numbers>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/config/dims.hpp"
#include "clip/core/error.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/tensor/param.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

// How one tensor starts: every element `value`, N(0, value^2) or U(-value, value).
struct InitRule {
  enum class Kind { constant, normal, uniform };
  Kind kind;
  double value;
};

namespace detail {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
inline bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// Whether the module owning `name` (the part before its last '.') is a BatchNorm: "bn<digit>" or a
// downsample branch's "downsample.1".
inline bool is_batchnorm_tensor(const std::string& name) {
  const size_t last = name.rfind('.');
  if (last == std::string::npos) return false;
  const std::string module = name.substr(0, last);
  const size_t dot = module.rfind('.');
  const std::string leaf = dot == std::string::npos ? module : module.substr(dot + 1);
  return (leaf.size() == 3 && leaf[0] == 'b' && leaf[1] == 'n' && leaf[2] >= '0' && leaf[2] <= '9') ||
         ends_with(module, "downsample.1");
}

// splitmix64: decorrelates the seeds of neighbouring streams.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1], from the engine's 53 high bits (the engine's output is fully specified,
// unlike std::*_distribution's, so the values are the same with every standard library).
inline double unit_uniform(std::mt19937_64& rng) { return (double((rng() >> 11) + 1)) * 0x1.0p-53; }

// Fills n values by `rule` (normal: Box-Muller, two values per pair of uniforms).
inline void fill_random(float* out, int64_t n, const InitRule& rule, std::mt19937_64& rng) {
  if (rule.kind == InitRule::Kind::uniform) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(rule.value * (2.0 * unit_uniform(rng) - 1.0));
    return;
  }
  for (int64_t i = 0; i < n; i += 2) {
    const double r = std::sqrt(-2.0 * std::log(unit_uniform(rng)));
    const double angle = 2.0 * std::numbers::pi * unit_uniform(rng);
    out[i] = static_cast<float>(rule.value * r * std::cos(angle));
    if (i + 1 < n) out[i + 1] = static_cast<float>(rule.value * r * std::sin(angle));
  }
}

}  // namespace detail

// The rule for the tensor `name` of shape `shape` in a CLIP model whose text transformer has
// width `text_width` and `text_layers` blocks. `bias_fan_in` is, for a "<m>.bias", the fan-in of
// "<m>.weight" (0 when there is none).
inline InitRule init_rule(const std::string& name, const Shape& shape, int64_t bias_fan_in, int text_width,
                          int text_layers) {
  using detail::ends_with;
  using detail::starts_with;
  using K = InitRule::Kind;
  const int rank = static_cast<int>(shape.size());
  const int64_t numel = shape_numel(shape);
  const double width = text_width;
  const double attn_std = 1.0 / std::sqrt(width);
  const double proj_std = attn_std / std::sqrt(2.0 * text_layers);
  const double fc_std = 1.0 / std::sqrt(2.0 * width);
  const bool text_block = starts_with(name, "transformer.resblocks.");

  if (name == "logit_scale") return {K::constant, std::log(1.0 / 0.07)};
  if (ends_with(name, "running_mean") || ends_with(name, "num_batches_tracked")) return {K::constant, 0.0};
  if (ends_with(name, "running_var")) return {K::constant, 1.0};
  if (name == "token_embedding.weight") return {K::normal, 0.02};
  if (name == "positional_embedding") return {K::normal, 0.01};
  if (name == "text_projection") return {K::normal, attn_std};
  // ViT: scale * randn with scale = width^-0.5; attention pool: randn / sqrt(pool width).
  if (name == "visual.class_embedding" && rank == 1) return {K::normal, 1.0 / std::sqrt(double(shape[0]))};
  if ((name == "visual.positional_embedding" || name == "visual.attnpool.positional_embedding") && rank == 2)
    return {K::normal, 1.0 / std::sqrt(double(shape[1]))};
  if (name == "visual.proj" && rank == 2) return {K::normal, 1.0 / std::sqrt(double(shape[0]))};
  // q/k/v/c_proj: std = c_proj.in_features^-0.5, the pool width, every weight's input size.
  if (starts_with(name, "visual.attnpool.") && ends_with(name, "_proj.weight") && rank == 2)
    return {K::normal, 1.0 / std::sqrt(double(shape[1]))};

  const bool is_weight = ends_with(name, ".weight"), is_bias = ends_with(name, ".bias");
  if (name.find("ln_") != std::string::npos && (is_weight || is_bias) && rank == 1)
    return {K::constant, is_weight ? 1.0 : 0.0};
  if (detail::is_batchnorm_tensor(name) && (is_weight || is_bias) && rank == 1) {
    const bool zero_gain = starts_with(name, "visual.layer") && ends_with(name, "bn3.weight");
    return {K::constant, is_weight && !zero_gain ? 1.0 : 0.0};
  }
  if (ends_with(name, "attn.in_proj_weight") && rank == 2) {
    if (text_block) return {K::normal, attn_std};
    return {K::uniform, std::sqrt(6.0 / double(shape[0] + shape[1]))};  // xavier_uniform
  }
  if (ends_with(name, "attn.in_proj_bias") || ends_with(name, "attn.out_proj.bias")) return {K::constant, 0.0};
  if (text_block && (ends_with(name, "attn.out_proj.weight") || ends_with(name, "mlp.c_proj.weight")))
    return {K::normal, proj_std};
  if (text_block && ends_with(name, "mlp.c_fc.weight")) return {K::normal, fc_std};
  if (is_weight && rank >= 2) return {K::uniform, 1.0 / std::sqrt(double(numel / shape[0]))};
  if (is_bias && bias_fan_in > 0) return {K::uniform, 1.0 / std::sqrt(double(bias_fan_in))};
  CLIP_FAIL("no initialisation rule covers tensor '", name, "' of shape ", shape_string(shape));
}

// Initialises every tensor of a CLIP Params (any struct with OpenAI's names) from `seed`.
template <class Params>
void init_tensors(Params& params, uint64_t seed, int text_width, int text_layers) {
  // The fan-in of every module's weight, for its bias.
  std::map<std::string, int64_t> fan_in;
  for_each_tensor(params, [&](const std::string& name, const auto& t, Role) {
    using T = std::remove_cvref_t<decltype(t)>;
    if constexpr (T::rank >= 2)
      if (detail::ends_with(name, ".weight")) fan_in[name.substr(0, name.size() - 7)] = T::numel / T::shape[0];
  });

  struct Job {
    float* data;
    int64_t begin, end;
    InitRule rule;
    uint64_t stream;
  };
  constexpr int64_t block = int64_t{1} << 16;
  std::vector<Job> jobs;
  uint64_t tensor_index = 0;
  for_each_tensor(params, [&](const std::string& name, auto& t, Role) {
    using T = std::remove_cvref_t<decltype(t)>;
    ++tensor_index;
    int64_t bias_fan_in = 0;
    if (detail::ends_with(name, ".bias")) {
      auto it = fan_in.find(name.substr(0, name.size() - 5));
      if (it != fan_in.end()) bias_fan_in = it->second;
    }
    const InitRule rule = init_rule(name, Shape(T::shape.begin(), T::shape.end()), bias_fan_in, text_width, text_layers);
    if constexpr (is_counter_v<T>) {
      t.value = static_cast<int64_t>(rule.value);
    } else if (rule.kind == InitRule::Kind::constant) {
      t.fill(static_cast<float>(rule.value));
    } else {
      for (int64_t b = 0; b < T::numel; b += block)
        jobs.push_back({t.data(), b, std::min(T::numel, b + block), rule,
                        detail::mix64(detail::mix64(seed) ^ (tensor_index << 32) ^ uint64_t(b / block))});
    }
  });
  const int64_t count = static_cast<int64_t>(jobs.size());
#pragma omp parallel for schedule(dynamic) if (count > 1)
  for (int64_t j = 0; j < count; ++j) {
    std::mt19937_64 rng(jobs[j].stream);
    detail::fill_random(jobs[j].data + jobs[j].begin, jobs[j].end - jobs[j].begin, jobs[j].rule, rng);
  }
}

// A CLIP model of variant Cfg, ready to train from scratch.
template <Variant Cfg>
void init_params(typename Clip<Cfg>::Params& params, uint64_t seed) {
  init_tensors(params, seed, Cfg::transformer_width, Cfg::transformer_layers);
}

}  // namespace clip
