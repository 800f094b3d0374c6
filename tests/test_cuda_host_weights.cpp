// The CUDA back end's weight layout (include/clip/cuda/weight_layout.hpp), on the CPU: every
// tensor of a model's Params gets a distinct, aligned, non-overlapping offset in visit order, the
// offsets are found from the host members' addresses, and pack/unpack round-trip the weights.
#include <boost/test/unit_test.hpp>

#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "clip/clip.hpp"
#include "clip/cuda/weight_layout.hpp"
#include "golden_variants.hpp"

namespace {

template <class Params>
void check_layout(Params& params) {
  const clip::cuda::WeightLayout layout(params);
  const auto& entries = layout.entries();

  // Same tensors, same order as visit (Counters excluded).
  std::vector<std::string> names;
  int64_t counters = 0;
  clip::for_each_tensor(params, [&](const std::string& name, const auto& t, clip::Role) {
    if constexpr (clip::is_counter_v<decltype(t)>) ++counters;
    else names.push_back(name);
  });
  BOOST_REQUIRE_EQUAL(entries.size(), names.size());
  for (size_t i = 0; i < names.size(); ++i) BOOST_CHECK_EQUAL(entries[i].name, names[i]);

  // Increasing, aligned, non-overlapping, inside size().
  int64_t end = 0;
  for (const auto& e : entries) {
    BOOST_CHECK_EQUAL(e.offset % clip::cuda::WeightLayout::kAlign, 0);
    BOOST_CHECK_GE(e.offset, end);
    BOOST_CHECK_LT(e.offset - end, clip::cuda::WeightLayout::kAlign);  // no more padding than alignment needs
    end = e.offset + e.numel;
  }
  BOOST_CHECK_LE(end, layout.size());
  BOOST_CHECK_LT(layout.size() - end, clip::cuda::WeightLayout::kAlign);
  BOOST_CHECK_EQUAL(layout.parameter_elements(), clip::parameter_count(params));

  // Lookup by member address: a few members, then a foreign member.
  BOOST_CHECK_EQUAL(layout.offset(params.positional_embedding), entries[0].offset);
  BOOST_CHECK_EQUAL(layout.entry(&params.logit_scale).name, "logit_scale");
  BOOST_CHECK_EQUAL(layout.entry(&params.ln_final.bias).name, "ln_final.bias");
  BOOST_CHECK_EQUAL(layout.offset(params.ln_final.bias), entries.back().offset);
  BOOST_CHECK_EQUAL(layout.entry(&params.transformer.resblocks[1].mlp.c_fc.weight).name,
                    "transformer.resblocks.1.mlp.c_fc.weight");
  const clip::Param<3> foreign;
  BOOST_CHECK_THROW(layout.offset(foreign), clip::Error);

  // pack / unpack round trip, padding zero, into another instance of the same type.
  int64_t k = 0;
  clip::for_each_tensor(params, [&](const std::string&, auto& t, clip::Role) {
    if constexpr (!clip::is_counter_v<decltype(t)>)
      for (int64_t i = 0; i < t.numel; ++i) t.data()[i] = float(++k % 1000) * 0.5f;
  });
  std::vector<float> flat(static_cast<size_t>(layout.size()), -1.0f);
  layout.pack(params, flat.data());
  std::vector<bool> covered(flat.size(), false);
  for (const auto& e : entries)
    for (int64_t i = 0; i < e.numel; ++i) covered[e.offset + i] = true;
  bool padding_zero = true;
  for (size_t i = 0; i < flat.size(); ++i)
    if (!covered[i] && flat[i] != 0.0f) padding_zero = false;
  BOOST_CHECK(padding_zero);
  BOOST_CHECK_EQUAL(flat[layout.offset(params.logit_scale)], params.logit_scale[0]);
  auto copy = std::make_unique<Params>();
  clip::zero(*copy);
  layout.unpack(flat.data(), *copy);
  bool same = true;
  int64_t compared = 0;
  std::vector<const float*> a, b;
  clip::for_each_tensor(params, [&](const std::string&, const auto& t, clip::Role) {
    if constexpr (!clip::is_counter_v<decltype(t)>) a.push_back(t.data());
  });
  clip::for_each_tensor(*copy, [&](const std::string&, const auto& t, clip::Role) {
    if constexpr (!clip::is_counter_v<decltype(t)>) b.push_back(t.data());
  });
  for (size_t i = 0; i < entries.size(); ++i)
    for (int64_t j = 0; j < entries[i].numel; ++j, ++compared) same = same && a[i][j] == b[i][j];
  BOOST_CHECK(same);
  int64_t total = 0;
  for (const auto& e : entries) total += e.numel;
  BOOST_CHECK_EQUAL(compared, total);

  // The listing: one line per tensor, "name offset numel".
  std::istringstream listing(layout.listing());
  std::string line;
  size_t lines = 0;
  while (std::getline(listing, line)) {
    std::istringstream fields(line);
    std::string name;
    int64_t offset = 0, numel = 0;
    fields >> name >> offset >> numel;
    BOOST_CHECK_EQUAL(name, entries[lines].name);
    BOOST_CHECK_EQUAL(offset, entries[lines].offset);
    BOOST_CHECK_EQUAL(numel, entries[lines].numel);
    ++lines;
  }
  BOOST_CHECK_EQUAL(lines, entries.size());
  BOOST_TEST_MESSAGE(entries.size() << " tensors, " << counters << " counters, " << layout.size() << " elements");
}

}  // namespace

BOOST_AUTO_TEST_CASE(cuda_weight_layout_vit_tiny) {
  auto params = std::make_unique<clip::Clip<clip::test::ViTTiny>::Params>();
  check_layout(*params);
}

BOOST_AUTO_TEST_CASE(cuda_weight_layout_rn_tiny_keeps_counters_on_the_host) {
  auto params = std::make_unique<clip::Clip<clip::test::RNTiny>::Params>();
  check_layout(*params);
  const clip::cuda::WeightLayout layout(*params);
  // BatchNorm running statistics are buffers with offsets; num_batches_tracked has none.
  bool has_buffer = false;
  for (const auto& e : layout.entries()) {
    has_buffer = has_buffer || e.role == clip::Role::buffer;
    BOOST_CHECK(e.name.find("num_batches_tracked") == std::string::npos);
  }
  BOOST_CHECK(has_buffer);
}

BOOST_AUTO_TEST_CASE(cuda_weight_layout_refuses_another_params_type) {
  auto vit = std::make_unique<clip::Clip<clip::test::ViTTiny>::Params>();
  auto rn = std::make_unique<clip::Clip<clip::test::RNTiny>::Params>();
  const clip::cuda::WeightLayout layout(*vit);
  std::vector<float> flat(static_cast<size_t>(layout.size()));
  BOOST_CHECK_THROW(layout.unpack(flat.data(), *rn), clip::Error);
}
