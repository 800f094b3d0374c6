// What the command-line programs in examples/ share: reading arguments, reporting errors the
// same way (exit 2 for a bad command line, 1 for bad input), finding data files, listing and
// preprocessing images in parallel, and a progress bar for long runs.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/image/decode.hpp"
#include "clip/image/preprocess.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/text/utf8.hpp"

namespace clip::cli {

namespace fs = std::filesystem;

// A bad command line: reported with a pointer to --help, exit status 2.
struct UsageError {
  std::string message;
};

inline int usage_error(const char* program, const std::string& message) {
  std::fprintf(stderr, "%s: %s (see %s --help)\n", program, message.c_str(), program);
  return 2;
}

// Bad input (a file that is missing, unreadable or wrong): exit status 1.
inline int failure(const char* program, const std::string& message) {
  std::fprintf(stderr, "%s: %s\n", program, message.c_str());
  return 1;
}

// "--verbose" (before any "--"), which every program takes: errors then also name the source
// line that raised them. It is taken out of argv, so the programs' own parsers never see it.
// A debug build (no NDEBUG) always names the line.
inline bool take_verbose_flag(int& argc, char** argv) {
#ifdef NDEBUG
  bool verbose = false;
#else
  bool verbose = true;
#endif
  int kept = 1;
  bool options_done = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--") options_done = true;
    if (!options_done && arg == "--verbose") {
      verbose = true;
      continue;
    }
    argv[kept++] = argv[i];
  }
  argc = kept;
  argv[argc] = nullptr;
  return verbose;
}

inline constexpr const char* kVerboseUsage = "\nEvery program also takes --verbose: errors then name the source line that raised them.\n";

// Every program's main: read the arguments (a usage error exits 2), print the usage for --help,
// then run; an exception escaping the run is bad input (exit 1) reported with its message.
template <class Arguments, class Run>
int run_program(const char* program, const char* usage, int argc, char** argv, Arguments (*parse)(int, char**),
                Run&& run) {
  const bool verbose = take_verbose_flag(argc, argv);
  Arguments args;
  try {
    args = parse(argc, argv);
  } catch (const UsageError& e) {
    return usage_error(program, e.message);
  }
  if (args.help) {
    std::fputs(usage, stdout);
    std::fputs(kVerboseUsage, stdout);
    return 0;
  }
  try {
    return run(args);
  } catch (const Error& e) {
    return failure(program, verbose && !e.where().empty() ? std::string(e.what()) + " [" + e.where() + "]" : e.what());
  } catch (const std::exception& e) {
    return failure(program, e.what());
  }
}

// Walks argv. An option takes its value as "--flag VALUE" or "--flag=VALUE". After "--" every
// argument is positional (for file names that start with '-'), and so is "-" alone.
class ArgReader {
 public:
  ArgReader(int argc, char** argv) : argc_(argc), argv_(argv) {}

  // Moves to the next argument; false when there are no more.
  bool next() {
    if (++i_ >= argc_) return false;
    arg_ = argv_[i_];
    if (!options_done_ && arg_ == "--") {
      options_done_ = true;
      return next();
    }
    return true;
  }

  std::string_view arg() const { return arg_; }
  bool positional() const { return options_done_ || !arg_.starts_with('-') || arg_ == "-"; }

  // Whether the argument is the switch `name` (no value).
  bool flag(std::string_view name) const { return !positional() && arg_ == name; }

  // The value when the argument is the option `name`, else nothing.
  std::optional<std::string_view> option(std::string_view name) {
    if (positional() || !arg_.starts_with(name)) return std::nullopt;
    if (arg_.size() == name.size()) {
      if (i_ + 1 >= argc_) throw UsageError{std::string(name) + " needs a value"};
      return std::string_view(argv_[++i_]);
    }
    if (arg_[name.size()] != '=') return std::nullopt;
    return arg_.substr(name.size() + 1);
  }

  // For an option that names a file or folder: the value, which must not be empty.
  std::optional<std::string> path_option(std::string_view name) {
    auto value = option(name);
    if (value && value->empty()) throw UsageError{std::string(name) + " needs a file name"};
    return value ? std::optional<std::string>(*value) : std::nullopt;
  }

  [[noreturn]] void unknown() const { throw UsageError{"unknown option '" + std::string(arg_) + "'"}; }

 private:
  int argc_;
  char** argv_;
  int i_ = 0;
  bool options_done_ = false;
  std::string_view arg_;
};

