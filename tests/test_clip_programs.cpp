// clip-embed and clip-zeroshot run as a user runs them, on the golden tiny models: from image
// files and captions to features equal to OpenAI's (text) and to the library's own in-process
// encoding (images), zero-shot output and evaluation, and the exit status and message of bad
// arguments and bad files. meson builds test copies of the programs that know the tiny models
// (tests/golden_variants.hpp) and passes their paths in CLIP_EMBED_PROGRAM and
// CLIP_ZEROSHOT_PROGRAM.
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/config/names.hpp"
#include "clip/eval/zero_shot.hpp"
#include "clip/image/decode.hpp"
#include "clip/image/preprocess.hpp"
#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/io/state_dict.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/text/bpe_tokenizer.hpp"
#include "golden.hpp"
#include "encode_in_process.hpp"
#include "golden_variants.hpp"
#include "program_runner.hpp"

namespace {

namespace fs = std::filesystem;
using clip::test::RNTiny;
using clip::test::ViTTiny;

using clip::test::slurp;
using clip::test::TempDir;
using Result = clip::test::ProgramResult;

void write(const fs::path& p, const std::string& content) { std::ofstream(p, std::ios::binary) << content; }

Result run(const char* env_var, const std::vector<std::string>& args) { return clip::test::run_program(env_var, args); }
Result embed(const std::vector<std::string>& args) { return run("CLIP_EMBED_PROGRAM", args); }
Result zeroshot(const std::vector<std::string>& args) { return run("CLIP_ZEROSHOT_PROGRAM", args); }

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// max|got - ref| / max|ref|, the golden MANIFEST's metric.
double relative_error(const clip::Tensor& got, const clip::Tensor& ref) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < ref.values.size(); ++i) {
    diff = std::max(diff, std::abs(double(got.values[i]) - ref.values[i]));
    scale = std::max(scale, std::abs(double(ref.values[i])));
  }
  return diff / scale;
}

std::vector<std::string> string_list(const std::string& json) {
  const clip::json::Value list = clip::json::parse(json);
  std::vector<std::string> out;
  for (const clip::json::Value& v : list.as_array()) out.push_back(v.as_string());
  return out;
}

// A golden tiny model: its weights alone in a temporary file (the golden file also holds inputs,
// outputs and traces, which a program's loader refuses), its captions and expected features.
template <class Cfg>
struct Golden {
  static constexpr const char* file = std::is_same_v<Cfg, ViTTiny> ? "vit_tiny.safetensors" : "rn_tiny.safetensors";
  TempDir dir;
  std::string weights = dir / "weights.safetensors";
  clip::Model<Cfg> model;
  std::vector<std::string> captions;
  clip::Tensor text_features;

  bool load() {
    auto path = clip::test::golden_file(file);
    if (!path) return false;
    const clip::SafeTensors golden = clip::SafeTensors::open(*path);
    model.load(golden, clip::Extra::allow);
    clip::save_state_dict(model.params(), weights);
    captions = string_list(golden.metadata().at("captions"));
    text_features = golden.tensor("output.text_features");
    return true;
  }
};

std::string image(const std::string& name) { return (clip::test::golden_dir() / "images" / name).string(); }

using clip::test::encode_in_process;

