// clip-eval: the CLIP paper's evaluations of a model, written as LAION CLIP_benchmark results.
//
//   clip-eval --task zeroshot,linear-probe,fewshot,retrieval --model NAME --weights FILE
//             --train DATA --test DATA [--classes FILE] [--output DIR] ...
//   clip-eval --task linear-probe --train-features F --test-features F [--val-features F]
//
// The protocols are the library's (clip/eval/): this program reads options, loads data and the
// model, encodes (through the feature cache) and writes the results.
//
// Exit status: 0 done, 1 bad input (a file, the weights, the data), 2 bad arguments.
#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstring>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "built_variants.hpp"
#include "cli.hpp"
#include "device_choice.hpp"
#include "clip/core/error.hpp"
#include "clip/eval/benchmark_result.hpp"
#include "clip/eval/dataset.hpp"
#include "clip/eval/feature_file.hpp"
#include "clip/eval/fewshot.hpp"
#include "clip/eval/linear_probe.hpp"
#include "clip/eval/metrics.hpp"
#include "clip/eval/zero_shot.hpp"
#include "clip/image/decode.hpp"
#include "clip/image/preprocess.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/text/bpe_tokenizer.hpp"

namespace {

namespace cli = clip::cli;
namespace fs = std::filesystem;

constexpr const char* kProgram = "clip-eval";

constexpr const char* kUsage =
    "usage: clip-eval --task TASKS --model NAME --weights FILE [--train DATA] [--val DATA] --test DATA\n"
    "                 [--classes FILE] [--templates FILE] [--output DIR] [options]\n"
    "       clip-eval --task linear-probe|fewshot --train-features F [--val-features F] --test-features F\n"
    "\n"
    "Evaluates a CLIP model as the CLIP paper does and writes each task's result as the JSON file\n"
    "LAION's CLIP_benchmark writes (DIR/{dataset}_{pretrained}_{model}_{language}_{task}.json), with a\n"
    "table on the terminal. TASKS is a comma-separated list of:\n"
    "  zeroshot      acc1, acc5, mean_per_class_recall of zero-shot classification (prompt\n"
    "                ensembling: each template's embedding normalised, averaged, renormalised)\n"
    "  linear-probe  multinomial logistic regression on frozen image features, scikit-learn's\n"
    "                objective solved by L-BFGS; C from the sweep C = 10^(k/8), k = -48..48 (7 points,\n"
    "                then steps 8, 4, 2, 1 around the best; ties to the smaller C) on --val or a\n"
    "                stratified --val-proportion of --train, then a refit on train + val\n"
    "                (metrics lp_acc1, lp_acc5, lp_mean_per_class_recall, C)\n"
    "  fewshot       the probe on k images per class (--shots), --seeds draws each; C from the\n"
    "                sweep on half of the k-shot set (or --C); mean and sd over seeds; an SVG curve\n"
    "                beside the JSON (with the zero-shot accuracy when that task runs too)\n"
    "  retrieval     image_retrieval_recall@k and text_retrieval_recall@k (--recall-k) on\n"
    "                --retrieval-data (default --test): captioned images\n"
    "\n"
    "DATA is a folder of class folders (ImageFolder), a CSV/TSV table (an image column and a label\n"
    "or caption column) or WebDataset shards (a brace list of .tar: image + cls, or + txt, a caption\n"
    "or a JSON list of captions). Image features are cached in --cache (safetensors keyed by the\n"
    "weights' hash, the model, the dataset, the split and the preprocessing), so a second task on\n"
    "the same data encodes nothing. --train-features etc. take such files (features [N, D] F32,\n"
    "labels [N] I64) made anywhere.\n"
    "\n"
    "options:\n"
    "  --task TASKS              see above (required)\n"
    "  --model NAME              the variant (ViT-B/32 or ViT-B-32 spelling)\n"
    "  --weights FILE            its weights (safetensors)\n"
    "  --pretrained NAME         the JSON's \"pretrained\" (default: the weights file's name)\n"
    "  --dataset-name NAME       the JSON's \"dataset\" (default: the test data's name)\n"
    "  --language CODE           the JSON's \"language\" (default en)\n"
    "  --train/--val/--test DATA the splits; --retrieval-data DATA for retrieval\n"
    "  --train-features F, --val-features F, --test-features F   precomputed features\n"
    "  --classes FILE            class names, one per line, in label order (default: the class\n"
    "                            folders' names)\n"
    "  --templates FILE          zero-shot prompt templates ({} = the class name; default: the\n"
    "                            paper's 80 ImageNet templates)\n"
    "  --features KIND           probe features: pre-projection (default; the image encoder's\n"
    "                            output before the projection, as the paper probes) or projected\n"
    "  --C X                     the probe's C (skips the sweep)\n"
    "  --val-proportion P        without --val: the share of --train held out (default 0.2)\n"
    "  --seed S                  for that split and the few-shot draws (default 0)\n"
    "  --tolerance T             L-BFGS stop: max |gradient| of the mean objective (default 1e-4,\n"
    "                            scikit-learn's default tol, which OpenAI's probe code used; at\n"
    "                            most 1000 iterations per fit)\n"
    "  --shots LIST              few-shot k values (default 1,2,4,8,16)\n"
    "  --seeds N                 few-shot draws per k (default 3)\n"
    "  --recall-k LIST           retrieval k values (default 1,5,10)\n"
    "  --output DIR              where the JSON (and SVG) files go (default .)\n"
    "  --cache DIR               the feature cache (default DIR/feature-cache; 'none': no cache)\n"
    "  --csv-image-key K, --csv-label-key K, --csv-caption-key K   CSV/TSV columns (default\n"
    "                            filepath, label, title)\n"
    "  --batch N                 images encoded at once (default 32)\n"
    "  --device DEV, --precision P, --vocab FILE, --quiet, --help   as clip-zeroshot\n"
    "\n"
    "exit status: 0 success, 1 bad input, 2 bad arguments\n";

struct Arguments {
  std::vector<std::string> tasks;
  std::string model, weights, pretrained, dataset_name, language = "en";
  std::string train, val, test, retrieval_data, train_features, val_features, test_features;
  std::string classes, templates, output = ".", cache;
  std::optional<std::string> vocab;
  bool projected = false;
  std::optional<double> C;
  double val_proportion = 0.2, tolerance = 1e-4;
  uint64_t seed = 0;
  std::vector<int> shots{1, 2, 4, 8, 16};
  int seeds = 3, batch = 32;
  std::vector<int64_t> recall_k{1, 5, 10};
  clip::DatasetOptions csv;
  bool quiet = false, help = false;
  cli::DeviceChoice device;
};

std::vector<std::string> split_list(std::string_view s) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == ',') {
      if (i > start) out.emplace_back(s.substr(start, i - start));
      start = i + 1;
    }
  return out;
}

