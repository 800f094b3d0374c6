// fashion-mnist-shards: turns Fashion-MNIST (Debian's dataset-fashion-mnist) into the captioned
// WebDataset shards the README's pretraining demo trains and evaluates on.
//
//   fashion-mnist-shards --out DIR [--input DIR] [--shard-size N] [--seed S] [--test-folders]
//                        [--retrieval-only]
//
// Exit status: 0 done, 1 bad input (a missing or malformed dataset file), 2 bad arguments.
#include <zlib.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

// The PNG encoder's one definition; its own code trips warnings this project's code does not.
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-function"
#include <stb_image_write.h>
#pragma GCC diagnostic pop

#include "cli.hpp"
#include "clip/core/error.hpp"
#include "clip/data/tar.hpp"
#include "clip/io/json.hpp"
#include "clip/text/bpe_tokenizer.hpp"
#include "fashion_mnist_captions.hpp"

namespace {

namespace cli = clip::cli;
namespace fs = std::filesystem;
namespace fm = clip::examples::fashion_mnist;

constexpr const char* kProgram = "fashion-mnist-shards";

constexpr const char* kUsage =
    "usage: fashion-mnist-shards --out DIR [--input DIR] [--shard-size N] [--seed S] [--test-folders]\n"
    "                            [--retrieval-only]\n"
    "\n"
    "Turns Fashion-MNIST (the IDX files of Debian's dataset-fashion-mnist) into WebDataset shards\n"
    "for contrastive pretraining and zero-shot evaluation:\n"
    "  DIR/train/00000.tar ...  the 60,000 training images: KEY.png (28x28 grayscale), KEY.txt (a\n"
    "                           caption naming the class in one of many phrasings, e.g. \"a black\n"
    "                           and white photo of an ankle boot\", \"product shot: a pullover\")\n"
    "                           and KEY.cls (the label, 0 to 9)\n"
    "  DIR/test/00000.tar ...   the 10,000 test images: KEY.png, KEY.cls, KEY.txt (the class name)\n"
    "  DIR/retrieval/00000.tar  the captioned retrieval set: the first 100 test images of each class\n"
    "                           (KEY is the test index), KEY.txt a JSON list of 5 captions, no caption\n"
    "                           string shared by two images; KEY.png and KEY.cls as in test/\n"
    "  DIR/classes.txt          the class names the evaluation uses, in label order\n"
    "  DIR/templates.txt        held-out prompt templates for the evaluation: the program checks,\n"
    "                           on BPE ids, that no template filled with a class name equals any\n"
    "                           caption training can produce\n"
    "  DIR/test-folders/        with --test-folders: the test images as one folder per class, for\n"
    "                           clip-zeroshot --dataset\n"
    "  DIR/info.json            the shard lists (relative to DIR), counts and settings, written last\n"
    "                           (the demo's sign of a finished conversion)\n"
    "Captions come from a hash of (seed, image index): the same seed writes the same files.\n"
    "\n"
    "options:\n"
    "  --out DIR         where to write (created if missing)\n"
    "  --input DIR       the dataset's folder (default /usr/share/datasets/fashion-mnist), holding\n"
    "                    {train,t10k}-images-idx3-ubyte.gz and {train,t10k}-labels-idx1-ubyte.gz\n"
    "  --shard-size N    samples per shard (default 5000)\n"
    "  --seed S          caption seed (default 0)\n"
    "  --test-folders    also write the test images into class folders\n"
    "  --retrieval-only  write DIR/retrieval/ alone (reads the test files only; info.json and the\n"
    "                    other folders stay as they are)\n"
    "  --vocab FILE      the BPE vocabulary used for the caption checks (default: found as\n"
    "                    clip-tokenize finds it)\n"
    "  --quiet           no progress lines\n"
    "  --help            show this help\n"
    "\n"
    "exit status: 0 success, 1 bad input (a missing, truncated or malformed dataset file), 2 bad arguments\n";

struct Arguments {
  std::string out, input = "/usr/share/datasets/fashion-mnist";
  std::optional<std::string> vocab;
  int shard_size = 5000;
  uint64_t seed = 0;
  bool test_folders = false, retrieval_only = false, quiet = false, help = false;
};

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (cli::ArgReader a(argc, argv); a.next();) {
    if (a.positional()) throw cli::UsageError{"unexpected argument '" + std::string(a.arg()) + "'"};
    if (a.flag("--help") || a.flag("-h")) args.help = true;
    else if (a.flag("--test-folders")) args.test_folders = true;
    else if (a.flag("--retrieval-only")) args.retrieval_only = true;
    else if (a.flag("--quiet")) args.quiet = true;
    else if (auto v = a.path_option("--out")) args.out = *v;
    else if (auto v = a.path_option("--input")) args.input = *v;
    else if (auto v = a.path_option("--vocab")) args.vocab = *v;
    else if (auto v = a.option("--shard-size")) args.shard_size = cli::parse_int("--shard-size", *v, 1, 1 << 24, "samples");
    else if (auto v = a.option("--seed")) args.seed = cli::parse_int("--seed", *v, 0, 1 << 30, "units");
    else a.unknown();
  }
  if (!args.help && args.out.empty()) throw cli::UsageError{"--out DIR is required"};
  return args;
}

