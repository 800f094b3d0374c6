// Command-line option parsing (examples/cli.hpp): --verbose taken out, ArgReader's options,
// flags, "--" and "-", path options and whole numbers, as the programs' parsers use them. The
// input is argv, its arguments separated by NUL bytes.
#include <utility>
#include <vector>

#include "../../examples/cli.hpp"
#include "fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> words = {"clip-fuzz"};
  std::string word;
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == 0) words.push_back(std::exchange(word, {}));
    else word += static_cast<char>(data[i]);
  }
  words.push_back(word);
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  argv.push_back(nullptr);
  int argc = static_cast<int>(words.size());
  (void)clip::cli::take_verbose_flag(argc, argv.data());
  if (argc < 1 || argv[argc] != nullptr) __builtin_trap();
  try {
    clip::cli::ArgReader args(argc, argv.data());
    while (args.next()) {
      if (args.positional()) continue;
      if (args.flag("--help")) continue;
      if (auto v = args.option("--batch-size")) (void)clip::cli::parse_int("--batch-size", *v, 1, 65536, "images");
      else if (auto p = args.path_option("--output")) { if (p->empty()) __builtin_trap(); }
      else if (auto m = args.option("--model")) (void)*m;
      else args.unknown();
    }
  } catch (const clip::cli::UsageError& e) {
    if (e.message.empty()) __builtin_trap();
  }
  return 0;
}