double parse_double(std::string_view flag, std::string_view text, double min, double max) {
  double v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || !(v > min && v < max))
    throw cli::UsageError{std::string(flag) + " needs a number in (" + clip::json::number(min) + ", " +
                          clip::json::number(max) + "), not '" + std::string(text) + "'"};
  return v;
}

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (cli::ArgReader a(argc, argv); a.next();) {
    if (a.positional()) throw cli::UsageError{"unexpected argument '" + std::string(a.arg()) + "'"};
    else if (a.flag("--help") || a.flag("-h")) args.help = true;
    else if (a.flag("--quiet")) args.quiet = true;
    else if (auto v = a.option("--task")) args.tasks = split_list(*v);
    else if (auto v = a.option("--model")) args.model = *v;
    else if (auto v = a.path_option("--weights")) args.weights = *v;
    else if (auto v = a.option("--pretrained")) args.pretrained = *v;
    else if (auto v = a.option("--dataset-name")) args.dataset_name = *v;
    else if (auto v = a.option("--language")) args.language = *v;
    else if (auto v = a.path_option("--train")) args.train = *v;
    else if (auto v = a.path_option("--val")) args.val = *v;
    else if (auto v = a.path_option("--test")) args.test = *v;
    else if (auto v = a.path_option("--retrieval-data")) args.retrieval_data = *v;
    else if (auto v = a.path_option("--train-features")) args.train_features = *v;
    else if (auto v = a.path_option("--val-features")) args.val_features = *v;
    else if (auto v = a.path_option("--test-features")) args.test_features = *v;
    else if (auto v = a.path_option("--classes")) args.classes = *v;
    else if (auto v = a.path_option("--templates")) args.templates = *v;
    else if (auto v = a.path_option("--output")) args.output = *v;
    else if (auto v = a.path_option("--cache")) args.cache = *v;
    else if (auto v = a.path_option("--vocab")) args.vocab = *v;
    else if (auto v = a.option("--features")) {
      if (*v != "pre-projection" && *v != "projected")
        throw cli::UsageError{"--features takes pre-projection or projected, not '" + std::string(*v) + "'"};
      args.projected = *v == "projected";
    } else if (auto v = a.option("--C")) args.C = parse_double("--C", *v, 0, 1e300);
    else if (auto v = a.option("--val-proportion")) args.val_proportion = parse_double("--val-proportion", *v, 0, 1);
    else if (auto v = a.option("--tolerance")) args.tolerance = parse_double("--tolerance", *v, 0, 1);
    else if (auto v = a.option("--seed")) args.seed = static_cast<uint64_t>(cli::parse_int("--seed", *v, 0, 1 << 30, "seeds"));
    else if (auto v = a.option("--seeds")) args.seeds = cli::parse_int("--seeds", *v, 1, 1000, "seeds");
    else if (auto v = a.option("--batch")) args.batch = cli::parse_int("--batch", *v, 1, 1 << 20, "images");
    else if (auto v = a.option("--shots")) {
      args.shots.clear();
      for (const std::string& s : split_list(*v)) args.shots.push_back(cli::parse_int("--shots", s, 1, 1 << 20, "shots"));
    } else if (auto v = a.option("--recall-k")) {
      args.recall_k.clear();
      for (const std::string& s : split_list(*v)) args.recall_k.push_back(cli::parse_int("--recall-k", s, 1, 1 << 30, "ranks"));
    } else if (auto v = a.option("--csv-image-key")) args.csv.image_key = *v;
    else if (auto v = a.option("--csv-label-key")) args.csv.label_key = *v;
    else if (auto v = a.option("--csv-caption-key")) args.csv.caption_key = *v;
    else if (auto v = a.option("--device")) args.device.device = cli::parse_device_option(*v);
    else if (auto v = a.option("--precision")) args.device.requested_precision = cli::parse_precision_option(*v);
    else a.unknown();
  }
  if (args.help) return args;
  if (args.tasks.empty()) throw cli::UsageError{"--task is required (zeroshot, linear-probe, fewshot, retrieval)"};
  bool needs_model = false;
  for (const std::string& t : args.tasks) {
    if (t != "zeroshot" && t != "linear-probe" && t != "fewshot" && t != "retrieval")
      throw cli::UsageError{"unknown task '" + t + "' (zeroshot, linear-probe, fewshot, retrieval)"};
    const bool probe = t == "linear-probe" || t == "fewshot";
    if (!probe || args.train_features.empty() || args.test_features.empty()) needs_model = true;
    if (probe && args.train.empty() && args.train_features.empty())
      throw cli::UsageError{"--task " + t + " needs --train DATA or --train-features FILE"};
    if (probe && args.test.empty() && args.test_features.empty())
      throw cli::UsageError{"--task " + t + " needs --test DATA or --test-features FILE"};
    if (t == "zeroshot" && args.test.empty()) throw cli::UsageError{"--task zeroshot needs --test DATA"};
    if (t == "retrieval" && args.test.empty() && args.retrieval_data.empty())
      throw cli::UsageError{"--task retrieval needs --retrieval-data DATA (or --test DATA)"};
  }
  if (needs_model) {
    if (args.model.empty()) throw cli::UsageError{"--model NAME is required for these tasks"};
    if (args.weights.empty()) throw cli::UsageError{"--weights FILE is required for these tasks"};
  }
  if (!args.model.empty()) cli::check_model_name(args.model);
  return args;
}

