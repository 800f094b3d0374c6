// clip-train: contrastive pretraining of a CLIP model on the CPU, from scratch or from weights,
// with checkpoints that resume exactly, metrics as JSON lines, curves as SVG and zero-shot
// evaluation during training.
//
//   clip-train --model NAME --train-data SOURCES --batch-size B (--steps N | --epochs E) --output DIR
//   clip-train --resume latest --output DIR
//   mpirun -np N clip-train ...     data parallel over N processes (built with MPI)
//
// Exit status: 0 done, 1 bad input or a diverged run, 2 bad arguments, 130 interrupted (SIGINT or
// SIGTERM; a checkpoint is written first).
#include <unistd.h>

#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "built_variants.hpp"
#include "cli.hpp"
#include "device_choice.hpp"
#include "clip/config/dims.hpp"
#include "clip/config/names.hpp"
#include "clip/core/error.hpp"
#include "clip/data/loader.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/dist/step_traffic.hpp"
#if CLIP_WITH_MPI
#include "clip/dist/mpi_communicator.hpp"
#endif
#include "clip/eval/zero_shot.hpp"
#include "clip/io/folder_lock.hpp"
#include "clip/io/json.hpp"
#include "clip/io/state_dict.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/text/bpe_tokenizer.hpp"
#include "clip/train/checkpoint.hpp"
#include "clip/train/init.hpp"
#include "clip/train/metrics.hpp"
#include "clip/train/trainer.hpp"

namespace {

namespace cli = clip::cli;
namespace fs = std::filesystem;
namespace json = clip::json;

constexpr const char* kProgram = "clip-train";

constexpr const char* kUsage =
    "usage: clip-train --model NAME --train-data SOURCES --batch-size B (--steps N | --epochs E)\n"
    "                  --output DIR [options]\n"
    "       clip-train --resume CHECKPOINT|latest --output DIR [options]\n"
    "\n"
    "Pretrains a CLIP model contrastively (the paper's symmetric cross-entropy over each batch's\n"
    "image-text pairs, learned temperature, AdamW, linear warmup then cosine decay) on image-text\n"
    "pairs, on the CPU. Starts from random weights (OpenAI's initialisation) or from --init.\n"
    "\n"
    "Writes into DIR:\n"
    "  checkpoint-<step>.safetensors  model, AdamW state, step and data position (atomically; the\n"
    "                                 newest --keep-checkpoints are kept)\n"
    "  metrics.jsonl                  one JSON object per step (loss, lr, temperature, gradient\n"
    "                                 norm, samples/s) and per zero-shot evaluation (top-1, top-5)\n"
    "  curves.svg                     the loss and zero-shot accuracy curves (opens in a browser)\n"
    "  weights.safetensors            the final weights under OpenAI's names, for clip-embed and\n"
    "                                 clip-zeroshot\n"
    "\n"
    "Ctrl-C (or SIGTERM; under mpirun, SIGUSR1 to mpirun) writes a checkpoint at the end of the\n"
    "current step and exits with status 130; --resume latest continues the run exactly (the same\n"
    "batches, the same losses). A loss or gradient that is NaN or infinite stops the run (status 1)\n"
    "and keeps the last checkpoint.\n"
    "\n"
    "model and data:\n"
    "  --model NAME            the variant: an official one in OpenAI's or open_clip's spelling\n"
    "                          (ViT-B/32, ViT-B-32, RN50) or one defined with the examples\n"
    "                          (fmnist-vit); the list is in the error for an unknown name\n"
    "  --train-data SOURCES    WebDataset shards (a .tar, or a brace list such as\n"
    "                          'data/{00000..00099}.tar'; KEY.jpg/png/... with KEY.txt) or a .csv/.tsv\n"
    "                          file of image paths and captions; repeat it, or join with '::', for\n"
    "                          several sources\n"
    "  --csv-img-key NAME      the CSV's image-path column (default filepath)\n"
    "  --csv-caption-key NAME  the CSV's caption column (default title)\n"
    "  --csv-separator C       the CSV's separator (default: tab for .tsv, comma for .csv)\n"
    "  --init FILE             start from these weights (OpenAI's, open_clip's or Hugging Face's names)\n"
    "  --vocab FILE            the BPE vocabulary (default: found as clip-tokenize finds it)\n"
    "\n"
    "schedule and optimizer:\n"
    "  --batch-size B          image-text pairs per step (the contrastive batch)\n"
    "  --micro-batch M         pairs per forward/backward (default B): gradient accumulation that\n"
    "                          keeps the loss of the whole batch, in the memory of M pairs\n"
    "  --steps N               optimizer steps in all\n"
    "  --epochs E              or passes over the data (a decimal is fine); the samples are counted first\n"
    "  --lr X                  peak learning rate (default 5e-4)\n"
    "  --wd X                  AdamW weight decay (default 0.2; none for gains, biases, logit_scale)\n"
    "  --warmup N              linear warmup steps, then cosine decay to 0 (default 0)\n"
    "  --beta1 X, --beta2 X    AdamW's betas (default 0.9, 0.98)\n"
    "  --eps X                 AdamW's epsilon (default 1e-6)\n"
    "  --grad-clip X           clip the global gradient norm to X (default 0: off)\n"
    "  --seed S                initial weights, data order and augmentation (default 0)\n"
    "  --no-augment            no random crops: every image resized and centre-cropped\n"
    "  --min-crop-scale X      the random square crop's smallest side, as a fraction of the image's\n"
    "                          shorter side (default 0.8)\n"
    "  --max-shift N           then shift the image by up to N pixels each way (default 0)\n"
    "  --shuffle-buffer N      samples shuffled together (default 1000)\n"
    "  --device DEV            cpu (default) or cuda (the first GPU; zero-shot evaluation and\n"
    "                          checkpoints still go through the host copy of the weights)\n"
    "  --precision P           bf16 products, fp32 master weights (the default with --device\n"
    "                          cuda; AMX tiles on CPUs that have them) or fp32 (the CPU default)\n"
    "  --recompute             activation recomputation: keep only each block's input, re-run the\n"
    "                          block in backward (less memory, ~1/3 more compute)\n"
    "  --workers N             data-loading threads (default 2)\n"
    "\n"
    "many processes (mpirun -np N clip-train ..., or srun): each step's batch is split across the\n"
    "processes and the step equals the one-process step (the same pairs, losses and weights, to\n"
    "rounding), so a run does not depend on the number of processes and resumes with any number.\n"
    "Rank 0 alone prints and writes files.\n"
    "  --sync-bn               a ResNet's BatchNorm statistics over the whole batch (default: each\n"
    "                          process's own, as PyTorch DDP)\n"
    "  --zero1                 shard AdamW's moments across the processes (ZeRO-1), and on a GPU\n"
    "                          in bf16 the fp32 master weights too: less memory per process, the\n"
    "                          same steps\n"
    "\n"
    "output, checkpoints and evaluation:\n"
    "  --output DIR            where everything is written (created if missing)\n"
    "  --resume CKPT           continue from a checkpoint file, or 'latest' in DIR; options not given\n"
    "                          are the checkpoint's, and those given must agree with it\n"
    "  --checkpoint-every N    a checkpoint every N steps (default 1000; 0: only at the end)\n"
    "  --keep-checkpoints K    keep the newest K checkpoints (default 2; 0: all)\n"
    "  --stop-at N             stop after step N with a checkpoint, as if interrupted, for runs in\n"
    "                          slices (the schedule still spans --steps)\n"
    "  --zeroshot-data SOURCE  a labeled set for zero-shot top-1/top-5: a folder of class folders\n"
    "                          of images (as clip-zeroshot --dataset), or WebDataset shards whose\n"
    "                          samples carry KEY.cls labels (a folder of .tar files, a .tar or a\n"
    "                          brace list)\n"
    "  --zeroshot-classes FILE class names, one per line (label order for shards, folder order for\n"
    "                          folders; default for folders: the folder names)\n"
    "  --zeroshot-templates FILE  prompt templates with {} for the class (default: the paper's 80)\n"
    "  --zeroshot-every N      evaluate every N steps (default 0: only at the end)\n"
    "  --zeroshot-batch N      images encoded at once (default 256)\n"
    "  --log-every N           with output to a log, a progress line every N steps (default: 20\n"
    "                          lines per run); on a terminal the line is redrawn in place\n"
    "  --quiet                 no progress lines\n"
    "  --help                  show this help\n"
    "\n"
    "exit status: 0 success, 1 bad input or a NaN/Inf loss, 2 bad arguments, 130 interrupted\n";

// ---------------------------------------------------------------------------------------------
// Arguments. The options that decide a run's trajectory (RunOptions) are optional here: a
// resumed run takes those not given from its checkpoint.

struct Arguments {
  std::optional<std::string> model, csv_img_key, csv_caption_key, csv_separator;
  std::vector<std::string> train_data;
  std::optional<int64_t> batch, steps, warmup, shuffle_buffer, max_shift;
  std::optional<double> epochs;
  std::optional<float> lr, wd, beta1, beta2, eps, grad_clip, min_crop_scale;
  std::optional<uint64_t> seed;
  std::optional<bool> augment;
  std::string output, resume, init, zeroshot_data, zeroshot_classes, zeroshot_templates;
  std::optional<std::string> vocab;
  int64_t micro_batch = 0, checkpoint_every = 1000, keep_checkpoints = 2, stop_at = 0, zeroshot_every = 0,
          zeroshot_batch = 256, log_every = 0;
  int workers = 2;
  bool recompute = false, quiet = false, help = false, sync_bn = false, zero1 = false;
  cli::DeviceChoice device;
};

template <class T>
T parse_number(std::string_view flag, std::string_view text, T min, T max, const char* what) {
  T value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || !(value >= min && value <= max)) {
    std::string range;
    if constexpr (std::is_floating_point_v<T>) {
      char s[96];
      std::snprintf(s, sizeof s, " from %g to %g", double(min), double(max));
      range = s;
    } else {
      range = " from " + std::to_string(min) + " to " + std::to_string(max);
    }
    throw cli::UsageError{std::string(flag) + " needs " + what + range + ", not '" + std::string(text) + "'"};
  }
  return value;
}