// ---- IDX files (LeCun's MNIST format): big-endian magic 0x000008NN (NN = rank), then the rank's
// sizes as big-endian uint32, then the unsigned bytes.

class GzFile {
 public:
  explicit GzFile(const fs::path& path) : path_(path) {
    std::error_code ec;
    CLIP_CHECK(fs::is_regular_file(path, ec), "cannot read '", path.string(), "': ",
               fs::exists(path, ec) ? "not a regular file" : "no such file",
               " (install Debian's dataset-fashion-mnist, or give its folder with --input)");
    file_ = gzopen(path.c_str(), "rb");
    CLIP_CHECK(file_, "cannot open '", path.string(), "': ", std::strerror(errno));
  }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;
  ~GzFile() { gzclose(file_); }

  // Exactly `n` bytes, or an error naming what was being read.
  void read(void* data, size_t n, const char* what) {
    size_t done = 0;
    while (done < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - done, 1u << 30));
      const int got = gzread(file_, static_cast<char*>(data) + done, chunk);
      if (got < 0) {
        int code = 0;
        const char* message = gzerror(file_, &code);
        CLIP_FAIL("'", path_.string(), "' is not a readable gzip file (", message, ") while reading ", what);
      }
      if (got == 0) break;
      done += static_cast<size_t>(got);
    }
    CLIP_CHECK(done == n, "'", path_.string(), "' is cut short: reading ", what, " wanted ", n, " bytes, found ", done);
  }

  uint32_t read_u32(const char* what) {
    unsigned char b[4];
    read(b, 4, what);
    return uint32_t{b[0]} << 24 | uint32_t{b[1]} << 16 | uint32_t{b[2]} << 8 | b[3];
  }

  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
  gzFile file_ = nullptr;
};

struct Split {
  int64_t count = 0;
  std::vector<uint8_t> pixels;  // [count, 28, 28], 0 = background
  std::vector<uint8_t> labels;  // [count]
};

constexpr int kSide = 28;

Split read_split(const fs::path& dir, const std::string& prefix) {
  Split s;
  GzFile images(dir / (prefix + "-images-idx3-ubyte.gz"));
  const uint32_t magic = images.read_u32("the IDX header");
  CLIP_CHECK(magic == 0x803, "'", images.path().string(), "' is not an IDX file of 28x28 byte images (its magic number is ",
             magic, ", not 2051)");
  const uint32_t n = images.read_u32("the IDX header"), rows = images.read_u32("the IDX header"),
                 cols = images.read_u32("the IDX header");
  CLIP_CHECK(rows == kSide && cols == kSide, "'", images.path().string(), "' holds ", rows, "x", cols,
             " images; Fashion-MNIST's are 28x28");
  CLIP_CHECK(n > 0 && n <= 10'000'000, "'", images.path().string(), "' claims ", n, " images");
  s.count = n;
  s.pixels.resize(size_t{n} * kSide * kSide);
  images.read(s.pixels.data(), s.pixels.size(), "the pixels");

  GzFile labels(dir / (prefix + "-labels-idx1-ubyte.gz"));
  const uint32_t lmagic = labels.read_u32("the IDX header");
  CLIP_CHECK(lmagic == 0x801, "'", labels.path().string(), "' is not an IDX file of byte labels (its magic number is ",
             lmagic, ", not 2049)");
  const uint32_t ln = labels.read_u32("the IDX header");
  CLIP_CHECK(ln == n, "'", labels.path().string(), "' holds ", ln, " labels but '", images.path().string(), "' ", n,
             " images");
  s.labels.resize(n);
  labels.read(s.labels.data(), n, "the labels");
  for (uint32_t i = 0; i < n; ++i)
    CLIP_CHECK(s.labels[i] < fm::kClasses, "'", labels.path().string(), "': label ", int(s.labels[i]), " of image ", i,
               " is not a Fashion-MNIST class (0 to 9)");
  return s;
}