// What the tasks need from a model; empty when only feature files are probed.
struct Encoder {
  std::string model_name;
  std::function<clip::LabeledFeatures(const clip::EvalDataset&, const std::string& split, bool projected)> images;
  std::function<clip::Tensor(const std::vector<std::string>& texts)> texts;  // [N, E], not normalised
  std::function<clip::ZeroShotClassifier(const std::vector<std::string>& classes,
                                         const std::vector<std::string>& templates)>
      zero_shot;
};

// Where the bytes of `count` images from `first` are decoded and preprocessed, in parallel;
// the first failing image (in dataset order) is the error, naming it.
std::vector<std::vector<float>> preprocess_blobs(const std::vector<clip::data::Blob>& blobs, size_t first, size_t count,
                                                 int resolution) {
  std::vector<std::vector<float>> out(count);
  std::vector<std::string> errors(count);
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next++) < count;) {
      try {
        clip::data::Blob blob = blobs[first + i];
        out[i] = clip::image::clip_preprocess(clip::image::decode(blob.take(), blob.name), resolution);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    }
  };
  std::vector<std::thread> workers;
  for (int t = 1; t < std::min<int>(cli::default_threads(), static_cast<int>(count)); ++t) workers.emplace_back(work);
  work();
  for (std::thread& w : workers) w.join();
  for (const std::string& e : errors)
    if (!e.empty()) throw clip::Error(e);
  return out;
}

