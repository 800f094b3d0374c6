// Hugging Face transformers' CLIPModel names for the vision-transformer variants. OpenAI's
// attention keeps q, k and v in one in_proj tensor where Hugging Face keeps three, and Hugging
// Face stores both projections as Linear weights, i.e. transposed.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace clip::hf {

// How one OpenAI tensor is assembled from Hugging Face tensors.
struct Recipe {
  enum class Kind { same, concat_rows, transpose } kind = Kind::same;
  std::vector<std::string> sources;
};

// True when a file's tensor names are Hugging Face's.
inline bool uses_hf_names(const std::vector<std::string>& names) {
  for (const std::string& n : names)
    if (n.starts_with("vision_model.") || n.starts_with("text_model.")) return true;
  return false;
}

// Tensors Hugging Face checkpoints carry that are not weights (constant index buffers).
inline bool is_hf_index_buffer(std::string_view name) { return name.ends_with("position_ids"); }

namespace detail {

inline bool take_prefix(std::string_view& s, std::string_view prefix) {
  if (!s.starts_with(prefix)) return false;
  s.remove_prefix(prefix.size());
  return true;
}

// "3.mlp.c_fc.bias" under an encoder -> recipe for "<encoder>layers.3.mlp.fc1.bias".
inline std::optional<Recipe> block(std::string_view rest, const std::string& encoder) {
  const size_t dot = rest.find('.');
  if (dot == std::string_view::npos) return std::nullopt;
  const std::string layer = encoder + "layers." + std::string(rest.substr(0, dot)) + ".";
  std::string_view leaf = rest.substr(dot + 1);
  if (leaf == "attn.in_proj_weight" || leaf == "attn.in_proj_bias") {
    const std::string kind = leaf.ends_with("weight") ? "weight" : "bias";
    return Recipe{Recipe::Kind::concat_rows,
                  {layer + "self_attn.q_proj." + kind, layer + "self_attn.k_proj." + kind, layer + "self_attn.v_proj." + kind}};
  }
  static const std::pair<std::string_view, std::string_view> renames[] = {
      {"attn.out_proj.", "self_attn.out_proj."}, {"ln_1.", "layer_norm1."}, {"mlp.c_fc.", "mlp.fc1."},
      {"mlp.c_proj.", "mlp.fc2."}, {"ln_2.", "layer_norm2."}};
  for (auto [from, to] : renames)
    if (take_prefix(leaf, from)) return Recipe{Recipe::Kind::same, {layer + std::string(to) + std::string(leaf)}};
  return std::nullopt;
}

}  // namespace detail

// The recipe for an OpenAI state_dict name, or nothing if Hugging Face has no such tensor.
inline std::optional<Recipe> recipe_for(std::string_view name) {
  using K = Recipe::Kind;
  auto same = [](std::string s) { return Recipe{K::same, {std::move(s)}}; };
  std::string_view rest = name;
  if (detail::take_prefix(rest, "visual.transformer.resblocks.")) return detail::block(rest, "vision_model.encoder.");
  if (detail::take_prefix(rest, "transformer.resblocks.")) return detail::block(rest, "text_model.encoder.");
  if (detail::take_prefix(rest, "visual.ln_pre.")) return same("vision_model.pre_layrnorm." + std::string(rest));
  if (detail::take_prefix(rest, "visual.ln_post.")) return same("vision_model.post_layernorm." + std::string(rest));
  if (detail::take_prefix(rest, "ln_final.")) return same("text_model.final_layer_norm." + std::string(rest));
  if (name == "visual.class_embedding") return same("vision_model.embeddings.class_embedding");
  if (name == "visual.positional_embedding") return same("vision_model.embeddings.position_embedding.weight");
  if (name == "visual.conv1.weight") return same("vision_model.embeddings.patch_embedding.weight");
  if (name == "visual.proj") return Recipe{K::transpose, {"visual_projection.weight"}};
  if (name == "token_embedding.weight") return same("text_model.embeddings.token_embedding.weight");
  if (name == "positional_embedding") return same("text_model.embeddings.position_embedding.weight");
  if (name == "text_projection") return Recipe{K::transpose, {"text_projection.weight"}};
  if (name == "logit_scale") return same("logit_scale");
  return std::nullopt;
}

}  // namespace clip::hf
