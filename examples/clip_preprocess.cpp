// clip-preprocess: CLIP's image preprocessing from the command line.
//
//   clip-preprocess --size N --out FILE.safetensors IMAGE...
//
// Writes each image's _transform(N) (float32 [3,N,N]) under the image path as given. Exit
// status: 0 done, 1 an image or the output could not be processed (nothing is written), 2 bad
// arguments.
#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdio>
#include <exception>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/image/decode.hpp"
#include "clip/image/preprocess.hpp"
#include "clip/io/safetensors.hpp"

namespace {

constexpr const char* kUsage =
    "usage: clip-preprocess --size N --out FILE.safetensors IMAGE...\n"
    "\n"
    "Preprocesses each IMAGE (JPEG, PNG, BMP or GIF) exactly as OpenAI CLIP's _transform(N)\n"
    "does with Pillow: bicubic resize of the shorter side to N, center crop to N x N, RGB,\n"
    "mean/std normalisation. Writes one float32 tensor [3,N,N] per image, named by the image\n"
    "path as given, to FILE.safetensors (replaced atomically: on any error nothing is written).\n"
    "\n"
    "options:\n"
    "  --size N     output side in pixels (224 for most CLIP models, 336 for ViT-L/14@336px)\n"
    "  --out FILE   the safetensors file to write\n"
    "  --threads T  images decoded in parallel (default: one per CPU)\n"
    "  --help       show this help\n"
    "  --           end of options (for image paths that start with '-')\n"
    "\n"
    "exit status: 0 success, 1 an image or the output failed, 2 bad arguments\n";

struct Arguments {
  int size = 0;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::string out;
  std::vector<std::string> images;
  bool help = false;
};

struct UsageError {
  std::string message;
};

int parse_count(std::string_view flag, std::string_view text, int max, const char* unit) {
  int value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value <= 0 || value > max)
    throw UsageError{std::string(flag) + " needs a whole number of " + unit + " from 1 to " + std::to_string(max) +
                     ", not '" + std::string(text) + "'"};
  return value;
}

Arguments parse(int argc, char** argv) {
  Arguments args;
  bool options_done = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&](std::string_view flag) -> std::string_view {
      if (a.size() > flag.size() && a[flag.size()] == '=') return a.substr(flag.size() + 1);
      if (i + 1 >= argc) throw UsageError{std::string(flag) + " needs a value"};
      return argv[++i];
    };
    auto is = [&](std::string_view flag) { return a == flag || (a.starts_with(flag) && a[flag.size()] == '='); };
    if (options_done || !a.starts_with("-") || a == "-") {
      args.images.emplace_back(a);
    } else if (a == "--") {
      options_done = true;
    } else if (a == "--help" || a == "-h") {
      args.help = true;
    } else if (is("--size")) {
      args.size = parse_count("--size", value("--size"), 16384, "pixels");
    } else if (is("--threads")) {
      args.threads = parse_count("--threads", value("--threads"), 1024, "threads");
    } else if (is("--out")) {
      args.out = value("--out");
      if (args.out.empty()) throw UsageError{"--out needs a file name"};
    } else {
      throw UsageError{"unknown option '" + std::string(a) + "'"};
    }
  }
  if (args.help) return args;
  if (args.size == 0) throw UsageError{"--size N is required"};
  if (args.out.empty()) throw UsageError{"--out FILE is required"};
  if (args.images.empty()) throw UsageError{"no images given"};
  std::set<std::string_view> seen;
  for (const std::string& image : args.images)
    if (!seen.insert(image).second) throw UsageError{"image '" + image + "' is given twice"};
  return args;
}

}  // namespace

int main(int argc, char** argv) {
  Arguments args;
  try {
    args = parse(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "clip-preprocess: %s\n(see clip-preprocess --help)\n", e.message.c_str());
    return 2;
  }
  if (args.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  // Each image is preprocessed on its own, in parallel; the file is written in argument order,
  // and only when every image succeeded.
  const size_t count = args.images.size();
  std::vector<std::vector<float>> tensors(count);
  std::vector<std::string> errors(count);
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  auto work = [&] {
    for (size_t i; !failed && (i = next++) < count;) {
      try {
        const clip::image::Image image = clip::image::decode_file(args.images[i]);
        tensors[i] = clip::image::clip_preprocess(image, args.size);
      } catch (const std::exception& e) {
        errors[i] = e.what();
        failed = true;
      }
    }
  };
  std::vector<std::thread> workers;
  try {
    for (int t = 1; t < std::min<int>(args.threads, static_cast<int>(count)); ++t) workers.emplace_back(work);
  } catch (const std::system_error&) {  // no more threads to be had: the ones running will do
  }
  work();
  for (std::thread& w : workers) w.join();
  for (const std::string& error : errors)
    if (!error.empty()) {
      std::fprintf(stderr, "clip-preprocess: %s\n", error.c_str());
      return 1;
    }
  try {
    clip::SafeTensorsWriter writer;
    for (size_t i = 0; i < count; ++i) {
      writer.add(args.images[i], {3, args.size, args.size}, tensors[i].data());
      std::vector<float>().swap(tensors[i]);  // the writer holds its own copy
    }
    writer.set_metadata("preprocessing", "clip._transform(" + std::to_string(args.size) + ")");
    writer.write(args.out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "clip-preprocess: %s\n", e.what());
    return 1;
  }
  return 0;
}
