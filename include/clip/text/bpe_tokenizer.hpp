// CLIP's byte-level BPE tokenizer, id for id as OpenAI's simple_tokenizer.py and clip.tokenize.
//
// The pipeline, step by step as the reference runs it:
//   1. ftfy.fix_text            not reproduced (see below); NFC normalization is an option
//   2. html.unescape, twice     html_unescape.hpp (HTML 4 names; the gap is documented there)
//   3. str.strip, `\s+` -> " ", str.strip
//   4. str.lower                full Unicode lowercasing (ICU root locale): "İ" becomes two code
//                               points and a Greek capital sigma at a word end becomes "ς"
//   5. the `regex` pattern      <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|
//                               [\p{N}]|[^\s\p{L}\p{N}]+ with IGNORECASE, matched by hand below
//   6. each piece's UTF-8 bytes -> byte symbols -> BPE merges in file order -> vocabulary ids
//
// ftfy: OpenAI's tokenizer runs ftfy.fix_text first, whose default includes NFC normalization;
// this tokenizer does the NFC step too (BpeOptions::nfc, on by default), so a decomposed "é"
// tokenizes as the composed one. The rest of ftfy is not reproduced: mojibake repair
// ("cafÃ©" -> "café"), straightening curly quotes, expanding ligatures and full-width letters,
// removing control characters and a third HTML unescape. ../shared/golden/tokenizer_cases.json
// was made without ftfy at all; with nfc off this tokenizer matches every case, and with it on
// every case whose text NFC leaves unchanged.
//
// Invalid UTF-8 is rejected with a clip::Error naming the byte offset; nothing is replaced.
// The vocabulary file is read directly from its .gz (a plain text copy works too).
#pragma once

#include <zlib.h>
#include <unicode/bytestream.h>
#include <unicode/casemap.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/text/html_unescape.hpp"
#include "clip/text/tokenizer.hpp"
#include "clip/text/utf8.hpp"

namespace clip::text {

struct BpeOptions {
  // ftfy.fix_text's NFC step, as OpenAI's tokenizer runs it; off gives the ftfy-free ids.
  bool nfc = true;
  // Words whose merges are remembered (the reference keeps every word forever); when it is full
  // the cache starts over, which bounds memory on endless streams of new words.
  size_t cache_words = 1 << 17;
};

// The vocabulary shipped with the library: $CLIP_DATA_DIR, then the folders a program names
// (a build knows its source tree's data/ and its install datadir), then the data/ folder of the
// source tree this header is in and the share/clip folder of the prefix it was installed into
// (found from __FILE__, which is absolute when the include folder was given as an absolute
// path, as pkg-config gives it), then the usual system prefixes. The error lists every place.
inline std::filesystem::path find_bpe_vocabulary(const std::vector<std::filesystem::path>& more_folders = {}) {
  namespace fs = std::filesystem;
  const char* name = "bpe_simple_vocab_16e6.txt.gz";
  std::vector<fs::path> folders;
  if (const char* dir = std::getenv("CLIP_DATA_DIR"); dir && *dir) folders.emplace_back(dir);
  folders.insert(folders.end(), more_folders.begin(), more_folders.end());
  // This header is <root>/include/clip/text/bpe_tokenizer.hpp in both places.
  const fs::path root = fs::path(__FILE__).parent_path().parent_path().parent_path().parent_path();
  folders.push_back(root / "data");
  folders.push_back(root / "share" / "clip");
  folders.emplace_back("/usr/local/share/clip");
  folders.emplace_back("/usr/share/clip");
  std::string looked;
  for (const fs::path& folder : folders) {
    std::error_code ec;
    if (fs::is_regular_file(folder / name, ec)) return folder / name;
    looked += "\n  " + folder.string();
  }
  CLIP_FAIL("cannot find the CLIP BPE vocabulary ", name, "; set CLIP_DATA_DIR to its folder. Looked in:", looked);
}

namespace bpe_detail {

// The whole (decompressed) file; gzread passes a file that is not gzip through unchanged.
inline std::string read_gzip(const std::filesystem::path& path) {
  gzFile file = gzopen(path.string().c_str(), "rb");
  CLIP_CHECK(file, "cannot open the BPE vocabulary ", path.string(), ": ", std::strerror(errno));
  std::string text;
  std::vector<char> buffer(1 << 18);
  for (;;) {
    int n = gzread(file, buffer.data(), static_cast<unsigned>(buffer.size()));
    if (n < 0) {
      int code = 0;
      std::string why = gzerror(file, &code);
      gzclose(file);
      CLIP_FAIL("cannot read the BPE vocabulary ", path.string(), ": ", why);
    }
    if (n == 0) break;
    text.append(buffer.data(), static_cast<size_t>(n));
  }
  int code = 0;
  std::string why = gzerror(file, &code);
  gzclose(file);
  CLIP_CHECK(code == Z_OK, "cannot read the BPE vocabulary ", path.string(), ": ", why);
  return text;
}

// GPT-2's reversible byte -> character map: printable Latin-1 bytes stand for themselves, the
// other 68 bytes take the code points from U+0100 on, in byte order. The vocabulary lists the
// bytes in this order: printable ones first.
struct ByteAlphabet {
  std::array<uint8_t, 256> order{};     // the byte at each of the first 256 vocabulary ids
  std::array<char32_t, 256> symbol{};   // the character that stands for each byte
  ByteAlphabet() {
    const auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE); };
    int next = 0, shifted = 0;
    for (int b = 0; b < 256; ++b)
      if (printable(b)) order[next++] = static_cast<uint8_t>(b), symbol[b] = static_cast<char32_t>(b);
    for (int b = 0; b < 256; ++b)
      if (!printable(b)) order[next++] = static_cast<uint8_t>(b), symbol[b] = static_cast<char32_t>(0x100 + shifted++);
  }
};