// A 64-bit hash of a file's bytes (the weights' identity for the feature cache).
uint64_t file_hash(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  CLIP_CHECK(in, "cannot read '", path.string(), "'");
  std::vector<char> buffer(1 << 20);
  uint64_t h = clip::data::mix64(0xC11B);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const size_t n = static_cast<size_t>(in.gcount());
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, buffer.data() + i, 8);
      h = clip::data::mix64(h ^ w);
    }
    for (; i < n; ++i) h = clip::data::mix64(h ^ static_cast<unsigned char>(buffer[i]));
  }
  return h;
}

std::string hex(uint64_t v) {
  char s[17];
  std::snprintf(s, sizeof s, "%016llx", static_cast<unsigned long long>(v));
  return s;
}

std::string base_name(const std::string& spec) {
  fs::path p(spec);
  if (p.filename().empty()) p = p.parent_path();
  std::string name = p.stem().string();
  for (char& c : name)
    if (c == '{' || c == '}' || c == '/' || c == ' ') c = '_';
  return name.empty() ? "dataset" : name;
}

template <class Cfg, clip::Device D>
Encoder make_encoder(const Arguments& args, const char* argv0, std::shared_ptr<clip::Model<Cfg, D>> model) {
  auto tokenizer = std::make_shared<clip::text::BpeTokenizer>(
      args.vocab ? fs::path(*args.vocab) : clip::text::find_bpe_vocabulary(cli::data_folders(argv0)));
  Encoder e;
  e.model_name = Cfg::name;
  const uint64_t weights_hash = file_hash(args.weights);
  e.images = [&args, model, weights_hash](const clip::EvalDataset& data, const std::string& split, bool projected) {
    constexpr int R = clip::Model<Cfg, D>::image_resolution;
    // The CPU model can record its intermediate results (the pre-projection features among them).
    constexpr bool kTraces = requires(const clip::Model<Cfg, D>& m, const clip::Tensor& x, clip::Trace* t) {
      m.encode_image(x, t);
    };
    const std::string kind = projected ? "projected" : "pre-projection";
    const std::map<std::string, std::string> meta{
        {"model", Cfg::name}, {"weights_hash", hex(weights_hash)}, {"dataset", data.source}, {"split", split},
        {"dataset_fingerprint", hex(data.fingerprint())}, {"features", kind},
        {"preprocessing", "clip _transform(" + std::to_string(R) + ")"},
        {"compute", std::string(clip::device_name(D)) + " " + clip::precision_name(args.device.precision())}};
    uint64_t key = 0;
    for (const auto& [k, v] : meta)
      for (char c : k + "=" + v + ";") key = clip::data::mix64(key ^ static_cast<unsigned char>(c));
    fs::path cached;
    if (args.cache != "none") {
      const fs::path dir = args.cache.empty() ? fs::path(args.output) / "feature-cache" : fs::path(args.cache);
      fs::create_directories(dir);
      cached = dir / (base_name(data.source) + "_" + split + "_" + kind + "_" + hex(key) + ".safetensors");
      std::error_code ec;
      if (fs::is_regular_file(cached, ec) && clip::read_feature_metadata(cached) == meta) {
        if (!args.quiet) std::fprintf(stderr, "%s: %s features of %s from the cache\n", kProgram, split.c_str(), data.source.c_str());
        clip::LabeledFeatures f = clip::read_feature_file(cached);
        if (f.rows() == data.size()) return f;
      }
    }
    if constexpr (!kTraces) {
      CLIP_CHECK(projected, "pre-projection features need the CPU model (--device cpu); use --features projected");
    }
    clip::LabeledFeatures out;
    out.labels = data.labels.empty() ? std::vector<int64_t>(data.size(), -1) : data.labels;
    const std::string what = split + " images";  // Progress keeps the pointer
    cli::Progress progress(kProgram, what.c_str(), data.size(),
                           !args.quiet && cli::Progress::wanted(data.size(), args.batch));
    for (size_t first = 0; first < data.images.size(); first += args.batch) {
      const size_t n = std::min<size_t>(args.batch, data.images.size() - first);
      const std::vector<std::vector<float>> pixels = preprocess_blobs(data.images, first, n, R);
      clip::Tensor batch({static_cast<int64_t>(n), 3, R, R});
      for (size_t i = 0; i < n; ++i) std::copy(pixels[i].begin(), pixels[i].end(), batch.data() + i * 3 * R * R);
      clip::Tensor features;
      if constexpr (kTraces) {
        if (projected) {
          features = model->encode_image(batch);
        } else {
          clip::Trace trace;
          features = model->encode_image(batch, &trace);
          // ViT: ln_post of the class token, before visual.proj. ModifiedResNet has no separate
          // projection (the attention pool ends in c_proj): its embedding is what is probed.
          if (auto it = trace.find("visual.ln_post"); it != trace.end()) features = std::move(it->second);
        }
      } else {
        features = model->encode_image(batch);
      }
      if (first == 0) out.features = clip::Tensor({data.size(), features.shape[1]});
      std::copy(features.values.begin(), features.values.end(), out.features.data() + first * features.shape[1]);
      progress.advance(static_cast<int64_t>(n));
    }
    if (!cached.empty() && !data.labels.empty()) clip::write_feature_file(cached, out, meta);
    return out;
  };
  e.texts = [&args, model, tokenizer](const std::vector<std::string>& texts) {
    constexpr int L = clip::Model<Cfg, D>::context_length;
    clip::Tensor out;
    cli::Progress progress(kProgram, "captions", static_cast<int64_t>(texts.size()),
                           !args.quiet && cli::Progress::wanted(static_cast<int64_t>(texts.size()), args.batch));
    for (size_t first = 0; first < texts.size(); first += args.batch) {
      const size_t n = std::min<size_t>(args.batch, texts.size() - first);
      std::vector<int> ids;
      for (size_t i = 0; i < n; ++i) {
        const std::vector<int> row = tokenizer->tokenize(texts[first + i], L, true);
        ids.insert(ids.end(), row.begin(), row.end());
      }
      const clip::Tensor f = model->encode_text(ids);
      if (first == 0) out = clip::Tensor({static_cast<int64_t>(texts.size()), f.shape[1]});
      std::copy(f.values.begin(), f.values.end(), out.data() + first * f.shape[1]);
      progress.advance(static_cast<int64_t>(n));
    }
    return out;
  };
  e.zero_shot = [model, tokenizer](const std::vector<std::string>& classes, const std::vector<std::string>& templates) {
    return clip::ZeroShotClassifier::build(*model, *tokenizer, classes, templates);
  };
  return e;
}

