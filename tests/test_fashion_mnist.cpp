// The Fashion-MNIST demo's data (examples/fashion_mnist_captions.hpp, fashion-mnist-shards):
// captions fit the variant's context and never equal a held-out evaluation prompt (on BPE ids),
// are reproducible from the seed and varied, and the program turns IDX files into shards whose
// PNGs hold the very pixels, with the right caption and label, and names a bad input file; the
// captioned retrieval set gives every image 5 captions of its class, no caption to two images,
// and reads back through clip-eval's dataset loader.
// meson passes the program's path in FASHION_MNIST_SHARDS_PROGRAM.
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "clip/eval/dataset.hpp"
#include "clip/image/decode.hpp"
#include "clip/text/bpe_tokenizer.hpp"
#include "fashion_mnist_captions.hpp"
#include "fashion_mnist_variant.hpp"
#include "program_runner.hpp"

namespace {

namespace fs = std::filesystem;
namespace fm = clip::examples::fashion_mnist;

const clip::text::BpeTokenizer& tokenizer() {
  static const clip::text::BpeTokenizer t;
  return t;
}

using clip::test::slurp;
using clip::test::TempDir;
using Result = clip::test::ProgramResult;

Result run_program(const std::vector<std::string>& args) {
  return clip::test::run_program("FASHION_MNIST_SHARDS_PROGRAM", args);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// An IDX file as the dataset ships it: gzip, big-endian magic and sizes, then the bytes.
void write_idx(const fs::path& path, uint32_t magic, std::vector<uint32_t> sizes, const std::vector<uint8_t>& bytes,
               size_t keep = SIZE_MAX) {
  std::string raw;
  auto u32 = [&](uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) raw += static_cast<char>(v >> shift & 0xFF);
  };
  u32(magic);
  for (uint32_t s : sizes) u32(s);
  raw.append(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  raw.resize(std::min(raw.size(), keep));
  gzFile f = gzopen(path.c_str(), "wb");
  BOOST_TEST_REQUIRE(f != nullptr);
  gzwrite(f, raw.data(), static_cast<unsigned>(raw.size()));
  gzclose(f);
}

// A small made-up dataset: `n` images whose pixels are a function of their index.
struct FakeSplit {
  std::vector<uint8_t> pixels, labels;
};

FakeSplit fake_split(int n, int offset) {
  FakeSplit s;
  for (int i = 0; i < n; ++i) {
    for (int p = 0; p < 28 * 28; ++p) s.pixels.push_back(static_cast<uint8_t>((i * 37 + p * 7 + offset) % 256));
    s.labels.push_back(static_cast<uint8_t>((i * 3 + offset) % 10));
  }
  return s;
}

void write_dataset(const fs::path& dir, const FakeSplit& train, const FakeSplit& test) {
  fs::create_directories(dir);
  write_idx(dir / "train-images-idx3-ubyte.gz", 0x803, {uint32_t(train.labels.size()), 28, 28}, train.pixels);
  write_idx(dir / "train-labels-idx1-ubyte.gz", 0x801, {uint32_t(train.labels.size())}, train.labels);
  write_idx(dir / "t10k-images-idx3-ubyte.gz", 0x803, {uint32_t(test.labels.size()), 28, 28}, test.pixels);
  write_idx(dir / "t10k-labels-idx1-ubyte.gz", 0x801, {uint32_t(test.labels.size())}, test.labels);
}

// The members of a ustar file, name -> content, in order.
std::vector<std::pair<std::string, std::string>> read_tar(const fs::path& path) {
  const std::string tar = slurp(path);
  std::vector<std::pair<std::string, std::string>> members;
  for (size_t at = 0; at + 512 <= tar.size();) {
    const char* h = tar.data() + at;
    if (h[0] == '\0') break;
    const std::string name(h, strnlen(h, 100));
    const size_t size = std::stoull(std::string(h + 124, 12), nullptr, 8);
    members.emplace_back(name, tar.substr(at + 512, size));
    at += 512 + (size + 511) / 512 * 512;
  }
  return members;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(fashion_mnist)

BOOST_AUTO_TEST_CASE(variant_has_the_demo_shapes) {
  using V = clip::examples::FashionMnistViT;
  BOOST_TEST(clip::dims<V>::vision::tokens == 17);
  BOOST_TEST(clip::dims<V>::vision::heads == 2);
  BOOST_TEST(V::context_length == fm::kMaxCaptionTokens + 2);
}

BOOST_AUTO_TEST_CASE(captions_fit_and_held_out_prompts_are_new) {
  const size_t distinct = fm::check_vocabulary(tokenizer());
  BOOST_TEST(distinct > 3000u);
  BOOST_TEST(fm::held_out_templates().size() >= 10u);
  // The check compares ids, so a template that differs only in case or spacing is caught.
  std::vector<std::string> leaky = fm::held_out_templates();
  leaky.push_back("Product  shot: {}");
  BOOST_CHECK_EXCEPTION(fm::check_vocabulary(tokenizer(), fm::training_phrasings(), leaky), clip::Error,
                        [](const clip::Error& e) { return contains(e.what(), "is also a training caption"); });
  std::vector<std::string> long_phrasing = fm::training_phrasings();
  long_phrasing.push_back("a very very very very very long description of {}");
  BOOST_CHECK_EXCEPTION(fm::check_vocabulary(tokenizer(), long_phrasing), clip::Error,
                        [](const clip::Error& e) { return contains(e.what(), "BPE tokens"); });
}

BOOST_AUTO_TEST_CASE(captions_are_seeded_varied_and_name_their_class) {
  std::set<std::string> seen;
  std::map<int, int> canonical;
  int differ = 0;
  for (int64_t i = 0; i < 6000; ++i) {
    const int label = static_cast<int>(i % 10);
    const std::string caption = fm::training_caption(7, i, label);
    BOOST_TEST(caption == fm::training_caption(7, i, label));
    differ += caption != fm::training_caption(8, i, label);
    seen.insert(caption);
    bool named = false;
    for (const std::string& name : fm::class_names()[label]) named = named || contains(caption, fm::bare(name));
    BOOST_TEST(named, caption << " names no name of class " << label);
    canonical[label] += fm::caption_choice(7, i, label).name == 0;
  }
  BOOST_TEST(seen.size() > 2000u);
  BOOST_TEST(differ > 5000);
  for (const auto& [label, count] : canonical) BOOST_TEST((count > 180 && count < 420), label << ": " << count);
  BOOST_TEST(fm::fill("{n} for sale", "an ankle boot") == "ankle boot for sale");
  BOOST_TEST(fm::fill("a photo of {}.", "an ankle boot") == "a photo of an ankle boot.");
}

BOOST_AUTO_TEST_CASE(retrieval_captions_are_distinct_seeded_fit_and_name_their_class) {
  std::set<std::string> all;
  for (int c = 0; c < fm::kClasses; ++c) {
    const std::vector<std::vector<std::string>> captions = fm::retrieval_captions(5, c);
    BOOST_TEST_REQUIRE(captions.size() == 100u);
    for (const std::vector<std::string>& image : captions) {
      BOOST_TEST_REQUIRE(image.size() == 5u);
      for (const std::string& caption : image) {
        BOOST_TEST(all.insert(caption).second, caption << " is given to two images");
        bool named = false;
        for (const std::string& name : fm::class_names()[c]) named = named || contains(caption, fm::bare(name));
        BOOST_TEST(named, caption << " names no name of class " << c);
      }
    }
    for (const std::string& caption : fm::retrieval_caption_pool(c))
      BOOST_TEST(static_cast<int>(tokenizer().encode(caption).size()) <= fm::kMaxCaptionTokens, caption);
    BOOST_TEST((captions == fm::retrieval_captions(5, c)));
    BOOST_TEST((captions != fm::retrieval_captions(6, c)));
  }
  BOOST_TEST(all.size() == 5000u);
  // The held-out templates join the pool too, with and without their full stop.
  const auto pool = fm::retrieval_caption_pool(2);
  BOOST_TEST((std::find(pool.begin(), pool.end(), "a sketch of a jumper") != pool.end()));
  BOOST_TEST((std::find(pool.begin(), pool.end(), "a sketch of a jumper.") != pool.end()));
  BOOST_CHECK_EXCEPTION(fm::retrieval_captions(5, 0, 200, 5), clip::Error,
                        [](const clip::Error& e) { return contains(e.what(), "not enough for 200 images"); });
}

BOOST_AUTO_TEST_CASE(program_writes_shards_with_the_pixels_captions_and_labels) {
  TempDir dir;
  const FakeSplit train = fake_split(9, 0), test = fake_split(5, 1);
  write_dataset(dir.path / "in", train, test);
  const fs::path out = dir.path / "out";
  // A stale shard of an earlier run with smaller shards must not survive.
  fs::create_directories(out / "train");
  std::ofstream(out / "train" / "00007.tar") << "stale";
  const Result r = run_program({"--input", (dir.path / "in").string(), "--out", out.string(), "--shard-size", "4",
                                "--seed", "3", "--test-folders", "--quiet"});
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  BOOST_TEST(contains(r.out, "9 training images in 3 shards"));
  BOOST_TEST(!fs::exists(out / "train" / "00003.tar"));
  BOOST_TEST(!fs::exists(out / "train" / "00007.tar"));
  for (const auto& [split, data, shards] : {std::tuple{"train", &train, 3}, std::tuple{"test", &test, 2}}) {
    int64_t index = 0;
    for (int shard = 0; shard < shards; ++shard) {
      char name[16];
      std::snprintf(name, sizeof name, "%05d.tar", shard);
      const auto members = read_tar(out / split / name);
      BOOST_TEST_REQUIRE(members.size() % 3 == 0u);
      for (size_t m = 0; m < members.size(); m += 3, ++index) {
        char key[16];
        std::snprintf(key, sizeof key, "%09lld", static_cast<long long>(index));
        BOOST_TEST(members[m].first == std::string(key) + ".png");
        BOOST_TEST(members[m + 1].first == std::string(key) + ".txt");
        BOOST_TEST(members[m + 2].first == std::string(key) + ".cls");
        const std::string& png = members[m].second;
        const clip::image::Image image =
            clip::image::decode(std::span(reinterpret_cast<const uint8_t*>(png.data()), png.size()));
        BOOST_TEST(image.width == 28);
        BOOST_TEST(image.height == 28);
        BOOST_TEST(image.mode == clip::image::Mode::L);
        BOOST_TEST(std::memcmp(image.pixels.data(), &data->pixels[index * 28 * 28], 28 * 28) == 0);
        const int label = data->labels[index];
        BOOST_TEST(members[m + 2].second == std::to_string(label));
        BOOST_TEST(members[m + 1].second == (split == std::string("train") ? fm::training_caption(3, index, label)
                                                                           : fm::canonical_name(label)));
      }
    }
    BOOST_TEST(index == static_cast<int64_t>(data->labels.size()));
  }
  // The evaluation files: canonical names in label order, the held-out templates, class folders.
  std::vector<std::string> classes;
  for (int c = 0; c < 10; ++c) classes.push_back(fm::canonical_name(c));
  std::string expected;
  for (const std::string& c : classes) expected += c + "\n";
  BOOST_TEST(slurp(out / "classes.txt") == expected);
  expected.clear();
  for (const std::string& t : fm::held_out_templates()) expected += t + "\n";
  BOOST_TEST(slurp(out / "templates.txt") == expected);
  size_t images = 0;
  for (const auto& entry : fs::recursive_directory_iterator(out / "test-folders")) images += entry.is_regular_file();
  BOOST_TEST(images == test.labels.size());
  BOOST_TEST(fs::exists(out / "test-folders" / "9_ankle_boot"));
  BOOST_TEST(contains(slurp(out / "info.json"), "\"train_samples\": 9"));
  BOOST_TEST(contains(slurp(out / "info.json"), "\"retrieval\": \"retrieval/00000.tar\""));

  // The retrieval set: every test image here (each class has fewer than 100), its 5 captions as a
  // JSON list, read back by clip-eval's loader.
  const auto members = read_tar(out / "retrieval" / "00000.tar");
  BOOST_TEST_REQUIRE(members.size() == 3 * test.labels.size());
  const clip::EvalDataset set =
      clip::load_eval_dataset((out / "retrieval" / "00000.tar").string(), clip::DatasetUse::retrieval, {});
  BOOST_TEST_REQUIRE(set.captions.size() == test.labels.size());
  for (size_t i = 0; i < test.labels.size(); ++i) {
    char key[24];
    std::snprintf(key, sizeof key, "%09zu", i);
    BOOST_TEST(members[3 * i].first == std::string(key) + ".png");
    BOOST_TEST(members[3 * i + 2].second == std::to_string(test.labels[i]));
    // The labels of this made-up split are all different: each image is its class's first.
    BOOST_TEST(set.captions[i] == fm::retrieval_captions(3, test.labels[i])[0], boost::test_tools::per_element());
  }
}

BOOST_AUTO_TEST_CASE(retrieval_only_writes_the_retrieval_set_alone) {
  TempDir dir;
  FakeSplit test = fake_split(30, 1);
  for (uint8_t& label : test.labels) label = label % 2;  // classes 0 and 1, 15 images each
  write_dataset(dir.path / "in", fake_split(3, 0), test);
  const fs::path out = dir.path / "out";
  const Result r = run_program({"--input", (dir.path / "in").string(), "--out", out.string(), "--retrieval-only",
                                "--seed", "4", "--quiet"});
  BOOST_TEST_REQUIRE(r.status == 0, r.err);
  BOOST_TEST(contains(r.out, "30 retrieval images with 5 captions each"));
  BOOST_TEST(!fs::exists(out / "info.json"));
  BOOST_TEST(!fs::exists(out / "train"));
  const clip::EvalDataset set =
      clip::load_eval_dataset((out / "retrieval" / "00000.tar").string(), clip::DatasetUse::retrieval, {});
  BOOST_TEST_REQUIRE(set.captions.size() == 30u);
  std::array<int, 2> seen{};
  for (size_t i = 0; i < 30; ++i) {
    const int label = test.labels[i];
    BOOST_TEST(set.captions[i] == fm::retrieval_captions(4, label)[seen[label]++], boost::test_tools::per_element());
  }
}

BOOST_AUTO_TEST_CASE(program_names_the_bad_input_file) {
  TempDir dir;
  const fs::path in = dir.path / "in", out = dir.path / "out";
  const FakeSplit train = fake_split(4, 0), test = fake_split(2, 1);
  auto expect_failure = [&](const std::string& file, const std::string& message) {
    const Result r = run_program({"--input", in.string(), "--out", out.string(), "--quiet"});
    BOOST_TEST(r.status == 1);
    BOOST_TEST(contains(r.err, (in / file).string()), r.err);
    BOOST_TEST(contains(r.err, message), r.err);
    BOOST_TEST(!fs::exists(out / "info.json"));
  };
  fs::create_directories(in);
  expect_failure("train-images-idx3-ubyte.gz", "install Debian's dataset-fashion-mnist");

  write_dataset(in, train, test);
  write_idx(in / "t10k-images-idx3-ubyte.gz", 0x803, {2, 28, 28}, test.pixels, 16 + 1000);
  expect_failure("t10k-images-idx3-ubyte.gz", "cut short");

  write_dataset(in, train, test);
  write_idx(in / "train-labels-idx1-ubyte.gz", 0x803, {4}, train.labels);
  expect_failure("train-labels-idx1-ubyte.gz", "magic number is 2051, not 2049");

  write_dataset(in, train, test);
  write_idx(in / "train-labels-idx1-ubyte.gz", 0x801, {3}, {0, 1, 2});
  expect_failure("train-labels-idx1-ubyte.gz", "holds 3 labels");

  write_dataset(in, train, test);
  write_idx(in / "train-labels-idx1-ubyte.gz", 0x801, {4}, {0, 1, 12, 2});
  expect_failure("train-labels-idx1-ubyte.gz", "label 12 of image 2");

  write_dataset(in, train, test);
  write_idx(in / "t10k-images-idx3-ubyte.gz", 0x803, {2, 32, 32}, std::vector<uint8_t>(2 * 32 * 32));
  expect_failure("t10k-images-idx3-ubyte.gz", "32x32");

  const Result usage = run_program({"--input", in.string()});
  BOOST_TEST(usage.status == 2);
  BOOST_TEST(contains(usage.err, "--out DIR is required"));
}

BOOST_AUTO_TEST_SUITE_END()
