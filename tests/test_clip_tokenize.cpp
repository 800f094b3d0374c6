// The clip-tokenize program, run as a user runs it: its output for a few lines and its exit
// status for bad arguments and bad input. meson passes the program's path in
// CLIP_TOKENIZE_PROGRAM (and CLIP_DATA_DIR, so it finds the vocabulary).
#include <boost/test/unit_test.hpp>

#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

namespace {

namespace fs = std::filesystem;

struct Result {
  int status;
  std::string out, err;
};

// Runs the program with `args` and `input` on stdin, through files so nothing can deadlock.
Result run(const std::string& args, const std::string& input) {
  const char* program = std::getenv("CLIP_TOKENIZE_PROGRAM");
  BOOST_TEST_REQUIRE(program, "CLIP_TOKENIZE_PROGRAM is not set (meson sets it)");
  const fs::path dir = fs::temp_directory_path() / ("clip-tokenize-test-" + std::to_string(std::random_device{}()));
  fs::create_directories(dir);
  std::ofstream(dir / "in") << input;
  const std::string command = std::string("'") + program + "' " + args + " < '" + (dir / "in").string() + "' > '" +
                              (dir / "out").string() + "' 2> '" + (dir / "err").string() + "'";
  const int raw = std::system(command.c_str());
  const auto slurp = [](const fs::path& p) {
    std::ifstream in(p);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  };
  Result r{WIFEXITED(raw) ? WEXITSTATUS(raw) : -1, slurp(dir / "out"), slurp(dir / "err")};
  fs::remove_all(dir);
  return r;
}

std::string row77(const std::string& ids) {
  std::string row = "[49406," + ids + ",49407";
  const int used = 2 + static_cast<int>(std::count(ids.begin(), ids.end(), ',')) + 1;
  for (int k = used; k < 77; ++k) row += ",0";
  return row + "]";
}

}  // namespace

BOOST_AUTO_TEST_SUITE(clip_tokenize_program)

BOOST_AUTO_TEST_CASE(writes_one_row_per_line) {
  const Result r = run("", "a photo of a cat\nHello, world!\n");
  BOOST_TEST(r.status == 0, r.err);
  BOOST_TEST(r.out == row77("320,1125,539,320,2368") + "\n" + row77("3306,267,1002,256") + "\n");
}

BOOST_AUTO_TEST_CASE(bpe_json_and_context_flags) {
  Result r = run("--bpe", "a photo of a cat\n\n");
  BOOST_TEST(r.status == 0, r.err);
  BOOST_TEST(r.out == "[320,1125,539,320,2368]\n[]\n");
  r = run("--json --bpe", "\"a photo\\nof a cat\"\n\"it&#39;s\"\n");
  BOOST_TEST(r.status == 0, r.err);
  BOOST_TEST(r.out == "[320,1125,539,320,2368]\n[585,568]\n");
  r = run("--context 8", "a photo of a cat dog\n");
  BOOST_TEST(r.status == 0, r.err);
  BOOST_TEST(r.out == "[49406,320,1125,539,320,2368,1929,49407]\n");
  r = run("--context=6 --no-truncate", "a photo of a cat\n");
  BOOST_TEST(r.status == 1);
  BOOST_TEST(r.err.find("line 1") != std::string::npos, r.err);
  r = run("--help", "");
  BOOST_TEST(r.status == 0);
  BOOST_TEST(r.out.find("usage: clip-tokenize") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(bad_arguments_exit_2) {
  for (const char* args : {"--bogus", "--context", "--context 1", "--context x", "--context 77x", "extra",
                           "--vocab /nonexistent/vocab.txt.gz"}) {
    const Result r = run(args, "a cat\n");
    BOOST_TEST(r.status == 2, args);
    BOOST_TEST(r.out.empty(), args);
    BOOST_TEST(r.err.find("clip-tokenize: ") == 0u, r.err);
  }
}

BOOST_AUTO_TEST_CASE(bad_input_exits_1_naming_the_line) {
  Result r = run("--bpe", "a cat\nbad \xff byte\na dog\n");
  BOOST_TEST(r.status == 1);
  BOOST_TEST(r.out == "[320,2368]\n");  // the lines before the bad one, nothing after
  BOOST_TEST(r.err.find("line 2") != std::string::npos, r.err);
  BOOST_TEST(r.err.find("byte offset 4") != std::string::npos, r.err);
  r = run("--json", "\"ok\"\nnot json\n");
  BOOST_TEST(r.status == 1);
  BOOST_TEST(r.err.find("line 2") != std::string::npos, r.err);
  r = run("--json", "[1, 2]\n");
  BOOST_TEST(r.status == 1);
  BOOST_TEST(r.err.find("not a string") != std::string::npos, r.err);
}

BOOST_AUTO_TEST_SUITE_END()
