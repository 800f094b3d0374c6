// The words of the Fashion-MNIST demo: the ten classes, the captions the training images get and
// the prompt templates the zero-shot evaluation uses, kept apart so that the evaluation measures
// transfer to phrasings the model never saw.
//
// A training caption is one of several natural names of its class put into one of many
// phrasings ("a black and white photo of an ankle boot", "product shot: a pullover"), sometimes
// with a full stop, chosen per sample from a seeded hash of (seed, index): the same seed gives
// the same captions whatever order or thread writes them. The evaluation fills held-out
// templates ("a blurry photo of {}.") with each class's canonical name; `check_vocabulary`
// proves, on BPE ids, that no filled held-out template equals any caption training can produce,
// and that every caption fits the variant's 16-token context.
#pragma once

#include <array>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/data/random.hpp"
#include "clip/eval/zero_shot.hpp"

namespace clip::examples::fashion_mnist {

inline constexpr int kClasses = 10;

// Caption ids (without the start and end tokens) fit a 16-token context.
inline constexpr int kMaxCaptionTokens = 14;

// The dataset's own class names, in label order (its README).
inline constexpr std::array<const char*, kClasses> kDatasetNames = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};

// Names each class goes by, with the article a sentence needs ("an ankle boot", "trousers").
// The first is the canonical name: the one the evaluation uses and training shows most often.
inline const std::array<std::vector<std::string>, kClasses>& class_names() {
  static const std::array<std::vector<std::string>, kClasses> names = {{
      {"a t-shirt", "a top", "a tee", "a tee shirt", "a short-sleeved top"},
      {"a pair of trousers", "trousers", "pants", "a pair of pants", "slacks"},
      {"a pullover", "a sweater", "a jumper", "a knitted pullover", "a long-sleeved sweater"},
      {"a dress", "a summer dress", "a frock", "a women's dress", "a sleeveless dress"},
      {"a coat", "a jacket", "a winter coat", "an overcoat", "a long coat"},
      {"a sandal", "a pair of sandals", "sandals", "a summer sandal", "an open sandal"},
      {"a shirt", "a button-up shirt", "a blouse", "a collared shirt", "a long-sleeved shirt"},
      {"a sneaker", "a running shoe", "a pair of sneakers", "sneakers", "a trainer shoe"},
      {"a bag", "a handbag", "a purse", "a tote bag", "a shoulder bag"},
      {"an ankle boot", "a boot", "a pair of ankle boots", "an ankle-high boot", "a short boot"},
  }};
  return names;
}

inline const std::string& canonical_name(int label) { return class_names().at(label).front(); }

// A name without its article ("an ankle boot" -> "ankle boot"), for phrasings that need none.
inline std::string bare(std::string_view name) {
  for (std::string_view article : {"a ", "an "})
    if (name.starts_with(article)) return std::string(name.substr(article.size()));
  return std::string(name);
}

// Training phrasings: "{}" takes the name with its article, "{n}" the bare name.
inline const std::vector<std::string>& training_phrasings() {
  static const std::vector<std::string> phrasings = {
      "{}",
      "{n}",
      "a black and white photo of {}",
      "a grayscale picture of {}",
      "product shot: {}",
      "this is {}",
      "an image of {}",
      "a small image of {}",
      "a picture showing {}",
      "catalog image of {}",
      "{} on a plain background",
      "{} on a black background",
      "a low resolution image of {}",
      "here is {}",
      "a thumbnail of {}",
      "{n} for sale",
      "a scan of {}",
      "a close-up of {}",
      "{} in black and white",
      "a gray photo of {}",
      "a centered photo of {}",
      "a product photo of {}",
      "shop listing: {}",
      "online store photo of {}",
      "a tiny grayscale {n}",
      "{n}, grayscale",
      "photo: {}",
      "a monochrome photo of {}",
      "just {}",
      "fashion item: {n}",
      "the {n} in this picture",
      "a 28 pixel image of {}",
      "there is {} in this image",
      "new in stock: {}",
      "fashion catalog: {n}",
      "what a nice {n}",
      "an icon of {}",
      "{n} (black and white)",
      "a greyscale snapshot of {}",
      "an example of {}",
  };
  return phrasings;
}

