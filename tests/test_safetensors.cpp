// The safetensors reader and writer, and loading by name: every malformed or mismatched file
// gives an error that names the file and what is wrong.
#include <boost/test/unit_test.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "clip/io/state_dict.hpp"

using namespace clip;
namespace fs = std::filesystem;

namespace {

// A miniature model: a matrix, a vector, a scalar and a counter buffer.
struct TinyParams {
  Param<2, 3> weight;
  Param<3> bias;
  Param<> scale;
  Param<2> running_mean;
  Counter steps;

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "weight", weight, Role::parameter);
    f(prefix + "bias", bias, Role::parameter);
    f(prefix + "scale", scale, Role::parameter);
    f(prefix + "running_mean", running_mean, Role::buffer);
    f(prefix + "steps", steps, Role::buffer);
  }
};

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("clip-test-" + std::to_string(::getpid()) + "-" + std::to_string(rand()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

TinyParams example_params() {
  TinyParams p;
  for (int i = 0; i < 6; ++i) p.weight[i] = 0.5f * i - 1;
  for (int i = 0; i < 3; ++i) p.bias[i] = 10.0f + i;
  p.scale[0] = 4.6052f;
  p.running_mean[0] = -3, p.running_mean[1] = 3;
  p.steps.value = 123456789012LL;
  return p;
}

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_all(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), bytes.size());
}

// A file made of a header text and `data_bytes` zero bytes of data.
void write_raw(const fs::path& p, const std::string& header, size_t data_bytes) {
  std::string bytes(8, '\0');
  uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  write_all(p, bytes + header + std::string(data_bytes, '\0'));
}

bool message_has(const Error& e, std::initializer_list<const char*> parts) {
  std::string m = e.what();
  for (const char* part : parts)
    if (m.find(part) == std::string::npos) {
      BOOST_TEST_MESSAGE("message lacks '" << part << "': " << m);
      return false;
    }
  return true;
}

#define CHECK_ERROR(expr, ...) \
  BOOST_CHECK_EXCEPTION(expr, Error, [&](const Error& e) { return message_has(e, {__VA_ARGS__}); })

}  // namespace

BOOST_AUTO_TEST_CASE(save_then_load_round_trips_every_tensor_and_counter) {
  TempDir dir;
  const fs::path file = dir.path / "tiny.safetensors";
  TinyParams saved = example_params();
  save_state_dict(saved, file, {{"note", "round trip"}});

  TinyParams loaded;
  load_state_dict(loaded, file);
  BOOST_TEST((loaded.weight.values == saved.weight.values));
  BOOST_TEST((loaded.bias.values == saved.bias.values));
  BOOST_TEST((loaded.scale.values == saved.scale.values));
  BOOST_TEST((loaded.running_mean.values == saved.running_mean.values));
  BOOST_TEST(loaded.steps.value == saved.steps.value);

  SafeTensors f = SafeTensors::open(file);
  BOOST_TEST(f.metadata().at("note") == "round trip");
  BOOST_TEST(std::string(dtype_name(f.entry("steps").dtype)) == "I64");
  BOOST_TEST(f.entry("scale").shape.empty());
  BOOST_TEST(parameter_count(saved) == 6 + 3 + 1);
}

BOOST_AUTO_TEST_CASE(half_and_bfloat16_are_converted_to_float) {
  TempDir dir;
  const fs::path file = dir.path / "halves.safetensors";
  // 1.0, -2.0, 65504 (largest half), 2^-24 (smallest subnormal half) / bf16: 1.0, -3.0
  const uint16_t half[] = {0x3C00, 0xC000, 0x7BFF, 0x0001};
  const uint16_t bf16[] = {0x3F80, 0xC040};
  std::string header = R"({"h":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]}})";
  std::string bytes(8, '\0');
  uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(half), 8);
  bytes.append(reinterpret_cast<const char*>(bf16), 4);
  write_all(file, bytes);

  SafeTensors f = SafeTensors::open(file);
  std::vector<float> h = f.tensor("h").values, b = f.tensor("b").values;
  BOOST_TEST(h == (std::vector<float>{1.0f, -2.0f, 65504.0f, 5.9604644775390625e-08f}));
  BOOST_TEST(b == (std::vector<float>{1.0f, -3.0f}));
}

