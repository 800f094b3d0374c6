// clip-tokenize: CLIP's BPE tokenizer from the command line.
//
//   clip-tokenize [--context N] [--bpe] [--json] [--vocab FILE] [--no-nfc] [--no-truncate]
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
#include <vector>

#include "cli.hpp"
#include "clip/core/error.hpp"
#include "clip/io/json.hpp"
#include "clip/text/bpe_tokenizer.hpp"

namespace {

namespace cli = clip::cli;

constexpr const char* kUsage =
    "usage: clip-tokenize [--context N] [--bpe] [--json] [--vocab FILE] [--no-nfc] [--no-truncate]\n"
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
    "  --no-nfc       skip the NFC normalization that ftfy.fix_text does (the ftfy-free ids)\n"
    "  --no-truncate  a text longer than the row is an error instead of being truncated\n"
    "  --help         show this help\n"
    "\n"
    "exit status: 0 success, 1 bad input (invalid UTF-8 or JSON, or too long with\n"
    "--no-truncate), 2 bad arguments\n";

struct Arguments {
  int context = 77;
  bool bpe = false, json = false, nfc = true, truncate = true, help = false;
  std::optional<std::string> vocab;
};

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (cli::ArgReader a(argc, argv); a.next();) {
    if (a.positional()) throw cli::UsageError{"unexpected argument '" + std::string(a.arg()) + "': the texts come on stdin"};
    if (a.flag("--help") || a.flag("-h")) args.help = true;
    else if (a.flag("--bpe")) args.bpe = true;
    else if (a.flag("--json")) args.json = true;
    else if (a.flag("--no-nfc")) args.nfc = false;
    else if (a.flag("--no-truncate")) args.truncate = false;
    else if (auto v = a.option("--context")) args.context = cli::parse_int("--context", *v, 2, 1000000, "tokens");
    else if (auto v = a.path_option("--vocab")) args.vocab = *v;
    else a.unknown();
  }
  return args;
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
  return cli::run_program("clip-tokenize", kUsage, argc, argv, parse, [&](const Arguments& args) {
    std::optional<clip::text::BpeTokenizer> tokenizer;
    try {
      clip::text::BpeOptions options;
      options.nfc = args.nfc;
      const std::filesystem::path vocab =
          args.vocab ? std::filesystem::path(*args.vocab) : clip::text::find_bpe_vocabulary(cli::data_folders(argv[0]));
      tokenizer.emplace(vocab, options);
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
  });
}
