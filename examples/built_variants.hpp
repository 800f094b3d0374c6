// The variants a program is compiled for. examples/meson.build turns the `variants` option into
// -DCLIP_VARIANT_<NAME>=1 definitions: every variant instantiates the image and text encoders
// once more, which is what a build pays for in compile time. The test copies of the programs
// add the two tiny golden models (-DCLIP_TEST_VARIANTS, tests/golden_variants.hpp); the programs
// that train or load the Fashion-MNIST demo's model add it (-DCLIP_EXAMPLE_VARIANTS).
#pragma once

#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "clip/config/names.hpp"
#include "clip/config/variants.hpp"
#include "clip/core/error.hpp"
#include "cli.hpp"
#ifdef CLIP_TEST_VARIANTS
#include "golden_variants.hpp"
#endif
#ifdef CLIP_EXAMPLE_VARIANTS
#include "fashion_mnist_variant.hpp"
#endif

#ifndef CLIP_VARIANT_RN50
#define CLIP_VARIANT_RN50 0
#endif
#ifndef CLIP_VARIANT_RN101
#define CLIP_VARIANT_RN101 0
#endif
#ifndef CLIP_VARIANT_RN50X4
#define CLIP_VARIANT_RN50X4 0
#endif
#ifndef CLIP_VARIANT_RN50X16
#define CLIP_VARIANT_RN50X16 0
#endif
#ifndef CLIP_VARIANT_RN50X64
#define CLIP_VARIANT_RN50X64 0
#endif
#ifndef CLIP_VARIANT_VIT_B_32
#define CLIP_VARIANT_VIT_B_32 0
#endif
#ifndef CLIP_VARIANT_VIT_B_16
#define CLIP_VARIANT_VIT_B_16 0
#endif
#ifndef CLIP_VARIANT_VIT_L_14
#define CLIP_VARIANT_VIT_L_14 0
#endif
#ifndef CLIP_VARIANT_VIT_L_14_336
#define CLIP_VARIANT_VIT_L_14_336 0
#endif

namespace clip::cli {

template <class... Cfgs>
struct VariantList {};

namespace detail {
template <class... Lists>
struct concat;
template <class... A>
struct concat<VariantList<A...>> {
  using type = VariantList<A...>;
};
template <class... A, class... B, class... Rest>
struct concat<VariantList<A...>, VariantList<B...>, Rest...> : concat<VariantList<A..., B...>, Rest...> {};

template <bool built, class Cfg>
using if_built = std::conditional_t<built, VariantList<Cfg>, VariantList<>>;
}  // namespace detail

using BuiltVariants = typename detail::concat<
    detail::if_built<CLIP_VARIANT_RN50, variants::RN50>, detail::if_built<CLIP_VARIANT_RN101, variants::RN101>,
    detail::if_built<CLIP_VARIANT_RN50X4, variants::RN50x4>, detail::if_built<CLIP_VARIANT_RN50X16, variants::RN50x16>,
    detail::if_built<CLIP_VARIANT_RN50X64, variants::RN50x64>,
    detail::if_built<CLIP_VARIANT_VIT_B_32, variants::ViT_B_32>,
    detail::if_built<CLIP_VARIANT_VIT_B_16, variants::ViT_B_16>,
    detail::if_built<CLIP_VARIANT_VIT_L_14, variants::ViT_L_14>,
    detail::if_built<CLIP_VARIANT_VIT_L_14_336, variants::ViT_L_14_336>
#ifdef CLIP_TEST_VARIANTS
    , VariantList<test::ViTTiny, test::RNTiny>
#endif
#ifdef CLIP_EXAMPLE_VARIANTS
    , VariantList<examples::FashionMnistViT>
#endif
    >::type;

static_assert(!std::is_same_v<BuiltVariants, VariantList<>>,
              "no variant to compile for: define CLIP_VARIANT_<NAME>=1 (meson: -Dvariants=)");

// Calls f(Cfg{}) for the built variant called `name` (OpenAI's or open_clip's spelling).
template <class F>
decltype(auto) with_built_variant(std::string_view name, F&& f) {
  return []<class... Cfgs>(VariantList<Cfgs...>, std::string_view n, F&& g) -> decltype(auto) {
    return with_variant<Cfgs...>(n, std::forward<F>(g));
  }(BuiltVariants{}, name, std::forward<F>(f));
}

// An unknown model name is a bad command line (exit 2); the message lists the built names.
inline void check_model_name(std::string_view name) {
  try {
    with_built_variant(name, [](auto) {});
  } catch (const Error& e) {
    throw UsageError{e.what()};
  }
}

}  // namespace clip::cli