int64_t count_arg(std::string_view flag, std::string_view text, int64_t min) {
  return parse_number<int64_t>(flag, text, min, int64_t{1} << 50, "a whole number");
}
float real_arg(std::string_view flag, std::string_view text, float min, float max) {
  return parse_number<float>(flag, text, min, max, "a number");
}

// open_clip joins several sources with "::".
void add_sources(std::vector<std::string>& sources, std::string_view text) {
  for (size_t start = 0;;) {
    const size_t end = text.find("::", start);
    const std::string_view part = text.substr(start, end == std::string_view::npos ? end : end - start);
    if (part.empty()) throw cli::UsageError{"--train-data has an empty source"};
    sources.emplace_back(part);
    if (end == std::string_view::npos) return;
    start = end + 2;
  }
}

Arguments parse(int argc, char** argv) {
  Arguments a;
  constexpr float kHuge = std::numeric_limits<float>::max();
  for (cli::ArgReader r(argc, argv); r.next();) {
    if (r.positional()) throw cli::UsageError{"unexpected argument '" + std::string(r.arg()) + "'"};
    else if (r.flag("--help") || r.flag("-h")) a.help = true;
    else if (r.flag("--quiet")) a.quiet = true;
    else if (r.flag("--recompute")) a.recompute = true;
    else if (r.flag("--sync-bn")) a.sync_bn = true;
    else if (r.flag("--zero1")) a.zero1 = true;
    else if (auto v = r.option("--device")) a.device.device = cli::parse_device_option(*v);
    else if (auto v = r.option("--precision")) a.device.requested_precision = cli::parse_precision_option(*v);
    else if (r.flag("--no-augment")) a.augment = false;
    else if (auto v = r.option("--model")) a.model = std::string(*v);
    else if (auto v = r.path_option("--train-data")) add_sources(a.train_data, *v);
    else if (auto v = r.option("--csv-img-key")) a.csv_img_key = std::string(*v);
    else if (auto v = r.option("--csv-caption-key")) a.csv_caption_key = std::string(*v);
    else if (auto v = r.option("--csv-separator")) {
      const std::string s = *v == "\\t" || *v == "tab" ? std::string("\t") : std::string(*v);
      if (s.size() != 1) throw cli::UsageError{"--csv-separator needs one character, not '" + std::string(*v) + "'"};
      a.csv_separator = s;
    }
    else if (auto v = r.option("--batch-size")) a.batch = count_arg("--batch-size", *v, 1);
    else if (auto v = r.option("--micro-batch")) a.micro_batch = count_arg("--micro-batch", *v, 1);
    else if (auto v = r.option("--steps")) a.steps = count_arg("--steps", *v, 1);
    else if (auto v = r.option("--epochs")) a.epochs = parse_number<double>("--epochs", *v, 1e-9, 1e9, "a positive number");
    else if (auto v = r.option("--lr")) a.lr = real_arg("--lr", *v, 0, kHuge);
    else if (auto v = r.option("--wd")) a.wd = real_arg("--wd", *v, 0, kHuge);
    else if (auto v = r.option("--warmup")) a.warmup = count_arg("--warmup", *v, 0);
    else if (auto v = r.option("--beta1")) a.beta1 = real_arg("--beta1", *v, 0, 0.99999994f);
    else if (auto v = r.option("--beta2")) a.beta2 = real_arg("--beta2", *v, 0, 0.99999994f);
    else if (auto v = r.option("--eps")) a.eps = real_arg("--eps", *v, 1e-30f, kHuge);
    else if (auto v = r.option("--grad-clip")) a.grad_clip = real_arg("--grad-clip", *v, 0, kHuge);
    else if (auto v = r.option("--seed")) a.seed = parse_number<uint64_t>("--seed", *v, 0, ~uint64_t{0}, "a whole number");
    else if (auto v = r.option("--min-crop-scale")) a.min_crop_scale = real_arg("--min-crop-scale", *v, 1e-3f, 1);
    else if (auto v = r.option("--shuffle-buffer")) a.shuffle_buffer = count_arg("--shuffle-buffer", *v, 1);
    else if (auto v = r.option("--max-shift")) a.max_shift = count_arg("--max-shift", *v, 0);
    else if (auto v = r.option("--workers")) a.workers = cli::parse_int("--workers", *v, 1, 256, "threads");
    else if (auto v = r.path_option("--output")) a.output = *v;
    else if (auto v = r.path_option("--resume")) a.resume = *v;
    else if (auto v = r.path_option("--init")) a.init = *v;
    else if (auto v = r.path_option("--vocab")) a.vocab = *v;
    else if (auto v = r.option("--checkpoint-every")) a.checkpoint_every = count_arg("--checkpoint-every", *v, 0);
    else if (auto v = r.option("--keep-checkpoints")) a.keep_checkpoints = count_arg("--keep-checkpoints", *v, 0);
    else if (auto v = r.option("--stop-at")) a.stop_at = count_arg("--stop-at", *v, 1);
    else if (auto v = r.path_option("--zeroshot-data")) a.zeroshot_data = *v;
    else if (auto v = r.path_option("--zeroshot-classes")) a.zeroshot_classes = *v;
    else if (auto v = r.path_option("--zeroshot-templates")) a.zeroshot_templates = *v;
    else if (auto v = r.option("--zeroshot-every")) a.zeroshot_every = count_arg("--zeroshot-every", *v, 0);
    else if (auto v = r.option("--zeroshot-batch")) a.zeroshot_batch = count_arg("--zeroshot-batch", *v, 1);
    else if (auto v = r.option("--log-every")) a.log_every = count_arg("--log-every", *v, 1);
    else r.unknown();
  }
  if (a.help) return a;
  if (a.output.empty()) throw cli::UsageError{"--output DIR is required"};
  if (a.resume.empty()) {
    if (!a.model) throw cli::UsageError{"--model NAME is required (or --resume)"};
    if (a.train_data.empty()) throw cli::UsageError{"--train-data SOURCES is required (or --resume)"};
    if (!a.batch) throw cli::UsageError{"--batch-size B is required (or --resume)"};
    if (!a.steps && !a.epochs) throw cli::UsageError{"--steps N or --epochs E is required (or --resume)"};
  } else if (!a.init.empty()) {
    throw cli::UsageError{"--init starts a new run; a resumed run takes its weights from the checkpoint"};
  }
  if (a.steps && a.epochs) throw cli::UsageError{"give --steps or --epochs, not both"};
  if (a.batch && a.micro_batch > *a.batch)
    throw cli::UsageError{"--micro-batch " + std::to_string(a.micro_batch) + " is larger than --batch-size " +
                          std::to_string(*a.batch)};
  if (a.zeroshot_data.empty() && (!a.zeroshot_classes.empty() || !a.zeroshot_templates.empty() || a.zeroshot_every))
    throw cli::UsageError{"--zeroshot-classes, --zeroshot-templates and --zeroshot-every go with --zeroshot-data"};
  if (a.model) cli::check_model_name(*a.model);
  return a;
}