// The terminal table: one row per metric.
void print_table(const clip::BenchmarkResult& r) {
  std::printf("\n%s on %s (%s, %s)\n", r.task.c_str(), r.dataset.c_str(), r.model.c_str(), r.pretrained.c_str());
  size_t width = 6;
  for (const auto& [k, v] : r.metrics) width = std::max(width, k.size());
  std::printf("  %-*s  %s\n  %s  %s\n", static_cast<int>(width), "metric", "value", std::string(width, '-').c_str(),
              "--------");
  for (const auto& [k, v] : r.metrics) {
    if (v) std::printf("  %-*s  %.4f\n", static_cast<int>(width), k.c_str(), *v);
    else std::printf("  %-*s  null\n", static_cast<int>(width), k.c_str());
  }
  std::fflush(stdout);
}

struct Context {
  const Arguments& args;
  Encoder* encoder;
  std::vector<std::string> class_names;
  std::map<std::string, clip::EvalDataset> datasets;  // by split
  std::map<std::string, clip::LabeledFeatures> features;
  std::optional<double> zero_shot_acc1;

  const clip::EvalDataset& dataset(const std::string& split, const std::string& spec, clip::DatasetUse use) {
    const std::string key = split + (use == clip::DatasetUse::retrieval ? "/retrieval" : "");
    if (auto it = datasets.find(key); it != datasets.end()) return it->second;
    clip::EvalDataset d = clip::load_eval_dataset(spec, use, class_names, args.csv);
    if (class_names.empty() && !d.folder_classes.empty()) class_names = d.folder_classes;
    return datasets.emplace(key, std::move(d)).first->second;
  }

