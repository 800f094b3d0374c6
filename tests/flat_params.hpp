// A parameter struct as the flat device layout the CUDA optimizer kernels see: every tensor back
// to back in visit order (buffers included), and the trained tensors' slices of it. Shared by the
// host replay (tests/test_cuda_host_train_ops.cpp) and the GPU test (tests/cuda/test_cuda_train_ops.cu)
// so that both check the same layout.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/tensor/param.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/adamw_math.hpp"

namespace clip::test {

// name -> values of every float tensor with the given role.
using TensorValues = std::map<std::string, std::vector<float>>;
template <class Params>
TensorValues tensor_values(const Params& params, clip::Role wanted = clip::Role::parameter) {
  TensorValues out;
  clip::for_each_tensor(params, [&](const std::string& name, const auto& t, clip::Role role) {
    if constexpr (!clip::is_counter_v<decltype(t)>)
      if (role == wanted) out[name] = std::vector<float>(t.values.begin(), t.values.end());
  });
  return out;
}

template <class Params>
std::vector<float> flatten(const Params& p) {
  std::vector<float> out;
  clip::for_each_tensor(p, [&](const std::string&, const auto& t, clip::Role) {
    out.insert(out.end(), t.values.begin(), t.values.end());
  });
  return out;
}

// The slices of flatten(p) that AdamW updates (Role::parameter), with their weight-decay flag.
template <class Params>
std::vector<clip::TensorSlice> trained_slices(const Params& p) {
  std::vector<clip::TensorSlice> out;
  int64_t offset = 0;
  clip::for_each_tensor(p, [&](const std::string& name, const auto& t, clip::Role role) {
    using T = std::remove_cvref_t<decltype(t)>;
    if (role == clip::Role::parameter) out.push_back({offset, T::numel, clip::adamw_decays(name, T::rank)});
    offset += T::numel;
  });
  return out;
}

}  // namespace clip::test
