// Evaluation datasets: where each image's bytes are, with its class label (classification) or
// its captions (retrieval). Three layouts, told apart by the path:
//
//   a folder            class folders (torchvision's ImageFolder): one sub-folder per class,
//                       sorted by name; class names from the folders or from a class list
//   *.csv / *.tsv       a table with a header row: an image column (paths relative to the
//                       table's folder) and a label column (a class index or a class name) or a
//                       caption column; rows naming one image give it several captions
//   *.tar (brace lists) WebDataset shards, in the order listed: image + `cls` (class index) or
//                       `txt` (a caption, or a JSON list of captions)
//
// Every image the dataset names must exist and every label must be one of the classes: an
// evaluation on part of the data would be a wrong number, so these are errors naming the file
// and the line (or shard member). An empty class folder is an error too; a table or shard set
// without some class is not (a probe's training split checks its classes itself).
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/data/csv.hpp"
#include "clip/data/random.hpp"
#include "clip/data/records.hpp"
#include "clip/io/json.hpp"
#include "clip/text/utf8.hpp"

namespace clip {

enum class DatasetUse { classification, retrieval };

struct DatasetOptions {
  std::string image_key = "filepath";  // CSV/TSV: the image column
  std::string label_key = "label";     // CSV/TSV: the class column (classification)
  std::string caption_key = "title";   // CSV/TSV: the caption column (retrieval)
};

struct EvalDataset {
  std::string source;                              // the path as given
  std::vector<data::Blob> images;                  // where each image's bytes are
  std::vector<int64_t> labels;                     // classification: per image
  std::vector<std::vector<std::string>> captions;  // retrieval: per image, at least one
  std::vector<std::string> folder_classes;         // class folders: their names, sorted

  int64_t size() const { return static_cast<int64_t>(images.size()); }

  // A summary of what the dataset holds (names, sizes, labels, captions), for the feature cache:
  // a dataset whose files or labels change gets new features.
  uint64_t fingerprint() const {
    uint64_t h = data::mix64(images.size());
    auto add = [&h](std::string_view s) {
      for (char c : s) h = data::mix64(h ^ static_cast<unsigned char>(c));
      h = data::mix64(h ^ 0xff);
    };
    for (size_t i = 0; i < images.size(); ++i) {
      add(images[i].name);
      h = data::mix64(h ^ static_cast<uint64_t>(images[i].offset) ^ (static_cast<uint64_t>(images[i].size) << 20));
      if (i < labels.size()) h = data::mix64(h ^ static_cast<uint64_t>(labels[i]));
      if (i < captions.size())
        for (const std::string& c : captions[i]) add(c);
    }
    return h;
  }
};

namespace dataset_detail {

inline std::string lower_extension(const std::filesystem::path& p) {
  std::string ext = p.extension().string();
  for (char& c : ext) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return ext;
}

inline std::string trim(std::string_view s) {
  const size_t a = s.find_first_not_of(" \t\r\n\f\v");
  if (a == std::string_view::npos) return "";
  const size_t b = s.find_last_not_of(" \t\r\n\f\v");
  return std::string(s.substr(a, b - a + 1));
}

// A label cell: a class index, or a class name from the list. `where` names file and line.
inline int64_t parse_label(std::string_view cell, const std::vector<std::string>& classes, const std::string& where) {
  const std::string text = trim(cell);
  CLIP_CHECK(!text.empty(), where, ": the label is empty");
  int64_t value = -1;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec == std::errc() && end == text.data() + text.size()) {
    CLIP_CHECK(value >= 0 && (classes.empty() || value < static_cast<int64_t>(classes.size())), where, ": label ",
               value, " is outside the class list (", classes.size(), " classes, 0..", int64_t(classes.size()) - 1, ")");
    return value;
  }
  const auto it = std::find(classes.begin(), classes.end(), text);
  CLIP_CHECK(it != classes.end(), where, ": label '", text, "' is not in the class list");
  return it - classes.begin();
}

// A WebDataset caption member: a JSON list of strings, or the text itself.
inline std::vector<std::string> parse_captions(std::string_view text, const std::string& where) {
  const size_t bad = text::utf8::find_invalid(text);
  CLIP_CHECK(bad == std::string_view::npos, where, ": the caption is not valid UTF-8 (byte ", bad, ")");
  std::vector<std::string> out;
  const std::string t = trim(text);
  if (!t.empty() && t.front() == '[') {
    json::Value v;
    try {
      v = json::parse(t);
    } catch (const Error& e) {
      CLIP_FAIL(where, ": the captions are not a valid JSON list: ", e.what());
    }
    for (const json::Value& c : v.as_array()) {
      CLIP_CHECK(c.is_string(), where, ": the caption list holds something that is not a string");
      if (!trim(c.as_string()).empty()) out.push_back(c.as_string());
    }
  } else if (!t.empty()) {
    out.push_back(t);
  }
  CLIP_CHECK(!out.empty(), where, ": no caption");
  return out;
}

inline data::Blob file_blob(const std::filesystem::path& path) {
  data::Blob b;
  b.present = true;
  b.name = path.string();
  b.file = path;
  std::error_code ec;
  b.size = static_cast<int64_t>(std::filesystem::file_size(path, ec));
  return b;
}

}  // namespace dataset_detail

