// clip-preprocess: CLIP's image preprocessing from the command line.
//
//   clip-preprocess --size N --out FILE.safetensors IMAGE...
//
// Writes each image's _transform(N) (float32 [3,N,N]) under the image path as given. Exit
// status: 0 done, 1 an image or the output could not be processed (nothing is written), 2 bad
// arguments.
#include <cstdio>
#include <exception>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "cli.hpp"
#include "clip/core/error.hpp"
#include "clip/io/safetensors.hpp"

namespace {

namespace cli = clip::cli;

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
  int threads = cli::default_threads();
  std::string out;
  std::vector<std::string> images;
  bool help = false;
};

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (cli::ArgReader a(argc, argv); a.next();) {
    if (a.positional()) args.images.emplace_back(a.arg());
    else if (a.flag("--help") || a.flag("-h")) args.help = true;
    else if (auto v = a.option("--size")) args.size = cli::parse_int("--size", *v, 1, 16384, "pixels");
    else if (auto v = a.option("--threads")) args.threads = cli::parse_int("--threads", *v, 1, 1024, "threads");
    else if (auto v = a.path_option("--out")) args.out = *v;
    else a.unknown();
  }
  if (args.help) return args;
  if (args.size == 0) throw cli::UsageError{"--size N is required"};
  if (args.out.empty()) throw cli::UsageError{"--out FILE is required"};
  if (args.images.empty()) throw cli::UsageError{"no images given"};
  std::set<std::string_view> seen;
  for (const std::string& image : args.images)
    if (!seen.insert(image).second) throw cli::UsageError{"image '" + image + "' is given twice"};
  return args;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_program("clip-preprocess", kUsage, argc, argv, parse, [&](const Arguments& args) {
    // The images are preprocessed in parallel; the file is written in argument order, and only
    // when every image succeeded.
    std::vector<std::vector<float>> tensors = cli::preprocess_images(args.images, args.size, args.threads);
    clip::SafeTensorsWriter writer;
    for (size_t i = 0; i < tensors.size(); ++i) {
      writer.add(args.images[i], {3, args.size, args.size}, tensors[i].data());
      std::vector<float>().swap(tensors[i]);  // the writer holds its own copy
    }
    writer.set_metadata("preprocessing", "clip._transform(" + std::to_string(args.size) + ")");
    writer.write(args.out);
    return 0;
  });
}
