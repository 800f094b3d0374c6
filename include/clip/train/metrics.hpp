// A training run's metrics as JSON lines, one object per line, and its curves as an SVG chart.
//
//   {"type":"train","step":12,"epoch":0,"loss":5.21,"lr":0.0005,"temperature":14.3,
//    "grad_norm":3.1,"samples_per_s":410.5,"elapsed_s":7.9,"world_size":1}
//   {"type":"zeroshot","step":100,"epoch":0,"top1":0.62,"top5":0.95,"images":10000,
//    "seconds":2.1,"elapsed_s":65.2}
//
// Every line is flushed as it is written, so the file says how far a run got even when it is
// killed. A resumed run keeps the lines up to its checkpoint's step and drops the later ones
// (the resumed run redoes those steps), so each step appears once. Numbers are written in the
// shortest form that reads back exactly: a resumed run's losses compare bit for bit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/train/svg_chart.hpp"

namespace clip {

// One optimizer step.
struct StepMetrics {
  int64_t step = 0;             // 1 for the first step
  int64_t epoch = 0;            // the epoch the step's batch came from (its last sample)
  double loss = 0;
  double lr = 0;
  double temperature = 0;       // exp(logit_scale), after the step
  double grad_norm = 0;         // global L2 norm of the gradients, before clipping
  double samples_per_s = 0;     // image-text pairs per second over this step
  double elapsed_s = 0;         // training time of the run so far (a resumed run continues it)
  int world_size = 1;           // processes sharing the step (data parallel)

  json::Object to_json() const {
    json::Object o;
    o["type"] = json::Value{std::string("train")};
    o["step"] = json::Value{double(step)};
    o["epoch"] = json::Value{double(epoch)};
    o["loss"] = json::Value{loss};
    o["lr"] = json::Value{lr};
    o["temperature"] = json::Value{temperature};
    o["grad_norm"] = json::Value{grad_norm};
    o["samples_per_s"] = json::Value{samples_per_s};
    o["elapsed_s"] = json::Value{elapsed_s};
    o["world_size"] = json::Value{double(world_size)};
    return o;
  }
};

// One zero-shot evaluation.
struct ZeroShotMetrics {
  int64_t step = 0, epoch = 0;
  double top1 = 0, top5 = 0;  // fractions of the images
  int64_t images = 0;
  double seconds = 0;         // the evaluation's own time
  double elapsed_s = 0;

  json::Object to_json() const {
    json::Object o;
    o["type"] = json::Value{std::string("zeroshot")};
    o["step"] = json::Value{double(step)};
    o["epoch"] = json::Value{double(epoch)};
    o["top1"] = json::Value{top1};
    o["top5"] = json::Value{top5};
    o["images"] = json::Value{double(images)};
    o["seconds"] = json::Value{seconds};
    o["elapsed_s"] = json::Value{elapsed_s};
    return o;
  }
};

// The points of the training curves, gathered from metrics records.
struct TrainingCurves {
  std::vector<std::pair<double, double>> loss, top1, top5;  // (step, value); accuracies in percent

  void add(const json::Value& record) {
    const json::Value* type = record.is_object() ? record.find("type") : nullptr;
    const json::Value* step = record.is_object() ? record.find("step") : nullptr;
    if (!type || !step || !type->is_string() || !step->is_number()) return;
    auto value = [&](const char* key) {
      const json::Value* v = record.find(key);
      return v && v->is_number() ? std::optional<double>(v->as_number()) : std::nullopt;
    };
    const double x = step->as_number();
    if (type->as_string() == "train") {
      if (auto l = value("loss")) loss.emplace_back(x, *l);
    } else if (type->as_string() == "zeroshot") {
      if (auto a = value("top1")) top1.emplace_back(x, 100 * *a);
      if (auto a = value("top5")) top5.emplace_back(x, 100 * *a);
    }
  }

