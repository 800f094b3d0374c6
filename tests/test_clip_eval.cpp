// clip-eval run as a user runs it, on the golden tiny ViT: zero-shot and retrieval against the
// library's own in-process computation, the linear probe and the few-shot probe on the golden
// probe features (--train-features ...) against scikit-learn's references, the feature cache,
// the CLIP_benchmark JSON parsed back field by field, and bad input named by file and line.
// meson builds a test copy of the program that knows the tiny models (CLIP_EVAL_PROGRAM).
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "clip/eval/benchmark_result.hpp"
#include "clip/eval/feature_file.hpp"
#include "clip/eval/metrics.hpp"
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
using clip::test::TempDir;
using Cfg = clip::test::ViTTiny;
using Result = clip::test::ProgramResult;

Result eval(const std::vector<std::string>& args) { return clip::test::run_program("CLIP_EVAL_PROGRAM", args); }
bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }
void write(const fs::path& p, const std::string& content) { std::ofstream(p, std::ios::binary) << content; }
std::string image(const std::string& name) { return (clip::test::golden_dir() / "images" / name).string(); }

// The tiny ViT's weights alone in a file, and the model in process.
struct Tiny {
  TempDir dir;
  std::string weights = dir / "weights.safetensors";
  clip::Model<Cfg> model;
  bool load() {
    auto path = clip::test::golden_file("vit_tiny.safetensors");
    if (!path) return false;
    model.load(clip::SafeTensors::open(*path), clip::Extra::allow);
    clip::save_state_dict(model.params(), weights);
    return true;
  }
};

using clip::test::encode_in_process;

clip::text::BpeTokenizer tokenizer() {
  return clip::text::BpeTokenizer(clip::test::data_dir() / "bpe_simple_vocab_16e6.txt.gz");
}

const std::vector<std::vector<std::string>> kFolders{{"astronaut.png", "coffee.png", "coins.png"},
                                                     {"rocket.jpg", "chelsea_rgba.png", "coffee_palette.png"}};
const std::vector<std::string> kClasses{"a person", "a rocket"};

// DIR/{0,1}/ with the golden images, and the class list.
void make_folders(const fs::path& dir) {
  for (size_t c = 0; c < kFolders.size(); ++c) {
    fs::create_directories(dir / std::to_string(c));
    for (const std::string& f : kFolders[c]) fs::copy_file(image(f), dir / std::to_string(c) / f);
  }
}

void split_golden_probe(const clip::SafeTensors& f, const fs::path& dir) {
  for (const std::string split : {"train", "val", "test"})
    clip::write_feature_file(dir / (split + ".safetensors"), {f.tensor(split + ".features"), f.integers(split + ".labels")});
}

}  // namespace