template <class Cfg>
void check_embed_end_to_end() {
  Golden<Cfg> g;
  if (!g.load()) return;
  BOOST_TEST_MESSAGE("clip-embed on " << Cfg::name);
  const TempDir dir;
  const std::vector<std::string> images{image("astronaut.png"), image("rocket.jpg")};
  std::vector<std::string> args{"--model", Cfg::name, "--weights", g.weights};
  for (const std::string& p : images) args.insert(args.end(), {"--image", p});
  for (const std::string& c : g.captions) args.insert(args.end(), {"--text", c});

  Result r = embed([&] { auto a = args; a.insert(a.end(), {"--out", dir / "plain.safetensors"}); return a; }());
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  BOOST_TEST(r.out.empty());
  BOOST_TEST(r.err.empty(), r.err);  // no progress bar for a short run into a file
  const clip::SafeTensors plain = clip::SafeTensors::open(dir / "plain.safetensors");
  const clip::Tensor image_features = plain.tensor("image_features"), text_features = plain.tensor("text_features");
  BOOST_TEST_REQUIRE((image_features.shape == clip::Shape{2, Cfg::embed_dim}));
  BOOST_TEST_REQUIRE((text_features.shape == clip::Shape{3, Cfg::embed_dim}));

  // Texts: through the tokenizer to OpenAI's own features.
  const double text_error = relative_error(text_features, g.text_features);
  BOOST_TEST_MESSAGE("  text_features vs golden: " << text_error);
  BOOST_TEST(text_error <= 1e-5);
  // Images: what the library computes from the same files.
  const double image_error = relative_error(image_features, encode_in_process(g.model, images));
  BOOST_TEST_MESSAGE("  image_features vs in-process: " << image_error);
  BOOST_TEST(image_error <= 1e-6);
  BOOST_TEST(plain.metadata().at("model") == Cfg::name);
  BOOST_TEST(string_list(plain.metadata().at("images")) == images, boost::test_tools::per_element());
  BOOST_TEST(string_list(plain.metadata().at("texts")) == g.captions, boost::test_tools::per_element());

  // --precision bf16 on the CPU is honoured (products on bf16 operands): each row within cosine
  // 0.999 of the fp32 one (tests/test_bf16_models.cpp states the error model), and not equal to it.
  r = embed([&] { auto a = args; a.insert(a.end(), {"--precision", "bf16", "--out", dir / "bf16.safetensors"}); return a; }());
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  const clip::SafeTensors bf16 = clip::SafeTensors::open(dir / "bf16.safetensors");
  for (const char* name : {"image_features", "text_features"}) {
    const clip::Tensor got = bf16.tensor(name), ref = plain.tensor(name);
    BOOST_TEST_REQUIRE(got.shape == ref.shape);
    const int64_t cols = Cfg::embed_dim;
    for (int64_t row = 0; row < got.shape[0]; ++row) {
      double ab = 0, aa = 0, bb = 0;
      for (int64_t j = 0; j < cols; ++j) {
        const double a = got.values[row * cols + j], b = ref.values[row * cols + j];
        ab += a * b, aa += a * a, bb += b * b;
      }
      BOOST_TEST(ab / std::sqrt(aa * bb) >= 0.999, name << " row " << row);
    }
    BOOST_TEST(relative_error(got, ref) > 1e-6, name << ": --precision bf16 gave the fp32 features");
  }

  // --normalize: the same rows as unit vectors.
  r = embed([&] { auto a = args; a.insert(a.end(), {"--normalize", "--out", dir / "unit.safetensors"}); return a; }());
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  const clip::SafeTensors unit = clip::SafeTensors::open(dir / "unit.safetensors");
  for (const char* name : {"image_features", "text_features"}) {
    const clip::Tensor got = unit.tensor(name);
    clip::Tensor expected = plain.tensor(name);
    clip::l2_normalize_rows(expected);
    BOOST_TEST(relative_error(got, expected) <= 1e-6, name);
    for (int64_t row = 0; row < got.shape[0]; ++row) {
      double sq = 0;
      for (int j = 0; j < Cfg::embed_dim; ++j) sq += double(got.values[row * Cfg::embed_dim + j]) * got.values[row * Cfg::embed_dim + j];
      BOOST_TEST(std::abs(std::sqrt(sq) - 1.0) <= 1e-6, name << " row " << row);
    }
  }

  // A folder (images by content, sorted by name; other files skipped) and a caption file give
  // the same rows; so does encoding one image at a time.
  const fs::path folder = dir.path / "images";
  fs::create_directories(folder);
  fs::copy_file(images[1], folder / "a-rocket.jpg");
  fs::copy_file(images[0], folder / "b-astronaut.png");
  write(folder / "notes.txt", "not an image\n");
  std::string caption_file;
  for (const std::string& c : g.captions) caption_file += c + "\n\n";
  write(dir.path / "captions.txt", caption_file);
  r = embed({"--model", Cfg::name, "--weights", g.weights, "--image-dir", folder.string(), "--text-file",
             dir / "captions.txt", "--batch", "1", "--out", dir / "folder.safetensors"});
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  const clip::SafeTensors from_folder = clip::SafeTensors::open(dir / "folder.safetensors");
  BOOST_TEST(string_list(from_folder.metadata().at("images")) ==
                 (std::vector<std::string>{(folder / "a-rocket.jpg").string(), (folder / "b-astronaut.png").string()}),
             boost::test_tools::per_element());
  // Rows swapped back into argument order. One image at a time sums in another order than two
  // (the ResNet's convolutions block by batch), hence the float32 tolerance.
  const clip::Tensor swapped = from_folder.tensor("image_features");
  clip::Tensor reordered(swapped.shape);
  std::copy_n(swapped.data() + Cfg::embed_dim, Cfg::embed_dim, reordered.data());
  std::copy_n(swapped.data(), Cfg::embed_dim, reordered.data() + Cfg::embed_dim);
  BOOST_TEST(relative_error(reordered, image_features) <= 1e-5);
  BOOST_TEST(relative_error(from_folder.tensor("text_features"), text_features) <= 1e-5);
}

