// The record stream: what the data loader's sources hold, one record (image + caption, and a
// class label when there is one) at a time, in the order one epoch visits them.
//
// Sources are WebDataset tar shards and CSV/TSV caption tables (csv.hpp). A shard's members
// group into records as WebDataset groups them: by key, the member name up to the first dot of
// its last path component ("a/b/00012.jpg" -> key "a/b/00012", extension "jpg"), consecutive
// members with one key forming one record. The image is the record's first member with an image
// extension (jpg, jpeg, png, webp, bmp, gif, ...; whether it decodes is found out later), the
// caption its "txt" member, the label its "cls" member. Members without an extension are
// ignored, as WebDataset ignores them.
//
// One epoch's order: the sources in a random order drawn from (seed, epoch); a table's rows in
// a random permutation drawn from (seed, epoch, its place in the source list) (a table is read
// whole, so it can be permuted, as open_clip's CsvDataset does); then everything through a
// shuffle buffer seeded from (seed, epoch).
//
// The stream can run without reading bodies (a replay to a saved position reads only the tar
// headers), or without reading the images (a process that prepares only its slice of each batch
// reads every caption but only its own images); a record met that way holds where its members
// are, and Blob::take() reads them when the record is finally used. Problems with whole shards
// (one that cannot be opened, one cut short or corrupt) are counted in StreamIssues and never
// stop the stream: the records before the damage are kept.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/data/csv.hpp"
#include "clip/data/random.hpp"
#include "clip/data/shards.hpp"
#include "clip/data/shuffle_buffer.hpp"
#include "clip/data/tar.hpp"

namespace clip::data {

// A tar shard, or a caption table read when the source list was resolved.
struct DataSource {
  std::filesystem::path path;
  std::shared_ptr<const CaptionTable> table;  // null for a tar shard
};

// The sources named by `specs`, each a "::"-separated brace list (shards.hpp). Every file must
// exist: a missing shard is a mistake in the list, not damaged data.
inline std::vector<DataSource> resolve_sources(const std::vector<std::string>& specs, const CsvOptions& csv = {}) {
  CLIP_CHECK(!specs.empty(), "no training data was given: name tar shards (data/{00000..00099}.tar) or a CSV/TSV file");
  std::vector<DataSource> sources;
  for (const std::string& spec : specs) {
    for (const std::string& name : expand_shard_list(spec)) {
      const std::filesystem::path path(name);
      std::error_code ec;
      const bool exists = std::filesystem::exists(path, ec);
      CLIP_CHECK(exists, "the data source '", name, "' does not exist",
                 name == spec ? std::string() : " (from the list '" + spec + "')");
      std::string ext = path.extension().string();
      for (char& c : ext) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
      DataSource source{path, nullptr};
      if (ext == ".csv" || ext == ".tsv") {
        source.table = std::make_shared<const CaptionTable>(read_caption_table(path, csv));
      } else {
        CLIP_CHECK(ext == ".tar", "cannot tell what kind of data '", name,
                   "' holds: give WebDataset shards (.tar) or a caption table (.csv, .tsv)");
      }
      sources.push_back(std::move(source));
    }
  }
  return sources;
}

// The bytes of one member or file: read along with the stream, or located and read on demand.
struct Blob {
  bool present = false;
  std::string name;             // for messages: "shard.tar:key.jpg", or the image file
  std::filesystem::path file;   // where the bytes are
  int64_t offset = -1;          // of the bytes in `file`; -1: the whole file
  int64_t size = 0;
  bool loaded = false;
  std::vector<uint8_t> bytes;   // when loaded