// ---------------------------------------------------------------------------------------------
// The options a run's trajectory depends on, recorded in every checkpoint.

struct RunOptions {
  std::string model;
  std::vector<std::string> train_data;
  std::string csv_img_key = "filepath", csv_caption_key = "title", csv_separator;  // "": by extension
  int64_t batch = 0, steps = 0, warmup = 0, shuffle_buffer = 1000, max_shift = 0;
  double epochs = 0;  // 0: --steps was given
  float lr = 5e-4f, wd = 0.2f, beta1 = 0.9f, beta2 = 0.98f, eps = 1e-6f, grad_clip = 0, min_crop_scale = 0.8f;
  uint64_t seed = 0;
  bool augment = true;

  json::Object to_json() const {
    json::Object o;
    o["model"] = json::Value{model};
    json::Array sources;
    for (const std::string& s : train_data) sources.push_back(json::Value{s});
    o["train_data"] = json::Value{std::move(sources)};
    o["csv_img_key"] = json::Value{csv_img_key};
    o["csv_caption_key"] = json::Value{csv_caption_key};
    o["csv_separator"] = json::Value{csv_separator};
    o["batch_size"] = json::Value{double(batch)};
    o["steps"] = json::Value{double(steps)};
    o["epochs"] = json::Value{epochs};
    o["warmup"] = json::Value{double(warmup)};
    o["shuffle_buffer"] = json::Value{double(shuffle_buffer)};
    o["max_shift"] = json::Value{double(max_shift)};
    o["lr"] = json::Value{double(lr)};
    o["wd"] = json::Value{double(wd)};
    o["beta1"] = json::Value{double(beta1)};
    o["beta2"] = json::Value{double(beta2)};
    o["eps"] = json::Value{double(eps)};
    o["grad_clip"] = json::Value{double(grad_clip)};
    o["min_crop_scale"] = json::Value{double(min_crop_scale)};
    o["seed"] = json::Value{std::to_string(seed)};
    o["augment"] = json::Value{augment};
    return o;
  }
};

// A resumed run's options: the checkpoint's, each checked against the flag when one was given.
// The data sources may differ (data moved to another folder); nothing else may.
class OptionMerger {
 public:
  OptionMerger(const json::Object* saved, std::string checkpoint) : saved_(saved), checkpoint_(std::move(checkpoint)) {}

  template <class T>
  void merge(const char* key, const char* flag, const std::optional<T>& given, T& out) {
    if (!saved_) {
      if (given) out = *given;
      return;
    }
    const auto it = saved_->find(key);
    CLIP_CHECK(it != saved_->end(), "the checkpoint '", checkpoint_, "' does not record the option '", key, "'");
    T stored = read<T>(it->second);
    if (given && !(*given == stored))
      conflicts_ += std::string(conflicts_.empty() ? "" : "; ") + flag + " " + text(*given) + " differs from the checkpoint's " +
                    text(stored);
    out = stored;
  }

