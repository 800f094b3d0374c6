// safetensors files: a memory-mapped reader that checks every header field before it trusts it,
// and a writer that replaces its output atomically.
//
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets},
// "__metadata__": {string: string}}, then the data; offsets are relative to the end of the header.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "clip/core/checked_math.hpp"
#include "clip/core/error.hpp"
#include "clip/core/limits.hpp"
#include "clip/io/json.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

enum class DType { F32, F16, BF16, F64, I64, I32 };

inline int dtype_size(DType t) {
  switch (t) {
    case DType::F16: case DType::BF16: return 2;
    case DType::F32: case DType::I32: return 4;
    case DType::F64: case DType::I64: return 8;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
  }
  return "?";
}

inline bool parse_dtype(const std::string& s, DType& out) {
  static const std::pair<const char*, DType> known[] = {{"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
                                                        {"F64", DType::F64}, {"I64", DType::I64}, {"I32", DType::I32}};
  for (auto& [name, t] : known)
    if (s == name) return out = t, true;
  return false;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; mant <<= 1; } while (!(mant & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3FF) << 13;
    }
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  return std::bit_cast<float>(bits);
}

inline float bf16_to_float(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }

// An open safetensors file. Tensors are read (and converted to float) on request.
class SafeTensors {
 public:
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    int64_t begin, end;  // byte offsets into the data section
  };

  static SafeTensors open(const std::filesystem::path& path) { return SafeTensors(path); }

  const std::filesystem::path& path() const { return path_; }
  const std::vector<Entry>& entries() const { return entries_; }  // in data order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const Entry& e : entries_) out.push_back(e.name);
    return out;
  }

  const Entry& entry(const std::string& name) const {
    auto it = index_.find(name);
    CLIP_CHECK(it != index_.end(), "'", path_.string(), "' has no tensor named '", name, "'");
    return entries_[it->second];
  }

  // The tensor converted to float, whatever its stored type.
  Tensor tensor(const std::string& name) const {
    const Entry& e = entry(name);
    Tensor t(e.shape);
    read_floats(e, t.data());
    return t;
  }

  // Converts the tensor into `out`, which must have room for all of its elements.
  void read_floats(const Entry& e, float* out) const {
    const unsigned char* p = data_ + e.begin;
    const int64_t n = shape_numel(e.shape);
    if (n == 0) return;  // an empty tensor's `out` may be null, which memcpy must not be given
    switch (e.dtype) {
      case DType::F32: std::memcpy(out, p, n * 4); break;
      case DType::F64: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<double>(p + 8 * i)); break;
      case DType::F16: for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(load<uint16_t>(p + 2 * i)); break;
      case DType::BF16: for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(load<uint16_t>(p + 2 * i)); break;
      case DType::I64: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<int64_t>(p + 8 * i)); break;
      case DType::I32: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<int32_t>(p + 4 * i)); break;
    }
  }

  // Integer tensors (token ids, counters) read exactly.
  std::vector<int64_t> integers(const std::string& name) const {
    const Entry& e = entry(name);
    const unsigned char* p = data_ + e.begin;
    const int64_t n = shape_numel(e.shape);
    std::vector<int64_t> out(n);
    if (e.dtype == DType::I64) for (int64_t i = 0; i < n; ++i) out[i] = load<int64_t>(p + 8 * i);
    else if (e.dtype == DType::I32) for (int64_t i = 0; i < n; ++i) out[i] = load<int32_t>(p + 4 * i);
    else CLIP_FAIL("'", path_.string(), "': tensor '", name, "' is ", dtype_name(e.dtype), ", not an integer type");
    return out;
  }

 private:
  // The file is unmapped when the last copy of the SafeTensors is gone.
  struct Mapping {
    void* addr = MAP_FAILED;
    size_t size = 0;
    ~Mapping() { if (addr != MAP_FAILED) munmap(addr, size); }
  };

  std::filesystem::path path_;
  std::shared_ptr<Mapping> map_;
  const unsigned char* data_ = nullptr;  // start of the data section
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;


  template <class T>
  static T load(const unsigned char* p) {
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  template <class... Parts>
  [[noreturn]] void bad(const Parts&... parts) const {
    CLIP_FAIL("'", path_.string(), "' is not a valid safetensors file: ", parts...);
  }

  explicit SafeTensors(const std::filesystem::path& path) : path_(path), map_(std::make_shared<Mapping>()) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    CLIP_CHECK(fd >= 0, "cannot open '", path.string(), "': ", std::strerror(errno));
    struct stat st{};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      CLIP_FAIL("'", path.string(), "' is not a regular file");
    }
    const uint64_t file_size = static_cast<uint64_t>(st.st_size);
    if (file_size < 8) {
      ::close(fd);
      bad("the file has ", file_size, " bytes, fewer than the 8-byte header length");
    }
    map_->size = file_size;
    map_->addr = mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    CLIP_CHECK(map_->addr != MAP_FAILED, "cannot map '", path.string(), "': ", std::strerror(errno));
    const auto* bytes = static_cast<const unsigned char*>(map_->addr);

    const uint64_t header_size = load<uint64_t>(bytes);
    if (header_size > limits::kMaxSafetensorsHeaderBytes)
      bad("the header length ", header_size, " is more than the limit of ", limits::kMaxSafetensorsHeaderBytes,
          " bytes (the safetensors crate's)");
    if (8 + header_size > file_size)
      bad("the header length ", header_size, " runs past the end of the file (", file_size, " bytes): truncated?");
    data_ = bytes + 8 + header_size;
    const uint64_t data_size = file_size - 8 - header_size;

    json::Value header;
    try {
      header = json::parse(std::string_view(reinterpret_cast<const char*>(bytes + 8), header_size));
    } catch (const Error& e) {
      bad("its header is not JSON (", e.what(), ")");
    }
    if (!header.is_object()) bad("its header is not a JSON object");

    for (const auto& [name, info] : header.as_object()) {
      if (name == "__metadata__") {
        if (!info.is_object()) bad("__metadata__ is not an object");
        for (const auto& [k, v] : info.as_object()) {
          if (!v.is_string()) bad("__metadata__ value '", k, "' is not a string");
          metadata_[k] = v.as_string();
        }
        continue;
      }
      entries_.push_back(parse_entry(name, info, data_size));
    }
    std::sort(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
    for (size_t i = 0; i < entries_.size(); ++i) {
      index_[entries_[i].name] = i;
      if (i && entries_[i].begin < entries_[i - 1].end && entries_[i].end > entries_[i].begin)
        bad("tensors '", entries_[i - 1].name, "' and '", entries_[i].name, "' overlap");
    }
  }

  Entry parse_entry(const std::string& name, const json::Value& info, uint64_t data_size) const {
    if (!info.is_object()) bad("entry '", name, "' is not an object");
    const json::Value* dtype = info.find("dtype");
    const json::Value* shape = info.find("shape");
    const json::Value* offsets = info.find("data_offsets");
    if (!dtype || !shape || !offsets) bad("entry '", name, "' lacks dtype, shape or data_offsets");
    Entry e{name, DType::F32, {}, 0, 0};
    if (!dtype->is_string() || !parse_dtype(dtype->as_string(), e.dtype))
      bad("tensor '", name, "' has unknown dtype ", dtype->is_string() ? dtype->as_string() : std::string("(not a string)"));
    if (!shape->is_array()) bad("tensor '", name, "' has a shape that is not a list");
    for (const json::Value& d : shape->as_array()) {
      // 2^53 bounds what a double holds exactly, and keeps the cast to int64 defined.
      if (!d.is_number() || !(d.as_number() >= 0 && d.as_number() <= 0x1p53) ||
          d.as_number() != std::floor(d.as_number()))
        bad("tensor '", name, "' has a dimension that is not a non-negative integer");
      e.shape.push_back(static_cast<int64_t>(d.as_number()));
    }
    if (!offsets->is_array() || offsets->as_array().size() != 2 || !offsets->as_array()[0].is_number() ||
        !offsets->as_array()[1].is_number())
      bad("tensor '", name, "' has data_offsets that are not two numbers");
    const double b = offsets->as_array()[0].as_number(), end = offsets->as_array()[1].as_number();
    if (b < 0 || end < b || end > static_cast<double>(data_size))
      bad("tensor '", name, "' has data_offsets [", b, ", ", end, "] outside the data section of ", data_size,
          " bytes: truncated?");
    e.begin = static_cast<int64_t>(b);
    e.end = static_cast<int64_t>(end);
    const std::optional<int64_t> numel = checked_product<int64_t>(e.shape);
    const std::optional<int64_t> needed = numel ? checked_mul<int64_t>(*numel, dtype_size(e.dtype)) : std::nullopt;
    if (!needed)
      bad("tensor '", name, "' of shape ", shape_string(e.shape), " has more elements than a 64-bit count holds");
    const int64_t expected = *needed;
    if (expected != e.end - e.begin)
      bad("tensor '", name, "' of shape ", shape_string(e.shape), " and dtype ", dtype_name(e.dtype), " needs ",
          expected, " bytes but its data_offsets span ", e.end - e.begin);
    return e;
  }
};