BOOST_AUTO_TEST_CASE(zeroshot_matches_in_process_and_uses_the_cache) {
  Tiny tiny;
  if (!tiny.load()) return;
  const TempDir dir;
  make_folders(dir / "data");
  write(dir / "classes.txt", "a person\na rocket\n");
  write(dir / "templates.txt", "a photo of {}.\n{} in a picture\n");
  const std::vector<std::string> args{"--task", "zeroshot", "--model", Cfg::name, "--weights", tiny.weights,
                                      "--test", dir / "data", "--classes", dir / "classes.txt", "--templates",
                                      dir / "templates.txt", "--output", dir / "out", "--pretrained", "golden",
                                      "--dataset-name", "six"};
  const Result r = eval(args);
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  BOOST_TEST(contains(r.out, "acc1"), r.out);  // the terminal table

  // Expected: the same protocol in process.
  std::vector<std::string> paths;
  std::vector<int64_t> labels;
  for (size_t c = 0; c < kFolders.size(); ++c) {
    std::vector<std::string> names = kFolders[c];
    std::sort(names.begin(), names.end());
    for (const std::string& f : names) paths.push_back(image(f)), labels.push_back(static_cast<int64_t>(c));
  }
  const auto classifier = clip::ZeroShotClassifier::build(tiny.model, tokenizer(), kClasses,
                                                          std::vector<std::string>{"a photo of {}.", "{} in a picture"});
  const clip::Tensor logits = classifier.logits(encode_in_process(tiny.model, paths));
  const clip::ClassificationMetrics want =
      clip::classification_metrics(std::span<const float>(logits.values), std::span<const int64_t>(labels), 2);

  const fs::path file = dir.path / "out" / "six_golden_ViT-tiny_en_zeroshot_classification.json";
  BOOST_TEST_REQUIRE(fs::exists(file));
  const clip::BenchmarkResult got = clip::BenchmarkResult::read(file);
  clip::BenchmarkResult expected;
  expected.dataset = "six", expected.model = Cfg::name, expected.pretrained = "golden";
  expected.task = "zeroshot_classification", expected.language = "en";
  BOOST_TEST(got.dataset == expected.dataset);
  BOOST_TEST(got.model == expected.model);
  BOOST_TEST(got.pretrained == expected.pretrained);
  BOOST_TEST(got.task == expected.task);
  BOOST_TEST(got.language == expected.language);
  BOOST_TEST(got.file_name() == expected.file_name());
  BOOST_TEST(*got.get("acc1") == want.acc1);
  BOOST_TEST(!got.get("acc5"));  // two classes: top-5 does not exist
  BOOST_TEST(*got.get("mean_per_class_recall") == want.mean_per_class_recall);
  BOOST_TEST(got.metrics.size() == 3u);

  // The second run reads the features from the cache; removing the cache encodes again.
  const Result again = eval(args);
  BOOST_TEST_REQUIRE(again.status == 0, again.err);
  BOOST_TEST(contains(again.err, "from the cache"), again.err);
  BOOST_TEST(clip::BenchmarkResult::read(file).to_json() == got.to_json());
  fs::remove_all(dir.path / "out" / "feature-cache");
  const Result fresh = eval(args);
  BOOST_TEST_REQUIRE(fresh.status == 0, fresh.err);
  BOOST_TEST(!contains(fresh.err, "from the cache"), fresh.err);
}

BOOST_AUTO_TEST_CASE(retrieval_matches_in_process) {
  Tiny tiny;
  if (!tiny.load()) return;
  const TempDir dir;
  for (const auto& folder : kFolders)
    for (const std::string& f : folder) fs::copy_file(image(f), dir / f);
  // Several captions for some images, one for others; a JSON-free CSV with a caption column.
  const std::vector<std::pair<std::string, std::string>> rows{
      {"astronaut.png", "an astronaut"}, {"coffee.png", "a cup of coffee"}, {"rocket.jpg", "a rocket launch"},
      {"coins.png", "old coins"}, {"astronaut.png", "a person in a space suit"}, {"chelsea_rgba.png", "a cat"},
      {"coffee_palette.png", "coffee, in few colours"}, {"rocket.jpg", "smoke and fire"}};
  std::string csv = "filepath,title\n";
  for (const auto& [f, c] : rows) csv += f + ",\"" + c + "\"\n";
  write(dir / "captions.csv", csv);
  const Result r = eval({"--task", "retrieval", "--model", Cfg::name, "--weights", tiny.weights, "--retrieval-data",
                         dir / "captions.csv", "--recall-k", "1,2,5", "--output", dir / "out", "--pretrained", "golden"});
  BOOST_TEST_REQUIRE(r.status == 0, r.err);

  std::vector<std::string> images, captions;
  std::vector<int64_t> index;
  for (const auto& [f, c] : rows) {
    auto it = std::find(images.begin(), images.end(), dir / f);
    if (it == images.end()) images.push_back(dir / f), it = images.end() - 1;
    captions.push_back(c);
    index.push_back(it - images.begin());
  }
  clip::Tensor image_features = encode_in_process(tiny.model, images);
  std::vector<int> ids;
  const auto tok = tokenizer();
  for (const std::string& c : captions) {
    const std::vector<int> row = tok.tokenize(c, 77, true);
    ids.insert(ids.end(), row.begin(), row.end());
  }
  clip::Tensor text_features = tiny.model.encode_text(ids);
  clip::l2_normalize_rows(image_features);
  clip::l2_normalize_rows(text_features);
  const int64_t T = text_features.shape[0], I = image_features.shape[0];
  const std::vector<float> scores = clip::retrieval_scores(text_features, image_features);
  const std::vector<int64_t> ks{1, 2, 5};
  const std::vector<clip::RetrievalRecall> want = clip::retrieval_recall(scores, T, I, index, ks);
  const clip::BenchmarkResult got =
      clip::BenchmarkResult::read(dir.path / "out" / "captions_golden_ViT-tiny_en_zeroshot_retrieval.json");
  BOOST_TEST(got.task == "zeroshot_retrieval");
  for (const clip::RetrievalRecall& w : want) {
    BOOST_TEST(*got.get("image_retrieval_recall@" + std::to_string(w.k)) == w.image_retrieval, "k " << w.k);
    BOOST_TEST(*got.get("text_retrieval_recall@" + std::to_string(w.k)) == w.text_retrieval, "k " << w.k);
  }
}

