// clip-embed: image and text features of a CLIP model from the command line.
//
//   clip-embed --model NAME --weights FILE [--image PATH]... [--text STR]... --out FILE
//
// Writes image_features [images, E] and text_features [texts, E] (float32 safetensors, written
// atomically), rows in argument order. Exit status: 0 done, 1 bad input (an image, the weights
// or another file), 2 bad arguments.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "built_variants.hpp"
#include "cli.hpp"
#include "device_choice.hpp"
#include "clip/core/error.hpp"
#include "clip/eval/zero_shot.hpp"
#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/text/bpe_tokenizer.hpp"

namespace {

namespace cli = clip::cli;

constexpr const char* kProgram = "clip-embed";

constexpr const char* kUsage =
    "usage: clip-embed --model NAME --weights FILE [--image PATH]... [--image-dir DIR]...\n"
    "                  [--text STR]... [--text-file FILE]... --out FILE\n"
    "\n"
    "Encodes images and texts with a CLIP model and writes the features, exactly what the\n"
    "model's encode_image / encode_text return, to a float32 safetensors file (replaced\n"
    "atomically: on any error nothing is written):\n"
    "  image_features  [images, E]  one row per image, in argument order\n"
    "  text_features   [texts, E]   one row per text, in argument order\n"
    "Its metadata holds the model name and the images and texts, as JSON lists in row order.\n"
    "\n"
    "options:\n"
    "  --model NAME      the variant, in OpenAI's or open_clip's spelling (ViT-B/32 or ViT-B-32)\n"
    "  --weights FILE    its weights (safetensors with OpenAI's, open_clip's or Hugging Face's names)\n"
    "  --image PATH      an image (JPEG, PNG, BMP or GIF); preprocessed as OpenAI's _transform\n"
    "  --image-dir DIR   every image file in DIR (by content, not by extension), sorted by name\n"
    "  --text STR        a text, tokenized as clip.tokenize(truncate=True) does\n"
    "  --text-file FILE  one text per line (UTF-8; blank lines are skipped)\n"
    "  --out FILE        the safetensors file to write\n"
    "  --normalize       write L2-normalized rows (unit vectors) instead\n"
    "  --batch N         images or texts encoded at once (default 32; bounds memory)\n"
    "  --device DEV      cpu (default) or cuda (the first GPU)\n"
    "  --precision P     bf16 (fp32 sums; the default with --device cuda; AMX tiles on CPUs\n"
    "                    that have them) or fp32 (the default on the CPU)\n"
    "  --vocab FILE      the BPE vocabulary (default: bpe_simple_vocab_16e6.txt.gz from\n"
    "                    $CLIP_DATA_DIR, the source tree's data/ or the installed share/clip)\n"
    "  --quiet           no progress bar (shown on a terminal, or in a log from 1000 items)\n"
    "  --help            show this help\n"
    "\n"
    "exit status: 0 success, 1 bad input (an image, the weights or a file), 2 bad arguments\n";

// An input as given: --image and --image-dir, --text and --text-file, each in order.
struct Source {
  bool many;  // --image-dir / --text-file
  std::string value;
};

struct Arguments {
  std::string model, weights, out;
  std::optional<std::string> vocab;
  std::vector<Source> images, texts;
  int batch = 32;
  bool normalize = false, quiet = false, help = false;
  cli::DeviceChoice device;
};

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (cli::ArgReader a(argc, argv); a.next();) {
    if (a.positional()) throw cli::UsageError{"unexpected argument '" + std::string(a.arg()) + "' (images come with --image)"};
    if (a.flag("--help") || a.flag("-h")) args.help = true;
    else if (a.flag("--normalize")) args.normalize = true;
    else if (a.flag("--quiet")) args.quiet = true;
    else if (auto v = a.option("--model")) args.model = *v;
    else if (auto v = a.path_option("--weights")) args.weights = *v;
    else if (auto v = a.path_option("--out")) args.out = *v;
    else if (auto v = a.path_option("--vocab")) args.vocab = *v;
    else if (auto v = a.path_option("--image")) args.images.push_back({false, *v});
    else if (auto v = a.path_option("--image-dir")) args.images.push_back({true, *v});
    else if (auto v = a.option("--text")) args.texts.push_back({false, std::string(*v)});
    else if (auto v = a.path_option("--text-file")) args.texts.push_back({true, *v});
    else if (auto v = a.option("--device")) args.device.device = cli::parse_device_option(*v);
    else if (auto v = a.option("--precision")) args.device.requested_precision = cli::parse_precision_option(*v);
    else if (auto v = a.option("--batch")) args.batch = cli::parse_int("--batch", *v, 1, 1 << 20, "items");
    else a.unknown();
  }
  if (args.help) return args;
  if (args.model.empty()) throw cli::UsageError{"--model NAME is required"};
  if (args.weights.empty()) throw cli::UsageError{"--weights FILE is required"};
  if (args.out.empty()) throw cli::UsageError{"--out FILE is required"};
  if (args.images.empty() && args.texts.empty())
    throw cli::UsageError{"no inputs: give --image, --image-dir, --text or --text-file"};
  cli::check_model_name(args.model);
  return args;
}