// Collects tensors, then writes them in one go: to a temporary file beside the target, synced,
// then renamed over it, so a failure never leaves a half-written file behind.
class SafeTensorsWriter {
 public:
  void add(const std::string& name, const Shape& shape, const float* values) {
    add_bytes(name, DType::F32, shape, values, shape_numel(shape) * 4);
  }
  void add(const std::string& name, const Tensor& t) { add(name, t.shape, t.data()); }
  void add_integers(const std::string& name, const Shape& shape, const int64_t* values) {
    add_bytes(name, DType::I64, shape, values, shape_numel(shape) * 8);
  }
  // Adds the tensor without copying it: `values` must stay valid and unchanged until write()
  // returns (a checkpoint of a large model then costs no second copy of its memory).
  void add_view(const std::string& name, const Shape& shape, const float* values) {
    add_bytes(name, DType::F32, shape, values, shape_numel(shape) * 4, /*copy=*/false);
  }
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  void write(const std::filesystem::path& path) const {
    std::string header = "{";
    if (!metadata_.empty()) {
      header += "\"__metadata__\":{";
      bool first = true;
      for (const auto& [k, v] : metadata_) {
        if (!first) header += ',';
        header += json::quote(k) + ":" + json::quote(v);
        first = false;
      }
      header += "}";
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < items_.size(); ++i) {
      const Item& it = items_[i];
      if (i || !metadata_.empty()) header += ',';
      header += json::quote(it.name) + ":{\"dtype\":\"" + dtype_name(it.dtype) +
                "\",\"shape\":" + shape_json(it.shape) + ",\"data_offsets\":[" + std::to_string(offset) + "," +
                std::to_string(offset + it.size) + "]}";
      offset += it.size;
    }
    header += "}";
    header.append((8 - header.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned

    std::filesystem::path tmp = temporary_beside(path);
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      CLIP_CHECK(out, "cannot create '", tmp.string(), "' to write '", path.string(), "'");
      const uint64_t n = header.size();
      out.write(reinterpret_cast<const char*>(&n), 8);
      out.write(header.data(), static_cast<std::streamsize>(header.size()));
      for (const Item& it : items_) out.write(reinterpret_cast<const char*>(it.data()), it.size);
      out.flush();
      if (!out) {
        std::error_code ignored;
        std::filesystem::remove(tmp, ignored);
        CLIP_FAIL("writing '", path.string(), "' failed (disk full?); the previous file, if any, is untouched");
      }
    }
    commit_file(tmp, path);
  }

  // Makes `tmp` durable and moves it over `path` in one step.
  static void commit_file(const std::filesystem::path& tmp, const std::filesystem::path& path) {
    int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) {
      std::filesystem::remove(tmp, ec);
      CLIP_FAIL("cannot move the finished file into place at '", path.string(), "'");
    }
  }