// ---- Output

std::string encode_png(const uint8_t* gray) {
  std::string png;
  auto append = [](void* context, void* data, int size) {
    static_cast<std::string*>(context)->append(static_cast<const char*>(data), static_cast<size_t>(size));
  };
  CLIP_CHECK(stbi_write_png_to_func(append, &png, kSide, kSide, 1, gray, kSide) != 0, "PNG encoding failed");
  return png;
}

std::string key_of(int64_t index) {
  char key[24];
  std::snprintf(key, sizeof key, "%09lld", static_cast<long long>(index));
  return key;
}

std::string shard_name(int64_t shard) {
  char name[24];
  std::snprintf(name, sizeof name, "%05lld.tar", static_cast<long long>(shard));
  return name;
}

// Writes a split's shards; `caption(i, label)` gives each sample's text. Returns the shard count.
template <class Caption>
int64_t write_shards(const Split& split, const fs::path& dir, int64_t shard_size, Caption&& caption,
                     cli::Progress& progress) {
  fs::create_directories(dir);
  int64_t shards = 0;
  for (int64_t first = 0; first < split.count; first += shard_size, ++shards) {
    const int64_t end = std::min(split.count, first + shard_size);
    clip::data::TarWriter tar(dir / shard_name(shards));  // appears under its name once closed
    for (int64_t i = first; i < end; ++i) {
      const std::string key = key_of(i);
      const int label = split.labels[i];
      tar.add(key + ".png", encode_png(&split.pixels[size_t(i) * kSide * kSide]));
      tar.add(key + ".txt", caption(i, label));
      tar.add(key + ".cls", std::to_string(label));
    }
    tar.close();
    progress.advance(end - first);
  }
  // Shards a previous run with a smaller --shard-size left behind would join a glob of the folder.
  std::vector<fs::path> stale;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.size() == 9 && name.ends_with(".tar") && name.find_first_not_of("0123456789") == 5 &&
        std::stoll(name.substr(0, 5)) >= shards)
      stale.push_back(entry.path());
  }
  for (const fs::path& path : stale) fs::remove(path);
  return shards;
}

// The captioned retrieval set (fashion_mnist_captions.hpp): the first kRetrievalImagesPerClass test
// images of each class in file order, each with its captions as a JSON list. Returns the images.
int64_t write_retrieval_set(const Split& test, const fs::path& dir, uint64_t seed) {
  std::array<std::vector<std::vector<std::string>>, fm::kClasses> captions;
  for (int c = 0; c < fm::kClasses; ++c) captions[c] = fm::retrieval_captions(seed, c);
  std::array<size_t, fm::kClasses> taken{};
  fs::create_directories(dir);
  clip::data::TarWriter tar(dir / shard_name(0));  // appears under its name once closed
  int64_t images = 0;
  for (int64_t i = 0; i < test.count; ++i) {
    const int label = test.labels[i];
    if (taken[label] == captions[label].size()) continue;
    std::string list = "[";
    for (const std::string& caption : captions[label][taken[label]++]) {
      if (list.size() > 1) list += ", ";
      list += clip::json::quote(caption);
    }
    const std::string key = key_of(i);
    tar.add(key + ".png", encode_png(&test.pixels[size_t(i) * kSide * kSide]));
    tar.add(key + ".txt", list + "]");
    tar.add(key + ".cls", std::to_string(label));
    ++images;
  }
  tar.close();
  return images;
}

// Every retrieval caption fits the variant's context.
template <class Tokenizer>
void check_retrieval_captions(const Tokenizer& tokenizer) {
  for (int c = 0; c < fm::kClasses; ++c)
    for (const std::string& caption : fm::retrieval_caption_pool(c)) {
      const size_t tokens = tokenizer.encode(caption).size();
      CLIP_CHECK(static_cast<int>(tokens) <= fm::kMaxCaptionTokens, "the retrieval caption '", caption, "' has ", tokens,
                 " BPE tokens; at most ", fm::kMaxCaptionTokens, " fit the 16-token context");
    }
}

// "t-shirt" from "a t-shirt": folder names without articles, numbered so they sort in label order.
std::string folder_name(int label) {
  std::string name = fm::bare(fm::canonical_name(label));
  for (char& c : name)
    if (c == ' ') c = '_';
  return std::to_string(label) + "_" + name;
}

