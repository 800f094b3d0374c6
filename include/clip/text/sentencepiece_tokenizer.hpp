// A SentencePiece vocabulary behind the same interface as BpeTokenizer (see tokenizer.hpp), for
// models pretrained with their own vocabulary. Needs the sentencepiece library (pkg-config
// sentencepiece; Debian libsentencepiece-dev), which the rest of the library does not.
//
// Choices: the start and end tokens are the model's own bos and eos pieces (a model trained
// without them is refused); rows are padded with the model's pad piece, or with 0 when it has
// none, as CLIP pads. Unlike CLIP's vocabulary, eos is not the largest id here, so a text
// encoder must find the end token by value (the first eot()), not by argmax.
#pragma once

#if !__has_include(<sentencepiece_processor.h>)
#error "clip/text/sentencepiece_tokenizer.hpp needs the sentencepiece library's headers (libsentencepiece-dev)"
#endif

#include <sentencepiece_processor.h>

#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/text/tokenizer.hpp"
#include "clip/text/utf8.hpp"

namespace clip::text {

class SentencePieceTokenizer {
 public:
  explicit SentencePieceTokenizer(const std::filesystem::path& model)
      : processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
    const auto status = processor_->Load(model.string());
    CLIP_CHECK(status.ok(), "cannot load the SentencePiece model ", model.string(), ": ", status.ToString());
    sot_ = processor_->bos_id();
    eot_ = processor_->eos_id();
    CLIP_CHECK(sot_ >= 0 && eot_ >= 0, "the SentencePiece model ", model.string(),
               " has no start (bos) or end (eos) piece; train it with bos_id and eos_id set");
    pad_ = processor_->pad_id() >= 0 ? processor_->pad_id() : 0;
  }

  int sot() const { return sot_; }
  int eot() const { return eot_; }
  int pad() const { return pad_; }
  int vocab_size() const { return processor_->GetPieceSize(); }

  // The text's piece ids, without start and end tokens.
  std::vector<int> encode(std::string_view text) const {
    utf8::check(text);  // the same error as BpeTokenizer, rather than SentencePiece's silent repair
    std::vector<int> ids;
    const auto status = processor_->Encode(text, &ids);
    CLIP_CHECK(status.ok(), "SentencePiece could not encode the text: ", status.ToString());
    return ids;
  }

  // [sot] + ids + [eot], padded to context_length; truncate keeps the first context_length - 2
  // ids, otherwise a longer text is an error.
  std::vector<int> tokenize(std::string_view text, int context_length, bool truncate = true) const {
    return token_row(encode(text), sot_, eot_, pad_, context_length, truncate);
  }

  // The text of the ids; control pieces (start, end, a pad piece) decode to nothing, while a
  // padding 0 that is the unknown piece decodes as " ⁇ ".
  std::string decode(std::span<const int> ids) const {
    for (int id : ids)
      CLIP_CHECK(id >= 0 && id < vocab_size(), "token id ", id, " is outside the vocabulary [0, ", vocab_size(), ")");
    std::string text;
    const auto status = processor_->Decode(std::vector<int>(ids.begin(), ids.end()), &text);
    CLIP_CHECK(status.ok(), "SentencePiece could not decode the ids: ", status.ToString());
    return text;
  }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  int sot_ = 0, eot_ = 0, pad_ = 0;
};

}  // namespace clip::text
