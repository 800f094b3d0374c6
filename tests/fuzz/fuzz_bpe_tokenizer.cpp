// The BPE tokenizer (clip/text/bpe_tokenizer.hpp with utf8.hpp and html_unescape.hpp): UTF-8
// checking, NFC, HTML unescaping, whitespace cleaning, lowercasing, the word pattern and the
// merges. Every id is in the vocabulary and decodes; a row always has its start and end tokens.
#include "clip/text/bpe_tokenizer.hpp"
#include "clip/text/html_unescape.hpp"
#include "clip/text/utf8.hpp"
#include "fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const clip::text::BpeTokenizer tokenizer(std::filesystem::path(CLIP_FUZZ_DATA_DIR) /
                                                  "bpe_simple_vocab_16e6.txt.gz");
  const std::string_view text = clip::fuzz::as_text(data, size);
  // Repairing bad UTF-8 always gives valid UTF-8.
  if (clip::text::utf8::find_invalid(clip::text::utf8::replace_invalid(text)) != std::string_view::npos)
    __builtin_trap();
  clip::fuzz::refusing_bad_input([&] {
    (void)clip::text::html_unescape(text);
    const std::vector<int> ids = tokenizer.encode(text);
    for (int id : ids)
      if (id < 0 || id >= tokenizer.vocab_size()) __builtin_trap();
    (void)tokenizer.decode(ids);
    const std::vector<int> row = tokenizer.tokenize(text, 77, true);
    if (row.size() != 77 || row[0] != tokenizer.sot()) __builtin_trap();
  });
  return 0;
}
