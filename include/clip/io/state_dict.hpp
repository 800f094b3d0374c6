// Loading and saving a model's tensors by name. Every tensor the model's `visit` names must be in
// the file with the model's shape; a file with tensors the model lacks is refused unless the
// caller allows extras. All problems are reported together, each naming the tensor.
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/io/hf_names.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/tensor/param.hpp"

namespace clip {

// Whether a file may hold tensors the model does not have (golden files add inputs and outputs).
enum class Extra { forbid, allow };

namespace detail {

// Reads OpenAI-named tensors from a file with OpenAI's or Hugging Face's names.
class TensorSource {
 public:
  explicit TensorSource(const SafeTensors& file) : file_(file), hf_(hf::uses_hf_names(file.names())) {}

  bool hf() const { return hf_; }

  // The stored shape of `name` in OpenAI's layout, or nothing when the file lacks it.
  std::optional<Shape> shape(const std::string& name) const {
    if (!hf_) return file_.contains(name) ? std::optional(file_.entry(name).shape) : std::nullopt;
    auto recipe = hf::recipe_for(name);
    if (!recipe) return std::nullopt;
    for (const std::string& s : recipe->sources)
      if (!file_.contains(s)) return std::nullopt;
    Shape first = file_.entry(recipe->sources[0]).shape;
    switch (recipe->kind) {
      case hf::Recipe::Kind::same: return first;
      case hf::Recipe::Kind::transpose:
        if (first.size() != 2) return first;
        return Shape{first[1], first[0]};
      case hf::Recipe::Kind::concat_rows: {
        if (first.empty()) return first;
        for (const std::string& s : recipe->sources)
          if (file_.entry(s).shape != first) return file_.entry(s).shape;  // reported as a mismatch
        first[0] *= static_cast<int64_t>(recipe->sources.size());
        return first;
      }
    }
    return std::nullopt;
  }

  // Converts `name` into `out` (shape already checked).
  void read(const std::string& name, float* out) {
    if (!hf_) {
      file_.read_floats(file_.entry(name), out);
      used_.insert(name);
      return;
    }
    auto recipe = *hf::recipe_for(name);
    for (const std::string& s : recipe.sources) used_.insert(s);
    if (recipe.kind == hf::Recipe::Kind::transpose) {
      Tensor t = file_.tensor(recipe.sources[0]);
      const int64_t rows = t.shape[0], cols = t.shape[1];
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = t.values[r * cols + c];
      return;
    }
    for (const std::string& s : recipe.sources) {
      const auto& e = file_.entry(s);
      file_.read_floats(e, out);
      out += shape_numel(e.shape);
    }
  }

  // Marks the file's tensors behind `name` as accounted for (read, or reported as misshapen).
  void claim(const std::string& name) {
    if (!hf_) {
      used_.insert(name);
    } else if (auto recipe = hf::recipe_for(name)) {
      used_.insert(recipe->sources.begin(), recipe->sources.end());
    }
  }

  int64_t read_integer(const std::string& name) {
    used_.insert(name);
    const auto& e = file_.entry(name);
    if (e.dtype == DType::I64 || e.dtype == DType::I32) return file_.integers(name).at(0);
    float v;
    file_.read_floats(e, &v);
    return static_cast<int64_t>(v);
  }

  // Tensors of the file that no read consumed (Hugging Face's index buffers excepted).
  std::vector<std::string> unused() const {
    std::vector<std::string> out;
    for (const std::string& n : file_.names())
      if (!used_.count(n) && !(hf_ && hf::is_hf_index_buffer(n))) out.push_back(n);
    return out;
  }

 private:
  const SafeTensors& file_;
  bool hf_;
  std::set<std::string> used_;
};

}  // namespace detail

// Fills every tensor of `params` from `file`; `prefix` is passed to params.visit (e.g. "visual."
// to load one tower). Throws one clip::Error listing every missing, misshapen or unexpected tensor.
template <class Params>
void load_state_dict(Params& params, const SafeTensors& file, Extra extra = Extra::forbid,
                     const std::string& prefix = "") {
  detail::TensorSource source(file);
  std::vector<std::string> problems;
  for_each_tensor(
      params,
      [&](const std::string& name, auto& tensor, Role) {
        using T = std::remove_cvref_t<decltype(tensor)>;
        const Shape expected(T::shape.begin(), T::shape.end());
        auto actual = source.shape(name);
        if (!actual) {
          problems.push_back("missing tensor '" + name + "' (the model expects shape " + shape_string(expected) + ")");
        } else if (*actual != expected) {
          problems.push_back("tensor '" + name + "' has shape " + shape_string(*actual) + " but the model expects " +
                             shape_string(expected));
          source.claim(name);
        } else if constexpr (is_counter_v<T>) {
          tensor.value = source.read_integer(name);
        } else {
          source.read(name, tensor.data());
        }
      },
      prefix);
  if (extra == Extra::forbid)
    for (const std::string& name : source.unused())
      problems.push_back("unexpected tensor '" + name + "' with shape " + shape_string(file.entry(name).shape) +
                         " (the model has no such weight)");
  if (problems.empty()) return;
  std::ostringstream msg;
  msg << "the weights in '" << file.path().string() << "' do not fit the model (" << problems.size() << " problem"
      << (problems.size() > 1 ? "s" : "") << "):";
  const size_t shown = std::min<size_t>(problems.size(), 20);
  for (size_t i = 0; i < shown; ++i) msg << "\n  " << problems[i];
  if (shown < problems.size()) msg << "\n  ... and " << problems.size() - shown << " more";
  throw Error(msg.str());
}

template <class Params>
void load_state_dict(Params& params, const std::filesystem::path& path, Extra extra = Extra::forbid,
                     const std::string& prefix = "") {
  load_state_dict(params, SafeTensors::open(path), extra, prefix);
}

// Adds every tensor of `params` to a writer under OpenAI's names.
template <class Params>
void add_state_dict(SafeTensorsWriter& writer, const Params& params, const std::string& prefix = "") {
  for_each_tensor(
      params,
      [&](const std::string& name, const auto& tensor, Role) {
        using T = std::remove_cvref_t<decltype(tensor)>;
        if constexpr (is_counter_v<T>) {
          writer.add_integers(name, {}, &tensor.value);
        } else {
          writer.add(name, Shape(T::shape.begin(), T::shape.end()), tensor.data());
        }
      },
      prefix);
}

// Writes `params` to a safetensors file (atomically: an existing file is replaced only when the
// new one is complete).
template <class Params>
void save_state_dict(const Params& params, const std::filesystem::path& path,
                     const std::map<std::string, std::string>& metadata = {}) {
  SafeTensorsWriter writer;
  add_state_dict(writer, params);
  for (const auto& [k, v] : metadata) writer.set_metadata(k, v);
  writer.write(path);
}

}  // namespace clip