  // The bytes (moved out when loaded). Throws clip::Error when they cannot be read.
  std::vector<uint8_t> take() {
    if (loaded) {
      loaded = false;
      return std::move(bytes);
    }
    CLIP_CHECK(present, "'", name, "' is missing");
    std::unique_ptr<std::FILE, tar_detail::FileCloser> f(std::fopen(file.c_str(), "rb"));
    CLIP_CHECK(f, "cannot open '", file.string(), "': ", std::strerror(errno));
    int64_t n = size;
    if (offset < 0) {
      std::error_code ec;
      if (std::filesystem::is_directory(file, ec)) CLIP_FAIL("cannot read '", file.string(), "': it is a directory");
      const auto length = std::filesystem::file_size(file, ec);
      CLIP_CHECK(!ec, "cannot read '", file.string(), "': ", ec.message());
      n = static_cast<int64_t>(length);
    } else {
      CLIP_CHECK(fseeko(f.get(), static_cast<off_t>(offset), SEEK_SET) == 0, "cannot read '", name, "'");
    }
    std::vector<uint8_t> out(static_cast<size_t>(n));
    CLIP_CHECK(std::fread(out.data(), 1, out.size(), f.get()) == out.size(), "cannot read '", name,
               "': the file is shorter than expected (changed while training?)");
    return out;
  }
};

struct Record {
  std::string key;     // the WebDataset key, or the table's image cell
  std::string origin;  // the shard, or "table.csv line N"
  Blob image, caption, label;
};

// Whole-shard problems met by a stream; reasons keeps the first few.
struct StreamIssues {
  int64_t truncated_shards = 0;   // cut short or corrupt: the records before the damage were kept
  int64_t unreadable_shards = 0;  // could not be opened
  std::vector<std::string> reasons;
  static constexpr size_t kMaxReasons = 20;