  const std::string& conflicts() const { return conflicts_; }

 private:
  const json::Object* saved_;
  std::string checkpoint_, conflicts_;

  template <class T>
  static T read(const json::Value& v) {
    if constexpr (std::is_same_v<T, std::string>) return v.as_string();
    else if constexpr (std::is_same_v<T, bool>) return v.as_bool();
    else if constexpr (std::is_same_v<T, uint64_t>) return std::stoull(v.as_string());
    else return static_cast<T>(v.as_number());
  }
  template <class T>
  static std::string text(const T& v) {
    if constexpr (std::is_same_v<T, std::string>) return "'" + v + "'";
    else if constexpr (std::is_same_v<T, bool>) return v ? "on" : "off";
    else if constexpr (std::is_floating_point_v<T>) return json::number(v);
    else return std::to_string(v);
  }
};

RunOptions merge_options(const Arguments& a, const clip::CheckpointInfo* checkpoint, const std::string& path) {
  RunOptions o;
  OptionMerger m(checkpoint ? &checkpoint->options : nullptr, path);
  m.merge("model", "--model", a.model, o.model);
  m.merge("csv_img_key", "--csv-img-key", a.csv_img_key, o.csv_img_key);
  m.merge("csv_caption_key", "--csv-caption-key", a.csv_caption_key, o.csv_caption_key);
  m.merge("csv_separator", "--csv-separator", a.csv_separator, o.csv_separator);
  m.merge("batch_size", "--batch-size", a.batch, o.batch);
  m.merge("warmup", "--warmup", a.warmup, o.warmup);
  m.merge("shuffle_buffer", "--shuffle-buffer", a.shuffle_buffer, o.shuffle_buffer);
  m.merge("max_shift", "--max-shift", a.max_shift, o.max_shift);
  m.merge("lr", "--lr", a.lr, o.lr);
  m.merge("wd", "--wd", a.wd, o.wd);
  m.merge("beta1", "--beta1", a.beta1, o.beta1);
  m.merge("beta2", "--beta2", a.beta2, o.beta2);
  m.merge("eps", "--eps", a.eps, o.eps);
  m.merge("grad_clip", "--grad-clip", a.grad_clip, o.grad_clip);
  m.merge("min_crop_scale", "--min-crop-scale", a.min_crop_scale, o.min_crop_scale);
  m.merge("seed", "--seed", a.seed, o.seed);
  m.merge("augment", "--no-augment", a.augment, o.augment);
  if (checkpoint) {
    // The total is what the schedule spans: --steps or --epochs must give the same number.
    const json::Object& saved = checkpoint->options;
    o.steps = static_cast<int64_t>(saved.at("steps").as_number());
    o.epochs = saved.at("epochs").as_number();
    m.merge("steps", "--steps", a.steps, o.steps);
    m.merge("epochs", "--epochs", a.epochs, o.epochs);
    o.train_data.clear();
    for (const json::Value& s : saved.at("train_data").as_array()) o.train_data.push_back(s.as_string());
    if (!a.train_data.empty()) o.train_data = a.train_data;  // moved data is fine
  } else {
    o.train_data = a.train_data;
    if (a.steps) o.steps = *a.steps;
    if (a.epochs) o.epochs = *a.epochs;
  }
  if (!m.conflicts().empty())
    throw cli::UsageError{"a resumed run keeps the options it started with: " + m.conflicts()};
  return o;
}

// ---------------------------------------------------------------------------------------------
// Signals: Ctrl-C and SIGTERM ask for a checkpoint at the next step boundary. The handler is
// reset after the first signal, so a second Ctrl-C stops at once (the last checkpoint, written
// atomically, stays valid).

volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signal) { g_stop_signal = signal; }

void install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART | SA_RESETHAND;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  // mpirun forwards SIGUSR1 to every rank and leaves them running: `kill -USR1 <mpirun>` stops a
  // parallel run cleanly. (On SIGTERM it sends SIGTERM odls_base_sigkill_timeout seconds later,
  // default 1, and SIGKILL as long after: README.)
  sigaction(SIGUSR1, &action, nullptr);
}

// ---------------------------------------------------------------------------------------------
// Small formatting helpers.

std::string bytes_text(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) bytes /= 1024, ++u;
  char s[32];
  std::snprintf(s, sizeof s, u ? "%.1f %s" : "%.0f %s", bytes, units[u]);
  return s;
}

std::string grouped(int64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string duration_text(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  char out[32];
  if (s >= 3600) std::snprintf(out, sizeof out, "%lldh%02lldm", (long long)(s / 3600), (long long)(s / 60 % 60));
  else if (s >= 60) std::snprintf(out, sizeof out, "%lldm%02llds", (long long)(s / 60), (long long)(s % 60));
  else std::snprintf(out, sizeof out, "%llds", (long long)s);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Zero-shot evaluation on a labeled set, with the model being trained.

struct ZeroShotSet {
  std::vector<std::string> classes, templates;
  // A folder of class folders: the images and their labels ...
  std::vector<std::string> images;
  std::vector<int64_t> labels;
  // ... or WebDataset shards with KEY.cls labels.
  std::vector<std::string> shards;
  std::string source;
};

bool has_tar_files(const fs::path& dir, std::vector<std::string>& out) {
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec))
    if (e.is_regular_file(ec) && e.path().extension() == ".tar") out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return !out.empty();
}

ZeroShotSet open_zeroshot_set(const Arguments& a, const char* argv0) {
  ZeroShotSet set;
  set.source = a.zeroshot_data;
  std::error_code ec;
  std::vector<std::string> folders;
  if (fs::is_directory(a.zeroshot_data, ec) && !has_tar_files(a.zeroshot_data, set.shards)) {
    folders = cli::list_folders(a.zeroshot_data);
    CLIP_CHECK(!folders.empty(), "'", a.zeroshot_data, "' holds neither class folders nor .tar shards");
    for (size_t c = 0; c < folders.size(); ++c)
      for (std::string& path : cli::list_images(fs::path(a.zeroshot_data) / folders[c])) {
        set.images.push_back(std::move(path));
        set.labels.push_back(static_cast<int64_t>(c));
      }
    CLIP_CHECK(!set.images.empty(), "the class folders of '", a.zeroshot_data, "' hold no JPEG, PNG, BMP or GIF file");
  } else if (set.shards.empty()) {
    set.shards.push_back(a.zeroshot_data);  // a .tar or a brace list, expanded by the loader
  }
  if (!a.zeroshot_classes.empty()) {
    set.classes = cli::read_lines(a.zeroshot_classes);
    CLIP_CHECK(!set.classes.empty(), "'", a.zeroshot_classes, "' names no class");
    if (!folders.empty())
      CLIP_CHECK(set.classes.size() == folders.size(), "'", a.zeroshot_classes, "' names ", set.classes.size(),
                 " classes but '", a.zeroshot_data, "' has ", folders.size(), " class folders");
  } else {
    CLIP_CHECK(!folders.empty(), "--zeroshot-classes FILE is needed with shards: their .cls labels index its lines");
    set.classes = folders;
  }
  const fs::path templates = a.zeroshot_templates.empty() ? cli::find_data_file("imagenet_templates.txt", argv0)
                                                          : fs::path(a.zeroshot_templates);
  set.templates = cli::read_lines(templates);
  CLIP_CHECK(!set.templates.empty(), "'", templates.string(), "' holds no prompt template");
  return set;
}