  // A split's probe features: a features file, or the data encoded (through the cache).
  const clip::LabeledFeatures* probe_features(const std::string& split, const std::string& spec,
                                              const std::string& file) {
    if (auto it = features.find(split); it != features.end()) return &it->second;
    if (!file.empty()) return &features.emplace(split, clip::read_feature_file(file)).first->second;
    if (spec.empty()) return nullptr;
    CLIP_CHECK(encoder, "the ", split, " split needs a model to encode it (--model, --weights)");
    const clip::EvalDataset& d = dataset(split, spec, clip::DatasetUse::classification);
    return &features.emplace(split, encoder->images(d, split, args.projected)).first->second;
  }

  int64_t classes(std::initializer_list<const clip::LabeledFeatures*> splits) const {
    return class_names.empty() ? clip::class_count(splits) : static_cast<int64_t>(class_names.size());
  }

  clip::BenchmarkResult result(const std::string& task) const {
    clip::BenchmarkResult r;
    r.dataset = !args.dataset_name.empty() ? args.dataset_name
                : !args.test.empty()       ? base_name(args.test)
                : !args.retrieval_data.empty() ? base_name(args.retrieval_data)
                                           : base_name(args.test_features);
    r.model = encoder ? encoder->model_name : (args.model.empty() ? "features" : args.model);
    r.pretrained = !args.pretrained.empty() ? args.pretrained
                   : !args.weights.empty()  ? fs::path(args.weights).stem().string()
                                            : "features";
    r.task = task;
    r.language = args.language;
    return r;
  }

  void write(const clip::BenchmarkResult& r) const {
    fs::create_directories(args.output);
    const fs::path path = fs::path(args.output) / r.file_name();
    cli::write_file_atomically(path, r.to_json());
    print_table(r);
    std::printf("  -> %s\n", path.string().c_str());
  }
};

void zeroshot(Context& ctx, const char* argv0) {
  const clip::EvalDataset& test = ctx.dataset("test", ctx.args.test, clip::DatasetUse::classification);
  CLIP_CHECK(!ctx.class_names.empty(), "zero-shot needs class names: --classes FILE or class folders");
  const fs::path template_file = ctx.args.templates.empty() ? cli::find_data_file("imagenet_templates.txt", argv0)
                                                            : fs::path(ctx.args.templates);
  const std::vector<std::string> templates = cli::read_lines(template_file);
  CLIP_CHECK(!templates.empty(), "'", template_file.string(), "' holds no prompt template");
  const clip::ZeroShotClassifier classifier = ctx.encoder->zero_shot(ctx.class_names, templates);
  const clip::LabeledFeatures f = ctx.encoder->images(test, "test", true);
  const clip::Tensor logits = classifier.logits(f.features);
  const clip::ClassificationMetrics m = clip::classification_metrics(
      std::span<const float>(logits.values), std::span<const int64_t>(f.labels), classifier.classes());
  ctx.zero_shot_acc1 = m.acc1;
  clip::BenchmarkResult r = ctx.result("zeroshot_classification");
  r.set("acc1", m.acc1);
  r.set("acc5", classifier.classes() >= 5 ? std::optional<double>(m.acc5) : std::nullopt);
  r.set("mean_per_class_recall", m.mean_per_class_recall);
  ctx.write(r);
}

