// Training checkpoints: everything a run needs to continue exactly where it stopped, in one
// safetensors file.
//
//   model.<name>    every tensor of the model's state_dict, buffers included (BatchNorm
//                   statistics; num_batches_tracked as I64), under OpenAI's names
//   adam.m.<name>   AdamW's first and second moments of every trained parameter
//   adam.v.<name>
//   __metadata__    "clip_train_checkpoint": JSON {format_version, variant, step,
//                   optimizer_steps, data: {epoch, samples}, seed, elapsed_s, options}
//
// The data position and the seed are the run's whole random state: the data pipeline draws its
// order and augmentations from (seed, epoch, position in the stream) and the trainer draws
// nothing, so a run rebuilt from them continues with the very batches it would have seen.
//
// Writing goes through SafeTensorsWriter (a temporary file beside the target, synced, then
// renamed over it), so a crash mid-write leaves the previous checkpoint as it was. Tensors are
// written from the model's own memory, not copied: a checkpoint costs no second copy of a large
// model. Loading checks the variant and every tensor's name, dtype and shape before it changes
// anything, and names the file and the tensor when one does not fit.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/tensor/param.hpp"
#include "clip/train/adamw.hpp"

namespace clip {

// Version 1: the layout above. A reader refuses files of a later version.
inline constexpr int kCheckpointFormatVersion = 1;
inline constexpr const char* kCheckpointMetadataKey = "clip_train_checkpoint";

// What a checkpoint records about the run besides its tensors.
struct CheckpointInfo {
  std::string variant;          // the variant's name (Cfg::name); loading into another is refused
  int64_t step = 0;             // optimizer steps the run has taken (drives the learning-rate schedule)
  int64_t optimizer_steps = 0;  // AdamW's own step count (its bias correction)
  int64_t epoch = 0;            // data position of the next batch: its epoch
  int64_t samples = 0;          //   and the samples of that epoch already consumed
  uint64_t seed = 0;            // the run's seed
  double elapsed_s = 0;         // training time so far (a resumed run's clock continues from it)
  json::Object options;         // the run's settings, free-form (clip-train stores its flags)
  int format_version = kCheckpointFormatVersion;
};

namespace detail {

inline std::string checkpoint_metadata(const CheckpointInfo& info) {
  json::Object o;
  o["format_version"] = json::Value{double(kCheckpointFormatVersion)};
  o["variant"] = json::Value{info.variant};
  o["step"] = json::Value{double(info.step)};
  o["optimizer_steps"] = json::Value{double(info.optimizer_steps)};
  json::Object data;
  data["epoch"] = json::Value{double(info.epoch)};
  data["samples"] = json::Value{double(info.samples)};
  o["data"] = json::Value{std::move(data)};
  o["seed"] = json::Value{std::to_string(info.seed)};  // a string: JSON numbers hold 53 bits exactly
  o["elapsed_s"] = json::Value{info.elapsed_s};
  o["options"] = json::Value{info.options};
  return json::dump(json::Value{std::move(o)});
}

inline CheckpointInfo parse_checkpoint_metadata(const SafeTensors& file) {
  std::string where = "'";  // (built up, not "'" + path: GCC 12 warns falsely about that)
  where += file.path().string();
  where += '\'';
  const auto it = file.metadata().find(kCheckpointMetadataKey);
  CLIP_CHECK(it != file.metadata().end(), where,
             " is not a training checkpoint (its metadata has no '", kCheckpointMetadataKey,
             "'); to start training from plain weights, use them as initial weights instead");
  CheckpointInfo info;
  try {
    const json::Value meta = json::parse(it->second);
    info.format_version = static_cast<int>(meta["format_version"].as_int());
    CLIP_CHECK(info.format_version >= 1 && info.format_version <= kCheckpointFormatVersion, "format version ",
               info.format_version, " is not one this program reads (1 to ", kCheckpointFormatVersion, ")");
    info.variant = meta["variant"].as_string();
    info.step = meta["step"].as_int();
    info.optimizer_steps = meta["optimizer_steps"].as_int();
    info.epoch = meta["data"]["epoch"].as_int();
    info.samples = meta["data"]["samples"].as_int();
    const std::string& seed = meta["seed"].as_string();
    const auto [end, ec] = std::from_chars(seed.data(), seed.data() + seed.size(), info.seed);
    CLIP_CHECK(ec == std::errc() && end == seed.data() + seed.size(), "the seed '", seed, "' is not a number");
    info.elapsed_s = meta["elapsed_s"].as_number();
    info.options = meta["options"].as_object();
    CLIP_CHECK(info.step >= 0 && info.optimizer_steps >= 0 && info.epoch >= 0 && info.samples >= 0,
               "a step count or data position is negative");
  } catch (const Error& e) {
    CLIP_FAIL(where, " has unreadable checkpoint metadata: ", e.what());
  }
  return info;
}

// One tensor the checkpoint holds: where it lives in memory and how it is stored.
struct CheckpointTensor {
  std::string name;
  Shape shape;
  float* floats = nullptr;      // F32 tensors
  int64_t* integer = nullptr;   // I64 counters (scalar)
};

// The tensors of a checkpoint in file order: the model's state_dict, then AdamW's moments of
// every trained parameter (buffers have none).
template <class Params>
std::vector<CheckpointTensor> checkpoint_tensors(Params& model, Params& adam_m, Params& adam_v) {
  std::vector<CheckpointTensor> out;
  for_each_tensor(model, [&](const std::string& name, auto& t, Role) {
    using T = std::remove_cvref_t<decltype(t)>;
    if constexpr (is_counter_v<T>) out.push_back({"model." + name, {}, nullptr, &t.value});
    else out.push_back({"model." + name, Shape(T::shape.begin(), T::shape.end()), t.data(), nullptr});
  });
  // (pairs, not a structured binding: clang 14, which builds the fuzzers, cannot capture one)
  for (const auto& moments : {std::pair{"adam.m.", &adam_m}, std::pair{"adam.v.", &adam_v}})
    for_each_tensor(*moments.second, [&, prefix = moments.first](const std::string& name, auto& t, Role role) {
      using T = std::remove_cvref_t<decltype(t)>;
      if constexpr (!is_counter_v<T>)
        if (role == Role::parameter) out.push_back({prefix + name, Shape(T::shape.begin(), T::shape.end()), t.data(), nullptr});
    });
  return out;
}

}  // namespace detail

// Writes a checkpoint of the model and AdamW's moments (as `Params` of the model's layout).
// Atomic: `path` is replaced only once the new file is complete and synced.
template <class Params>
void save_checkpoint(const std::filesystem::path& path, const Params& model, const Params& adam_m,
                     const Params& adam_v, const CheckpointInfo& info) {
  CLIP_CHECK(!info.variant.empty(), "a checkpoint needs the variant's name");
  SafeTensorsWriter writer;
  // The writer only reads through these pointers (views are written, never modified).
  for (const detail::CheckpointTensor& t :
       detail::checkpoint_tensors(const_cast<Params&>(model), const_cast<Params&>(adam_m), const_cast<Params&>(adam_v))) {
    if (t.integer) writer.add_integers(t.name, {}, t.integer);
    else writer.add_view(t.name, t.shape, t.floats);
  }
  writer.set_metadata(kCheckpointMetadataKey, detail::checkpoint_metadata(info));
  writer.set_metadata("format", "clip-train checkpoint");
  writer.set_metadata("model", info.variant);
  writer.write(path);
}

// The metadata alone (no tensor is read): for choosing a variant or finding where a run stood.
inline CheckpointInfo read_checkpoint_info(const std::filesystem::path& path) {
  return detail::parse_checkpoint_metadata(SafeTensors::open(path));
}

// Loads a checkpoint written by save_checkpoint for the variant called `variant`. Everything is
// checked before anything is read, so on an error the model and moments are left unchanged;
// the error names the file and lists every tensor that is missing, misshapen, of the wrong
// dtype or unexpected.
template <class Params>
CheckpointInfo load_checkpoint(const std::filesystem::path& path, Params& model, Params& adam_m, Params& adam_v,
                               std::string_view variant) {
  const SafeTensors file = SafeTensors::open(path);
  CheckpointInfo info = detail::parse_checkpoint_metadata(file);
  CLIP_CHECK(info.variant == variant, "'", path.string(), "' is a checkpoint of the variant '", info.variant,
             "', not of '", variant, "'");

  const std::vector<detail::CheckpointTensor> tensors = detail::checkpoint_tensors(model, adam_m, adam_v);
  std::vector<std::string> problems;
  std::set<std::string> expected;
  for (const detail::CheckpointTensor& t : tensors) {
    expected.insert(t.name);
    const DType dtype = t.integer ? DType::I64 : DType::F32;
    if (!file.contains(t.name)) {
      problems.push_back("missing tensor '" + t.name + "' (expected " + dtype_name(dtype) + " " +
                         shape_string(t.shape) + ")");
      continue;
    }
    const SafeTensors::Entry& e = file.entry(t.name);
    if (e.shape != t.shape || e.dtype != dtype)
      problems.push_back("tensor '" + t.name + "' is " + dtype_name(e.dtype) + " " + shape_string(e.shape) +
                         " but the model needs " + dtype_name(dtype) + " " + shape_string(t.shape));
  }
  for (const std::string& name : file.names())
    if (!expected.count(name)) problems.push_back("unexpected tensor '" + name + "' (the model has no such tensor)");
  if (!problems.empty()) {
    std::ostringstream msg;
    msg << "the checkpoint '" << path.string() << "' does not fit " << variant << " (" << problems.size()
        << " problem" << (problems.size() > 1 ? "s" : "") << "):";
    const size_t shown = std::min<size_t>(problems.size(), 20);
    for (size_t i = 0; i < shown; ++i) msg << "\n  " << problems[i];
    if (shown < problems.size()) msg << "\n  ... and " << problems.size() - shown << " more";
    throw Error(msg.str());
  }

  for (const detail::CheckpointTensor& t : tensors) {
    if (t.integer) *t.integer = file.integers(t.name).at(0);
    else file.read_floats(file.entry(t.name), t.floats);
  }
  return info;
}

// The same with the optimizer itself: its moments and its step count are saved and restored.
template <class Params>
void save_checkpoint(const std::filesystem::path& path, const Params& model, const AdamW<Params>& optimizer,
                     CheckpointInfo info) {
  info.optimizer_steps = optimizer.steps();
  save_checkpoint(path, model, optimizer.m(), optimizer.v(), info);
}

template <class Params>
CheckpointInfo load_checkpoint(const std::filesystem::path& path, Params& model, AdamW<Params>& optimizer,
                               std::string_view variant) {
  CheckpointInfo info = load_checkpoint(path, model, optimizer.m(), optimizer.v(), variant);
  optimizer.set_steps(info.optimizer_steps);
  return info;
}

// Checkpoint files in a run's folder: checkpoint-<step, 8 digits>.safetensors.
inline std::filesystem::path checkpoint_path(const std::filesystem::path& dir, int64_t step) {
  std::string digits = std::to_string(step);
  if (digits.size() < 8) digits.insert(0, 8 - digits.size(), '0');
  return dir / ("checkpoint-" + digits + ".safetensors");
}

// The step of a checkpoint file name, or -1 for any other file (temporary files included).
inline int64_t checkpoint_step(const std::filesystem::path& file) {
  const std::string name = file.filename().string();
  constexpr std::string_view head = "checkpoint-", tail = ".safetensors";
  if (name.size() <= head.size() + tail.size() || !name.starts_with(head) || !name.ends_with(tail)) return -1;
  const std::string_view digits(name.data() + head.size(), name.size() - head.size() - tail.size());
  int64_t step = -1;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
  return ec == std::errc() && end == digits.data() + digits.size() && step >= 0 ? step : -1;
}

// The checkpoints in `dir` by step, oldest first.
inline std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& dir) {
  std::vector<std::pair<int64_t, std::filesystem::path>> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
    if (const int64_t step = checkpoint_step(entry.path()); step >= 0 && entry.is_regular_file(ec))
      found.emplace_back(step, entry.path());
  std::sort(found.begin(), found.end());
  std::vector<std::filesystem::path> out;
  for (auto& [step, path] : found) out.push_back(std::move(path));
  return out;
}

// The newest checkpoint in `dir`; an error when there is none.
inline std::filesystem::path latest_checkpoint(const std::filesystem::path& dir) {
  const std::vector<std::filesystem::path> all = list_checkpoints(dir);
  CLIP_CHECK(!all.empty(), "'", dir.string(), "' holds no checkpoint (checkpoint-<step>.safetensors) to resume from");
  return all.back();
}

// Deletes all but the newest `keep` checkpoints of `dir` (keep 0: deletes none).
inline void prune_checkpoints(const std::filesystem::path& dir, size_t keep) {
  if (keep == 0) return;
  const std::vector<std::filesystem::path> all = list_checkpoints(dir);
  std::error_code ignored;
  for (size_t i = 0; i + keep < all.size(); ++i) std::filesystem::remove(all[i], ignored);
}

}  // namespace clip