// Evaluation templates (OpenAI's ImageNet prompt style), none of them a training phrasing. They
// use "{}" alone, as clip::fill_template and a classes file of canonical names read them.
inline const std::vector<std::string>& held_out_templates() {
  static const std::vector<std::string> templates = {
      "a photo of {}.",
      "a blurry photo of {}.",
      "a cropped photo of {}.",
      "a bright photo of {}.",
      "a dark photo of {}.",
      "a good photo of {}.",
      "a jpeg photo of {}.",
      "a pixelated photo of {}.",
      "a rendering of {}.",
      "a close-up photo of {}.",
      "a sketch of {}.",
      "a black and white rendering of {}.",
  };
  return templates;
}

// "{}" -> the name, "{n}" -> the bare name.
inline std::string fill(std::string_view phrasing, const std::string& name) {
  std::string out;
  for (size_t i = 0; i < phrasing.size(); ++i) {
    if (phrasing.compare(i, 2, "{}") == 0) {
      out += name;
      ++i;
    } else if (phrasing.compare(i, 3, "{n}") == 0) {
      out += bare(name);
      i += 2;
    } else {
      out += phrasing[i];
    }
  }
  return out;
}

// SplitMix64: the caption of sample `index` depends on (seed, index) only.
inline uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// What the caption of training sample `index` is made of: which of its class's names (the
// canonical one 40% of the time, as the evaluation asks for it), which phrasing, and whether it
// ends with a full stop (one time in 4).
struct CaptionChoice {
  size_t name, phrasing;
  bool full_stop;
};

inline CaptionChoice caption_choice(uint64_t seed, int64_t index, int label) {
  CLIP_CHECK(label >= 0 && label < kClasses, "Fashion-MNIST labels are 0 to 9, not ", label);
  uint64_t state = mix(seed ^ mix(static_cast<uint64_t>(index)));
  auto draw = [&](uint64_t n) {
    state = mix(state);
    return static_cast<size_t>((state >> 11) % n);
  };
  CaptionChoice c;
  const size_t names = class_names()[label].size();
  c.name = draw(10) < 4 ? 0 : 1 + draw(names - 1);
  c.phrasing = draw(training_phrasings().size());
  c.full_stop = draw(4) == 0;
  return c;
}

inline std::string training_caption(uint64_t seed, int64_t index, int label) {
  const CaptionChoice c = caption_choice(seed, index, label);
  std::string caption = fill(training_phrasings()[c.phrasing], class_names()[label][c.name]);
  if (c.full_stop) caption += ".";
  return caption;
}

// Every caption training_caption can produce from these phrasings, for every class.
inline std::vector<std::string> all_training_captions(const std::vector<std::string>& phrasings = training_phrasings()) {
  std::vector<std::string> captions;
  for (const auto& names : class_names())
    for (const std::string& name : names)
      for (const std::string& phrasing : phrasings) {
        captions.push_back(fill(phrasing, name));
        captions.push_back(fill(phrasing, name) + ".");
      }
  return captions;
}

// The evaluation prompts: every template filled with every canonical name.
inline std::vector<std::string> all_evaluation_prompts(const std::vector<std::string>& templates = held_out_templates()) {
  std::vector<std::string> prompts;
  for (const std::string& t : templates)
    for (int c = 0; c < kClasses; ++c) prompts.push_back(fill(t, canonical_name(c)));
  return prompts;
}

