// Hugging Face CLIPModel files load into the same model as OpenAI's state_dict. The file here is
// written from the golden OpenAI weights with Hugging Face's layout spelled out independently of
// the library's name map: separate q/k/v projections, both projections stored transposed.
#include <boost/test/unit_test.hpp>

#include <filesystem>
#include <memory>

#include "clip/clip.hpp"
#include "golden.hpp"
#include "golden_variants.hpp"

using namespace clip;
namespace fs = std::filesystem;
using Net = Clip<test::ViTTiny>;

namespace {

Tensor rows(const Tensor& t, int64_t begin, int64_t count) {
  const int64_t width = t.numel() / t.shape[0];
  Shape shape = t.shape;
  shape[0] = count;
  return Tensor(shape, t.data() + begin * width);
}

Tensor transposed(const Tensor& t) {
  Tensor out({t.shape[1], t.shape[0]});
  for (int64_t r = 0; r < t.shape[0]; ++r)
    for (int64_t c = 0; c < t.shape[1]; ++c) out.values[c * t.shape[0] + r] = t.values[r * t.shape[1] + c];
  return out;
}

// Hugging Face's names for one encoder layer, from OpenAI's resblock.
void add_layer(SafeTensorsWriter& w, const SafeTensors& f, const std::string& openai, const std::string& hf) {
  const Tensor in_w = f.tensor(openai + "attn.in_proj_weight"), in_b = f.tensor(openai + "attn.in_proj_bias");
  const int64_t c = in_w.shape[1];
  const char* qkv[] = {"q_proj", "k_proj", "v_proj"};
  for (int i = 0; i < 3; ++i) {
    w.add(hf + "self_attn." + qkv[i] + ".weight", rows(in_w, i * c, c));
    w.add(hf + "self_attn." + qkv[i] + ".bias", rows(in_b, i * c, c));
  }
  const std::pair<const char*, const char*> same[] = {
      {"attn.out_proj.", "self_attn.out_proj."}, {"ln_1.", "layer_norm1."}, {"mlp.c_fc.", "mlp.fc1."},
      {"mlp.c_proj.", "mlp.fc2."}, {"ln_2.", "layer_norm2."}};
  for (auto [from, to] : same)
    for (const char* leaf : {"weight", "bias"}) w.add(hf + to + leaf, f.tensor(openai + from + leaf));
}

}  // namespace

BOOST_AUTO_TEST_CASE(hugging_face_names_load_the_same_weights) {
  auto path = test::golden_file("vit_tiny.safetensors");
  if (!path) return;
  const SafeTensors f = SafeTensors::open(*path);
  auto openai = std::make_unique<Net::Params>();
  load_state_dict(*openai, f, Extra::allow);

  SafeTensorsWriter w;
  w.add("logit_scale", f.tensor("logit_scale"));
  w.add("text_projection.weight", transposed(f.tensor("text_projection")));
  w.add("visual_projection.weight", transposed(f.tensor("visual.proj")));
  w.add("vision_model.embeddings.class_embedding", f.tensor("visual.class_embedding"));
  w.add("vision_model.embeddings.patch_embedding.weight", f.tensor("visual.conv1.weight"));
  w.add("vision_model.embeddings.position_embedding.weight", f.tensor("visual.positional_embedding"));
  std::vector<int64_t> positions(17);
  for (int i = 0; i < 17; ++i) positions[i] = i;
  w.add_integers("vision_model.embeddings.position_ids", {1, 17}, positions.data());  // ignored buffer
  for (const char* leaf : {"weight", "bias"}) {
    w.add(std::string("vision_model.pre_layrnorm.") + leaf, f.tensor(std::string("visual.ln_pre.") + leaf));
    w.add(std::string("vision_model.post_layernorm.") + leaf, f.tensor(std::string("visual.ln_post.") + leaf));
    w.add(std::string("text_model.final_layer_norm.") + leaf, f.tensor(std::string("ln_final.") + leaf));
  }
  w.add("text_model.embeddings.token_embedding.weight", f.tensor("token_embedding.weight"));
  w.add("text_model.embeddings.position_embedding.weight", f.tensor("positional_embedding"));
  for (int i = 0; i < 2; ++i) {
    add_layer(w, f, "visual.transformer.resblocks." + std::to_string(i) + ".",
              "vision_model.encoder.layers." + std::to_string(i) + ".");
    add_layer(w, f, "transformer.resblocks." + std::to_string(i) + ".",
              "text_model.encoder.layers." + std::to_string(i) + ".");
  }
  const fs::path file = fs::temp_directory_path() / ("clip-hf-" + std::to_string(::getpid()) + ".safetensors");
  w.write(file);

  auto hf = std::make_unique<Net::Params>();
  load_state_dict(*hf, file);  // strict: every Hugging Face tensor is used
  size_t compared = 0;
  std::vector<std::pair<std::string, const FloatBuffer*>> expected;
  for_each_tensor(*openai, [&](const std::string& name, const auto& t, Role) {
    if constexpr (!is_counter_v<decltype(t)>) expected.emplace_back(name, &t.values);
  });
  for_each_tensor(*hf, [&](const std::string& name, const auto& t, Role) {
    if constexpr (!is_counter_v<decltype(t)>) {
      BOOST_TEST_CONTEXT(name) { BOOST_TEST((t.values == *expected[compared].second)); }
      ++compared;
    }
  });
  BOOST_TEST(compared == expected.size());

  // A Hugging Face file with one projection missing names the tensor the model needs.
  SafeTensorsWriter broken;
  broken.add("vision_model.embeddings.class_embedding", f.tensor("visual.class_embedding"));
  broken.write(file);
  auto partial = std::make_unique<Net::Params>();
  BOOST_CHECK_EXCEPTION(load_state_dict(*partial, file), Error, [](const Error& e) {
    return std::string(e.what()).find("missing tensor 'visual.proj'") != std::string::npos;
  });
  fs::remove(file);
}