void linear_probe(Context& ctx) {
  const Arguments& a = ctx.args;
  const clip::LabeledFeatures* train = ctx.probe_features("train", a.train, a.train_features);
  const clip::LabeledFeatures* val = ctx.probe_features("val", a.val, a.val_features);
  const clip::LabeledFeatures* test = ctx.probe_features("test", a.test, a.test_features);
  const int64_t classes = ctx.classes({train, val, test});
  clip::check_labeled_features(*train, classes, a.train_features.empty() ? "'" + a.train + "'" : "'" + a.train_features + "'");
  clip::check_same_dim(*train, "the training features", *test, "the test features");
  clip::LabeledFeatures fit_split, val_split;
  if (val) {
    clip::check_same_dim(*train, "the training features", *val, "the validation features");
    fit_split = *train;
    val_split = *val;
  } else if (a.C) {
    fit_split = *train;
    val_split = clip::LabeledFeatures{clip::Tensor({0, train->dim()}), {}};
  } else {
    std::tie(fit_split, val_split) = clip::stratified_split(*train, classes, a.val_proportion, a.seed);
  }
  clip::ProbeOptions options;
  options.tolerance = a.tolerance;
  if (!a.quiet)
    std::fprintf(stderr, "%s: linear probe on %lld x %lld features, %lld classes%s\n", kProgram,
                 static_cast<long long>(fit_split.rows() + val_split.rows()), static_cast<long long>(train->dim()),
                 static_cast<long long>(classes), a.C ? "" : " (the C sweep, 15 fits, then the refit)");
  const clip::LinearProbeResult p = clip::linear_probe(fit_split, val_split, *test, classes, a.C, options,
                                                       [&](const clip::SweepPoint& s) {
    if (!a.quiet)
      std::fprintf(stderr, "%s:   k %3d  C %-10.4g validation accuracy %.4f  (%d iterations)\n", kProgram, s.k, s.C,
                   s.val_accuracy, s.fit.solver.iterations);
  });
  const clip::ClassificationMetrics m = clip::classification_metrics(
      std::span<const double>(p.test_logits), std::span<const int64_t>(test->labels), classes);
  clip::BenchmarkResult r = ctx.result("linear_probe");
  r.set("lp_acc1", m.acc1);
  r.set("lp_acc5", classes >= 5 ? std::optional<double>(m.acc5) : std::nullopt);
  r.set("lp_mean_per_class_recall", m.mean_per_class_recall);
  r.set("C", p.final_fit.C);
  ctx.write(r);
}

