// clip-zeroshot: zero-shot image classification with a CLIP model, or its accuracy on a dataset.
//
//   clip-zeroshot --model NAME --weights FILE --classes FILE [--templates FILE] [--top K] IMAGE...
//   clip-zeroshot --model NAME --weights FILE --dataset DIR [--classes FILE] [--json-out FILE]
//
// Exit status: 0 done, 1 bad input (an image, the weights or another file), 2 bad arguments.
#include <cstdio>
#include <exception>
#include <filesystem>
#include <numeric>
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
#include "clip/models/clip_model.hpp"
#include "clip/text/bpe_tokenizer.hpp"

namespace {

namespace cli = clip::cli;

constexpr const char* kProgram = "clip-zeroshot";

constexpr const char* kUsage =
    "usage: clip-zeroshot --model NAME --weights FILE --classes FILE [--templates FILE] [--top K] IMAGE...\n"
    "       clip-zeroshot --model NAME --weights FILE --dataset DIR [--classes FILE] [--json-out FILE]\n"
    "\n"
    "Classifies each IMAGE among the classes of FILE (one name per line) as the CLIP paper does\n"
    "zero-shot: every class name is put into every prompt template (\"a photo of a {}.\"), each\n"
    "prompt's text embedding is L2-normalized, and the class embedding is their renormalized mean\n"
    "(prompt ensembling). Probabilities are softmax(exp(logit_scale) * cosine): the model's own\n"
    "temperature, as OpenAI's model uses it (100 for OpenAI's released weights, the factor of\n"
    "OpenAI's ImageNet notebook). Prints, per image, its path and its top K classes:\n"
    "  astronaut.png\n"
    "    0.9342  an astronaut\n"
    "\n"
    "With --dataset DIR it evaluates instead: DIR holds one folder per class, whose name is the\n"
    "class name (or --classes gives the names, one per folder in sorted folder order); prints\n"
    "top-1 and top-5 accuracy and writes them, with per-class accuracy, as JSON to --json-out.\n"
    "\n"
    "options:\n"
    "  --model NAME      the variant, in OpenAI's or open_clip's spelling (ViT-B/32 or ViT-B-32)\n"
    "  --weights FILE    its weights (safetensors with OpenAI's, open_clip's or Hugging Face's names)\n"
    "  --classes FILE    class names, one per line\n"
    "  --templates FILE  prompt templates, one per line, {} standing for the class name (default:\n"
    "                    the paper's 80 ImageNet templates, imagenet_templates.txt in the data folder)\n"
    "  --top K           classes printed per image (default 5)\n"
    "  --dataset DIR     evaluate on the images of DIR's class folders\n"
    "  --json-out FILE   with --dataset: the JSON report (written atomically)\n"
    "  --batch N         images encoded at once (default 32; bounds memory)\n"
    "  --device DEV      cpu (default) or cuda (the first GPU)\n"
    "  --precision P     bf16 (fp32 sums; the default with --device cuda; AMX tiles on CPUs\n"
    "                    that have them) or fp32 (the default on the CPU)\n"
    "  --vocab FILE      the BPE vocabulary (default: bpe_simple_vocab_16e6.txt.gz from\n"
    "                    $CLIP_DATA_DIR, the source tree's data/ or the installed share/clip)\n"
    "  --quiet           no progress bar (shown on a terminal, or in a log from 1000 items)\n"
    "  --help            show this help\n"
    "  --                end of options (for image paths that start with '-')\n"
    "\n"
    "exit status: 0 success, 1 bad input (an image, the weights or a file), 2 bad arguments\n";

struct Arguments {
  std::string model, weights, classes, templates, dataset, json_out;
  std::optional<std::string> vocab;
  std::vector<std::string> images;
  int top = 5, batch = 32;
  bool quiet = false, help = false;
  cli::DeviceChoice device;
};

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (cli::ArgReader a(argc, argv); a.next();) {
    if (a.positional()) args.images.emplace_back(a.arg());
    else if (a.flag("--help") || a.flag("-h")) args.help = true;
    else if (a.flag("--quiet")) args.quiet = true;
    else if (auto v = a.option("--model")) args.model = *v;
    else if (auto v = a.path_option("--weights")) args.weights = *v;
    else if (auto v = a.path_option("--classes")) args.classes = *v;
    else if (auto v = a.path_option("--templates")) args.templates = *v;
    else if (auto v = a.path_option("--dataset")) args.dataset = *v;
    else if (auto v = a.path_option("--json-out")) args.json_out = *v;
    else if (auto v = a.path_option("--vocab")) args.vocab = *v;
    else if (auto v = a.option("--top")) args.top = cli::parse_int("--top", *v, 1, 1 << 20, "classes");
    else if (auto v = a.option("--device")) args.device.device = cli::parse_device_option(*v);
    else if (auto v = a.option("--precision")) args.device.requested_precision = cli::parse_precision_option(*v);
    else if (auto v = a.option("--batch")) args.batch = cli::parse_int("--batch", *v, 1, 1 << 20, "images");
    else a.unknown();
  }
  if (args.help) return args;
  if (args.model.empty()) throw cli::UsageError{"--model NAME is required"};
  if (args.weights.empty()) throw cli::UsageError{"--weights FILE is required"};
  if (args.dataset.empty()) {
    if (args.classes.empty()) throw cli::UsageError{"--classes FILE is required (or --dataset DIR)"};
    if (args.images.empty()) throw cli::UsageError{"no images given"};
    if (!args.json_out.empty()) throw cli::UsageError{"--json-out goes with --dataset"};
  } else if (!args.images.empty()) {
    throw cli::UsageError{"--dataset evaluates its own images; give images or --dataset, not both"};
  }
  cli::check_model_name(args.model);
  return args;
}