// Top-1 and top-5 hits of one batch of image features against the class embeddings.
void tally(const clip::ZeroShotClassifier& classifier, const clip::Tensor& features, const int64_t* labels,
           const std::string* keys, int64_t& top1, int64_t& top5) {
  const clip::Tensor logits = classifier.logits(features);
  const int64_t classes = classifier.classes();
  for (int64_t i = 0; i < logits.shape[0]; ++i) {
    const std::string key = keys ? keys[i] : std::to_string(i);
    CLIP_CHECK(labels[i] >= 0, "the zero-shot sample '", key, "' has no class label (a KEY.cls member)");
    CLIP_CHECK(labels[i] < classes, "the zero-shot sample '", key, "' has label ", labels[i], ", but there are only ",
               classes, " classes");
    const std::vector<clip::ClassScore> best =
        clip::top_k(std::span<const float>(logits.data() + i * classes, classes), 5);
    top1 += best[0].label == labels[i];
    for (const clip::ClassScore& s : best) top5 += s.label == labels[i];
  }
}

template <class Cfg>
clip::ZeroShotMetrics evaluate(const clip::Model<Cfg>& model, const clip::text::BpeTokenizer& tokenizer,
                               const ZeroShotSet& set, const Arguments& args, uint64_t seed) {
  constexpr int R = Cfg::image_resolution;
  const auto start = std::chrono::steady_clock::now();
  const clip::ZeroShotClassifier classifier = clip::ZeroShotClassifier::build(model, tokenizer, set.classes, set.templates);
  int64_t top1 = 0, top5 = 0, images = 0;
  if (!set.images.empty()) {
    cli::encode_image_files(model, std::span<const std::string>(set.images), static_cast<int>(args.zeroshot_batch),
                            [&](int64_t first, const clip::Tensor& features) {
      tally(classifier, features, set.labels.data() + first, set.images.data() + first, top1, top5);
      images += features.shape[0];
    });
  } else {
    clip::data::DataOptions options;
    options.resolution = R;
    options.context_length = Cfg::context_length;
    options.batch = args.zeroshot_batch;
    options.workers = args.workers;
    options.shuffle_buffer = 1;
    options.seed = seed;
    options.augment = false;
    options.loop = false;
    clip::data::DataLoader loader(set.shards, tokenizer, options);
    while (std::optional<clip::data::Batch> batch = loader.next()) {
      clip::Tensor pixels({batch->size, 3, R, R});
      std::copy(batch->images.begin(), batch->images.begin() + pixels.values.size(), pixels.values.begin());
      const std::vector<int64_t> labels(batch->labels.begin(), batch->labels.end());
      tally(classifier, model.encode_image(pixels), labels.data(), batch->keys.data(), top1, top5);
      images += batch->size;
    }
    CLIP_CHECK(images > 0, "'", set.source, "' holds no readable sample to evaluate on");
  }
  clip::ZeroShotMetrics m;
  m.images = images;
  m.top1 = double(top1) / images;
  m.top5 = double(top5) / images;
  m.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return m;
}

// ---------------------------------------------------------------------------------------------
// The run.

clip::data::CsvOptions csv_options(const RunOptions& o) {
  clip::data::CsvOptions csv;
  csv.image_key = o.csv_img_key;
  csv.caption_key = o.csv_caption_key;
  csv.separator = o.csv_separator.empty() ? 0 : o.csv_separator[0];
  return csv;
}

// Records in one epoch of the training data, for --epochs: the record stream read without
// bodies (tar headers only; no image is decoded). Records that later fail to decode are
// counted too: the data position counts them, so an epoch is exactly this many.
int64_t count_training_records(const RunOptions& o) {
  const std::vector<clip::data::DataSource> sources = clip::data::resolve_sources(o.train_data, csv_options(o));
  clip::data::StreamIssues issues;
  clip::data::RecordStream stream(sources, o.seed, 0, issues);
  int64_t n = 0;
  while (stream.next(false)) ++n;
  return n;
}

// The data-parallel plan, printed at start: processes, the batch per rank, and what a step moves.
template <class Cfg>
void print_parallel_plan(clip::dist::Communicator& comm, int64_t batch) {
  const int world = comm.size();
  const clip::dist::Slice first = clip::dist::batch_slice(batch, world, 0);
  const clip::dist::Slice last = clip::dist::batch_slice(batch, world, world - 1);
  const clip::dist::StepTraffic t = clip::dist::step_traffic(clip::dims<Cfg>::parameters, Cfg::embed_dim, batch, world);
  const clip::dist::LogitShape logits = clip::dist::logits_per_rank(batch, world, 0);  // rank 0's are the largest
  std::printf("%s: %s; %lld pairs per step, %lld%s per rank; logits per rank [%lld, %lld] (CPU and GPU alike)\n",
              kProgram, comm.describe().c_str(), static_cast<long long>(batch), static_cast<long long>(first.rows),
              first.rows == last.rows ? "" : (" or " + std::to_string(last.rows)).c_str(),
              static_cast<long long>(logits.rows), static_cast<long long>(logits.columns));
  std::printf("%s: per step and rank: features %s gathered, feature gradients %s, parameter gradients %s "
              "(ZeRO-1 would move the same, or less on a GPU in bf16, whose weights it gathers in bf16, and hold AdamW "
              "moments of %s instead of %s)\n",
              kProgram, bytes_text(t.feature_bytes).c_str(), bytes_text(t.feature_grad_bytes).c_str(),
              bytes_text(t.gradient_bytes).c_str(), bytes_text(t.sharded_moment_bytes).c_str(),
              bytes_text(t.moment_bytes).c_str());
}