void fewshot(Context& ctx) {
  const Arguments& a = ctx.args;
  const clip::LabeledFeatures* train = ctx.probe_features("train", a.train, a.train_features);
  const clip::LabeledFeatures* test = ctx.probe_features("test", a.test, a.test_features);
  const int64_t classes = ctx.classes({train, test});
  clip::FewShotOptions options;
  options.shots = a.shots;
  options.seeds = a.seeds;
  options.seed = a.seed;
  options.C = a.C;
  options.probe.tolerance = a.tolerance;
  const std::vector<clip::FewShotPoint> points = clip::fewshot_probe(*train, *test, classes, options,
                                                                     [&](const std::string& line) {
    if (!a.quiet) std::fprintf(stderr, "%s:   %s\n", kProgram, line.c_str());
  });
  clip::BenchmarkResult r = ctx.result("fewshot_linear_probe");
  using M = clip::ClassificationMetrics;
  for (const clip::FewShotPoint& p : points) {
    const std::string k = std::to_string(p.shots) + "shot_";
    auto value = [&](double M::*m, bool sd) {
      return p.available() ? std::optional<double>(sd ? p.spread(m) : p.mean(m)) : std::nullopt;
    };
    r.set(k + "acc1", value(&M::acc1, false));
    r.set(k + "acc1_sd", value(&M::acc1, true));
    r.set(k + "acc5", classes >= 5 ? value(&M::acc5, false) : std::nullopt);
    r.set(k + "mean_per_class_recall", value(&M::mean_per_class_recall, false));
  }
  r.set("seeds", a.seeds);
  ctx.write(r);
  const fs::path svg = fs::path(a.output) / (fs::path(r.file_name()).stem().string() + ".svg");
  cli::write_file_atomically(svg, clip::fewshot_svg(r.model + " on " + r.dataset + ": few-shot linear probe", points,
                                                    ctx.zero_shot_acc1));
  std::printf("  -> %s\n", svg.string().c_str());
}

void retrieval(Context& ctx) {
  const std::string& spec = ctx.args.retrieval_data.empty() ? ctx.args.test : ctx.args.retrieval_data;
  const clip::EvalDataset& data = ctx.dataset("retrieval", spec, clip::DatasetUse::retrieval);
  clip::LabeledFeatures images = ctx.encoder->images(data, "retrieval", true);
  std::vector<std::string> captions;
  std::vector<int64_t> caption_image;
  for (size_t i = 0; i < data.captions.size(); ++i)
    for (const std::string& c : data.captions[i]) captions.push_back(c), caption_image.push_back(static_cast<int64_t>(i));
  clip::Tensor texts = ctx.encoder->texts(captions);
  clip::l2_normalize_rows(images.features);
  clip::l2_normalize_rows(texts);
  const std::vector<float> scores = clip::retrieval_scores(texts, images.features);  // [T, I]
  const std::vector<clip::RetrievalRecall> recall =
      clip::retrieval_recall(scores, texts.shape[0], images.rows(), caption_image, ctx.args.recall_k);
  clip::BenchmarkResult r = ctx.result("zeroshot_retrieval");
  for (const clip::RetrievalRecall& x : recall) {
    r.set("image_retrieval_recall@" + std::to_string(x.k), x.image_retrieval);
    r.set("text_retrieval_recall@" + std::to_string(x.k), x.text_retrieval);
  }
  ctx.write(r);
}

void run_tasks(const Arguments& args, Encoder* encoder, const char* argv0) {
  Context ctx{args, encoder, {}, {}, {}, {}};
  if (!args.classes.empty()) {
    ctx.class_names = cli::read_lines(args.classes);
    CLIP_CHECK(!ctx.class_names.empty(), "'", args.classes, "' names no class");
  }
  // Zero-shot first, so the few-shot plot can show its accuracy.
  std::vector<std::string> tasks = args.tasks;
  std::stable_sort(tasks.begin(), tasks.end(), [](const std::string& x, const std::string& y) {
    return x == "zeroshot" && y != "zeroshot";
  });
  for (const std::string& t : tasks) {
    if (t == "zeroshot") zeroshot(ctx, argv0);
    else if (t == "linear-probe") linear_probe(ctx);
    else if (t == "fewshot") fewshot(ctx);
    else if (t == "retrieval") retrieval(ctx);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_program(kProgram, kUsage, argc, argv, parse, [&](const Arguments& args) {
    if (args.model.empty() || args.weights.empty()) {
      run_tasks(args, nullptr, argv[0]);
      return 0;
    }
    cli::with_built_variant(args.model, [&]<class Cfg>(Cfg) {
      cli::with_device(args.device.device, [&]<clip::Device D>() {
        auto model = std::make_shared<clip::Model<Cfg, D>>(cli::make_model<Cfg, D>(args.device));
        model->load(args.weights);
        Encoder encoder = make_encoder<Cfg, D>(args, argv[0], model);
        run_tasks(args, &encoder, argv[0]);
      });
    });
    return 0;
  });
}