// Python's str.isspace (what str.strip removes) is the White_Space property plus the
// information separators U+001C..U+001F; the `regex` module's \s is White_Space alone.
inline bool is_regex_space(char32_t c) {
  return c < 0x80 ? (c == ' ' || (c >= '\t' && c <= '\r')) : u_isUWhiteSpace(static_cast<UChar32>(c));
}
inline bool is_python_space(char32_t c) { return is_regex_space(c) || (c >= 0x1C && c <= 0x1F); }

// strip(), `\s+` -> " ", strip(). The first strip leaves non-space characters at both ends, so
// the collapsed runs are all inside and the second strip has nothing left to do.
inline std::string clean_whitespace(std::string_view s) {
  size_t begin = 0, end = s.size();
  for (size_t i = begin; i < end; begin = i)
    if (!is_python_space(utf8::next(s, i))) break;
  while (end > begin) {
    size_t last = end - 1;
    while (last > begin && (static_cast<unsigned char>(s[last]) & 0xC0) == 0x80) --last;  // continuation bytes
    size_t i = last;
    if (!is_python_space(utf8::next(s, i))) break;
    end = last;
  }
  std::string out;
  out.reserve(end - begin);
  for (size_t i = begin; i < end;) {
    size_t plain = i;  // the common case: a run of ASCII characters other than spaces
    while (plain < end && static_cast<unsigned char>(s[plain]) < 0x80 && !is_regex_space(s[plain])) ++plain;
    if (plain > i) {
      out.append(s.substr(i, plain - i));
      i = plain;
      continue;
    }
    const size_t at = i;
    if (!is_regex_space(utf8::next(s, i))) {
      out.append(s.substr(at, i - at));
      continue;
    }
    for (size_t j = i; j < end && is_regex_space(utf8::next(s, j)); i = j) {
    }
    out += ' ';
  }
  return out;
}

