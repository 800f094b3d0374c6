// Labeled features on disk: a safetensors file with `features` [N, D] F32 and `labels` [N] I64,
// the format of the feature cache and of clip-eval's --train-features / --val-features /
// --test-features, so features computed elsewhere can be probed. `__metadata__` says what they
// are (model, weights hash, dataset, split, preprocessing).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>

#include "clip/core/error.hpp"
#include "clip/eval/labeled_features.hpp"
#include "clip/io/safetensors.hpp"

namespace clip {

inline LabeledFeatures read_feature_file(const std::filesystem::path& path) {
  const SafeTensors f = SafeTensors::open(path);
  const std::string name = "'" + path.string() + "'";
  CLIP_CHECK(f.contains("features") && f.contains("labels"), name,
             " must hold the tensors 'features' [N, D] (F32) and 'labels' [N] (I64)");
  const SafeTensors::Entry& features = f.entry("features");
  const SafeTensors::Entry& labels = f.entry("labels");
  CLIP_CHECK(features.shape.size() == 2, name, ": 'features' must be [N, D], not ", shape_string(features.shape));
  CLIP_CHECK(labels.shape.size() == 1 && labels.shape[0] == features.shape[0], name, ": 'labels' must be [",
             features.shape[0], "] (one per feature row), not ", shape_string(labels.shape));
  LabeledFeatures out{f.tensor("features"), f.integers("labels")};
  for (size_t i = 0; i < out.labels.size(); ++i)
    CLIP_CHECK(out.labels[i] >= 0, name, ": row ", i, " has the negative label ", out.labels[i]);
  return out;
}

inline std::map<std::string, std::string> read_feature_metadata(const std::filesystem::path& path) {
  return SafeTensors::open(path).metadata();
}

// Written atomically: a reader never sees half a file.
inline void write_feature_file(const std::filesystem::path& path, const LabeledFeatures& data,
                               const std::map<std::string, std::string>& metadata = {}) {
  CLIP_CHECK(data.features.shape.size() == 2 && static_cast<int64_t>(data.labels.size()) == data.rows(),
             "features to write must be [N, D] with N labels");
  SafeTensorsWriter w;
  w.add_view("features", data.features.shape, data.features.data());
  w.add_integers("labels", {data.rows()}, data.labels.data());
  for (const auto& [k, v] : metadata) w.set_metadata(k, v);
  w.write(path);
}

}  // namespace clip
