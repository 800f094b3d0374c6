// The training data loader: batches of CLIP-normalised images [B, 3, R, R] and token rows [B, T]
// from WebDataset tar shards or CSV/TSV caption tables, prepared ahead of the training step.
//
// Pipeline: the record stream (records.hpp: shards in a per-epoch random order, table rows
// permuted, a shuffle buffer) hands out records numbered 0, 1, 2... within each epoch (the
// stream index); worker threads take them in turn and decode the image, augment it
// (augment.hpp) and tokenize the caption (BpeTokenizer::tokenize, truncating to the context
// length); a reorder step hands the prepared samples to next() strictly by stream index, so a
// batch never depends on which worker finished first.
//
// Determinism: the order of records depends only on (seed, epoch) and the data; a sample's
// augmentation only on (seed, epoch, stream index). Batches are therefore bit for bit the same
// for any number of workers (0 runs everything inside next()), and a loader built at a saved
// DataPosition continues with exactly the batches the original would have produced: it replays
// the epoch's record stream up to the position reading only tar headers (no image is read or
// decoded), then carries on. A DataPosition counts stream indices, skipped records included.
//
// Damaged data is skipped and counted, never fatal: an image that does not decode, a file that
// cannot be read, a record without an image or caption, a caption that is not valid UTF-8 or is
// blank. A shard cut short or corrupt keeps the records before the damage (its last, partial
// record is skipped like any other), and is counted apart. What is fatal, with a message: a
// source list naming no files, a missing file, an unknown file kind, a CSV without the named
// columns, sources without any record, and an epoch in which no record at all could be used.
//
// Threads: `workers` std::threads, which sleep on a condition variable once `prefetch` samples
// are prepared or in preparation (no spinning), so they leave the cores to the training step.
// The tokenizer must outlive the loader.
#pragma once

#include <algorithm>
#include <charconv>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/core/limits.hpp"
#include "clip/data/augment.hpp"
#include "clip/data/csv.hpp"
#include "clip/data/random.hpp"
#include "clip/data/records.hpp"
#include "clip/image/decode.hpp"
#include "clip/text/bpe_tokenizer.hpp"
#include "clip/text/utf8.hpp"

namespace clip::data {

struct DataOptions {
  int resolution = 0;          // R: images come out R x R
  int context_length = 0;      // T: token rows of T ids
  int64_t batch = 0;           // B
  int workers = 2;             // preparing threads; 0: prepare inside next()
  int64_t shuffle_buffer = 1000;
  uint64_t seed = 0;
  bool augment = true;         // false: CLIP's centre-crop preprocessing
  float min_crop_scale = 0.8f; // the random square's smallest side, as a fraction of the shorter side
  bool loop = true;            // epochs forever; false: one epoch, its last batch may be short
  int max_shift = 0;           // augmentation: then a random shift by up to this many pixels
  int64_t prefetch = 0;        // samples prepared ahead of next(); 0: two batches
  CsvOptions csv = {};         // columns and separator of CSV/TSV sources
};

// Where the stream stands: the epoch, and how many of its records (skipped ones included) the
// batches handed out so far have consumed.
struct DataPosition {
  int64_t epoch = 0;
  int64_t samples = 0;
};

struct DataStats {
  int64_t samples = 0;                        // handed out in batches
  int64_t skipped = 0;                        // records skipped (see the header comment)
  std::vector<std::string> skipped_reasons;   // the first few, each naming the file and member
  int64_t truncated_shards = 0;               // cut short or corrupt; the records before were kept
  int64_t unreadable_shards = 0;              // could not be opened
  std::vector<std::string> shard_problems;    // the first few
};

struct Batch {
  int64_t size = 0;              // B, or fewer for the last batch of a loader with loop = false
  std::vector<float> images;     // [B, 3, R, R] CLIP-normalised
  std::vector<int32_t> tokens;   // [B, T]
  std::vector<std::string> keys; // [B] WebDataset keys (or the tables' image cells)
  std::vector<int> labels;       // [B] the records' "cls" labels, -1 where there is none
};

class DataLoader {
 public:
  static constexpr size_t kMaxReasons = 20;

