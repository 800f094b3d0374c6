// Training checkpoints: a round trip restores the model (buffers included), AdamW's moments and
// step count and the run's metadata bit for bit, so the next step after loading equals the next
// step without the round trip; a truncated, foreign or misshapen file is refused with an error
// naming the file and the tensor, before anything is changed; a write that fails or is killed
// midway leaves the previous checkpoint intact.
#include <boost/test/unit_test.hpp>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/io/state_dict.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/checkpoint.hpp"
#include "golden_variants.hpp"
#include "messages.hpp"

namespace {

namespace fs = std::filesystem;
using clip::test::message_of;
using clip::test::RNTiny;
using clip::test::ViTTiny;

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("clip-checkpoint-test-" + std::to_string(::getpid()) + "-" +
                                                std::to_string(std::random_device{}()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
  fs::path operator/(const std::string& name) const { return path / name; }
};

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Every float of `p` drawn from N(0, 1) (seeded), every counter set to `counter`.
template <class Params>
void randomize(Params& p, uint64_t seed, int64_t counter = 0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  clip::for_each_tensor(p, [&](const std::string&, auto& t, clip::Role) {
    if constexpr (clip::is_counter_v<decltype(t)>) t.value = counter;
    else for (float& x : t.values) x = normal(rng);
  });
}

// Whether two Params hold the same bits in every tensor (and the same counters).
template <class Params>
bool identical(const Params& a, const Params& b, std::string* first_difference = nullptr) {
  std::vector<std::pair<std::string, std::vector<char>>> bytes;
  clip::for_each_tensor(a, [&](const std::string& name, const auto& t, clip::Role) {
    const char* p;
    size_t n;
    if constexpr (clip::is_counter_v<decltype(t)>) p = reinterpret_cast<const char*>(&t.value), n = sizeof t.value;
    else p = reinterpret_cast<const char*>(t.data()), n = t.values.size() * sizeof(float);
    bytes.emplace_back(name, std::vector<char>(p, p + n));
  });
  size_t i = 0;
  bool same = true;
  clip::for_each_tensor(b, [&](const std::string& name, const auto& t, clip::Role) {
    const char* p;
    size_t n;
    if constexpr (clip::is_counter_v<decltype(t)>) p = reinterpret_cast<const char*>(&t.value), n = sizeof t.value;
    else p = reinterpret_cast<const char*>(t.data()), n = t.values.size() * sizeof(float);
    const auto& [ref_name, ref] = bytes[i++];
    if (same && (ref_name != name || ref.size() != n || std::memcmp(ref.data(), p, n) != 0)) {
      same = false;
      if (first_difference) *first_difference = name;
    }
  });
  return same;
}

// A model with AdamW two steps in (non-zero moments, step count 2) and the run's metadata.
template <class Cfg>
struct TrainedState {
  using Params = typename clip::Clip<Cfg>::Params;
  std::unique_ptr<Params> params = std::make_unique<Params>(), grads = std::make_unique<Params>();
  clip::AdamW<Params> optimizer{*params, clip::AdamWOptions{}};
  clip::CheckpointInfo info;

  explicit TrainedState(uint64_t seed) {
    randomize(*params, seed, /*counter=*/7);  // num_batches_tracked = 7 in a ResNet
    for (int step = 0; step < 2; ++step) {
      randomize(*grads, seed + 100 + step);
      optimizer.step(*params, *grads, 1e-3f);
    }
    info.variant = Cfg::name;
    info.step = 2;
    info.epoch = 3;
    info.samples = 1234;
    info.seed = ~uint64_t{0};  // beyond a double's 53 bits: must survive as text
    info.elapsed_s = 12.375;
    info.options["lr"] = clip::json::Value{double(5e-4f)};
    info.options["train_data"] = clip::json::Value{clip::json::Array{clip::json::Value{std::string("a/{0..9}.tar")}}};
    info.options["augment"] = clip::json::Value{true};
  }

  void save(const fs::path& path) const { clip::save_checkpoint(path, *params, optimizer, info); }
};

template <class Cfg>
void check_round_trip() {
  BOOST_TEST_MESSAGE("checkpoint round trip of " << Cfg::name);
  const TempDir dir;
  const fs::path path = dir / "checkpoint.safetensors";
  TrainedState<Cfg> a(11);
  a.save(path);

  TrainedState<Cfg> b(99);  // different weights, moments and metadata, all to be overwritten
  b.optimizer.set_steps(5);
  const clip::CheckpointInfo info = clip::load_checkpoint(path, *b.params, b.optimizer, Cfg::name);
  std::string where;
  BOOST_TEST(identical(*a.params, *b.params, &where), "model differs at " << where);
  BOOST_TEST(identical(a.optimizer.m(), b.optimizer.m(), &where), "first moment differs at " << where);
  BOOST_TEST(identical(a.optimizer.v(), b.optimizer.v(), &where), "second moment differs at " << where);
  BOOST_TEST(b.optimizer.steps() == 2);
  BOOST_TEST(info.variant == Cfg::name);
  BOOST_TEST(info.step == 2);
  BOOST_TEST(info.optimizer_steps == 2);
  BOOST_TEST(info.epoch == 3);
  BOOST_TEST(info.samples == 1234);
  BOOST_TEST(info.seed == ~uint64_t{0});
  BOOST_TEST(info.elapsed_s == 12.375);
  BOOST_TEST(info.format_version == clip::kCheckpointFormatVersion);
  BOOST_TEST(float(info.options.at("lr").as_number()) == 5e-4f);
  BOOST_TEST(info.options.at("train_data").as_array().at(0).as_string() == "a/{0..9}.tar");
  BOOST_TEST(info.options.at("augment").as_bool());
  BOOST_TEST(clip::read_checkpoint_info(path).step == 2);

  // The restored state is the whole state: one more step from each gives the same bits (the
  // bias corrections depend on the restored step count).
  randomize(*a.grads, 500);
  randomize(*b.grads, 500);
  a.optimizer.step(*a.params, *a.grads, 1e-3f);
  b.optimizer.step(*b.params, *b.grads, 1e-3f);
  BOOST_TEST(identical(*a.params, *b.params, &where), "after one more step, the model differs at " << where);

  // Layout: every state_dict tensor under model., AdamW moments of trained parameters only.
  const clip::SafeTensors file = clip::SafeTensors::open(path);
  size_t tensors = 0, trained = 0;
  clip::for_each_tensor(*a.params, [&](const std::string& name, const auto&, clip::Role role) {
    ++tensors;
    BOOST_TEST(file.contains("model." + name), name);
    if (role == clip::Role::parameter) {
      ++trained;
      BOOST_TEST(file.contains("adam.m." + name), name);
      BOOST_TEST(file.contains("adam.v." + name), name);
    } else {
      BOOST_TEST(!file.contains("adam.m." + name), name);
    }
  });
  BOOST_TEST(file.entries().size() == tensors + 2 * trained);
  BOOST_TEST(file.metadata().at("model") == Cfg::name);
  const clip::json::Value meta = clip::json::parse(file.metadata().at(clip::kCheckpointMetadataKey));
  BOOST_TEST(meta["format_version"].as_number() == 1);
  BOOST_TEST(meta["data"]["samples"].as_number() == 1234);
  // The model's tensors are plain OpenAI-named weights under the prefix.
  typename clip::Clip<Cfg>::Params reloaded;
  clip::load_state_dict(reloaded, file, clip::Extra::allow, "model.");
  TrainedState<Cfg> original(11);
  BOOST_TEST(identical(*original.params, reloaded));
}

// A checkpoint file rewritten with `edit(name, tensor) -> keep?` applied to its tensors and
// `meta` as its training metadata (when not empty).
void rewrite(const fs::path& from, const fs::path& to,
             const std::function<bool(const std::string&, clip::Tensor&)>& edit, const std::string& meta = "") {
  const clip::SafeTensors file = clip::SafeTensors::open(from);
  clip::SafeTensorsWriter writer;
  for (const auto& e : file.entries()) {
    if (e.dtype == clip::DType::I64) {
      const std::vector<int64_t> v = file.integers(e.name);
      writer.add_integers(e.name, e.shape, v.data());
      continue;
    }
    clip::Tensor t = file.tensor(e.name);
    if (edit(e.name, t)) writer.add(e.name, t);
  }
  for (const auto& [k, v] : file.metadata()) writer.set_metadata(k, v);
  if (!meta.empty()) writer.set_metadata(clip::kCheckpointMetadataKey, meta);
  writer.write(to);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(checkpoint)

BOOST_AUTO_TEST_CASE(vit_round_trip_is_exact) { check_round_trip<ViTTiny>(); }
BOOST_AUTO_TEST_CASE(resnet_round_trip_is_exact_with_batchnorm_buffers) { check_round_trip<RNTiny>(); }

BOOST_AUTO_TEST_CASE(bad_checkpoints_are_refused_naming_file_and_tensor) {
  using Params = clip::Clip<ViTTiny>::Params;
  const TempDir dir;
  const fs::path good = dir / "good.safetensors";
  TrainedState<ViTTiny> state(3);
  state.save(good);

  // Loading into a fresh state; after each refusal the fresh state must be untouched.
  TrainedState<ViTTiny> target(4);
  const TrainedState<ViTTiny> untouched(4);
  auto load = [&](const fs::path& path) {
    return message_of([&] { clip::load_checkpoint(path, *target.params, target.optimizer, ViTTiny::name); });
  };
  auto check_untouched = [&](const char* what) {
    BOOST_TEST(identical(*target.params, *untouched.params), what << ": the model was changed");
    BOOST_TEST(identical(target.optimizer.m(), untouched.optimizer.m()), what << ": the moments were changed");
    BOOST_TEST(target.optimizer.steps() == 2, what);
  };

  // Another variant.
  std::string msg = message_of([&] {
    TrainedState<RNTiny> rn(5);
    clip::load_checkpoint(good, *rn.params, rn.optimizer, RNTiny::name);
  });
  BOOST_TEST(contains(msg, good.string()), msg);
  BOOST_TEST(contains(msg, "checkpoint of the variant 'ViT-tiny', not of 'RN-tiny'"), msg);

  // Truncated in the data and in the header.
  const uintmax_t size = fs::file_size(good);
  for (uintmax_t keep : {size - 4, size / 2, uintmax_t{100}, uintmax_t{5}}) {
    const fs::path cut = dir / ("cut" + std::to_string(keep) + ".safetensors");
    fs::copy_file(good, cut);
    fs::resize_file(cut, keep);
    msg = load(cut);
    BOOST_TEST(contains(msg, cut.string()), msg);
    BOOST_TEST((contains(msg, "truncated") || contains(msg, "fewer than")), msg);
    check_untouched("truncated");
  }

  // Plain weights are not a checkpoint.
  const fs::path weights = dir / "weights.safetensors";
  clip::save_state_dict(*state.params, weights);
  msg = load(weights);
  BOOST_TEST(contains(msg, weights.string()), msg);
  BOOST_TEST(contains(msg, "is not a training checkpoint"), msg);

  // A tensor of the wrong shape, one missing, one unexpected: all named, in one error.
  const fs::path bad = dir / "bad.safetensors";
  rewrite(good, bad, [](const std::string& name, clip::Tensor& t) {
    if (name == "adam.v.text_projection") t = clip::Tensor({3, 4});
    if (name == "model.visual.proj") t.shape = {int64_t(t.values.size())};
    return name != "model.ln_final.bias";
  });
  {
    clip::SafeTensors f = clip::SafeTensors::open(bad);
    clip::SafeTensorsWriter w;
    for (const auto& e : f.entries()) {
      if (e.dtype == clip::DType::I64) continue;
      w.add(e.name, f.tensor(e.name));
    }
    w.add("adam.m.visual.extra", clip::Tensor({2}));
    for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
    w.write(bad);
  }
  msg = load(bad);
  BOOST_TEST(contains(msg, bad.string()), msg);
  BOOST_TEST(contains(msg, "tensor 'adam.v.text_projection' is F32 [3, 4] but the model needs F32 [64, 32]"), msg);
  BOOST_TEST(contains(msg, "tensor 'model.visual.proj' is F32 [4096] but the model needs F32 [128, 32]"), msg);
  BOOST_TEST(contains(msg, "missing tensor 'model.ln_final.bias'"), msg);
  BOOST_TEST(contains(msg, "unexpected tensor 'adam.m.visual.extra'"), msg);
  check_untouched("misshapen");

  // A later format, and metadata that is not JSON.
  const fs::path newer = dir / "newer.safetensors";
  std::string meta = clip::SafeTensors::open(good).metadata().at(clip::kCheckpointMetadataKey);
  meta.replace(meta.find("\"format_version\":1"), 18, "\"format_version\":2");
  rewrite(good, newer, [](const std::string&, clip::Tensor&) { return true; }, meta);
  msg = load(newer);
  BOOST_TEST(contains(msg, newer.string()), msg);
  BOOST_TEST(contains(msg, "format version 2"), msg);
  rewrite(good, newer, [](const std::string&, clip::Tensor&) { return true; }, "{\"step\": ");
  msg = load(newer);
  BOOST_TEST(contains(msg, "unreadable checkpoint metadata"), msg);
  check_untouched("bad metadata");

  // And the good one still loads.
  BOOST_TEST(load(good).empty());
  BOOST_TEST(identical(*target.params, *state.params));
  (void)sizeof(Params);
}

// A write that fails midway (here: the file-size limit, as a full disk) throws, removes its
// temporary file and leaves the previous checkpoint as it was.
BOOST_AUTO_TEST_CASE(a_failed_write_leaves_the_previous_checkpoint) {
  const TempDir dir;
  const fs::path path = dir / "checkpoint.safetensors";
  TrainedState<ViTTiny> old_state(1);
  old_state.save(path);
  const uintmax_t old_size = fs::file_size(path);

  TrainedState<ViTTiny> new_state(2);  // made before the fork: the child runs no OpenMP region
  const pid_t child = fork();
  BOOST_TEST_REQUIRE(child >= 0);
  if (child == 0) {  // the child: a size limit of 1 MiB, far below a checkpoint
    signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{1 << 20, 1 << 20};
    setrlimit(RLIMIT_FSIZE, &limit);
    const std::string msg = message_of([&] { new_state.save(path); });
    _exit(contains(msg, "failed (disk full?)") && contains(msg, path.string()) ? 0 : 3);
  }
  int status = 0;
  waitpid(child, &status, 0);
  BOOST_TEST_REQUIRE(WIFEXITED(status));
  BOOST_TEST(WEXITSTATUS(status) == 0, "the child's write did not fail with the expected message");

  BOOST_TEST(fs::file_size(path) == old_size);
  TrainedState<ViTTiny> loaded(9);
  clip::load_checkpoint(path, *loaded.params, loaded.optimizer, ViTTiny::name);
  BOOST_TEST(identical(*loaded.params, *old_state.params));
  for (const auto& entry : fs::directory_iterator(dir.path))
    BOOST_TEST(entry.path() == path, "left behind: " << entry.path().string());
}

// A process killed while writing (at several moments) leaves a checkpoint that loads whole:
// the previous one or the new one, never a mix. Temporary files it leaves are not checkpoints.
BOOST_AUTO_TEST_CASE(a_killed_write_leaves_a_whole_checkpoint) {
  const TempDir dir;
  using Params = clip::Clip<ViTTiny>::Params;
  // The states the writer alternates between: every model float equal to the step number.
  auto state_of = [](int64_t step, Params& p, clip::AdamW<Params>& opt, clip::CheckpointInfo& info) {
    clip::for_each_tensor(p, [&](const std::string&, auto& t, clip::Role) {
      if constexpr (!clip::is_counter_v<decltype(t)>) t.fill(float(step));
    });
    clip::for_each_tensor(opt.m(), [&](const std::string&, auto& t, clip::Role) {
      if constexpr (!clip::is_counter_v<decltype(t)>) t.fill(float(step));
    });
    info.variant = ViTTiny::name;
    info.step = step;
  };
  auto params = std::make_unique<Params>();
  clip::AdamW<Params> optimizer(*params);
  clip::CheckpointInfo info;
  const fs::path path = clip::checkpoint_path(dir.path, 0);
  state_of(1, *params, optimizer, info);
  clip::save_checkpoint(path, *params, optimizer, info);

  auto writing = [&] {  // whether a temporary file beside the checkpoint exists: a write under way
    for (const auto& entry : fs::directory_iterator(dir.path))
      if (entry.path().filename().string().find(".tmp-") != std::string::npos) return true;
    return false;
  };
  for (int delay_ms : {0, 5, 20, 60, 400}) {
    for (const auto& entry : fs::directory_iterator(dir.path))  // the last round's leftovers
      if (entry.path() != path) fs::remove(entry.path());
    const pid_t child = fork();
    BOOST_TEST_REQUIRE(child >= 0);
    if (child == 0) {
      for (int64_t step = 2;; ++step) {
        state_of(step, *params, optimizer, info);
        clip::save_checkpoint(path, *params, optimizer, info);
      }
    }
    // The kill lands `delay_ms` after the child's first write began.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!writing() && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    kill(child, SIGKILL);
    int status = 0;
    waitpid(child, &status, 0);
    BOOST_TEST(WIFSIGNALED(status));

    auto loaded = std::make_unique<Params>();
    clip::AdamW<Params> loaded_optimizer(*loaded);
    const std::string msg = message_of([&] {
      const clip::CheckpointInfo got = clip::load_checkpoint(path, *loaded, loaded_optimizer, ViTTiny::name);
      const float expected = float(got.step);
      bool consistent = true;
      clip::for_each_tensor(*loaded, [&](const std::string&, const auto& t, clip::Role) {
        if constexpr (!clip::is_counter_v<decltype(t)>)
          for (float x : t.values) consistent = consistent && x == expected;
      });
      BOOST_TEST(consistent, "after a kill at " << delay_ms << " ms the checkpoint of step " << got.step
                                                << " holds another step's weights");
      BOOST_TEST_MESSAGE("killed at " << delay_ms << " ms: the checkpoint holds step " << got.step);
    });
    BOOST_TEST(msg.empty(), "after a kill at " << delay_ms << " ms: " << msg);
  }
  // Whatever temporary files the kills left, the newest checkpoint is still the real file.
  BOOST_TEST(clip::latest_checkpoint(dir.path) == path);
}

BOOST_AUTO_TEST_CASE(checkpoint_files_of_a_run) {
  const TempDir dir;
  BOOST_TEST(clip::checkpoint_path(dir.path, 40).filename() == "checkpoint-00000040.safetensors");
  BOOST_TEST(clip::checkpoint_path(dir.path, 123456789).filename() == "checkpoint-123456789.safetensors");
  BOOST_TEST(clip::checkpoint_step("checkpoint-00000040.safetensors") == 40);
  BOOST_TEST(clip::checkpoint_step("checkpoint-00000040.safetensors.tmp-123") == -1);
  BOOST_TEST(clip::checkpoint_step("checkpoint-.safetensors") == -1);
  BOOST_TEST(clip::checkpoint_step("checkpoint-12a.safetensors") == -1);
  BOOST_TEST(clip::checkpoint_step("weights.safetensors") == -1);

  std::string msg = message_of([&] { clip::latest_checkpoint(dir.path); });
  BOOST_TEST(contains(msg, "holds no checkpoint"), msg);
  for (int64_t step : {300, 5, 40}) std::ofstream(clip::checkpoint_path(dir.path, step)) << "x";
  std::ofstream(dir / "checkpoint-00000900.safetensors.tmp-77") << "x";  // an interrupted write
  std::ofstream(dir / "notes.txt") << "x";
  BOOST_TEST(clip::latest_checkpoint(dir.path) == clip::checkpoint_path(dir.path, 300));
  clip::prune_checkpoints(dir.path, 2);
  BOOST_TEST(!fs::exists(clip::checkpoint_path(dir.path, 5)));
  BOOST_TEST(fs::exists(clip::checkpoint_path(dir.path, 40)));
  BOOST_TEST(fs::exists(dir / "notes.txt"));
  clip::prune_checkpoints(dir.path, 0);  // keep all
  BOOST_TEST(clip::list_checkpoints(dir.path).size() == 2u);
}

BOOST_AUTO_TEST_SUITE_END()
