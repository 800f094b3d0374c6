// The in-process reference of the program tests: image files decoded, preprocessed (CLIP's
// _transform) and encoded by the library, as a program should do it.
#pragma once

#include <string>
#include <vector>

#include "clip/image/decode.hpp"
#include "clip/image/preprocess.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip::test {

template <class Model>
Tensor encode_in_process(const Model& model, const std::vector<std::string>& paths) {
  constexpr int R = Model::image_resolution;
  Tensor images({static_cast<int64_t>(paths.size()), 3, R, R});
  for (size_t i = 0; i < paths.size(); ++i) {
    const std::vector<float> pixels = image::clip_preprocess(image::decode_file(paths[i]), R);
    std::copy(pixels.begin(), pixels.end(), images.data() + i * pixels.size());
  }
  return model.encode_image(images);
}

}  // namespace clip::test