void write_test_folders(const Split& split, const fs::path& dir) {
  for (int c = 0; c < fm::kClasses; ++c) fs::create_directories(dir / folder_name(c));
  for (int64_t i = 0; i < split.count; ++i)
    cli::write_file_atomically(dir / folder_name(split.labels[i]) / (key_of(i) + ".png"),
                               encode_png(&split.pixels[size_t(i) * kSide * kSide]));
}

std::string lines(const std::vector<std::string>& items) {
  std::string s;
  for (const std::string& item : items) s += item + "\n";
  return s;
}

int run(const Arguments& args, const char* argv0) {
  const auto start = std::chrono::steady_clock::now();
  const clip::text::BpeTokenizer tokenizer(args.vocab ? fs::path(*args.vocab)
                                                      : clip::text::find_bpe_vocabulary(cli::data_folders(argv0)));
  check_retrieval_captions(tokenizer);
  const fs::path input(args.input), out(args.out);
  if (args.retrieval_only) {
    const Split test = read_split(input, "t10k");
    const int64_t images = write_retrieval_set(test, out / "retrieval", args.seed);
    std::printf("%s: %lld retrieval images with %d captions each, %.1f s\n", (out / "retrieval").string().c_str(),
                static_cast<long long>(images), fm::kRetrievalCaptionsPerImage,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    return 0;
  }
  const size_t distinct = fm::check_vocabulary(tokenizer);

  const Split train = read_split(input, "train");
  const Split test = read_split(input, "t10k");

  fs::create_directories(out);
  std::error_code ec;
  fs::remove(out / "info.json", ec);  // unfinished until written again at the end
  cli::Progress progress(kProgram, "images", train.count + test.count, !args.quiet);
  const int64_t train_shards = write_shards(train, out / "train", args.shard_size, [&](int64_t i, int label) {
    return fm::training_caption(args.seed, i, label);
  }, progress);
  const int64_t test_shards = write_shards(test, out / "test", args.shard_size, [&](int64_t, int label) {
    return fm::canonical_name(label);
  }, progress);
  const int64_t retrieval_images = write_retrieval_set(test, out / "retrieval", args.seed);
  if (args.test_folders) write_test_folders(test, out / "test-folders");

  std::vector<std::string> classes;
  for (int c = 0; c < fm::kClasses; ++c) classes.push_back(fm::canonical_name(c));
  cli::write_file_atomically(out / "classes.txt", lines(classes));
  cli::write_file_atomically(out / "templates.txt", lines(fm::held_out_templates()));

  auto brace = [](int64_t shards) {
    char s[48];
    std::snprintf(s, sizeof s, "{00000..%05lld}.tar", static_cast<long long>(shards - 1));
    return std::string(s);
  };
  using clip::json::quote;
  const std::string info =
      "{\n  \"train\": " + quote("train/" + brace(train_shards)) +
      ",\n  \"train_samples\": " + std::to_string(train.count) + ",\n  \"test\": " +
      quote("test/" + brace(test_shards)) + ",\n  \"test_samples\": " + std::to_string(test.count) +
      ",\n  \"shard_size\": " + std::to_string(args.shard_size) + ",\n  \"seed\": " + std::to_string(args.seed) +
      ",\n  \"retrieval\": " + quote("retrieval/" + shard_name(0)) + ",\n  \"retrieval_images\": " +
      std::to_string(retrieval_images) + ",\n  \"retrieval_captions_per_image\": " +
      std::to_string(fm::kRetrievalCaptionsPerImage) + ",\n  \"test_folders\": " + (args.test_folders ? "true" : "false") +
      ",\n  \"distinct_training_captions\": " + std::to_string(distinct) +
      ",\n  \"held_out_templates\": " + std::to_string(fm::held_out_templates().size()) + "\n}\n";
  cli::write_file_atomically(out / "info.json", info);

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%s: %lld training images in %lld shards (%zu distinct captions), %lld test images in %lld shards, "
              "%zu held-out templates (none a training caption), %.1f s\n",
              out.string().c_str(), static_cast<long long>(train.count), static_cast<long long>(train_shards), distinct,
              static_cast<long long>(test.count), static_cast<long long>(test_shards), fm::held_out_templates().size(),
              seconds);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_program(kProgram, kUsage, argc, argv, parse, [&](const Arguments& args) { return run(args, argv[0]); });
}