BOOST_AUTO_TEST_CASE(linear_probe_and_fewshot_on_feature_files) {
  const auto path = clip::test::golden_file("eval_probe.safetensors");
  if (!path) return;
  const clip::SafeTensors golden = clip::SafeTensors::open(*path);
  const TempDir dir;
  split_golden_probe(golden, dir.path);
  const clip::json::Value sweep = clip::json::parse(golden.metadata().at("sweep"));
  const Result r = eval({"--task", "linear-probe", "--train-features", dir / "train.safetensors", "--val-features",
                         dir / "val.safetensors", "--test-features", dir / "test.safetensors", "--output", dir / "out",
                         "--dataset-name", "probe"});
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  const clip::BenchmarkResult lp = clip::BenchmarkResult::read(dir.path / "out" / "probe_features_features_en_linear_probe.json");
  BOOST_TEST(std::abs(*lp.get("lp_acc1") - sweep["final_test_accuracy"].as_number()) <= 1.0 / 200 + 1e-12);
  BOOST_TEST(std::abs(*lp.get("C") - sweep["best_C"].as_number()) <= 1e-9 * sweep["best_C"].as_number());
  BOOST_TEST(lp.get("lp_acc5").has_value());  // 5 classes
  BOOST_TEST(lp.get("lp_mean_per_class_recall").has_value());

  // Few-shot: 60 training rows per class at most, so 1000 shots is null.
  const Result f = eval({"--task", "fewshot", "--train-features", dir / "train.safetensors", "--test-features",
                         dir / "test.safetensors", "--shots", "1,4,16,1000", "--seeds", "2", "--output", dir / "out",
                         "--dataset-name", "probe"});
  BOOST_TEST_REQUIRE(f.status == 0, f.err);
  BOOST_TEST(contains(f.err, "1000-shot"), f.err);
  const fs::path json = dir.path / "out" / "probe_features_features_en_fewshot_linear_probe.json";
  const clip::BenchmarkResult few = clip::BenchmarkResult::read(json);
  BOOST_TEST(!few.get("1000shot_acc1"));
  for (const char* k : {"1shot_acc1", "4shot_acc1", "16shot_acc1"}) {
    BOOST_TEST_REQUIRE(few.get(k).has_value());
    BOOST_TEST(*few.get(k) > 0.2);  // above chance (5 classes)
  }
  BOOST_TEST(*few.get("16shot_acc1") >= *few.get("1shot_acc1"));
  BOOST_TEST(*few.get("seeds") == 2);
  const std::string svg = clip::test::slurp(dir.path / "out" / "probe_features_features_en_fewshot_linear_probe.svg");
  BOOST_TEST(contains(svg, "<svg"));
  BOOST_TEST(contains(svg, "Few-shot linear probe"));
  // The JSON text is CLIP_benchmark's layout: keys in its order.
  const std::string text = clip::test::slurp(json);
  BOOST_TEST(text.find("\"dataset\"") < text.find("\"model\""));
  BOOST_TEST(text.find("\"metrics\"") < text.find("\"language\""));
  BOOST_TEST(contains(text, "\"1000shot_acc1\": null"), text);
}