// The evaluation set: class folders in sorted order, each one's images sorted by name.
struct Dataset {
  std::vector<std::string> folders, images;
  std::vector<int64_t> labels;  // per image
};

Dataset list_dataset(const std::string& dir) {
  Dataset d;
  d.folders = cli::list_folders(dir);
  CLIP_CHECK(!d.folders.empty(), "'", dir, "' holds no class folders");
  for (size_t c = 0; c < d.folders.size(); ++c)
    for (std::string& path : cli::list_images(std::filesystem::path(dir) / d.folders[c])) {
      d.images.push_back(std::move(path));
      d.labels.push_back(static_cast<int64_t>(c));
    }
  CLIP_CHECK(!d.images.empty(), "the class folders of '", dir, "' hold no JPEG, PNG, BMP or GIF file");
  return d;
}

std::string percent(int64_t hits, int64_t total) {
  char s[32];
  std::snprintf(s, sizeof s, "%.2f%%", total ? 100.0 * hits / total : 0.0);
  return s;
}

std::string number(double x) {
  char s[32];
  std::snprintf(s, sizeof s, "%.6g", x);
  return s;
}

// Tallies top-1 / top-5 hits overall and per class; prints the summary, writes the JSON.
struct Evaluation {
  std::vector<int64_t> images, top1, top5;  // per class

  explicit Evaluation(size_t classes) : images(classes), top1(classes), top5(classes) {}

  void add(int64_t label, const std::vector<clip::ClassScore>& best) {  // best: the top 5
    ++images[label];
    top1[label] += best[0].label == label;
    for (const clip::ClassScore& s : best) top5[label] += s.label == label;
  }

  static int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

  // Mean over the classes that have images (as the paper reports for some datasets).
  double mean_per_class_top1() const {
    double total = 0;
    int64_t counted = 0;
    for (size_t c = 0; c < images.size(); ++c)
      if (images[c]) total += double(top1[c]) / images[c], ++counted;
    return counted ? total / counted : 0.0;
  }

  void print(const std::string& model) const {
    const int64_t n = sum(images);
    std::printf("%s on %lld images in %zu classes\n", model.c_str(), static_cast<long long>(n), images.size());
    std::printf("top-1 accuracy: %s (%lld/%lld)\n", percent(sum(top1), n).c_str(), static_cast<long long>(sum(top1)),
                static_cast<long long>(n));
    std::printf("top-5 accuracy: %s (%lld/%lld)\n", percent(sum(top5), n).c_str(), static_cast<long long>(sum(top5)),
                static_cast<long long>(n));
    std::printf("mean per-class top-1 accuracy: %.2f%%\n", 100.0 * mean_per_class_top1());
  }