// The images and texts in row order; a folder without images or an invalid text is an error.
std::vector<std::string> expand_images(const std::vector<Source>& sources) {
  std::vector<std::string> paths;
  for (const Source& s : sources) {
    if (!s.many) {
      paths.push_back(s.value);
      continue;
    }
    std::vector<std::string> found = cli::list_images(s.value);
    CLIP_CHECK(!found.empty(), "'", s.value, "' holds no JPEG, PNG, BMP or GIF file");
    paths.insert(paths.end(), found.begin(), found.end());
  }
  return paths;
}

std::vector<std::string> expand_texts(const std::vector<Source>& sources) {
  std::vector<std::string> texts;
  for (const Source& s : sources) {
    if (s.many) {
      std::vector<std::string> lines = cli::read_lines(s.value);
      texts.insert(texts.end(), lines.begin(), lines.end());
      continue;
    }
    try {
      clip::text::utf8::check(s.value);
    } catch (const clip::Error& e) {
      CLIP_FAIL("--text '", clip::text::utf8::replace_invalid(s.value), "': ", e.what());
    }
    texts.push_back(s.value);
  }
  return texts;
}

std::string json_list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += ',';
    out += clip::json::quote(items[i]);
  }
  return out + "]";
}

template <class Cfg, clip::Device D>
void embed(const Arguments& args, const std::vector<std::string>& images, const std::vector<std::string>& texts,
           const char* argv0) {
  constexpr int E = Cfg::embed_dim;
  clip::Model<Cfg, D> model = cli::make_model<Cfg, D>(args.device);
  model.load(args.weights);
  std::optional<clip::text::BpeTokenizer> tokenizer;
  if (!texts.empty())
    tokenizer.emplace(args.vocab ? std::filesystem::path(*args.vocab)
                                 : clip::text::find_bpe_vocabulary(cli::data_folders(argv0)));

  clip::Tensor image_features({static_cast<int64_t>(images.size()), E});
  {
    cli::Progress progress(kProgram, "images", static_cast<int64_t>(images.size()),
                           !args.quiet && cli::Progress::wanted(static_cast<int64_t>(images.size()), args.batch));
    cli::encode_image_files(model, std::span<const std::string>(images), args.batch,
                            [&](int64_t first, const clip::Tensor& features) {
                              std::copy(features.values.begin(), features.values.end(), image_features.data() + first * E);
                              progress.advance(features.shape[0]);
                            });
  }

  clip::Tensor text_features({static_cast<int64_t>(texts.size()), E});
  {
    cli::Progress progress(kProgram, "texts", static_cast<int64_t>(texts.size()),
                           !args.quiet && cli::Progress::wanted(static_cast<int64_t>(texts.size()), args.batch));
    for (size_t first = 0; first < texts.size(); first += args.batch) {
      const size_t n = std::min<size_t>(args.batch, texts.size() - first);
      std::vector<int> ids;
      for (size_t i = first; i < first + n; ++i) {
        const std::vector<int> row = tokenizer->tokenize(texts[i], Cfg::context_length);
        ids.insert(ids.end(), row.begin(), row.end());
      }
      const clip::Tensor features = model.encode_text(ids);
      std::copy(features.values.begin(), features.values.end(), text_features.data() + first * E);
      progress.advance(static_cast<int64_t>(n));
    }
  }

  if (args.normalize) {
    clip::l2_normalize_rows(image_features);
    clip::l2_normalize_rows(text_features);
  }
  clip::SafeTensorsWriter writer;
  writer.add("image_features", image_features);
  writer.add("text_features", text_features);
  writer.set_metadata("model", Cfg::name);
  writer.set_metadata("normalized", args.normalize ? "true" : "false");
  writer.set_metadata("images", json_list(images));
  writer.set_metadata("texts", json_list(texts));
  writer.write(args.out);
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_program(kProgram, kUsage, argc, argv, parse, [&](const Arguments& args) {
    const std::vector<std::string> images = expand_images(args.images);
    const std::vector<std::string> texts = expand_texts(args.texts);
    cli::with_built_variant(args.model, [&]<class Cfg>(Cfg) { cli::with_device(args.device.device, [&]<clip::Device D>() { embed<Cfg, D>(args, images, texts, argv[0]); }); });
    return 0;
  });
}