// The images of a folder (not its sub-folders) whose names end like an image, sorted.
inline std::vector<std::filesystem::path> list_image_files(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> out;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::error_code ec;
    if (!entry.is_regular_file(ec)) continue;
    const std::string ext = dataset_detail::lower_extension(entry.path());
    if (!ext.empty() && data::records_detail::is_image_extension(ext.substr(1))) out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// `classes`: the class names (a class list file's lines); may be empty for class folders (the
// folder names are the classes) and for retrieval.
inline EvalDataset load_eval_dataset(const std::string& spec, DatasetUse use, const std::vector<std::string>& classes,
                                     const DatasetOptions& options = {}) {
  namespace fs = std::filesystem;
  using namespace dataset_detail;
  EvalDataset d;
  d.source = spec;
  std::error_code ec;
  const bool classify = use == DatasetUse::classification;
  if (fs::is_directory(spec, ec)) {
    CLIP_CHECK(classify, "'", spec, "' is a folder of class folders; retrieval needs a caption table or shards");
    for (const auto& entry : fs::directory_iterator(spec))
      if (entry.is_directory(ec)) d.folder_classes.push_back(entry.path().filename().string());
    std::sort(d.folder_classes.begin(), d.folder_classes.end());
    CLIP_CHECK(!d.folder_classes.empty(), "'", spec, "' holds no class folders");
    CLIP_CHECK(classes.empty() || classes.size() == d.folder_classes.size(), "the class list names ", classes.size(),
               " classes but '", spec, "' has ", d.folder_classes.size(), " class folders");
    for (size_t c = 0; c < d.folder_classes.size(); ++c) {
      const fs::path folder = fs::path(spec) / d.folder_classes[c];
      const std::vector<fs::path> files = list_image_files(folder);
      CLIP_CHECK(!files.empty(), "the class folder '", folder.string(), "' holds no image (an empty class)");
      for (const fs::path& f : files) {
        d.images.push_back(file_blob(f));
        d.labels.push_back(static_cast<int64_t>(c));
      }
    }
    return d;
  }
  const std::string ext = lower_extension(spec);
  if (ext == ".csv" || ext == ".tsv") {
    data::CsvOptions csv;
    csv.image_key = options.image_key;
    csv.caption_key = classify ? options.label_key : options.caption_key;
    const data::CaptionTable table = data::read_caption_table(spec, csv);
    std::map<std::string, size_t> by_image;  // retrieval: one image per distinct path
    for (const data::CaptionRow& row : table.rows) {
      const std::string where = "'" + spec + "' line " + std::to_string(row.line);
      CLIP_CHECK(!row.image.empty(), where, ": the ", options.image_key, " cell is empty");
      CLIP_CHECK(fs::is_regular_file(row.path, ec), where, ": the image '", row.image, "' does not exist",
                 row.path.string() == row.image ? std::string() : " (looked for '" + row.path.string() + "')");
      if (classify) {
        d.images.push_back(file_blob(row.path));
        d.labels.push_back(parse_label(row.caption, classes, where));
        continue;
      }
      CLIP_CHECK(!trim(row.caption).empty(), where, ": the caption is empty");
      const auto [it, added] = by_image.emplace(row.path.string(), d.images.size());
      if (added) {
        d.images.push_back(file_blob(row.path));
        d.captions.emplace_back();
      }
      d.captions[it->second].push_back(row.caption);
    }
  } else {
    const std::vector<data::DataSource> sources = data::resolve_sources({spec});
    for (const data::DataSource& source : sources) {
      CLIP_CHECK(!source.table, "'", spec, "': give either caption tables or shards, not a mixture");
      data::StreamIssues issues;
      const std::vector<data::DataSource> one{source};
      data::RecordStream stream(one, 0, 0, issues);
      while (std::optional<data::Record> r = stream.next(false)) {
        const std::string where = source.path.string() + ": record '" + r->key + "'";
        CLIP_CHECK(r->image.present, where, " has no image");
        if (classify) {
          CLIP_CHECK(r->label.present, where, " has no cls member (the class index)");
          const std::vector<uint8_t> bytes = r->label.take();
          d.labels.push_back(parse_label(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
                                         classes, where));
        } else {
          CLIP_CHECK(r->caption.present, where, " has no txt member (its caption)");
          const std::vector<uint8_t> bytes = r->caption.take();
          d.captions.push_back(
              parse_captions(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), where));
        }
        d.images.push_back(std::move(r->image));
      }
      CLIP_CHECK(issues.truncated_shards == 0 && issues.unreadable_shards == 0, "the shard '", source.path.string(),
                 "' is damaged: ", issues.reasons.empty() ? std::string("unreadable") : issues.reasons.front());
    }
  }
  CLIP_CHECK(!d.images.empty(), "'", spec, "' holds no image");
  return d;
}

}  // namespace clip