// The top-k blocks clip-zeroshot prints: an image path, then "  0.1234  class" lines.
struct Ranking {
  std::string image;
  std::vector<std::pair<double, std::string>> classes;
};

std::vector<Ranking> parse_rankings(const std::string& out) {
  std::vector<Ranking> rankings;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    if (!line.starts_with("  ")) {
      rankings.push_back({line, {}});
      continue;
    }
    BOOST_TEST_REQUIRE(!rankings.empty(), "a class line before any image: " << line);
    std::istringstream fields(line);
    double p;
    fields >> p;
    std::string name;
    std::getline(fields >> std::ws, name);
    rankings.back().classes.emplace_back(p, name);
  }
  return rankings;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(clip_programs)

BOOST_AUTO_TEST_CASE(embed_vit_tiny_end_to_end) { check_embed_end_to_end<ViTTiny>(); }
BOOST_AUTO_TEST_CASE(embed_rn_tiny_end_to_end) { check_embed_end_to_end<RNTiny>(); }

BOOST_AUTO_TEST_CASE(zeroshot_prints_top_k_and_evaluates_a_dataset) {
  Golden<ViTTiny> g;
  if (!g.load()) return;
  const TempDir dir;
  const std::vector<std::string> classes{"an astronaut", "a rocket", "a cup of coffee"};
  const std::vector<std::string> templates{"a photo of {}.", "a drawing of {}."};
  write(dir.path / "classes.txt", "an astronaut\na rocket\na cup of coffee\n");
  write(dir.path / "templates.txt", "a photo of {}.\na drawing of {}.\n");
  const std::vector<std::string> images{image("astronaut.png"), image("rocket.jpg")};

  Result r = zeroshot({"--model", "ViT-tiny", "--weights", g.weights, "--classes", dir / "classes.txt", "--templates",
                       dir / "templates.txt", "--top", "3", images[0], images[1]});
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  BOOST_TEST(r.err.empty(), r.err);
  const std::vector<Ranking> rankings = parse_rankings(r.out);
  BOOST_TEST_REQUIRE(rankings.size() == 2u, r.out);

  // The library's classifier on the library's features, for comparison with what was printed.
  const clip::text::BpeTokenizer tokenizer(clip::text::find_bpe_vocabulary());
  const clip::ZeroShotClassifier classifier = clip::ZeroShotClassifier::build(g.model, tokenizer, classes, templates);
  const clip::Tensor p = classifier.probabilities(encode_in_process(g.model, images));
  for (size_t i = 0; i < 2; ++i) {
    BOOST_TEST(rankings[i].image == images[i]);
    BOOST_TEST_REQUIRE(rankings[i].classes.size() == 3u);
    double sum = 0;
    for (size_t k = 0; k < 3; ++k) {
      const auto& [probability, name] = rankings[i].classes[k];
      sum += probability;
      if (k) BOOST_TEST(probability <= rankings[i].classes[k - 1].first);
      const size_t label = std::find(classes.begin(), classes.end(), name) - classes.begin();
      BOOST_TEST_REQUIRE(label < classes.size(), "unknown class '" << name << "'");
      BOOST_TEST(std::abs(probability - p.values[i * 3 + label]) <= 5e-5 + 1e-6, name);
    }
    BOOST_TEST(std::abs(sum - 1.0) <= 2e-4, "probabilities sum to " << sum);
  }

  // --top 1: one class per image. The default templates (the paper's 80) are found on their own.
  r = zeroshot({"--model", "ViT-tiny", "--weights", g.weights, "--classes", dir / "classes.txt", "--top", "1",
                images[0]});
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  BOOST_TEST_REQUIRE(parse_rankings(r.out).size() == 1u);
  BOOST_TEST(parse_rankings(r.out)[0].classes.size() == 1u);

  // Evaluation: one folder per class, names from the folders.
  const fs::path data = dir.path / "dataset";
  for (const char* c : {"astronaut", "coffee", "rocket"}) fs::create_directories(data / c);
  fs::copy_file(images[0], data / "astronaut" / "1.png");
  fs::copy_file(images[1], data / "rocket" / "1.jpg");
  fs::copy_file(image("coffee.png"), data / "coffee" / "1.png");
  fs::copy_file(image("coffee_palette.png"), data / "coffee" / "2.png");
  r = zeroshot({"--model", "ViT-tiny", "--weights", g.weights, "--templates", dir / "templates.txt", "--dataset",
                data.string(), "--json-out", dir / "report.json"});
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  BOOST_TEST(contains(r.out, "top-1 accuracy: "), r.out);
  BOOST_TEST(contains(r.out, "top-5 accuracy: 100.00% (4/4)"), r.out);  // 3 classes: always in the top 5
  const clip::json::Value report = clip::json::parse(slurp(dir.path / "report.json"));
  BOOST_TEST(report.find("images")->as_number() == 4);
  BOOST_TEST(report.find("top5")->as_number() == 1);
  const auto& per_class = report.find("classes")->as_array();
  BOOST_TEST_REQUIRE(per_class.size() == 3u);
  BOOST_TEST(per_class[0].find("name")->as_string() == "astronaut");
  BOOST_TEST(per_class[1].find("name")->as_string() == "coffee");
  BOOST_TEST(per_class[1].find("images")->as_number() == 2);
  double hits = 0;
  for (const auto& c : per_class) hits += c.find("top1")->as_number() * c.find("images")->as_number();
  BOOST_TEST(std::abs(hits / 4 - report.find("top1")->as_number()) < 1e-6);

  // --classes names the folders in sorted order; a count that does not match is an error.
  write(dir.path / "two.txt", "one\ntwo\n");
  r = zeroshot({"--model", "ViT-tiny", "--weights", g.weights, "--templates", dir / "templates.txt", "--dataset",
                data.string(), "--classes", dir / "two.txt"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "3 class folders"), r.err);
}