  // `sources`: tar shards or CSV/TSV tables, each entry a "::"-separated brace list.
  DataLoader(const std::vector<std::string>& sources, const text::BpeTokenizer& tokenizer, DataOptions options,
             DataPosition start = {})
      : tokenizer_(tokenizer), options_(std::move(options)), position_(start) {
    const DataOptions& o = options_;
    CLIP_CHECK(o.resolution > 0, "the data loader needs a positive image resolution, not ", o.resolution);
    CLIP_CHECK(o.context_length >= 2, "the data loader needs a context length of at least 2, not ", o.context_length);
    CLIP_CHECK(o.batch > 0, "the batch size must be positive, not ", o.batch);
    CLIP_CHECK(o.workers >= 0 && o.workers <= 256, "the number of data workers must lie in [0, 256], not ", o.workers);
    CLIP_CHECK(o.min_crop_scale > 0.0f && o.min_crop_scale <= 1.0f, "the smallest crop scale must lie in (0, 1], not ",
               o.min_crop_scale);
    CLIP_CHECK(o.max_shift >= 0, "the largest shift must not be negative, not ", o.max_shift);
    CLIP_CHECK(start.epoch >= 0 && start.samples >= 0, "a data position cannot be negative (epoch ", start.epoch,
               ", sample ", start.samples, ")");
    augment_ = AugmentOptions{o.augment, o.min_crop_scale, o.max_shift};
    capacity_ = std::max<int64_t>(o.prefetch > 0 ? o.prefetch : 2 * o.batch, std::max(o.workers, 1));
    sources_ = resolve_sources(sources, o.csv);

    // Replay the epoch up to the start position, reading tar headers only.
    stream_epoch_ = start.epoch;
    stream_.emplace(sources_, o.seed, stream_epoch_, o.shuffle_buffer, issues_);
    for (; stream_index_ < start.samples; ++stream_index_)
      CLIP_CHECK(stream_->next(false), "cannot resume the data at epoch ", start.epoch, ", sample ", start.samples,
                 ": that epoch has only ", stream_index_, " records (did the data change since the position was saved?)");
    epoch_from_start_ = start.samples == 0;

    // ICU builds its normaliser on first use, thread-safely but out of ThreadSanitizer's sight:
    // one caption here, before the workers start, keeps that out of the threads.
    tokenizer_.tokenize("warm up", o.context_length, true);
    try {
      for (int w = 0; w < o.workers; ++w) threads_.emplace_back([this] { work(); });
    } catch (...) {
      shut_down();
      throw;
    }
  }

  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;
  ~DataLoader() { shut_down(); }

  // The next batch; nothing once a loader with loop = false has handed out its epoch.
  std::optional<Batch> next() {
    const int64_t R = options_.resolution, T = options_.context_length;
    Batch batch;
    batch.images.reserve(static_cast<size_t>(options_.batch * 3 * R * R));
    batch.tokens.reserve(static_cast<size_t>(options_.batch * T));
    while (batch.size < options_.batch) {
      std::optional<Sample> sample = options_.workers == 0 ? prepare_here() : wait_for_next();
      if (!sample) break;
      take(std::move(*sample), batch);
    }
    if (batch.size == 0) return std::nullopt;
    return batch;
  }

  // Where the next batch starts; a loader built at this position yields the same batches.
  DataPosition position() const {
    std::lock_guard lock(mutex_);
    return position_;
  }

  DataStats stats() const {
    std::scoped_lock lock(source_mutex_, mutex_);
    DataStats s = stats_;
    s.truncated_shards = issues_.truncated_shards;
    s.unreadable_shards = issues_.unreadable_shards;
    s.shard_problems = issues_.reasons;
    return s;
  }

  const DataOptions& options() const { return options_; }

 private:
  // A record with its place in the stream, or the end of an epoch.
  struct Item {
    int64_t seq = 0;  // across epochs: the order next() hands items out in
    int64_t epoch = 0, index = 0;
    bool epoch_end = false;
    Record record;
  };