BOOST_AUTO_TEST_CASE(malformed_files_are_refused_with_a_reason) {
  TempDir dir;
  const fs::path good = dir.path / "good.safetensors";
  save_state_dict(example_params(), good);
  const std::string bytes = read_all(good);
  const fs::path bad = dir.path / "bad.safetensors";
  const std::string name = bad.string();

  CHECK_ERROR(SafeTensors::open(dir.path / "absent.safetensors"), "cannot open", "absent.safetensors");

  write_all(bad, "");
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "fewer than the 8-byte header length");

  write_all(bad, bytes.substr(0, 20));
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "runs past the end of the file", "truncated?");

  write_all(bad, bytes.substr(0, bytes.size() - 4));
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "outside the data section", "truncated?");

  std::string huge = bytes;
  const uint64_t big = uint64_t{1} << 40;
  std::memcpy(huge.data(), &big, 8);
  write_all(bad, huge);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "more than the limit of 100000000 bytes");
  // The limit is the safetensors crate's: 100,000,000 bytes, one more is refused before it is read.
  const uint64_t over = 100'000'001;
  std::memcpy(huge.data(), &over, 8);
  write_all(bad, huge);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "more than the limit of 100000000 bytes");

  // Element counts from the header are checked, not wrapped around (2^32 * 2^32 * 4 bytes would
  // wrap to 0 in 64 bits); dimensions beyond 2^53 or fractional are not integers a double holds.
  write_raw(bad, R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", 0);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "'w'", "more elements than a 64-bit count holds");
  write_raw(bad, R"({"w": {"dtype": "F32", "shape": [1e300], "data_offsets": [0, 8]}})", 8);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "not a non-negative integer");
  write_raw(bad, R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 8]}})", 8);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "not a non-negative integer");

  write_raw(bad, R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})", 8);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "header is not JSON");

  write_raw(bad, R"([1, 2])", 0);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "not a JSON object");

  write_raw(bad, R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}})", 8);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "'w'", "unknown dtype Q4");

  write_raw(bad, R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", 8);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "'w'", "needs 8 bytes");

  write_raw(bad, R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "not a non-negative integer");

  write_raw(bad, R"({"w": {"dtype": "F32", "shape": [2]}})", 8);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "lacks dtype, shape or data_offsets");

  write_raw(bad, R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12);
  CHECK_ERROR(SafeTensors::open(bad), name.c_str(), "overlap");
}

BOOST_AUTO_TEST_CASE(mismatched_weights_name_the_tensor_and_both_shapes) {
  TempDir dir;
  const fs::path file = dir.path / "other.safetensors";
  SafeTensorsWriter w;
  std::vector<float> zeros(64, 0.0f);
  w.add("weight", {3, 2}, zeros.data());        // transposed
  w.add("bias", {3}, zeros.data());
  w.add("running_mean", {2}, zeros.data());
  int64_t steps = 1;
  w.add_integers("steps", {}, &steps);
  w.add("extra.weight", {4, 4}, zeros.data());  // not in the model; "scale" is missing
  w.write(file);

  TinyParams p;
  CHECK_ERROR(load_state_dict(p, file), file.string().c_str(), "3 problems",
              "tensor 'weight' has shape [3, 2] but the model expects [2, 3]",
              "missing tensor 'scale' (the model expects shape [])",
              "unexpected tensor 'extra.weight' with shape [4, 4]");
  // With extras allowed only the real mismatches remain.
  CHECK_ERROR(load_state_dict(p, file, Extra::allow), "2 problems", "'weight'", "'scale'");
}

BOOST_AUTO_TEST_CASE(a_failed_write_leaves_the_previous_file_intact) {
  TempDir dir;
  const fs::path file = dir.path / "keep.safetensors";
  save_state_dict(example_params(), file);
  const std::string before = read_all(file);

  // A tensor added twice is refused before anything is written.
  SafeTensorsWriter w;
  std::vector<float> v(6, 1.0f);
  w.add("weight", {2, 3}, v.data());
  BOOST_CHECK_THROW(w.add("weight", {2, 3}, v.data()), Error);

  // Writing into a folder that does not exist fails cleanly.
  CHECK_ERROR(w.write(dir.path / "missing" / "x.safetensors"), "cannot create");

  BOOST_TEST(read_all(file) == before);
  size_t files = 0;
  for (auto& entry : fs::directory_iterator(dir.path)) files += entry.is_regular_file();
  BOOST_TEST(files == 1u);  // no temporary file left behind
}