// Python's str.lower: full lowercasing with the root locale's rules (final sigma in context).
inline std::string lowercase(std::string s) {
  if (utf8::is_ascii(s)) {
    for (char& c : s)
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return s;
  }
  std::string out;
  icu::StringByteSink<std::string> sink(&out, static_cast<int32_t>(s.size()));
  UErrorCode status = U_ZERO_ERROR;
  icu::CaseMap::utf8ToLower("", 0, icu::StringPiece(s.data(), static_cast<int32_t>(s.size())), sink, nullptr,
                            status);
  CLIP_CHECK(U_SUCCESS(status), "ICU could not lowercase the text: ", u_errorName(status));
  return out;
}

inline std::string nfc(std::string_view s) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* normalizer = icu::Normalizer2::getNFCInstance(status);
  CLIP_CHECK(U_SUCCESS(status), "ICU has no NFC normalizer: ", u_errorName(status));
  const icu::StringPiece piece(s.data(), static_cast<int32_t>(s.size()));
  if (normalizer->isNormalizedUTF8(piece, status) && U_SUCCESS(status)) return std::string(s);
  status = U_ZERO_ERROR;
  std::string out;
  icu::StringByteSink<std::string> sink(&out, static_cast<int32_t>(s.size()));
  normalizer->normalizeUTF8(0, piece, sink, nullptr, status);
  CLIP_CHECK(U_SUCCESS(status), "ICU could not NFC-normalize the text: ", u_errorName(status));
  return out;
}

// How the pre-tokenizing pattern treats one character. `skip` matches no alternative.
enum class CharClass : uint8_t { skip, letter, number, other };

inline CharClass classify_slow(char32_t c) {
  const auto cls = [](char32_t v) {
    if (is_regex_space(v)) return CharClass::skip;
    const uint32_t mask = U_GET_GC_MASK(static_cast<UChar32>(v));
    if (mask & U_GC_L_MASK) return CharClass::letter;
    if (mask & U_GC_N_MASK) return CharClass::number;
    return CharClass::other;
  };
  const CharClass own = cls(c);
  if (own != CharClass::other) return own;
  // Under IGNORECASE the `regex` module lets [^\s\p{L}\p{N}] match a character only when none
  // of its case forms is a space, letter or number: U+0345 (a combining mark whose capital is
  // Greek Iota) is matched by no alternative at all and vanishes from the token stream.
  const UChar32 u = static_cast<UChar32>(c);
  for (UChar32 form : {u_tolower(u), u_toupper(u), u_totitle(u), u_foldCase(u, U_FOLD_CASE_DEFAULT)})
    if (form != u && cls(static_cast<char32_t>(form)) != CharClass::other) return CharClass::skip;
  return CharClass::other;
}

inline CharClass classify(char32_t c) {
  static const auto ascii = [] {
    std::array<CharClass, 128> t{};
    for (char32_t b = 0; b < 128; ++b) t[b] = classify_slow(b);
    return t;
  }();
  return c < 128 ? ascii[c] : classify_slow(c);
}

// Whether `pattern` (lower-case ASCII) starts s at i, compared case-insensitively by simple
// case folding as the `regex` module's IGNORECASE does ("'ſ" matches 's). Returns its length.
inline size_t match_folded(std::string_view s, size_t i, std::string_view pattern) {
  const size_t start = i;
  for (char p : pattern) {
    if (i >= s.size()) return 0;
    char32_t c = utf8::next(s, i);
    if (c != static_cast<char32_t>(p) &&
        static_cast<char32_t>(u_foldCase(static_cast<UChar32>(c), U_FOLD_CASE_DEFAULT)) != static_cast<char32_t>(p))
      return 0;
  }
  return i - start;
}

constexpr std::string_view kStartOfText = "<|startoftext|>";
constexpr std::string_view kEndOfText = "<|endoftext|>";