BOOST_AUTO_TEST_CASE(bad_arguments_exit_2) {
  const std::vector<std::vector<std::string>> embed_cases{
      {},
      {"--bogus"},
      {"--model"},
      {"--model", "ViT-tiny", "--weights", "w.safetensors", "--text", "a cat"},          // no --out
      {"--model", "ViT-tiny", "--weights", "w.safetensors", "--out", "o.safetensors"},   // no inputs
      {"--model", "ViT-tiny", "--weights", "w.safetensors", "--out", "o", "--text", "a", "--batch", "0"},
      {"--model", "ViT-tiny", "--weights", "", "--out", "o", "--text", "a"},
      {"--model", "ViT-tiny", "--weights", "w", "--out", "o", "stray.png"},
  };
  for (const auto& args : embed_cases) {
    const Result r = embed(args);
    BOOST_TEST(r.status == 2, r.err);
    BOOST_TEST(r.out.empty());
    BOOST_TEST(r.err.starts_with("clip-embed: "), r.err);
    BOOST_TEST(contains(r.err, "--help"), r.err);
  }
  const std::vector<std::vector<std::string>> zeroshot_cases{
      {},
      {"--model", "ViT-tiny", "--weights", "w", "a.png"},                                 // no --classes
      {"--model", "ViT-tiny", "--weights", "w", "--classes", "c.txt"},                    // no images
      {"--model", "ViT-tiny", "--weights", "w", "--dataset", "d", "a.png"},               // both
      {"--model", "ViT-tiny", "--weights", "w", "--classes", "c", "--json-out", "j", "a.png"},
      {"--model", "ViT-tiny", "--weights", "w", "--classes", "c", "--top", "0", "a.png"},
      {"--model", "ViT-tiny", "--weights", "w", "--classes", "c", "--top=x", "a.png"},
  };
  for (const auto& args : zeroshot_cases) {
    const Result r = zeroshot(args);
    BOOST_TEST(r.status == 2, r.err);
    BOOST_TEST(r.out.empty());
    BOOST_TEST(r.err.starts_with("clip-zeroshot: "), r.err);
  }
  for (const auto& r : {embed({"--help"}), zeroshot({"--help"})}) {
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.out.starts_with("usage: "));
  }
}