  struct Sample {
    int64_t epoch = 0, index = 0;
    bool epoch_end = false, ok = false;
    std::string key, reason;
    std::vector<float> image;     // [3, R, R]
    std::vector<int32_t> tokens;  // [T]
    int label = -1;
  };

  // The stream's next item (source_mutex_ held); nothing after the last epoch.
  std::optional<Item> pull() {
    if (stream_finished_) return std::nullopt;
    if (std::optional<Record> record = stream_->next(true))
      return Item{next_seq_++, stream_epoch_, stream_index_++, false, std::move(*record)};
    if (stream_index_ == 0) {
      std::string why;
      for (const std::string& r : issues_.reasons) why += "\n  " + r;
      CLIP_FAIL("the data sources hold no records (", sources_.size(), " file", sources_.size() == 1 ? "" : "s",
                ", none with an image or caption member)", why);
    }
    Item end{next_seq_++, stream_epoch_, stream_index_, true, {}};
    if (options_.loop) {
      ++stream_epoch_;
      stream_index_ = 0;
      stream_.emplace(sources_, options_.seed, stream_epoch_, options_.shuffle_buffer, issues_);
    } else {
      stream_finished_ = true;
    }
    return end;
  }

  // Decode, augment and tokenize; problems become a skip reason.
  Sample prepare(Item item) const {
    Sample s;
    s.epoch = item.epoch;
    s.index = item.index;
    s.epoch_end = item.epoch_end;
    if (item.epoch_end) return s;
    Record& r = item.record;
    s.key = r.key;
    try {
      CLIP_CHECK(r.image.present, r.origin, ": record '", r.key, "' has no image");
      CLIP_CHECK(r.caption.present, r.origin, ": record '", r.key, "' has no caption");
      const std::vector<uint8_t> text_bytes = r.caption.take();
      CLIP_CHECK(text_bytes.size() <= limits::kMaxCaptionBytes, r.caption.name, ": the caption has ", text_bytes.size(),
                 " bytes, more than the limit of ", limits::kMaxCaptionBytes);
      const std::string_view caption(reinterpret_cast<const char*>(text_bytes.data()), text_bytes.size());
      const size_t bad = text::utf8::find_invalid(caption);
      CLIP_CHECK(bad == std::string_view::npos, r.caption.name, ": the caption is not valid UTF-8 (byte ", bad, ")");
      CLIP_CHECK(caption.find_first_not_of(" \t\r\n\f\v") != std::string_view::npos, r.caption.name,
                 ": the caption is blank");
      const std::vector<int> ids = tokenizer_.tokenize(caption, options_.context_length, true);
      s.tokens.assign(ids.begin(), ids.end());

      const std::vector<uint8_t> bytes = r.image.take();
      const image::Image decoded = image::decode(bytes, r.image.name);
      const int R = options_.resolution;
      s.image.resize(static_cast<size_t>(3) * R * R);
      Rng rng(derive_seed(options_.seed, RandomUse::augment,
                          {static_cast<uint64_t>(item.epoch), static_cast<uint64_t>(item.index)}));
      augment(decoded, R, augment_, rng, s.image);

      if (r.label.present) {
        const std::vector<uint8_t> label = r.label.take();
        const char* p = reinterpret_cast<const char*>(label.data());
        const char* end = p + label.size();
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
        int value = -1;
        if (std::from_chars(p, end, value).ec == std::errc() && value >= 0) s.label = value;
      }
      s.ok = true;
    } catch (const std::exception& e) {
      s.ok = false;
      s.reason = e.what();
      s.image.clear();
      s.tokens.clear();
    }
    return s;
  }

  // workers == 0: the next item, prepared by the caller's thread.
  std::optional<Sample> prepare_here() {
    std::optional<Item> item;
    {
      std::lock_guard lock(source_mutex_);
      item = pull();
    }
    if (!item) return std::nullopt;
    return prepare(std::move(*item));
  }