template <class Cfg, clip::Device D>
int train(const Arguments& args, const RunOptions& run, const std::optional<clip::CheckpointInfo>& resumed,
          const fs::path& resume_path, const char* argv0, clip::dist::Communicator& comm, int gpu) {
  using Trainer = clip::Trainer<Cfg, D>;
  constexpr int R = Cfg::image_resolution, T = Cfg::context_length;
  const fs::path out = args.output;
  const bool lead = comm.rank() == 0;  // rank 0 alone prints and writes files
  const bool tty = isatty(2) && lead;
  const bool quiet = args.quiet || !lead;
  const clip::dist::Slice slice = clip::dist::batch_slice(run.batch, comm.size(), comm.rank());

  // What the run costs, before anything large is allocated.
  const int64_t micro = args.micro_batch ? args.micro_batch : run.batch;
  const int64_t params = clip::dims<Cfg>::parameters;
  const double state_bytes = 4.0 * sizeof(float) * params;  // weights, gradients, two AdamW moments
  const int64_t rank_micro = std::min(micro, slice.rows);
  std::printf("%s: %s parameters; weights, gradients and AdamW moments %s; activations of a step (%lld pairs%s) %s\n",
              Cfg::name, grouped(params).c_str(), bytes_text(state_bytes).c_str(), static_cast<long long>(rank_micro),
              args.recompute ? ", recomputed" : "",
              bytes_text(double(Trainer::activation_bytes(rank_micro, args.recompute))).c_str());
  if (comm.size() > 1) print_parallel_plan<Cfg>(comm, run.batch);
  std::fflush(stdout);

  const clip::text::BpeTokenizer tokenizer(args.vocab ? fs::path(*args.vocab)
                                                      : clip::text::find_bpe_vocabulary(cli::data_folders(argv0)));
  std::optional<ZeroShotSet> zeroshot;
  if (!args.zeroshot_data.empty()) zeroshot = open_zeroshot_set(args, argv0);

  // The schedule's length.
  int64_t total = run.steps;
  if (run.epochs > 0 && !resumed) {
    const int64_t samples = count_training_records(run);
    CLIP_CHECK(samples >= run.batch, "the training data has ", samples, " samples, fewer than one batch of ", run.batch);
    total = std::max<int64_t>(1, static_cast<int64_t>(std::floor(run.epochs * samples / run.batch)));
    std::printf("%s: %lld samples, %g epochs of %lld pairs: %lld steps\n", kProgram, static_cast<long long>(samples),
                run.epochs, static_cast<long long>(run.batch), static_cast<long long>(total));
  }
  CLIP_CHECK(total > run.warmup || run.warmup == 0, "--warmup ", run.warmup, " is not shorter than the run (", total,
             " steps)");

  // The model, the trainer and the optimizer state.
  clip::Model<Cfg> model;
  clip::TrainOptions options;
  options.batch = run.batch;
  options.micro_batch = micro;
  options.adam = {run.lr, run.beta1, run.beta2, run.eps, run.wd};
  options.warmup_steps = run.warmup;
  options.total_steps = total;
  options.grad_clip_norm = run.grad_clip;
  options.recompute = args.recompute;
  if (!args.init.empty()) model.load(args.init);
  else clip::init_params<Cfg>(model.params(), run.seed);
  options.sync_batchnorm = args.sync_bn;
  options.zero1 = args.zero1;
  Trainer trainer = [&] {
    if constexpr (D == clip::Device::cuda) {
      // One process per GPU, the node-local rank's GPU; the collectives over NCCL.
      // --zero1 at one process still runs the sharded optimizer (through NCCL, at world size 1).
      if (comm.size() == 1 && !args.zero1) return Trainer(model.params(), options, args.device.precision());
      const clip::dist::LogitShape logits = clip::dist::logits_per_rank(run.batch, comm.size(), comm.rank());
      std::printf("%s: rank %d on GPU %d; collectives over NCCL; the GPU loss computes this rank's logits [%lld, "
                  "%lld]\n", kProgram, comm.rank(), gpu, static_cast<long long>(logits.rows),
                  static_cast<long long>(logits.columns));
      return Trainer(model.params(), options, args.device.precision(), gpu, &comm);
    } else {
      return Trainer(model.params(), options, &comm, args.device.precision());
    }
  }();
  // On a GPU the weights and the optimizer state live on the device: checkpoints, evaluation and
  // the final weights read the host copy, brought up to date first (the weights alone; a
  // collective under --zero1 in bf16, whose fp32 master weights are sharded: every rank calls it).
  auto to_host = [&] {
    if constexpr (D == clip::Device::cuda) trainer.download(model.params());
  };
  // The whole optimizer state (with --zero1 gathered from the ranks: every rank calls it; on a
  // GPU the weights come down with it).
  auto optimizer_state = [&]() -> auto& {
    if constexpr (D == clip::Device::cuda) {
      trainer.download();
      return trainer.optimizer();
    } else {
      return trainer.optimizer_state();
    }
  };
  auto release_optimizer_state = [&] {
    if constexpr (D == clip::Device::cpu) trainer.release_optimizer_state();
  };
  if constexpr (D == clip::Device::cpu) {
    if (comm.size() > 1 || args.zero1)
      std::printf("%s: AdamW state per rank %s%s\n", kProgram, bytes_text(4.0 * trainer.optimizer_floats()).c_str(),
                  args.zero1 ? (" (ZeRO-1: moments and summed gradients sharded over " + std::to_string(comm.size()) +
                                " ranks; unsharded " + bytes_text(8.0 * params) + ")").c_str()
                             : "");
  } else {
    const auto b = trainer.state_bytes();
    const auto u = trainer.unsharded_state_bytes();
    // The fp32 masters: sharded under --zero1 in bf16 (the rank's shard, plus BatchNorm buffers
    // and logit_scale whole); whole in fp32, where they are the weights the kernels read.
    const bool masters_sharded = b.master_shard > 0;
    const std::string master =
        masters_sharded ? "fp32 master shard " + bytes_text(double(b.master_shard)) + " + buffers and logit_scale " +
                              bytes_text(double(b.master))
                        : "fp32 master " + bytes_text(double(b.master));
    const std::string zero1_note =
        !args.zero1 ? ""
        : masters_sharded
            ? " (ZeRO-1: fp32 master weights, moments and summed gradients sharded over " + std::to_string(comm.size()) +
                  " ranks, the bf16 copy all-gathered; unsharded " + bytes_text(double(u.total())) + ")"
            : " (ZeRO-1: moments and summed gradients sharded over " + std::to_string(comm.size()) +
                  " ranks; in fp32 the master weights are the weights the kernels read, whole on every rank; "
                  "unsharded " + bytes_text(double(u.total())) + ")";
    std::printf("%s: GPU memory per rank for weights, gradients and AdamW state %s (%s, %sgradients %s, "
                "moments %s%s)%s\n", kProgram, bytes_text(double(b.total())).c_str(), master.c_str(),
                b.compute ? ("bf16 copy " + bytes_text(double(b.compute)) + ", ").c_str() : "",
                bytes_text(double(b.gradients)).c_str(), bytes_text(double(b.moments)).c_str(),
                args.zero1 ? (", summed-gradient shard " + bytes_text(double(b.shard_gradients)) + ", staging " +
                              bytes_text(double(b.staging))).c_str() : "",
                zero1_note.c_str());
  }

  clip::CheckpointInfo info;
  info.variant = Cfg::name;
  info.seed = run.seed;
  RunOptions saved_run = run;
  saved_run.steps = total;
  info.options = saved_run.to_json();
  if (resumed) {
    const clip::CheckpointInfo loaded = clip::load_checkpoint(resume_path, model.params(), optimizer_state(), Cfg::name);
    if constexpr (D == clip::Device::cpu) trainer.scatter_optimizer_state();
    release_optimizer_state();
    info.step = loaded.step;
    info.epoch = loaded.epoch;
    info.samples = loaded.samples;
    info.elapsed_s = loaded.elapsed_s;
    if constexpr (D == clip::Device::cuda) trainer.upload();
    std::printf("%s: resumed from '%s' at step %lld of %lld\n", kProgram, resume_path.c_str(),
                static_cast<long long>(info.step), static_cast<long long>(total));
  }

  if (lead) fs::create_directories(out);
  std::optional<clip::io::FolderLock> output_lock;  // a second run on the same --output is refused
  if (lead) output_lock.emplace(out);
  std::optional<clip::MetricsLog> metrics;
  if (lead) metrics.emplace(out / "metrics.jsonl", resumed ? std::optional<int64_t>(info.step) : std::nullopt);
  const std::string chart_title = std::string(Cfg::name) + " contrastive pretraining";
  auto write_chart = [&] {
    if (lead) cli::write_file_atomically(out / "curves.svg", metrics->curves().svg(chart_title, total));
  };
  fs::path last_checkpoint = resumed ? resume_path : fs::path();
  auto checkpoint = [&] {
    auto& state = optimizer_state();  // the weights came down with it
    if (!lead) return release_optimizer_state();
    info.optimizer_steps = state.steps();
    const fs::path path = clip::checkpoint_path(out, info.step);
    clip::save_checkpoint(path, model.params(), state, info);
    release_optimizer_state();
    clip::prune_checkpoints(out, static_cast<size_t>(args.keep_checkpoints));
    last_checkpoint = path;
  };
  auto run_zeroshot = [&] {  // on rank 0; the others wait at the next collective
    to_host();
    if (!lead) return;
    clip::ZeroShotMetrics m = evaluate(model, tokenizer, *zeroshot, args, run.seed);
    m.step = info.step;
    m.epoch = info.epoch;
    m.elapsed_s = info.elapsed_s;
    metrics->write(m);
    write_chart();
    std::printf("%s: step %lld: zero-shot top-1 %.2f%%, top-5 %.2f%% on %lld images (%.1f s)\n", kProgram,
                  static_cast<long long>(info.step), 100 * m.top1, 100 * m.top5, static_cast<long long>(m.images),
                  m.seconds);
    std::fflush(stdout);
  };

  clip::data::DataOptions data;
  data.resolution = R;
  data.context_length = T;
  data.batch = run.batch;
  data.workers = args.workers;
  data.shuffle_buffer = run.shuffle_buffer;
  data.seed = run.seed;
  data.augment = run.augment;
  data.min_crop_scale = run.min_crop_scale;
  data.loop = true;
  data.max_shift = run.max_shift;
  data.csv = csv_options(run);
  // Each rank prepares only its rows of every global batch (the ranks tell each other the images
  // they could not decode, so the rows after one shift alike on every rank).
  clip::data::BatchShare share{comm.size(), comm.rank(), nullptr};
  if (comm.size() > 1)
    share.exchange = [&comm](const std::string& bytes) { return clip::dist::all_gather_bytes(comm, bytes); };
  clip::data::DataLoader loader(run.train_data, tokenizer, data, clip::data::DataPosition{info.epoch, info.samples},
                                share);

  install_stop_handlers();
  const int64_t stop = args.stop_at ? std::min(args.stop_at, total) : total;
  const int64_t log_every = args.log_every ? args.log_every : std::max<int64_t>(1, (total + 19) / 20);
  const int64_t first_step = info.step;
  double train_seconds = 0;  // this process's time in steps (not evaluations), for the ETA
  auto last_draw = std::chrono::steady_clock::time_point{};

  // A signal stops every rank at the same step: the ranks sum their flags before each step.
  auto stop_requested = [&] {
    double flag = g_stop_signal ? 1.0 : 0.0;
    comm.all_reduce_sum(&flag, 1);
    if (flag > 0 && !g_stop_signal) g_stop_signal = SIGTERM;
    return flag > 0;
  };
  while (info.step < stop && !stop_requested()) {
    const auto t0 = std::chrono::steady_clock::now();
    std::optional<clip::data::Batch> batch = loader.next();
    CLIP_CHECK(batch && batch->global_size == run.batch, "the training data ran out of samples");
    CLIP_CHECK(batch->first == slice.first && batch->size == slice.rows, "internal error: rank ", comm.rank(),
               " got rows [", batch->first, ", +", batch->size, ") of the batch instead of its slice");
    clip::StepResult r;
    try {
      // The loader handed this rank its slice of the global batch alone (the rows the one-process
      // loader puts there, damaged records anywhere included).
      r = trainer.step(batch->images.data(), batch->tokens.data());
    } catch (const clip::Error& e) {
      if (!lead) return 1;  // every rank fails alike (the values checked are sums); rank 0 says why
      if (tty && !quiet) std::fputc('\n', stderr);
      write_chart();
      std::fprintf(stderr, "%s: training stopped at step %lld of %lld: the loss or the gradients are not finite "
                   "(NaN or Inf); try a lower --lr or --grad-clip\n%s: %s\n",
                   kProgram, static_cast<long long>(info.step + 1), static_cast<long long>(total), kProgram, e.what());
      if (!last_checkpoint.empty())
        std::fprintf(stderr, "%s: the last good checkpoint is '%s' (step %lld)\n", kProgram, last_checkpoint.c_str(),
                     static_cast<long long>(clip::read_checkpoint_info(last_checkpoint).step));
      else
        std::fprintf(stderr, "%s: no checkpoint was written before this step\n", kProgram);
      return 1;
    }
    const auto t1 = std::chrono::steady_clock::now();
    const double seconds = std::chrono::duration<double>(t1 - t0).count();
    train_seconds += seconds;
    ++info.step;
    const clip::data::DataPosition position = loader.position();
    info.elapsed_s += seconds;

    clip::StepMetrics m;
    m.step = info.step;
    m.epoch = info.epoch;  // the epoch the batch started in
    m.loss = r.loss;
    m.lr = r.lr;
    m.temperature = r.temperature;
    m.grad_norm = r.grad_norm;
    m.samples_per_s = run.batch / seconds;
    m.elapsed_s = info.elapsed_s;
    m.world_size = comm.size();
    if (lead) metrics->write(m);
    info.epoch = position.epoch;
    info.samples = position.samples;

    // Progress: redrawn on a terminal, a line every log_every steps in a log.
    const int64_t done_here = info.step - first_step;
    const double eta = (total - info.step) * (train_seconds / done_here);
    if (!quiet && (tty ? (t1 - last_draw > std::chrono::milliseconds(100) || info.step == stop)
                            : (info.step % log_every == 0 || info.step == stop))) {
      last_draw = t1;
      std::fprintf(stderr, "%s%s: step %lld/%lld  loss %.4f  temp %.2f  lr %.3g  %.1f samples/s  ETA %s%s", tty ? "\r" : "",
                   kProgram, static_cast<long long>(info.step), static_cast<long long>(total), r.loss, r.temperature,
                   r.lr, done_here * run.batch / train_seconds, duration_text(eta).c_str(), tty ? "\x1b[K" : "\n");
      std::fflush(stderr);
    }
    if (!tty && !quiet && info.step % log_every == 0) write_chart();

    const bool at_end = info.step == total;
    if (zeroshot && args.zeroshot_every && info.step % args.zeroshot_every == 0 && !at_end) {
      if (tty && !quiet) std::fputc('\n', stderr);
      run_zeroshot();
    }
    if (args.checkpoint_every && info.step % args.checkpoint_every == 0 && info.step != stop) checkpoint();
  }
  if (tty && !quiet) std::fputc('\n', stderr);

  // Damaged data is skipped, never fatal; say how much, and why, once.
  const clip::data::DataStats stats = loader.stats();
  if (lead && (stats.skipped || stats.truncated_shards || stats.unreadable_shards)) {
    std::fprintf(stderr, "%s: skipped %lld unusable samples; %lld shards were cut short or corrupt, %lld unreadable\n",
                 kProgram, static_cast<long long>(stats.skipped), static_cast<long long>(stats.truncated_shards),
                 static_cast<long long>(stats.unreadable_shards));
    for (const std::string& reason : stats.shard_problems) std::fprintf(stderr, "  %s\n", reason.c_str());
    for (size_t i = 0; i < std::min<size_t>(stats.skipped_reasons.size(), 5); ++i)
      std::fprintf(stderr, "  %s\n", stats.skipped_reasons[i].c_str());
  }

  if (info.step < total) {  // interrupted, or --stop-at
    checkpoint();
    write_chart();
    if (g_stop_signal) {
      if (lead) std::fprintf(stderr, "%s: interrupted after step %lld of %lld; checkpoint '%s' written; continue with --resume latest\n",
                   kProgram, static_cast<long long>(info.step), static_cast<long long>(total), last_checkpoint.c_str());
      return 130;
    }
    std::printf("%s: stopped after step %lld of %lld (--stop-at); checkpoint '%s' written; continue with --resume latest\n",
                kProgram, static_cast<long long>(info.step), static_cast<long long>(total), last_checkpoint.c_str());
    return 0;
  }

  checkpoint();
  if (lead) clip::save_state_dict(model.params(), out / "weights.safetensors",
                        {{"model", Cfg::name}, {"step", std::to_string(info.step)}, {"format", "clip weights"}});
  if (zeroshot) run_zeroshot();
  write_chart();
  std::printf("%s: finished %lld steps in %s; weights in '%s'\n", kProgram, static_cast<long long>(total),
              duration_text(info.elapsed_s).c_str(), (out / "weights.safetensors").c_str());
  return g_stop_signal ? 130 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Under mpirun the ranks are data-parallel processes; a plain run is one process without MPI.
  std::unique_ptr<clip::dist::Communicator> comm;
  int gpu = 0;  // --device cuda: the node-local rank's GPU
#if CLIP_WITH_MPI
  std::optional<clip::dist::MpiSession> mpi;
  try {
    mpi.emplace();
    comm = mpi->communicator();
    if (mpi->active()) gpu = clip::dist::node_rank();
  } catch (const std::exception& e) {
    return cli::failure(kProgram, e.what());
  }
#else
  if (clip::dist::launched_by_mpi())
    std::fprintf(stderr, "%s: started by an MPI launcher, but built without MPI: every process trains alone\n",
                 kProgram);
  comm = std::make_unique<clip::dist::LocalCommunicator>();
#endif
  const int rank = comm->rank(), world = comm->size();
  if (rank != 0) (void)std::freopen("/dev/null", "w", stdout);
  return cli::run_program(kProgram, kUsage, argc, argv, parse, [&](const Arguments& args) -> int {
    try {
      std::optional<clip::CheckpointInfo> resumed;
      fs::path resume_path;
      if (!args.resume.empty()) {
        resume_path = args.resume == "latest" ? clip::latest_checkpoint(args.output) : fs::path(args.resume);
        resumed = clip::read_checkpoint_info(resume_path);
      }
      RunOptions run;
      try {
        run = merge_options(args, resumed ? &*resumed : nullptr, resume_path.string());
      } catch (const cli::UsageError& e) {
        return cli::usage_error(kProgram, e.message);
      }
      if (resumed && args.model && !clip::same_variant_name(*args.model, resumed->variant))
        return cli::usage_error(kProgram, "--model " + *args.model + " differs from the checkpoint's " + resumed->variant);
      const std::string model = resumed ? resumed->variant : run.model;
      try {
        cli::check_model_name(model);
      } catch (const cli::UsageError& e) {
        return cli::usage_error(kProgram, e.message);
      }
      // Every rank must run the same job: refused before step 1 when they differ.
      clip::dist::check_agreement(*comm,
                                  "variant " + model + ", options " + json::dump(json::Value{run.to_json()}) +
                                      ", from step " + std::to_string(resumed ? resumed->step : 0) +
                                      ", micro-batch " + std::to_string(args.micro_batch) +
                                      (args.sync_bn ? ", --sync-bn" : "") + (args.zero1 ? ", --zero1" : ""),
                                  "the run (variant, batch, seed, data, schedule)");
      return cli::with_built_variant(model, [&]<class Cfg>(Cfg) {
        return cli::with_device(args.device.device, [&]<clip::Device D>() {
          return train<Cfg, D>(args, run, resumed, resume_path, argv[0], *comm, gpu);
        });
      });
    } catch (const std::exception& e) {
      if (world == 1) throw;
      // One rank's error would leave the others waiting in a collective: end the whole job.
      std::fprintf(stderr, "%s: rank %d of %d: %s\n", kProgram, rank, world, e.what());
      comm->abort(1);
      return 1;  // not reached
    }
  });
}