  void note(std::string reason) {
    if (reasons.size() < kMaxReasons) reasons.push_back(std::move(reason));
  }
};

namespace records_detail {

// WebDataset's split of a member name into key and extension (lowercased); false when the last
// path component has no extension or starts with a dot.
inline bool split_key(std::string_view name, std::string& key, std::string& ext) {
  const size_t slash = name.rfind('/');
  const size_t base = slash == std::string_view::npos ? 0 : slash + 1;
  const size_t dot = name.find('.', base);
  if (dot == std::string_view::npos || dot == base || dot + 1 == name.size()) return false;
  key = std::string(name.substr(0, dot));
  ext = std::string(name.substr(dot + 1));
  for (char& c : ext) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return true;
}

inline bool is_image_extension(std::string_view ext) {
  const size_t dot = ext.rfind('.');
  const std::string_view last = dot == std::string_view::npos ? ext : ext.substr(dot + 1);
  for (std::string_view e : {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm"})
    if (last == e) return true;
  return false;
}

}  // namespace records_detail

// One epoch's records, before the shuffle buffer.
class RecordStream {
 public:
  RecordStream(const std::vector<DataSource>& sources, uint64_t seed, int64_t epoch, StreamIssues& issues)
      : sources_(&sources), seed_(seed), epoch_(epoch), issues_(&issues) {
    order_.resize(sources.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = i;
    Rng rng(derive_seed(seed, RandomUse::shard_order, {static_cast<uint64_t>(epoch)}));
    shuffle(order_, rng);
  }

  // The next record; with `bodies` false, nothing but tar headers is read, with `images` false
  // every body but the images' (they stay located, for Blob::take()).
  std::optional<Record> next(bool bodies, bool images = true) {
    for (;;) {
      if (table_) {
        if (next_row_ < rows_.size()) return table_record(rows_[next_row_++]);
        table_.reset();
      }
      if (tar_) {
        if (!tar_ended_)
          if (std::optional<Record> record = next_group(bodies, images)) return record;
        tar_.reset();
      }
      if (next_source_ == order_.size()) return std::nullopt;
      const size_t index = order_[next_source_++];
      const DataSource& source = (*sources_)[index];
      if (source.table) {
        table_ = source.table;
        rows_.resize(table_->rows.size());
        for (size_t i = 0; i < rows_.size(); ++i) rows_[i] = i;
        Rng rng(derive_seed(seed_, RandomUse::table_rows, {static_cast<uint64_t>(epoch_), index}));
        shuffle(rows_, rng);
        next_row_ = 0;
        continue;
      }
      try {
        tar_.emplace(source.path);
        pending_.reset();
        tar_ended_ = false;
      } catch (const Error& e) {
        ++issues_->unreadable_shards;
        issues_->note(e.what());
      }
    }
  }

 private:
  Record table_record(size_t r) const {
    const CaptionRow& row = table_->rows[r];
    Record record;
    record.key = row.image;
    record.origin = table_->file.string() + " line " + std::to_string(row.line);
    record.image.present = !row.image.empty();
    record.image.name = row.path.string();
    record.image.file = row.path;
    record.caption.present = !row.caption.empty();
    record.caption.name = record.origin;
    record.caption.loaded = true;
    record.caption.bytes.assign(row.caption.begin(), row.caption.end());
    return record;
  }

  // The next group of members with one key, or nothing at the end of the shard.
  std::optional<Record> next_group(bool bodies, bool images) {
    std::optional<Record> record;
    std::string key, ext;
    for (;;) {
      std::optional<TarEntry> entry = pending_ ? std::exchange(pending_, std::nullopt) : tar_->next();
      if (!entry) {
        tar_ended_ = true;  // report the shard's problem once, with its last record
        if (tar_->truncated()) {
          ++issues_->truncated_shards;
          issues_->note(tar_->path().string() + ": " + tar_->problem());
        }
        return record;
      }
      if (!records_detail::split_key(entry->name, key, ext)) continue;
      if (record && key != record->key) {
        pending_ = std::move(entry);
        return record;
      }
      if (!record) {
        record.emplace();
        record->key = key;
        record->origin = tar_->path().string();
      }
      Blob* blob = nullptr;
      if (records_detail::is_image_extension(ext)) blob = &record->image;
      else if (ext == "txt") blob = &record->caption;
      else if (ext == "cls") blob = &record->label;
      if (!blob || blob->present) continue;  // other members (json...) and duplicates are not used
      blob->present = true;
      blob->name = record->origin + ":" + entry->name;
      blob->file = tar_->path();
      blob->offset = entry->offset;
      blob->size = entry->size;
      if (bodies && (images || blob != &record->image)) {
        try {
          blob->bytes = tar_->read();
          blob->loaded = true;
        } catch (const Error& e) {  // the file changed under us: the shard ends here
          ++issues_->truncated_shards;
          issues_->note(e.what());
          tar_ended_ = true;
          return record;
        }
      }
    }
  }

  const std::vector<DataSource>* sources_;
  uint64_t seed_;
  int64_t epoch_;
  StreamIssues* issues_;
  std::vector<size_t> order_;
  size_t next_source_ = 0;
  std::optional<TarReader> tar_;
  std::optional<TarEntry> pending_;
  bool tar_ended_ = false;
  std::shared_ptr<const CaptionTable> table_;
  std::vector<size_t> rows_;
  size_t next_row_ = 0;
};

// One epoch's records in their final order: the record stream through the shuffle buffer.
class EpochStream {
 public:
  EpochStream(const std::vector<DataSource>& sources, uint64_t seed, int64_t epoch, int64_t shuffle_buffer,
              StreamIssues& issues)
      : records_(sources, seed, epoch, issues),
        buffer_(shuffle_buffer, derive_seed(seed, RandomUse::shuffle_buffer, {static_cast<uint64_t>(epoch)})) {}

  std::optional<Record> next(bool bodies, bool images = true) {
    while (!input_done_) {
      std::optional<Record> record = records_.next(bodies, images);
      if (!record) {
        input_done_ = true;
        break;
      }
      if (std::optional<Record> out = buffer_.push(std::move(*record))) return out;
    }
    return buffer_.drain();
  }

 private:
  RecordStream records_;
  ShuffleBuffer<Record> buffer_;
  bool input_done_ = false;
};

}  // namespace clip::data