// The pattern's alternatives in order, at every position of the cleaned text; positions where
// none matches (spaces) are skipped. Calls visit(piece) for each match.
template <class Visit>
void split_words(std::string_view s, Visit&& visit) {
  static constexpr std::string_view kContractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  for (size_t i = 0; i < s.size();) {
    size_t length = 0;
    if (s[i] == '<') {
      length = match_folded(s, i, kStartOfText);
      if (!length) length = match_folded(s, i, kEndOfText);
    } else if (s[i] == '\'') {
      for (std::string_view contraction : kContractions)
        if ((length = match_folded(s, i, contraction))) break;
    }
    if (length) {
      visit(s.substr(i, length));
      i += length;
      continue;
    }
    size_t end = i;
    const CharClass kind = classify(utf8::next(s, end));
    if (kind == CharClass::skip) {
      i = end;
      continue;
    }
    if (kind != CharClass::number) {  // letters and other characters come in runs
      for (size_t j = end; j < s.size(); end = j)
        if (classify(utf8::next(s, j)) != kind) break;
    }
    visit(s.substr(i, end - i));
    i = end;
  }
}

}  // namespace bpe_detail

// Loads once (about 0.1 s), then every method is const and safe to call from many threads (the
// word cache takes a lock).
class BpeTokenizer {
 public:
  // OpenAI's vocabulary: 256 byte symbols, the same with "</w>", then one symbol per merge line.
  static constexpr int kMergeCount = 49152 - 256 - 2;

  explicit BpeTokenizer(const std::filesystem::path& vocabulary = find_bpe_vocabulary(), BpeOptions options = {})
      : options_(options), cache_(std::make_unique<Cache>()) {
    load(vocabulary);
  }

  int sot() const { return sot_; }
  int eot() const { return eot_; }
  int pad() const { return 0; }
  int vocab_size() const { return static_cast<int>(vocab_.size()); }
  // A vocabulary entry as the file spells it ("photo</w>"), in the byte alphabet.
  const std::string& token_string(int id) const { return vocab_.at(checked(id)); }

  // The text the pattern splits: unescaped, whitespace-cleaned and lowercased.
  std::string clean(std::string_view text) const {
    utf8::check(text);
    std::string s = options_.nfc ? bpe_detail::nfc(text) : std::string(text);
    s = html_unescape(html_unescape(s));
    return bpe_detail::lowercase(bpe_detail::clean_whitespace(s));
  }

  // SimpleTokenizer.encode: the BPE ids of the text, without start and end tokens.
  std::vector<int> encode(std::string_view text) const {
    std::vector<int> ids;
    const std::string cleaned = clean(text);
    Scratch scratch;
    bpe_detail::split_words(cleaned, [&](std::string_view word) { append_word(word, ids, scratch); });
    return ids;
  }

  // clip.tokenize for one text: [sot] + ids + [eot] padded with 0 to context_length; with
  // truncate a long text keeps its first context_length - 2 ids, without it is an error.
  std::vector<int> tokenize(std::string_view text, int context_length = 77, bool truncate = true) const {
    return token_row(encode(text), sot_, eot_, pad(), context_length, truncate);
  }