inline int parse_int(std::string_view flag, std::string_view text, int min, int max, const char* unit) {
  int value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value < min || value > max)
    throw UsageError{std::string(flag) + " needs a whole number of " + unit + " from " + std::to_string(min) + " to " +
                     std::to_string(max) + ", not '" + std::string(text) + "'"};
  return value;
}

inline int default_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

// Where data files (the BPE vocabulary, the prompt templates) are looked for besides
// $CLIP_DATA_DIR: the folders this build knows (examples/meson.build defines them), then
// share/clip beside the installed program.
inline std::vector<fs::path> data_folders(const char* argv0) {
  std::vector<fs::path> folders;
#ifdef CLIP_SOURCE_DATA_DIR
  folders.emplace_back(CLIP_SOURCE_DATA_DIR);
#endif
#ifdef CLIP_INSTALL_DATA_DIR
  folders.emplace_back(CLIP_INSTALL_DATA_DIR);
#endif
  std::error_code ec;
  fs::path program = fs::canonical("/proc/self/exe", ec);
  if (ec) program = fs::absolute(argv0, ec);
  if (!ec) folders.push_back(program.parent_path().parent_path() / "share" / "clip");
  return folders;
}

// A data file shipped with the library, found as the BPE vocabulary is.
inline fs::path find_data_file(const std::string& name, const char* argv0) {
  std::vector<fs::path> folders;
  if (const char* dir = std::getenv("CLIP_DATA_DIR"); dir && *dir) folders.emplace_back(dir);
  for (fs::path& folder : data_folders(argv0)) folders.push_back(std::move(folder));
  std::string looked;
  for (const fs::path& folder : folders) {
    std::error_code ec;
    if (fs::is_regular_file(folder / name, ec)) return folder / name;
    looked += "\n  " + folder.string();
  }
  CLIP_FAIL("cannot find ", name, "; set CLIP_DATA_DIR to its folder. Looked in:", looked);
}

// The non-blank lines of a UTF-8 text file (a trailing '\r' dropped); an invalid line is an
// error naming the file and the line.
inline std::vector<std::string> read_lines(const fs::path& path) {
  std::error_code ec;
  CLIP_CHECK(!fs::is_directory(path, ec), "cannot read '", path.string(), "': it is a directory");
  std::ifstream in(path, std::ios::binary);
  CLIP_CHECK(in, "cannot read '", path.string(), "': ", std::strerror(errno));
  std::vector<std::string> lines;
  std::string line;
  for (size_t number = 1; std::getline(in, line); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    try {
      text::utf8::check(line);
    } catch (const Error& e) {
      CLIP_FAIL("'", path.string(), "' line ", number, ": ", e.what());
    }
    lines.push_back(std::move(line));
  }
  CLIP_CHECK(!in.bad(), "cannot read '", path.string(), "'");
  return lines;
}

// Whether the file starts like a JPEG, PNG, GIF or BMP: the formats clip::image::decode reads.
inline bool looks_like_image(const fs::path& path) {
  char head[8] = {};
  std::ifstream in(path, std::ios::binary);
  in.read(head, sizeof head);
  const std::string_view h(head, static_cast<size_t>(in.gcount()));
  return h.starts_with("\xFF\xD8\xFF") || h.starts_with("\x89PNG\r\n\x1A\n") || h.starts_with("GIF87a") ||
         h.starts_with("GIF89a") || h.starts_with("BM");
}

// The image files of a folder (not its sub-folders), by content, sorted by name.
inline std::vector<std::string> list_images(const fs::path& dir) {
  std::error_code ec;
  CLIP_CHECK(fs::is_directory(dir, ec), "'", dir.string(), "' is not a folder");
  std::vector<std::string> names;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
    if (entry.is_regular_file(ec) && looks_like_image(entry.path())) names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  std::vector<std::string> paths;
  for (const std::string& name : names) paths.push_back((dir / name).string());
  return paths;
}

