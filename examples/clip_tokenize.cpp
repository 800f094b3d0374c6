// clip-tokenize: CLIP's BPE tokenizer from the command line.
//
//   clip-tokenize [--context N] [--bpe] [--json] [--vocab FILE] [--nfc] [--no-truncate]
//
// Reads one text per line on stdin and writes one JSON array of ids per line on stdout. Exit
// status: 0 done, 1 bad input (the line number is named; nothing is written for it or after
// it), 2 bad arguments.
#include <charconv>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/io/json.hpp"
#include "clip/text/bpe_tokenizer.hpp"

namespace {

constexpr const char* kUsage =
    "usage: clip-tokenize [--context N] [--bpe] [--json] [--vocab FILE] [--nfc] [--no-truncate]\n"
    "\n"
    "Tokenizes each line of stdin (UTF-8) with OpenAI CLIP's BPE tokenizer and writes one JSON\n"
    "array of token ids per line: by default the row clip.tokenize makes, start token, ids, end\n"
    "token, padded with 0 to the context length (a longer text is truncated and still ends with\n"
    "the end token).\n"
    "\n"
    "options:\n"
    "  --context N    row length (default 77)\n"
    "  --bpe          write only the text's BPE ids: no start/end tokens, no padding\n"
    "  --json         each input line is a JSON string (so a text may hold newlines)\n"
    "  --vocab FILE   the BPE vocabulary (default: bpe_simple_vocab_16e6.txt.gz from\n"
    "                 $CLIP_DATA_DIR, the source tree's data/ or the installed share/clip)\n"
    "  --nfc          NFC-normalize first, as ftfy.fix_text would (the reference ids do not)\n"
    "  --no-truncate  a text longer than the row is an error instead of being truncated\n"
    "  --help         show this help\n"
    "\n"
    "exit status: 0 success, 1 bad input (invalid UTF-8 or JSON, or too long with\n"
    "--no-truncate), 2 bad arguments\n";

struct Arguments {
  int context = 77;
  bool bpe = false, json = false, nfc = false, truncate = true, help = false;
  std::optional<std::string> vocab;
};

struct UsageError {
  std::string message;
};

int parse_context(std::string_view text) {
  int value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value < 2 || value > 1000000)
    throw UsageError{"--context needs a whole number of tokens from 2 to 1000000, not '" + std::string(text) + "'"};
  return value;
}

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto is = [&](std::string_view flag) { return a == flag || (a.starts_with(flag) && a.size() > flag.size() && a[flag.size()] == '='); };
    auto value = [&](std::string_view flag) -> std::string_view {
      if (a.size() > flag.size()) return a.substr(flag.size() + 1);
      if (i + 1 >= argc) throw UsageError{std::string(flag) + " needs a value"};
      return argv[++i];
    };
    if (a == "--help" || a == "-h") args.help = true;
    else if (a == "--bpe") args.bpe = true;
    else if (a == "--json") args.json = true;
    else if (a == "--nfc") args.nfc = true;
    else if (a == "--no-truncate") args.truncate = false;
    else if (is("--context")) args.context = parse_context(value("--context"));
    else if (is("--vocab")) {
      args.vocab = std::string(value("--vocab"));
      if (args.vocab->empty()) throw UsageError{"--vocab needs a file name"};
    } else if (a.starts_with("-")) throw UsageError{"unknown option '" + std::string(a) + "'"};
    else throw UsageError{"unexpected argument '" + std::string(a) + "': the texts come on stdin"};
  }
  return args;
}

// Where the vocabulary is looked for besides $CLIP_DATA_DIR: the folders this build knows
// (examples/meson.build defines them), then share/clip beside the installed program.
std::vector<std::filesystem::path> vocabulary_folders(const char* argv0) {
  std::vector<std::filesystem::path> folders;
#ifdef CLIP_SOURCE_DATA_DIR
  folders.emplace_back(CLIP_SOURCE_DATA_DIR);
#endif
#ifdef CLIP_INSTALL_DATA_DIR
  folders.emplace_back(CLIP_INSTALL_DATA_DIR);
#endif
  std::error_code ec;
  std::filesystem::path program = std::filesystem::canonical("/proc/self/exe", ec);
  if (ec) program = std::filesystem::absolute(argv0, ec);
  if (!ec) folders.push_back(program.parent_path().parent_path() / "share" / "clip");
  return folders;
}

void append_ids(std::string& out, const std::vector<int>& ids) {
  out += '[';
  char digits[16];
  for (size_t k = 0; k < ids.size(); ++k) {
    if (k) out += ',';
    auto [end, ec] = std::to_chars(digits, digits + sizeof digits, ids[k]);
    out.append(digits, end);
  }
  out += "]\n";
}

}  // namespace

int main(int argc, char** argv) {
  Arguments args;
  try {
    args = parse(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "clip-tokenize: %s (see --help)\n", e.message.c_str());
    return 2;
  }
  if (args.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }

  std::optional<clip::text::BpeTokenizer> tokenizer;
  try {
    clip::text::BpeOptions options;
    options.nfc = args.nfc;
    tokenizer.emplace(args.vocab ? std::filesystem::path(*args.vocab) : clip::text::find_bpe_vocabulary(vocabulary_folders(argv[0])),
                      options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "clip-tokenize: %s\n", e.what());
    return args.vocab ? 2 : 1;  // a --vocab that does not load is a bad argument
  }

  std::ios::sync_with_stdio(false);
  std::string line, out;
  size_t number = 0;
  while (std::getline(std::cin, line)) {
    ++number;
    try {
      std::string text = args.json ? clip::json::parse(line).as_string() : std::move(line);
      append_ids(out, args.bpe ? tokenizer->encode(text) : tokenizer->tokenize(text, args.context, args.truncate));
    } catch (const std::exception& e) {
      std::cout << out << std::flush;
      std::fprintf(stderr, "clip-tokenize: line %zu: %s\n", number, e.what());
      return 1;
    }
    if (out.size() > (1 << 16)) {
      std::cout << out;
      out.clear();
    }
  }
  std::cout << out << std::flush;
  if (!std::cout) {
    std::fprintf(stderr, "clip-tokenize: cannot write the output\n");
    return 1;
  }
  return 0;
}