  // The chart: the loss per step with its moving average, and zero-shot accuracy. `total_steps`
  // (when known) fixes the step axis, so a run in progress shows how far it has come.
  std::string svg(const std::string& title, int64_t total_steps = 0) const {
    ChartPanel loss_panel;
    loss_panel.title = "Training loss", loss_panel.x_label = "step", loss_panel.y_label = "contrastive loss";
    // Moving average over a window of ~2% of the run, centred, so its curve lines up with the steps;
    // the raw curve is drawn pale behind it (or alone and dark when the run is too short for one).
    const size_t window = std::max<size_t>(1, loss.size() / 50) | 1;
    loss_panel.series.push_back({"loss", window > 1 ? "#9ecae1" : "#08519c", loss, false, window > 1 ? 1.0 : 1.5});
    if (window > 1) {
      std::vector<std::pair<double, double>> smooth;
      double sum = 0;
      size_t count = 0, lo = 0, hi = 0;  // the sum covers loss[lo, hi)
      for (size_t i = 0; i < loss.size(); ++i) {
        const size_t want_lo = i >= window / 2 ? i - window / 2 : 0, want_hi = std::min(loss.size(), i + window / 2 + 1);
        for (; hi < want_hi; ++hi) sum += loss[hi].second, ++count;
        for (; lo < want_lo; ++lo) sum -= loss[lo].second, --count;
        smooth.emplace_back(loss[i].first, sum / count);
      }
      loss_panel.series.push_back({"moving average (" + std::to_string(window) + " steps)", "#08519c", smooth, false, 2.0});
    }
    ChartPanel accuracy;
    accuracy.title = "Zero-shot accuracy", accuracy.x_label = "step", accuracy.y_label = "accuracy (%)";
    accuracy.series.push_back({"top-1", "#d62728", top1, true, 2.0});
    accuracy.series.push_back({"top-5", "#ff9896", top5, true, 1.5});
    accuracy.y_min = 0;
    accuracy.y_max = 100;
    accuracy.legend_bottom = true;
    accuracy.empty_note = "no zero-shot evaluation yet";
    for (ChartPanel* p : {&loss_panel, &accuracy}) {
      p->x_min = 0;
      if (total_steps > 0) p->x_max = static_cast<double>(total_steps);
    }
    return render_svg_chart(title, {loss_panel, accuracy});
  }
};

// The records of a metrics file. A last line cut short (a run killed mid-write) is dropped;
// any other line that is not a JSON object is an error naming the file and the line.
inline std::vector<json::Value> read_metrics(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  CLIP_CHECK(in, "cannot read the metrics file '", path.string(), "'");
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(std::move(line));
  std::vector<json::Value> records;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].empty()) continue;
    try {
      records.push_back(json::parse(lines[i]));
      CLIP_CHECK(records.back().is_object(), "not a JSON object");
    } catch (const Error& e) {
      if (i + 1 == lines.size()) {
        if (!records.empty() && !records.back().is_object()) records.pop_back();
        break;
      }
      CLIP_FAIL("'", path.string(), "' line ", i + 1, " is not a metrics record: ", e.what());
    }
  }
  return records;
}

// The metrics file of a run, open for appending, and the curves so far.
class MetricsLog {
 public:
  // A new run starts the file afresh. A run resumed from a checkpoint at `resume_step` keeps
  // the records of steps up to it (the file rewritten atomically) and appends after them.
  explicit MetricsLog(const std::filesystem::path& path, std::optional<int64_t> resume_step = std::nullopt)
      : path_(path) {
    std::error_code ec;
    if (resume_step && std::filesystem::exists(path, ec)) {
      std::string kept;
      for (const json::Value& r : read_metrics(path)) {
        const json::Value* step = r.find("step");
        if (step && step->is_number() && step->as_number() > static_cast<double>(*resume_step)) continue;
        kept += json::dump(r) + "\n";
        curves_.add(r);
      }
      const std::filesystem::path tmp = SafeTensorsWriter::temporary_beside(path);
      {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        out << kept;
        CLIP_CHECK(out.flush(), "cannot write '", tmp.string(), "'");
      }
      SafeTensorsWriter::commit_file(tmp, path);
      out_.open(path, std::ios::binary | std::ios::app);
    } else {
      out_.open(path, std::ios::binary | std::ios::trunc);
    }
    CLIP_CHECK(out_, "cannot write the metrics file '", path.string(), "'");
  }

  void write(const StepMetrics& m) { write(json::Value{m.to_json()}); }
  void write(const ZeroShotMetrics& m) { write(json::Value{m.to_json()}); }

  const TrainingCurves& curves() const { return curves_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
  TrainingCurves curves_;

  void write(const json::Value& record) {
    out_ << json::dump(record) << '\n';
    out_.flush();
    CLIP_CHECK(out_, "writing the metrics file '", path_.string(), "' failed (disk full?)");
    curves_.add(record);
  }
};

}  // namespace clip
