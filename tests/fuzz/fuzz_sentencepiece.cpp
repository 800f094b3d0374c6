// The SentencePiece front (clip/text/sentencepiece_tokenizer.hpp): UTF-8 checking, encoding,
// the fixed-length row and decoding, with a small unigram model trained when the fuzzer starts
// (on captions made here, so no outside data is needed).
#include <sentencepiece_trainer.h>

#include <fstream>

#include "clip/text/sentencepiece_tokenizer.hpp"
#include "fuzz_input.hpp"

namespace {

std::unique_ptr<clip::text::SentencePieceTokenizer> trained_tokenizer() {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("clip-fuzz-sentencepiece-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  {
    std::ofstream corpus(dir / "captions.txt");
    const char* words[] = {"a", "photo", "of", "the", "dog", "cat", "red", "small", "car", "on", "grass",
                           "café", "naïve", "日本", "smile 😀", "over", "blue", "sky", "<b>", "&amp;"};
    for (int i = 0; i < 2000; ++i)
      corpus << words[i % 20] << ' ' << words[(i * 7) % 20] << ' ' << words[(i * 13 + 3) % 20] << "\n";
  }
  const auto status = sentencepiece::SentencePieceTrainer::Train(
      {{"input", (dir / "captions.txt").string()}, {"model_prefix", (dir / "m").string()},
       {"vocab_size", "64"}, {"model_type", "unigram"}, {"character_coverage", "1.0"},
       {"unk_id", "0"}, {"bos_id", "1"}, {"eos_id", "2"}, {"pad_id", "3"}, {"num_threads", "1"},
       {"minloglevel", "2"}});
  if (!status.ok()) __builtin_trap();
  auto tokenizer = std::make_unique<clip::text::SentencePieceTokenizer>(dir / "m.model");
  std::filesystem::remove_all(dir);
  return tokenizer;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::unique_ptr<clip::text::SentencePieceTokenizer> tokenizer = trained_tokenizer();
  const std::string_view text = clip::fuzz::as_text(data, size);
  clip::fuzz::refusing_bad_input([&] {
    const std::vector<int> ids = tokenizer->encode(text);
    for (int id : ids)
      if (id < 0 || id >= tokenizer->vocab_size()) __builtin_trap();
    (void)tokenizer->decode(ids);
    const int context = 2 + static_cast<int>(size % 20);
    const std::vector<int> row = tokenizer->tokenize(text, context, true);
    if (static_cast<int>(row.size()) != context || row[0] != tokenizer->sot()) __builtin_trap();
  });
  return 0;
}