  static std::filesystem::path temporary_beside(const std::filesystem::path& path) {
    std::random_device rd;
    return std::filesystem::path(path.string() + ".tmp-" + std::to_string(rd()));
  }

 private:
  struct Item {
    std::string name;
    DType dtype;
    Shape shape;
    std::vector<unsigned char> bytes;  // a copy, or empty for a view
    const unsigned char* view = nullptr;
    std::streamsize size = 0;
    const unsigned char* data() const { return view ? view : bytes.data(); }
  };
  std::vector<Item> items_;
  std::map<std::string, std::string> metadata_;

  void add_bytes(const std::string& name, DType dtype, const Shape& shape, const void* data, int64_t bytes,
                 bool copy = true) {
    CLIP_CHECK(name != "__metadata__", "a tensor cannot be named __metadata__");
    for (const Item& it : items_) CLIP_CHECK(it.name != name, "tensor '", name, "' is added twice");
    const auto* p = static_cast<const unsigned char*>(data);
    if (copy) items_.push_back({name, dtype, shape, std::vector<unsigned char>(p, p + bytes), nullptr, bytes});
    else items_.push_back({name, dtype, shape, {}, p, bytes});
  }

  static std::string shape_json(const Shape& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) {
      if (i) s += ',';
      s += std::to_string(shape[i]);
    }
    return s + "]";
  }
};

}  // namespace clip