  // SimpleTokenizer.decode: the ids' bytes as UTF-8 (bad sequences -> U+FFFD), "</w>" -> " ".
  std::string decode(std::span<const int> ids) const {
    std::string bytes;
    for (int id : ids) bytes += raw_[checked(id)];
    std::string text = utf8::replace_invalid(bytes);
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size();) {
      if (text.compare(i, 4, "</w>") == 0) out += ' ', i += 4;
      else out += text[i++];
    }
    return out;
  }

 private:
  struct Merge {
    int rank;
    int result;
  };
  // Looked up by string_view, so a cache hit builds no string.
  struct WordHash {
    using is_transparent = void;
    size_t operator()(std::string_view word) const { return std::hash<std::string_view>()(word); }
  };
  struct Cache {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int>, WordHash, std::equal_to<>> words;
  };
  // Buffers reused across the words of one call.
  struct Scratch {
    std::vector<int> symbols, next, prev;
    std::vector<bool> alive;
    std::vector<int> merged, merged_at;
    struct Candidate {
      int rank, left, first, second;
      bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
    };
    std::vector<Candidate> heap, batch;
  };

  BpeOptions options_;
  std::vector<std::string> vocab_;  // id -> entry (UTF-8, byte alphabet)
  std::vector<std::string> raw_;    // id -> the bytes it stands for, "</w>" kept
  std::array<int, 256> byte_id_{};  // byte -> id of its symbol; + 256 for the "</w>" form
  std::unordered_map<uint64_t, Merge> merges_;
  int sot_ = 0, eot_ = 0;
  std::unique_ptr<Cache> cache_;

  size_t checked(int id) const {
    CLIP_CHECK(id >= 0 && id < vocab_size(), "token id ", id, " is outside the vocabulary [0, ", vocab_size(), ")");
    return static_cast<size_t>(id);
  }

  static uint64_t pair_key(int first, int second) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(first)) << 32) | static_cast<uint32_t>(second);
  }

  void load(const std::filesystem::path& path) {
    const std::string text = bpe_detail::read_gzip(path);
    const bpe_detail::ByteAlphabet alphabet;

    // Line 0 is a version header; the merges are the next kMergeCount lines.
    std::vector<std::pair<std::string_view, std::string_view>> lines;
    lines.reserve(kMergeCount);
    size_t at = text.find('\n');
    for (int n = 1; n <= kMergeCount; ++n) {
      CLIP_CHECK(at != std::string::npos, "the BPE vocabulary ", path.string(), " ends after ", n - 1,
                 " merge lines; CLIP's has ", kMergeCount);
      size_t end = text.find('\n', at + 1);
      std::string_view line(text.data() + at + 1, (end == std::string::npos ? text.size() : end) - at - 1);
      at = end;
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.remove_suffix(1);
      size_t space = line.find(' ');
      CLIP_CHECK(space != std::string_view::npos && space > 0 && line.find(' ', space + 1) == std::string_view::npos,
                 "line ", n + 1, " of the BPE vocabulary ", path.string(), " is not two symbols: \"", line, "\"");
      lines.emplace_back(line.substr(0, space), line.substr(space + 1));
    }

    vocab_.reserve(512 + kMergeCount + 2);
    for (int k = 0; k < 256; ++k) {
      std::string s;
      utf8::append(s, alphabet.symbol[alphabet.order[k]]);
      vocab_.push_back(s);
      byte_id_[alphabet.order[k]] = k;
    }
    for (int k = 0; k < 256; ++k) vocab_.push_back(vocab_[k] + "</w>");
    for (auto [first, second] : lines) vocab_.push_back(std::string(first) + std::string(second));
    vocab_.emplace_back(bpe_detail::kStartOfText);
    vocab_.emplace_back(bpe_detail::kEndOfText);

    // Like the reference's dict, a string listed twice means its last id.
    std::unordered_map<std::string_view, int> encoder;
    encoder.reserve(vocab_.size());
    for (size_t id = 0; id < vocab_.size(); ++id) encoder.insert_or_assign(vocab_[id], static_cast<int>(id));
    sot_ = encoder.at(bpe_detail::kStartOfText);
    eot_ = encoder.at(bpe_detail::kEndOfText);

    merges_.reserve(lines.size());
    for (size_t rank = 0; rank < lines.size(); ++rank) {
      auto [first, second] = lines[rank];
      auto a = encoder.find(first), b = encoder.find(second);
      CLIP_CHECK(a != encoder.end() && b != encoder.end(), "line ", rank + 2, " of the BPE vocabulary ",
                 path.string(), " merges a symbol that no earlier line makes");
      merges_.insert_or_assign(pair_key(a->second, b->second),
                               Merge{static_cast<int>(rank), encoder.at(vocab_[512 + rank])});
    }

    std::array<int, 0x144> byte_of{};  // the byte alphabet's characters all lie below U+0144
    byte_of.fill(-1);
    for (int b = 0; b < 256; ++b) byte_of[alphabet.symbol[b]] = b;
    raw_.reserve(vocab_.size());
    for (const std::string& entry : vocab_) {
      std::string bytes;
      for (size_t i = 0; i < entry.size();) {
        char32_t c = utf8::next(entry, i);
        CLIP_CHECK(c < byte_of.size() && byte_of[c] >= 0, "the BPE vocabulary ", path.string(),
                   " has a symbol outside the byte alphabet: \"", entry, "\"");
        bytes += static_cast<char>(byte_of[c]);
      }
      raw_.push_back(std::move(bytes));
    }
  }

  void append_word(std::string_view word, std::vector<int>& ids, Scratch& scratch) const {
    if (word == bpe_detail::kStartOfText) return ids.push_back(sot_);
    if (word == bpe_detail::kEndOfText) return ids.push_back(eot_);
    if (word.size() == 1) return ids.push_back(byte_id_[static_cast<uint8_t>(word[0])] + 256);
    {
      std::lock_guard<std::mutex> lock(cache_->mutex);
      if (auto it = cache_->words.find(word); it != cache_->words.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    merge(word, scratch);
    ids.insert(ids.end(), scratch.merged.begin(), scratch.merged.end());
    std::lock_guard<std::mutex> lock(cache_->mutex);
    if (cache_->words.size() >= options_.cache_words) cache_->words.clear();
    cache_->words.emplace(std::string(word), scratch.merged);
  }

  // The reference's bpe(): repeatedly take the lowest-ranked adjacent pair and merge all its
  // occurrences left to right. A heap of candidate pairs over a linked list of symbols keeps
  // that O(n log n) for long words; candidates of one rank are merged together, in position
  // order, before the pairs they create are considered, exactly as the reference's passes go.
  void merge(std::string_view word, Scratch& s) const {
    const int n = static_cast<int>(word.size());
    s.symbols.resize(n);
    s.next.resize(n);
    s.prev.resize(n);
    s.alive.assign(n, true);
    for (int k = 0; k < n; ++k) {
      s.symbols[k] = byte_id_[static_cast<uint8_t>(word[k])];
      s.next[k] = k + 1 < n ? k + 1 : -1;
      s.prev[k] = k - 1;
    }
    s.symbols[n - 1] += 256;  // the last symbol carries "</w>"

    auto& heap = s.heap;
    heap.clear();
    const auto consider = [&](int left) {
      if (left < 0 || s.next[left] < 0) return;
      auto it = merges_.find(pair_key(s.symbols[left], s.symbols[s.next[left]]));
      if (it == merges_.end()) return;
      heap.push_back({it->second.rank, left, s.symbols[left], s.symbols[s.next[left]]});
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    };
    for (int k = 0; k + 1 < n; ++k) consider(k);

    auto& merged_at = s.merged_at;
    while (!heap.empty()) {
      const int rank = heap.front().rank;
      s.batch.clear();
      while (!heap.empty() && heap.front().rank == rank) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<>());
        s.batch.push_back(heap.back());
        heap.pop_back();
      }
      const int result = merges_.at(pair_key(s.batch[0].first, s.batch[0].second)).result;
      merged_at.clear();
      for (const auto& c : s.batch) {  // ascending position; stale candidates no longer match
        const int right = s.next[c.left];
        if (!s.alive[c.left] || s.symbols[c.left] != c.first || right < 0 || s.symbols[right] != c.second) continue;
        s.symbols[c.left] = result;
        s.alive[right] = false;
        s.next[c.left] = s.next[right];
        if (s.next[right] >= 0) s.prev[s.next[right]] = c.left;
        merged_at.push_back(c.left);
      }
      for (int left : merged_at) {
        if (!s.alive[left]) continue;
        consider(s.prev[left]);
        consider(left);
      }
    }
    s.merged.clear();
    for (int k = 0; k >= 0; k = s.next[k]) s.merged.push_back(s.symbols[k]);
  }
};

}  // namespace clip::text