BOOST_AUTO_TEST_CASE(bad_input_is_named) {
  const TempDir dir;
  // Feature dimensions that disagree.
  clip::LabeledFeatures a{clip::Tensor({4, 3}), {0, 1, 0, 1}}, b{clip::Tensor({2, 5}), {0, 1}};
  clip::write_feature_file(dir / "a.safetensors", a);
  clip::write_feature_file(dir / "b.safetensors", b);
  Result r = eval({"--task", "linear-probe", "--train-features", dir / "a.safetensors", "--test-features",
                   dir / "b.safetensors", "--C", "1", "--output", dir / "out"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "dimensions disagree"), r.err);
  BOOST_TEST(!fs::exists(dir.path / "out" / "b_features_features_en_linear_probe.json"));

  Tiny tiny;
  if (!tiny.load()) return;
  // A caption table naming a missing image.
  fs::copy_file(image("astronaut.png"), dir / "astronaut.png");
  write(dir / "captions.csv", "filepath,title\nastronaut.png,an astronaut\nmissing.png,nothing\n");
  r = eval({"--task", "retrieval", "--model", Cfg::name, "--weights", tiny.weights, "--retrieval-data",
            dir / "captions.csv", "--output", dir / "out"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "captions.csv' line 3"), r.err);
  BOOST_TEST(contains(r.err, "missing.png"), r.err);
  // A label outside the class list.
  write(dir / "classes.txt", "a\nb\n");
  write(dir / "labels.csv", "filepath,label\nastronaut.png,1\nastronaut.png,2\n");
  r = eval({"--task", "zeroshot", "--model", Cfg::name, "--weights", tiny.weights, "--test", dir / "labels.csv",
            "--classes", dir / "classes.txt", "--output", dir / "out"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "labels.csv' line 3: label 2 is outside the class list"), r.err);
  write(dir / "names.csv", "filepath,label\nastronaut.png,a\nastronaut.png,zebra\n");
  r = eval({"--task", "zeroshot", "--model", Cfg::name, "--weights", tiny.weights, "--test", dir / "names.csv",
            "--classes", dir / "classes.txt", "--output", dir / "out"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "names.csv' line 3: label 'zebra' is not in the class list"), r.err);
  // An empty class folder.
  make_folders(dir / "folders");
  fs::create_directories(dir.path / "folders" / "2");
  r = eval({"--task", "zeroshot", "--model", Cfg::name, "--weights", tiny.weights, "--test", dir / "folders",
            "--output", dir / "out"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.err, "folders/2' holds no image (an empty class)"), r.err);
  // Bad arguments: exit 2.
  r = eval({"--task", "dance"});
  BOOST_TEST(r.status == 2);
  BOOST_TEST(contains(r.err, "unknown task 'dance'"), r.err);
}

BOOST_AUTO_TEST_CASE(benchmark_json_round_trip) {
  clip::BenchmarkResult r;
  r.dataset = "cifar10", r.model = "ViT-B/32", r.pretrained = "openai", r.task = "linear_probe";
  r.set("lp_acc1", 0.951);
  r.set("lp_acc5", std::nullopt);
  r.set("C", 0.316);
  BOOST_TEST(r.file_name() == "cifar10_openai_ViT-B_32_en_linear_probe.json");
  BOOST_TEST(r.to_json() == "{\"dataset\": \"cifar10\", \"model\": \"ViT-B/32\", \"pretrained\": \"openai\", "
                            "\"task\": \"linear_probe\", \"metrics\": {\"lp_acc1\": 0.951, \"lp_acc5\": null, "
                            "\"C\": 0.316}, \"language\": \"en\"}\n");
  const clip::BenchmarkResult back = clip::BenchmarkResult::from_json(r.to_json());
  BOOST_TEST(back.dataset == r.dataset);
  BOOST_TEST(back.model == r.model);
  BOOST_TEST(back.pretrained == r.pretrained);
  BOOST_TEST(back.task == r.task);
  BOOST_TEST(back.language == r.language);
  BOOST_TEST(*back.get("lp_acc1") == 0.951);
  BOOST_TEST(!back.get("lp_acc5"));
  BOOST_TEST(*back.get("C") == 0.316);
  BOOST_CHECK_THROW(clip::BenchmarkResult::from_json("{\"dataset\": 1}"), clip::Error);
}
