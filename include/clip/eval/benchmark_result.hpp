// Results in the JSON that LAION's CLIP_benchmark writes, the common currency for comparing
// models:
//
//   {"dataset": "cifar10", "model": "ViT-B-32", "pretrained": "openai",
//    "task": "zeroshot_classification", "metrics": {"acc1": 0.89, ...}, "language": "en"}
//
// in a file named {dataset}_{pretrained}_{model}_{language}_{task}.json (each part with '/'
// replaced by '_', as its slugs do). Its task names: zeroshot_classification, zeroshot_retrieval,
// linear_probe; the few-shot probe, which it does not run, is written as fewshot_linear_probe.
// A metric that cannot be computed (a few-shot k larger than a class) is null.
#pragma once

#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/io/json.hpp"

namespace clip {

struct BenchmarkResult {
  std::string dataset, model, pretrained, task, language = "en";
  std::vector<std::pair<std::string, std::optional<double>>> metrics;  // in the order written

  void set(const std::string& name, std::optional<double> value) {
    for (auto& [k, v] : metrics)
      if (k == name) {
        v = value;
        return;
      }
    metrics.emplace_back(name, value);
  }
  std::optional<double> get(const std::string& name) const {
    for (const auto& [k, v] : metrics)
      if (k == name) return v;
    CLIP_FAIL("the result has no metric '", name, "'");
  }

  static std::string slug(std::string s) {
    for (char& c : s)
      if (c == '/') c = '_';
    return s;
  }
  std::string file_name() const {
    return slug(dataset) + "_" + slug(pretrained) + "_" + slug(model) + "_" + slug(language) + "_" + slug(task) +
           ".json";
  }

  // Keys in CLIP_benchmark's order; numbers in the shortest form that reads back exactly.
  std::string to_json() const {
    std::string s = "{\"dataset\": " + json::quote(dataset) + ", \"model\": " + json::quote(model) +
                    ", \"pretrained\": " + json::quote(pretrained) + ", \"task\": " + json::quote(task) +
                    ", \"metrics\": {";
    for (size_t i = 0; i < metrics.size(); ++i) {
      const auto& [k, v] = metrics[i];
      s += (i ? ", " : "") + json::quote(k) + ": " + (v && std::isfinite(*v) ? json::number(*v) : "null");
    }
    return s + "}, \"language\": " + json::quote(language) + "}\n";
  }

  static BenchmarkResult from_json(const std::string& text, const std::string& where = "<memory>") {
    json::Value v;
    try {
      v = json::parse(text);
    } catch (const Error& e) {
      CLIP_FAIL("'", where, "' is not a CLIP_benchmark result: ", e.what());
    }
    CLIP_CHECK(v.is_object(), "'", where, "' is not a JSON object");
    BenchmarkResult r;
    auto field = [&](const char* key) {
      const json::Value* f = v.find(key);
      CLIP_CHECK(f && f->is_string(), "'", where, "' has no string field \"", key, "\"");
      return f->as_string();
    };
    r.dataset = field("dataset");
    r.model = field("model");
    r.pretrained = field("pretrained");
    r.task = field("task");
    r.language = field("language");
    const json::Value* m = v.find("metrics");
    CLIP_CHECK(m && m->is_object(), "'", where, "' has no \"metrics\" object");
    // The object's keys come back sorted (json::Object is a map); order is not part of the format.
    for (const auto& [k, value] : m->as_object()) {
      CLIP_CHECK(value.is_null() || value.is_number(), "'", where, "': metric \"", k, "\" is not a number or null");
      r.metrics.emplace_back(k, value.is_null() ? std::nullopt : std::optional<double>(value.as_number()));
    }
    return r;
  }

  static BenchmarkResult read(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    CLIP_CHECK(in, "cannot read '", path.string(), "'");
    std::ostringstream s;
    s << in.rdbuf();
    return from_json(s.str(), path.string());
  }
};

}  // namespace clip
