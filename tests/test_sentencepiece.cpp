// SentencePieceTokenizer: trains a small model with the library's own trainer on captions made
// here, then checks the shared interface: round trips, start/end tokens, padding, truncation.
#include <boost/test/unit_test.hpp>

#include "messages.hpp"

#include <sentencepiece_trainer.h>

#include <fstream>
#include <functional>
#include <random>
#include <unordered_map>

#include "clip/text/sentencepiece_tokenizer.hpp"

namespace {

namespace fs = std::filesystem;
using clip::text::SentencePieceTokenizer;

std::vector<std::string> captions(size_t count, unsigned seed) {
  static const char* subjects[] = {"a cat", "two dogs", "an old man", "a red car", "the city", "a small bird",
                                   "children", "a mountain", "a bowl of soup", "a sailing boat"};
  static const char* verbs[] = {"sitting on", "running across", "looking at", "parked near", "flying over",
                                "reflected in", "covered with", "next to"};
  static const char* objects[] = {"a wooden table", "the beach", "a snowy field", "the river", "a busy street",
                                  "green grass", "the night sky", "a window"};
  std::mt19937 random(seed);
  std::vector<std::string> out;
  for (size_t k = 0; k < count; ++k)
    out.push_back(std::string(subjects[random() % 10]) + " " + verbs[random() % 8] + " " + objects[random() % 8]);
  return out;
}

// A folder of its own under the system temp folder, removed at the end of the run.
struct TempFolder {
  fs::path path;
  TempFolder() {
    path = fs::temp_directory_path() / ("clip-sentencepiece-" + std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempFolder() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// Trains a 64-piece unigram model on 2,000 generated captions (their few distinct words allow
// no more); `extra` overrides the trainer's settings.
fs::path train(const TempFolder& folder, const std::string& name,
               std::unordered_map<std::string, std::string> extra = {}) {
  const fs::path corpus = folder.path / "captions.txt";
  if (!fs::exists(corpus)) {
    std::ofstream out(corpus);
    for (const std::string& c : captions(2000, 1)) out << c << "\n";
  }
  std::unordered_map<std::string, std::string> args = {
      {"input", corpus.string()},     {"model_prefix", (folder.path / name).string()},
      {"vocab_size", "64"},           {"model_type", "unigram"},
      {"character_coverage", "1.0"},  {"unk_id", "0"},
      {"bos_id", "1"},                {"eos_id", "2"},
      {"pad_id", "3"},                {"num_threads", "1"},
      {"minloglevel", "2"}};
  for (auto& [key, value] : extra) args[key] = value;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  BOOST_TEST_REQUIRE(status.ok(), "training failed: " << status.ToString());
  return folder.path / (name + ".model");
}

struct TrainedModel {
  TempFolder folder;
  fs::path model = train(folder, "captions");
};

const TrainedModel& trained() {
  static const TrainedModel instance;
  return instance;
}

using clip::test::message_of;

}  // namespace

BOOST_AUTO_TEST_SUITE(sentencepiece_tokenizer)

BOOST_AUTO_TEST_CASE(round_trips_captions) {
  const SentencePieceTokenizer tok(trained().model);
  BOOST_TEST(tok.vocab_size() == 64);
  for (const std::string& caption : captions(200, 2)) {  // other draws than the training corpus
    const std::vector<int> ids = tok.encode(caption);
    BOOST_TEST(!ids.empty());
    BOOST_TEST(tok.decode(ids) == caption);
  }
  // Words the corpus never had still round-trip through smaller pieces.
  BOOST_TEST(tok.decode(tok.encode("a brown bat by the sea")) == "a brown bat by the sea");
}

BOOST_AUTO_TEST_CASE(rows_have_start_end_and_padding) {
  const SentencePieceTokenizer tok(trained().model);
  BOOST_TEST(tok.sot() == 1);
  BOOST_TEST(tok.eot() == 2);
  BOOST_TEST(tok.pad() == 3);
  const std::string text = "a cat sitting on the beach";
  const std::vector<int> ids = tok.encode(text);
  const std::vector<int> row = tok.tokenize(text, 32);
  BOOST_TEST_REQUIRE(ids.size() + 2 <= 32u);
  BOOST_TEST(row.size() == 32u);
  BOOST_TEST(row.front() == tok.sot());
  BOOST_TEST(std::vector<int>(row.begin() + 1, row.begin() + 1 + static_cast<long>(ids.size())) == ids);
  BOOST_TEST(row[ids.size() + 1] == tok.eot());
  for (size_t k = ids.size() + 2; k < row.size(); ++k) BOOST_TEST(row[k] == tok.pad());
  // Start, end and padding are control pieces: the row decodes to the text.
  BOOST_TEST(tok.decode(row) == text);
}

BOOST_AUTO_TEST_CASE(truncation_keeps_start_and_end) {
  const SentencePieceTokenizer tok(trained().model);
  std::string text;
  for (int k = 0; k < 20; ++k) text += "a small bird flying over the river ";
  const std::vector<int> ids = tok.encode(text);
  BOOST_TEST_REQUIRE(ids.size() > 14u);
  const std::vector<int> row = tok.tokenize(text, 16);
  BOOST_TEST(row.size() == 16u);
  BOOST_TEST(row.front() == tok.sot());
  BOOST_TEST(row.back() == tok.eot());
  BOOST_TEST(std::vector<int>(row.begin() + 1, row.end() - 1) == std::vector<int>(ids.begin(), ids.begin() + 14));
  BOOST_CHECK_THROW(tok.tokenize(text, 16, false), clip::Error);
  BOOST_CHECK_THROW(tok.tokenize(text, 1), clip::Error);
}

BOOST_AUTO_TEST_CASE(errors_are_sentences) {
  const SentencePieceTokenizer tok(trained().model);
  const std::string bad_text = message_of([&] { tok.encode("caf\xc3"); });
  BOOST_TEST(bad_text.find("at byte offset 3") != std::string::npos, bad_text);
  const std::string bad_id = message_of([&] { tok.decode(std::vector<int>{64}); });
  BOOST_TEST(bad_id.find("outside the vocabulary") != std::string::npos, bad_id);
  const std::string missing = message_of([] { SentencePieceTokenizer("/nonexistent/model.model"); });
  BOOST_TEST(missing.find("/nonexistent/model.model") != std::string::npos, missing);
}

BOOST_AUTO_TEST_CASE(models_without_padding_or_start_token) {
  TempFolder folder;
  // No pad piece: rows are padded with 0, as CLIP pads.
  const SentencePieceTokenizer no_pad(train(folder, "no_pad", {{"pad_id", "-1"}}));
  BOOST_TEST(no_pad.pad() == 0);
  BOOST_TEST(no_pad.tokenize("a cat", 16).back() == 0);
  // No bos piece: refused with a sentence that names the model.
  const fs::path no_bos = train(folder, "no_bos", {{"bos_id", "-1"}, {"pad_id", "-1"}});
  const std::string refused = message_of([&] { SentencePieceTokenizer{no_bos}; });
  BOOST_TEST(refused.find("no start (bos) or end (eos) piece") != std::string::npos, refused);
}

BOOST_AUTO_TEST_SUITE_END()