// The sub-folders of a folder, sorted by name.
inline std::vector<std::string> list_folders(const fs::path& dir) {
  std::error_code ec;
  CLIP_CHECK(fs::is_directory(dir, ec), "'", dir.string(), "' is not a folder");
  std::vector<std::string> names;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir))
    if (entry.is_directory(ec)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// Decodes and preprocesses (CLIP's _transform(size)) every image, `threads` at a time, keeping
// argument order. The first failing image in that order is the error, naming its file.
inline std::vector<std::vector<float>> preprocess_images(std::span<const std::string> paths, int size,
                                                         int threads = default_threads()) {
  const size_t count = paths.size();
  std::vector<std::vector<float>> tensors(count);
  std::vector<std::exception_ptr> errors(count);
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  auto work = [&] {
    for (size_t i; !failed && (i = next++) < count;) {
      try {
        tensors[i] = image::clip_preprocess(image::decode_file(paths[i]), size);
      } catch (const std::exception&) {
        errors[i] = std::current_exception();  // rethrown whole: its source line stays for --verbose
        failed = true;
      }
    }
  };
  std::vector<std::thread> workers;
  try {
    for (int t = 1; t < std::min<int>(threads, static_cast<int>(count)); ++t) workers.emplace_back(work);
  } catch (const std::system_error&) {  // no more threads to be had: the ones running will do
  }
  work();
  for (std::thread& w : workers) w.join();
  for (const std::exception_ptr& error : errors)
    if (error) std::rethrow_exception(error);
  return tensors;
}

// Encodes image files `batch` at a time (bounding memory to one batch of pixels) and hands each
// batch's features [n, E] to `sink(first, features)`.
template <class Model, class Sink>
void encode_image_files(const Model& model, std::span<const std::string> paths, int batch, Sink&& sink) {
  constexpr int R = Model::image_resolution;
  constexpr size_t plane = size_t(3) * R * R;
  for (size_t first = 0; first < paths.size(); first += batch) {
    const size_t n = std::min<size_t>(batch, paths.size() - first);
    const std::vector<std::vector<float>> pixels = preprocess_images(paths.subspan(first, n), R);
    Tensor images({static_cast<int64_t>(n), 3, R, R});
    for (size_t i = 0; i < n; ++i) std::copy(pixels[i].begin(), pixels[i].end(), images.data() + i * plane);
    sink(static_cast<int64_t>(first), model.encode_image(images));
  }
}

// A file written whole or not at all, as SafeTensorsWriter writes.
inline void write_file_atomically(const fs::path& path, const std::string& content) {
  const fs::path tmp = SafeTensorsWriter::temporary_beside(path);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    CLIP_CHECK(out, "cannot create '", tmp.string(), "' to write '", path.string(), "'");
    out << content;
    out.flush();
    if (!out) {
      std::error_code ignored;
      fs::remove(tmp, ignored);
      CLIP_FAIL("writing '", path.string(), "' failed (disk full?)");
    }
  }
  SafeTensorsWriter::commit_file(tmp, path);
}

// A progress bar on stderr. On a terminal it redraws one line; in a log it writes a line at
// every tenth, so a long run in a batch job still says how far it got.
class Progress {
 public:
  // Worth showing: on a terminal when the work is more than one batch, in a log from this many
  // items on (short runs stay quiet, and tests read stderr).
  static constexpr int64_t kLogItems = 1000;
  static bool wanted(int64_t items, int64_t batch) { return isatty(2) ? items > batch : items >= kLogItems; }

  Progress(const char* program, const char* what, int64_t total, bool show)
      : program_(program), what_(what), total_(total), show_(show && total > 0), tty_(isatty(2)),
        start_(std::chrono::steady_clock::now()) {}
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  ~Progress() {
    if (show_ && tty_ && done_ > 0) std::fputc('\n', stderr);
  }

  void advance(int64_t n) {
    done_ += n;
    if (!show_) return;
    const auto now = std::chrono::steady_clock::now();
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const int tenth = static_cast<int>(10 * done_ / total_);
    if (tty_ ? (now - last_ < std::chrono::milliseconds(100) && done_ < total_) : tenth == last_tenth_) return;
    last_ = now;
    last_tenth_ = tenth;
    constexpr int width = 30;
    const int filled = static_cast<int>(width * done_ / total_);
    const double rate = seconds > 0 ? done_ / seconds : 0.0;
    std::fprintf(stderr, "%s%s: %s [%s%s] %lld/%lld %.1f/s%s", tty_ ? "\r" : "", program_, what_,
                 std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                 static_cast<long long>(done_), static_cast<long long>(total_), rate,
                 tty_ ? "\x1b[K" : "\n");  // on a terminal: clear what a longer line left
    std::fflush(stderr);
  }

 private:
  const char* program_;
  const char* what_;
  int64_t total_, done_ = 0;
  bool show_, tty_;
  std::chrono::steady_clock::time_point start_, last_{};
  int last_tenth_ = 0;
};

}  // namespace clip::cli