// ---- The captioned retrieval set: 100 test images per class (the first in the test file's
// order), 5 captions each, as Flickr30k's test set has 1,000 images of 5 captions. Fashion-MNIST
// has no description of a single image, so a caption can only name the class: within a class no
// caption tells its image from the others. What keeps the task honest is that no caption string
// belongs to two images (identical strings score identically, and a tie with another image's copy
// would count as a hit), so a perfect class ranker scores about k/100 on recall@k in both
// directions (the README's retrieval row says so).
inline constexpr int kRetrievalImagesPerClass = 100;
inline constexpr int kRetrievalCaptionsPerImage = 5;

// Every distinct caption of class `label` the retrieval set draws from: each of its names in each
// training phrasing and each held-out template (its full stop dropped), with and without a full
// stop, in a fixed order.
inline std::vector<std::string> retrieval_caption_pool(int label) {
  CLIP_CHECK(label >= 0 && label < kClasses, "Fashion-MNIST labels are 0 to 9, not ", label);
  std::vector<std::string> phrasings = training_phrasings();
  for (std::string t : held_out_templates()) {
    if (t.ends_with(".")) t.pop_back();
    phrasings.push_back(std::move(t));
  }
  std::vector<std::string> pool;
  std::set<std::string> seen;
  for (const std::string& name : class_names()[label])
    for (const std::string& phrasing : phrasings)
      for (const char* stop : {"", "."})
        if (std::string caption = fill(phrasing, name) + stop; seen.insert(caption).second) pool.push_back(caption);
  return pool;
}

// The captions of the retrieval set's first `images` images of class `label`, `per_image` each:
// the pool in a seeded order, dealt out in turn, so that no two captions of the set are equal.
inline std::vector<std::vector<std::string>> retrieval_captions(uint64_t seed, int label,
                                                                int images = kRetrievalImagesPerClass,
                                                                int per_image = kRetrievalCaptionsPerImage) {
  std::vector<std::string> pool = retrieval_caption_pool(label);
  CLIP_CHECK(images >= 0 && per_image > 0 && static_cast<size_t>(images) * per_image <= pool.size(), "class ", label,
             " has ", pool.size(), " distinct captions, not enough for ", images, " images of ", per_image, " each");
  data::Rng rng(data::derive_seed(seed, {0x7e7c, static_cast<uint64_t>(label)}));
  data::shuffle(pool, rng);
  std::vector<std::vector<std::string>> captions(images);
  for (int i = 0; i < images; ++i)
    captions[i].assign(pool.begin() + i * per_image, pool.begin() + (i + 1) * per_image);
  return captions;
}

// Checks, on the tokenizer's ids (so case and spacing cannot hide a match), that every training
// caption and evaluation prompt fits kMaxCaptionTokens and that no evaluation prompt is a
// training caption. A tokenizer is anything with `encode(text) -> ids`. Returns the number of
// distinct training captions.
template <class Tokenizer>
size_t check_vocabulary(const Tokenizer& tokenizer, const std::vector<std::string>& phrasings = training_phrasings(),
                        const std::vector<std::string>& templates = held_out_templates()) {
  std::set<std::vector<int>> training;
  for (const std::string& caption : all_training_captions(phrasings)) {
    std::vector<int> ids = tokenizer.encode(caption);
    CLIP_CHECK(static_cast<int>(ids.size()) <= kMaxCaptionTokens, "the training caption '", caption, "' has ",
               ids.size(), " BPE tokens; at most ", kMaxCaptionTokens, " fit the 16-token context");
    training.insert(std::move(ids));
  }
  for (const std::string& prompt : all_evaluation_prompts(templates)) {
    const std::vector<int> ids = tokenizer.encode(prompt);
    CLIP_CHECK(static_cast<int>(ids.size()) <= kMaxCaptionTokens, "the evaluation prompt '", prompt, "' has ",
               ids.size(), " BPE tokens; at most ", kMaxCaptionTokens, " fit the 16-token context");
    CLIP_CHECK(!training.contains(ids), "the evaluation prompt '", prompt,
               "' is also a training caption: held-out templates must differ from every training phrasing");
  }
  return training.size();
}

}  // namespace clip::examples::fashion_mnist
