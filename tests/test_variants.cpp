// The nine official variants: every state_dict name, shape, dtype and role, in order, and the
// parameter counts, against OpenAI's model.CLIP as recorded in variants.json.
#include <boost/test/unit_test.hpp>

#include <fstream>
#include <sstream>

#include "clip/clip.hpp"
#include "golden.hpp"

using namespace clip;

namespace {

const json::Value* load_variants() {
  static std::optional<json::Value> doc;
  if (!doc) {
    auto path = test::golden_file("variants.json");
    if (!path) return nullptr;
    std::ifstream in(*path);
    std::stringstream text;
    text << in.rdbuf();
    doc = json::parse(text.str());
  }
  return &(*doc)["variants"];
}

template <class Cfg>
void check_variant() {
  const json::Value* variants = load_variants();
  if (!variants) return;
  const json::Value& ref = (*variants)[Cfg::name];
  BOOST_TEST_CONTEXT(Cfg::name) {
    const json::Value& config = ref["config"];
    BOOST_TEST(config["embed_dim"].as_int() == Cfg::embed_dim);
    BOOST_TEST(config["image_resolution"].as_int() == Cfg::image_resolution);
    BOOST_TEST(config["vision_width"].as_int() == Cfg::vision_width);
    BOOST_TEST(config["context_length"].as_int() == Cfg::context_length);
    BOOST_TEST(config["vocab_size"].as_int() == Cfg::vocab_size);
    BOOST_TEST(config["transformer_width"].as_int() == Cfg::transformer_width);
    BOOST_TEST(config["transformer_heads"].as_int() == Cfg::transformer_heads);
    BOOST_TEST(config["transformer_layers"].as_int() == Cfg::transformer_layers);
    if constexpr (ResNetConfig<Cfg>) {
      for (int s = 0; s < 4; ++s) BOOST_TEST(config["vision_layers"].as_array()[s].as_int() == Cfg::vision_layers[s]);
      BOOST_TEST(config["vision_patch_size"].is_null());
    } else {
      BOOST_TEST(config["vision_layers"].as_int() == Cfg::vision_layers);
      BOOST_TEST(config["vision_patch_size"].as_int() == Cfg::vision_patch_size);
    }

    // Declaring the parameters of even RN50x64 touches no memory: storage starts uninitialised.
    auto params = std::make_unique<typename Clip<Cfg>::Params>();
    std::vector<std::string> lines;
    for_each_tensor(*params, [&](const std::string& name, const auto& t, Role role) {
      using T = std::remove_cvref_t<decltype(t)>;
      lines.push_back(name + " " + shape_string(Shape(T::shape.begin(), T::shape.end())) + " " +
                      (is_counter_v<T> ? "I64" : "F32") + " " + (role == Role::parameter ? "parameter" : "buffer"));
    });
    std::vector<std::string> expected;
    for (const json::Value& e : ref["state_dict"].as_array()) {
      Shape shape;
      for (const json::Value& d : e.as_array()[1].as_array()) shape.push_back(d.as_int());
      expected.push_back(e.as_array()[0].as_string() + " " + shape_string(shape) + " " + e.as_array()[2].as_string() +
                         " " + e.as_array()[3].as_string());
    }
    BOOST_TEST(lines.size() == expected.size());
    for (size_t i = 0; i < std::min(lines.size(), expected.size()); ++i) {
      if (lines[i] != expected[i]) {
        BOOST_ERROR("entry " << i << ": model has '" << lines[i] << "', OpenAI has '" << expected[i] << "'");
        break;
      }
    }
    BOOST_TEST(parameter_count(*params) == ref["num_parameters"].as_int());
    BOOST_TEST(dims<Cfg>::parameters == ref["num_parameters"].as_int());
    BOOST_TEST(dims<Cfg>::vision::parameters == ref["num_parameters_visual"].as_int());
    BOOST_TEST(dims<Cfg>::vision::buffer_elements == ref["num_buffer_elements"].as_int());
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(rn50) { check_variant<variants::RN50>(); }
BOOST_AUTO_TEST_CASE(rn101) { check_variant<variants::RN101>(); }
BOOST_AUTO_TEST_CASE(rn50x4) { check_variant<variants::RN50x4>(); }
BOOST_AUTO_TEST_CASE(rn50x16) { check_variant<variants::RN50x16>(); }
BOOST_AUTO_TEST_CASE(rn50x64) { check_variant<variants::RN50x64>(); }
BOOST_AUTO_TEST_CASE(vit_b_32) { check_variant<variants::ViT_B_32>(); }
BOOST_AUTO_TEST_CASE(vit_b_16) { check_variant<variants::ViT_B_16>(); }
BOOST_AUTO_TEST_CASE(vit_l_14) { check_variant<variants::ViT_L_14>(); }
BOOST_AUTO_TEST_CASE(vit_l_14_336) { check_variant<variants::ViT_L_14_336>(); }