BOOST_AUTO_TEST_CASE(unknown_model_lists_the_names) {
  const Result a = embed({"--model", "ViT-H/14", "--weights", "w", "--text", "a", "--out", "o"});
  const Result b = zeroshot({"--model", "ViT-H/14", "--weights", "w", "--classes", "c", "a.png"});
  for (const Result& r : {a, b}) {
    BOOST_TEST(r.status == 2);
    BOOST_TEST(contains(r.err, "unknown model 'ViT-H/14'"), r.err);
    for (const char* name : {"ViT-tiny", "RN-tiny"}) BOOST_TEST(contains(r.err, name), r.err);
  }
  // Both spellings of every official variant built in (CLIP_PROGRAM_VARIANTS, from -Dvariants=)
  // are known names: these runs fail on the weights instead.
  const char* built = std::getenv("CLIP_PROGRAM_VARIANTS");
  BOOST_TEST_REQUIRE(built != nullptr, "CLIP_PROGRAM_VARIANTS is not set (meson sets it)");
  std::istringstream names(built);
  for (std::string name; std::getline(names, name, ',');) {
    BOOST_TEST(contains(a.err, name), a.err);
    for (const std::string& spelling : {name, clip::open_clip_name(name)}) {
      const Result r = embed({"--model", spelling, "--weights", "/nonexistent/w.safetensors", "--text", "a", "--out", "o"});
      BOOST_TEST(r.status == 1, spelling << ": " << r.err);
      BOOST_TEST(contains(r.err, "/nonexistent/w.safetensors"), r.err);
    }
  }
}

BOOST_AUTO_TEST_CASE(bad_files_exit_1_naming_them) {
  Golden<ViTTiny> vit;
  Golden<RNTiny> rn;
  if (!vit.load() || !rn.load()) return;
  const TempDir dir;
  const std::string out = dir / "out.safetensors";
  auto embed_vit = [&](std::vector<std::string> extra) {
    std::vector<std::string> args{"--model", "ViT-tiny", "--weights", vit.weights, "--out", out};
    args.insert(args.end(), extra.begin(), extra.end());
    return embed(args);
  };

  // Missing weights.
  Result r = embed({"--model", "ViT-tiny", "--weights", dir / "missing.safetensors", "--text", "a", "--out", out});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "missing.safetensors"), r.err);

  // Weights of the other model: the tensor and both shapes.
  r = embed({"--model", "ViT-tiny", "--weights", rn.weights, "--text", "a", "--out", out});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "'visual.conv1.weight' has shape [8, 3, 3, 3] but the model expects [128, 3, 8, 8]"), r.err);

  // A corrupt image, an image that is not there, a folder without images, a bad caption file.
  const std::string corrupt = dir / "corrupt.png";
  write(corrupt, std::string("\x89PNG\r\n\x1A\n", 8) + "not really a png");
  r = embed_vit({"--image", image("astronaut.png"), "--image", corrupt});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "corrupt.png"), r.err);
  r = embed_vit({"--image", dir / "absent.jpg"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "absent.jpg"), r.err);
  fs::create_directories(dir.path / "empty");
  r = embed_vit({"--image-dir", dir / "empty"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "empty"), r.err);
  write(dir.path / "captions.txt", "fine\nbad \xff byte\n");
  r = embed_vit({"--text-file", dir / "captions.txt"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "captions.txt' line 2"), r.err);
  BOOST_TEST(!fs::exists(out), "nothing is written on failure");

  // clip-zeroshot: missing class file, corrupt image, a template without {}.
  write(dir.path / "classes.txt", "cat\ndog\n");
  write(dir.path / "templates.txt", "a photo of {}.\na photo\n");
  r = zeroshot({"--model", "ViT-tiny", "--weights", vit.weights, "--classes", dir / "nope.txt", image("astronaut.png")});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "nope.txt"), r.err);
  r = zeroshot({"--model", "ViT-tiny", "--weights", vit.weights, "--classes", dir / "classes.txt", corrupt});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "corrupt.png"), r.err);
  r = zeroshot({"--model", "ViT-tiny", "--weights", vit.weights, "--classes", dir / "classes.txt", "--templates",
                dir / "templates.txt", image("astronaut.png")});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "'a photo' has no {}"), r.err);
  r = zeroshot({"--model", "RN-tiny", "--weights", vit.weights, "--classes", dir / "classes.txt", image("astronaut.png")});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "visual.conv1.weight"), r.err);
}

BOOST_AUTO_TEST_SUITE_END()