  // workers > 0: the next item in stream order, once a worker has prepared it.
  std::optional<Sample> wait_for_next() {
    std::unique_lock lock(mutex_);
    ready_cv_.wait(lock, [&] { return error_ || ready_.count(consumed_) || (total_ >= 0 && consumed_ >= total_); });
    if (error_) std::rethrow_exception(error_);
    const auto it = ready_.find(consumed_);
    if (it == ready_.end()) return std::nullopt;
    Sample s = std::move(it->second);
    ready_.erase(it);
    ++consumed_;
    --reserved_;
    lock.unlock();
    work_cv_.notify_one();
    return s;
  }

  void work() {
    for (;;) {
      {
        std::unique_lock lock(mutex_);
        work_cv_.wait(lock, [&] { return stop_ || error_ || total_ >= 0 || reserved_ < capacity_; });
        if (stop_ || error_ || total_ >= 0) return;
        ++reserved_;
      }
      std::optional<Item> item;
      try {
        std::lock_guard source(source_mutex_);
        item = pull();
        if (!item) {
          {
            std::lock_guard lock(mutex_);
            total_ = next_seq_;
            --reserved_;
          }
          ready_cv_.notify_all();
          work_cv_.notify_all();
          return;
        }
      } catch (...) {
        {
          std::lock_guard lock(mutex_);
          error_ = std::current_exception();
        }
        ready_cv_.notify_all();
        work_cv_.notify_all();
        return;
      }
      const int64_t seq = item->seq;
      Sample sample = prepare(std::move(*item));
      {
        std::lock_guard lock(mutex_);
        ready_.emplace(seq, std::move(sample));
      }
      ready_cv_.notify_one();
    }
  }

  // Hands one prepared item to the batch (or counts it as skipped) and moves the position on.
  void take(Sample&& s, Batch& batch) {
    std::lock_guard lock(mutex_);
    if (s.epoch_end) {
      if (options_.loop && epoch_from_start_ && epoch_used_ == 0) {
        std::string why;
        for (const std::string& r : stats_.skipped_reasons) why += "\n  " + r;
        CLIP_FAIL("no record of epoch ", s.epoch, " could be used (", stats_.skipped, " skipped); the first reasons:",
                  why);
      }
      position_ = DataPosition{s.epoch + 1, 0};
      epoch_used_ = 0;
      epoch_from_start_ = true;
      return;
    }
    position_ = DataPosition{s.epoch, s.index + 1};
    if (!s.ok) {
      ++stats_.skipped;
      if (stats_.skipped_reasons.size() < kMaxReasons) stats_.skipped_reasons.push_back(std::move(s.reason));
      return;
    }
    ++stats_.samples;
    ++epoch_used_;
    batch.images.insert(batch.images.end(), s.image.begin(), s.image.end());
    batch.tokens.insert(batch.tokens.end(), s.tokens.begin(), s.tokens.end());
    batch.keys.push_back(std::move(s.key));
    batch.labels.push_back(s.label);
    ++batch.size;
  }

  void shut_down() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (std::thread& t : threads_)
      if (t.joinable()) t.join();
  }

  const text::BpeTokenizer& tokenizer_;
  DataOptions options_;
  AugmentOptions augment_;
  int64_t capacity_ = 0;
  std::vector<DataSource> sources_;

  // The stream, guarded by source_mutex_ (taken before mutex_ when both are needed).
  mutable std::mutex source_mutex_;
  StreamIssues issues_;
  std::optional<EpochStream> stream_;
  int64_t stream_epoch_ = 0, stream_index_ = 0, next_seq_ = 0;
  bool stream_finished_ = false;

  // The hand-over between workers and next(), guarded by mutex_.
  mutable std::mutex mutex_;
  std::condition_variable work_cv_, ready_cv_;
  std::map<int64_t, Sample> ready_;  // prepared, by seq
  int64_t reserved_ = 0;             // items taken from the stream and not yet handed out
  int64_t consumed_ = 0;             // the seq next() needs next
  int64_t total_ = -1;               // the number of items, once the stream has finished
  std::exception_ptr error_;
  bool stop_ = false;

  // The caller's side (also under mutex_, for position() and stats() from other threads).
  DataPosition position_;
  DataStats stats_;
  int64_t epoch_used_ = 0;
  bool epoch_from_start_ = true;

  std::vector<std::thread> threads_;
};

}  // namespace clip::data