  std::string json(const std::string& model, const std::string& dataset, const std::vector<std::string>& names,
                   const std::vector<std::string>& folders, size_t templates, float scale) const {
    using clip::json::quote;
    const int64_t n = sum(images);
    auto rate = [](int64_t hits, int64_t total) { return total ? number(double(hits) / total) : std::string("null"); };
    std::string s = "{\n  \"model\": " + quote(model) + ",\n  \"dataset\": " + quote(dataset) +
                    ",\n  \"templates\": " + std::to_string(templates) + ",\n  \"logit_scale_exp\": " + number(scale) +
                    ",\n  \"images\": " + std::to_string(n) + ",\n  \"top1\": " + rate(sum(top1), n) +
                    ",\n  \"top5\": " + rate(sum(top5), n) +
                    ",\n  \"mean_per_class_top1\": " + number(mean_per_class_top1()) + ",\n  \"classes\": [";
    for (size_t c = 0; c < images.size(); ++c)
      s += std::string(c ? "," : "") + "\n    {\"name\": " + quote(names[c]) + ", \"folder\": " + quote(folders[c]) +
           ", \"images\": " + std::to_string(images[c]) + ", \"top1\": " + rate(top1[c], images[c]) +
           ", \"top5\": " + rate(top5[c], images[c]) + "}";
    return s + "\n  ]\n}\n";
  }
};

template <class Cfg, clip::Device D>
void run(const Arguments& args, const std::vector<std::string>& class_names, const std::vector<std::string>& templates,
         const Dataset* dataset, const char* argv0) {
  clip::Model<Cfg, D> model = cli::make_model<Cfg, D>(args.device);
  model.load(args.weights);
  const clip::text::BpeTokenizer tokenizer(args.vocab ? std::filesystem::path(*args.vocab)
                                                      : clip::text::find_bpe_vocabulary(cli::data_folders(argv0)));
  const int64_t classes = static_cast<int64_t>(class_names.size());
  std::optional<clip::ZeroShotClassifier> classifier;
  {
    const int64_t prompts = classes * static_cast<int64_t>(templates.size());
    cli::Progress progress(kProgram, "classes", classes, !args.quiet && cli::Progress::wanted(prompts, args.batch));
    classifier.emplace(clip::ZeroShotClassifier::build(model, tokenizer, class_names, templates,
                                                       [&](int64_t) { progress.advance(1); }));
  }

  const std::vector<std::string>& images = dataset ? dataset->images : args.images;
  Evaluation evaluation(class_names.size());
  cli::Progress progress(kProgram, "images", static_cast<int64_t>(images.size()),
                         !args.quiet && dataset && cli::Progress::wanted(static_cast<int64_t>(images.size()), args.batch));
  cli::encode_image_files(model, std::span<const std::string>(images), args.batch,
                          [&](int64_t first, const clip::Tensor& features) {
    const clip::Tensor p = classifier->probabilities(features);
    for (int64_t i = 0; i < p.shape[0]; ++i) {
      const std::span<const float> row(p.data() + i * classes, classes);
      if (dataset) {
        evaluation.add(dataset->labels[first + i], clip::top_k(row, 5));
        continue;
      }
      std::printf("%s\n", images[first + i].c_str());
      for (const clip::ClassScore& s : clip::top_k(row, args.top))
        std::printf("  %.4f  %s\n", s.probability, class_names[s.label].c_str());
    }
    std::fflush(stdout);
    progress.advance(p.shape[0]);
  });
  if (!dataset) return;
  evaluation.print(Cfg::name);
  if (!args.json_out.empty())
    cli::write_file_atomically(args.json_out, evaluation.json(Cfg::name, args.dataset, class_names, dataset->folders,
                                                              templates.size(), classifier->scale()));
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_program(kProgram, kUsage, argc, argv, parse, [&](const Arguments& args) {
    std::optional<Dataset> dataset;
    std::vector<std::string> class_names;
    if (!args.classes.empty()) {
      class_names = cli::read_lines(args.classes);
      CLIP_CHECK(!class_names.empty(), "'", args.classes, "' names no class");
    }
    if (!args.dataset.empty()) {
      dataset = list_dataset(args.dataset);
      if (class_names.empty()) class_names = dataset->folders;
      CLIP_CHECK(class_names.size() == dataset->folders.size(), "'", args.classes, "' names ", class_names.size(),
                 " classes but '", args.dataset, "' has ", dataset->folders.size(), " class folders");
    }
    const std::filesystem::path template_file =
        args.templates.empty() ? cli::find_data_file("imagenet_templates.txt", argv[0])
                               : std::filesystem::path(args.templates);
    const std::vector<std::string> templates = cli::read_lines(template_file);
    CLIP_CHECK(!templates.empty(), "'", template_file.string(), "' holds no prompt template");
    cli::with_built_variant(args.model, [&]<class Cfg>(Cfg) {
      cli::with_device(args.device.device, [&]<clip::Device D>() {
        run<Cfg, D>(args, class_names, templates, dataset ? &*dataset : nullptr, argv[0]);
      });
    });
    return 0;
  });
}
