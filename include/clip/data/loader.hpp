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
// A process of a data-parallel job (BatchShare: rank r of W) prepares only its slice of each
// global batch, rows [first, first + rows) as clip::batch_slice splits them, and next()
// hands out those rows alone, bit for bit the rows a one-process loader would put there. Every
// process reads every record's tar headers and caption and checks the caption (cheap), but reads,
// decodes and augments only the images of its own rows. Which records a batch uses is then known
// up to the images other processes found broken: after preparing its rows, each process tells
// the others the records it could not prepare (BatchShare::exchange, a collective the caller
// provides, so data/ needs no transport); when any process reports one, the rows after it shift,
// the rows are assigned anew and what became a process's own is prepared, until a round reports
// nothing (damaged images are rare: one exchange per batch in practice). Positions and DataStats
// are those of one process, on every rank (samples counts the global batches' rows; the reasons
// for other processes' images are theirs, as exchanged). next() reads the headers and captions
// on the caller's thread; the workers prepare this process's rows of the next ceil(prefetch / B)
// batches as far as they are known (a failure found later may shift some to other processes).
//
// Threads: `workers` std::threads, which sleep on a condition variable once `prefetch` samples
// are prepared or in preparation (no spinning), so they leave the cores to the training step.
// The tokenizer must outlive the loader.
#pragma once

#include <algorithm>
#include <charconv>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "clip/core/batch_slice.hpp"
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
  int64_t samples = 0;                        // handed out in batches (with a BatchShare: by all ranks)
  int64_t skipped = 0;                        // records skipped (see the header comment)
  std::vector<std::string> skipped_reasons;   // the first few, each naming the file and member
  int64_t truncated_shards = 0;               // cut short or corrupt; the records before were kept
  int64_t unreadable_shards = 0;              // could not be opened
  std::vector<std::string> shard_problems;    // the first few
};

// This process's part in a data-parallel job: rank `rank` of `world` processes, each with a loader
// on the same sources, options and start position.
struct BatchShare {
  int world = 1, rank = 0;
  // An all-gather of bytes: called by every rank at the same points of next() with this rank's
  // bytes (the records it could not prepare), returns every rank's, in rank order. The caller's
  // transport (clip::dist::all_gather_bytes over a Communicator), as data/ has none.
  std::function<std::vector<std::string>(const std::string&)> exchange;
};

struct Batch {
  int64_t size = 0;              // B, or fewer for the last batch of a loader with loop = false
                                 // (with a BatchShare: this rank's rows of that global batch)
  int64_t first = 0;             // with a BatchShare: where this rank's rows start in the batch
  int64_t global_size = 0;       // the global batch's rows (= size without a BatchShare)
  std::vector<float> images;     // [B, 3, R, R] CLIP-normalised
  std::vector<int32_t> tokens;   // [B, T]
  std::vector<std::string> keys; // [B] WebDataset keys (or the tables' image cells)
  std::vector<int> labels;       // [B] the records' "cls" labels, -1 where there is none
};

class DataLoader {
 public:
  static constexpr size_t kMaxReasons = 20;

  // `sources`: tar shards or CSV/TSV tables, each entry a "::"-separated brace list.
  // `share`: this process's part in a data-parallel job; without one (world 1), the whole batch.
  DataLoader(const std::vector<std::string>& sources, const text::BpeTokenizer& tokenizer, DataOptions options,
             DataPosition start = {}, BatchShare share = {})
      : tokenizer_(tokenizer), options_(std::move(options)), share_(std::move(share)), position_(start) {
    const DataOptions& o = options_;
    CLIP_CHECK(o.resolution > 0, "the data loader needs a positive image resolution, not ", o.resolution);
    CLIP_CHECK(o.context_length >= 2, "the data loader needs a context length of at least 2, not ", o.context_length);
    CLIP_CHECK(o.batch > 0, "the batch size must be positive, not ", o.batch);
    CLIP_CHECK(o.workers >= 0 && o.workers <= 256, "the number of data workers must lie in [0, 256], not ", o.workers);
    CLIP_CHECK(o.min_crop_scale > 0.0f && o.min_crop_scale <= 1.0f, "the smallest crop scale must lie in (0, 1], not ",
               o.min_crop_scale);
    CLIP_CHECK(o.max_shift >= 0, "the largest shift must not be negative, not ", o.max_shift);
    CLIP_CHECK(share_.world >= 1 && share_.rank >= 0 && share_.rank < share_.world, "rank ", share_.rank,
               " is not in a world of ", share_.world, " processes");
    CLIP_CHECK(share_.world == 1 || share_.exchange, "a data loader of one of ", share_.world,
               " processes needs the exchange of failed records");
    CLIP_CHECK(start.epoch >= 0 && start.samples >= 0, "a data position cannot be negative (epoch ", start.epoch,
               ", sample ", start.samples, ")");
    augment_ = AugmentOptions{o.augment, o.min_crop_scale, o.max_shift};
    capacity_ = std::max<int64_t>(o.prefetch > 0 ? o.prefetch : 2 * o.batch, std::max(o.workers, 1));
    ahead_ = std::max<int64_t>(1, (capacity_ + o.batch - 1) / o.batch);
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
      for (int w = 0; w < o.workers; ++w)
        threads_.emplace_back([this] { shared() ? work_on_share() : work(); });
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
    if (shared()) return next_share();
    const int64_t R = options_.resolution, T = options_.context_length;
    Batch batch;
    batch.images.reserve(static_cast<size_t>(options_.batch * 3 * R * R));
    batch.tokens.reserve(static_cast<size_t>(options_.batch * T));
    while (batch.size < options_.batch) {
      std::optional<Sample> sample = options_.workers == 0 ? prepare_here() : wait_for_next();
      if (!sample) break;
      take(std::move(*sample), &batch);
    }
    if (batch.size == 0) return std::nullopt;
    batch.global_size = batch.size;
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
  std::optional<Item> pull(bool images = true) {
    if (stream_finished_) return std::nullopt;
    if (std::optional<Record> record = stream_->next(true, images))
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

  // The checks that need no image, in the order prepare() makes them: the caption's bytes, or a
  // clip::Error that says what is wrong with the record.
  static std::vector<uint8_t> checked_caption(Record& r) {
    CLIP_CHECK(r.image.present, r.origin, ": record '", r.key, "' has no image");
    CLIP_CHECK(r.caption.present, r.origin, ": record '", r.key, "' has no caption");
    std::vector<uint8_t> text_bytes = r.caption.take();
    CLIP_CHECK(text_bytes.size() <= limits::kMaxCaptionBytes, r.caption.name, ": the caption has ", text_bytes.size(),
               " bytes, more than the limit of ", limits::kMaxCaptionBytes);
    const std::string_view caption(reinterpret_cast<const char*>(text_bytes.data()), text_bytes.size());
    const size_t bad = text::utf8::find_invalid(caption);
    CLIP_CHECK(bad == std::string_view::npos, r.caption.name, ": the caption is not valid UTF-8 (byte ", bad, ")");
    CLIP_CHECK(caption.find_first_not_of(" \t\r\n\f\v") != std::string_view::npos, r.caption.name,
               ": the caption is blank");
    return text_bytes;
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
      const std::vector<uint8_t> text_bytes = checked_caption(r);
      const std::string_view caption(reinterpret_cast<const char*>(text_bytes.data()), text_bytes.size());
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

  // Hands one prepared item to the batch (or counts it as skipped) and moves the position on;
  // with no batch (another rank's row) it is only counted.
  void take(Sample&& s, Batch* batch) {
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
    if (!batch) return;
    batch->images.insert(batch->images.end(), s.image.begin(), s.image.end());
    batch->tokens.insert(batch->tokens.end(), s.tokens.begin(), s.tokens.end());
    batch->keys.push_back(std::move(s.key));
    batch->labels.push_back(s.label);
    ++batch->size;
  }

  // ---- A BatchShare of more than one process (see the header comment) ----

  bool shared() const { return share_.world > 1; }

  // A record one process could not prepare, as it tells the others: its stream place and why.
  struct Failure {
    int64_t epoch = 0, index = 0;
    std::string reason;
  };

  static void put(std::string& out, int64_t v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); }
  static int64_t get(const std::string& in, size_t& at) {
    CLIP_CHECK(in.size() - at >= sizeof(int64_t), "a garbled list of failed records came from another process");
    int64_t v;
    std::memcpy(&v, in.data() + at, sizeof v);
    at += sizeof v;
    return v;
  }

  // Every rank's failures: this rank's out, all of them back (rank 0's first).
  std::vector<Failure> exchange(const std::vector<Failure>& mine) const {
    std::string bytes;
    for (const Failure& f : mine) {
      put(bytes, f.epoch), put(bytes, f.index), put(bytes, static_cast<int64_t>(f.reason.size()));
      bytes += f.reason;
    }
    const std::vector<std::string> all = share_.exchange(bytes);
    CLIP_CHECK(all.size() == static_cast<size_t>(share_.world), "the exchange of failed records returned ", all.size(),
               " parts for ", share_.world, " processes");
    std::vector<Failure> out;
    for (const std::string& part : all) {
      for (size_t at = 0; at < part.size();) {
        Failure f;
        f.epoch = get(part, at);
        f.index = get(part, at);
        const int64_t n = get(part, at);
        CLIP_CHECK(n >= 0 && static_cast<uint64_t>(n) <= part.size() - at,
                   "a garbled list of failed records came from another process");
        f.reason.assign(part, at, static_cast<size_t>(n));
        at += static_cast<size_t>(n);
        out.push_back(std::move(f));
      }
    }
    return out;
  }

  // One batch as far as this process knows: the window offsets of its rows, and the end of the
  // items it consumes [from, end). A record is a row unless its caption failed or a process
  // reported its image; `used` and `from_start` carry take()'s epoch bookkeeping along.
  struct Plan {
    std::vector<size_t> rows;
    size_t end = 0;
  };

  Plan plan_batch(size_t from, int64_t& used, bool& from_start) {
    Plan plan;
    size_t o = from;
    while (static_cast<int64_t>(plan.rows.size()) < options_.batch) {
      if (o == window_.size() && !extend_window()) break;
      const Planned& x = window_[o++];
      if (x.item.epoch_end) {
        if (options_.loop && from_start && used == 0) break;  // take() fails here, as in one process
        used = 0;
        from_start = true;
        continue;
      }
      if (!x.usable) continue;
      plan.rows.push_back(o - 1);
      ++used;
    }
    plan.end = o;
    return plan;
  }

  // One more item of the stream in the window, its caption checked; false at the stream's end.
  bool extend_window() {
    if (window_finished_) return false;
    std::optional<Item> item = pull(false);
    if (!item) {
      window_finished_ = true;
      return false;
    }
    Planned x{std::move(*item), true, {}};
    if (!x.item.epoch_end) {
      try {
        x.item.record.caption.bytes = checked_caption(x.item.record);
        x.item.record.caption.loaded = true;
      } catch (const std::exception& e) {
        x.usable = false;
        x.reason = e.what();
      }
    }
    window_.push_back(std::move(x));
    return true;
  }

  // Hands this rank's rows of `plan` to the workers (those not handed out before).
  void schedule(const Plan& plan) {
    if (options_.workers == 0) return;
    const auto [first, rows] = batch_slice(static_cast<int64_t>(plan.rows.size()), share_.world, share_.rank);
    bool queued = false;
    {
      std::lock_guard lock(mutex_);
      for (int64_t i = first; i < first + rows; ++i) {
        const Item& item = window_[plan.rows[i]].item;
        if (!requested_.insert(item.seq).second) continue;
        tasks_.push_back(item);
        queued = true;
      }
    }
    if (queued) work_cv_.notify_all();
  }

  // The workers' share of the next batches: the rows known so far of this one and ahead_ more.
  void schedule_ahead() {
    if (options_.workers == 0) return;
    int64_t used = epoch_used_;
    bool from_start = epoch_from_start_;
    size_t from = 0;
    for (int64_t k = 0; k <= ahead_; ++k) {
      const Plan plan = plan_batch(from, used, from_start);
      schedule(plan);
      if (static_cast<int64_t>(plan.rows.size()) < options_.batch) break;
      from = plan.end;
    }
  }

  // The prepared sample of a window item: made here, or waited for when a worker has it.
  const Sample& obtain(const Item& item) {
    std::unique_lock lock(mutex_);
    for (;;) {
      if (auto it = ready_.find(item.seq); it != ready_.end()) return it->second;
      bool here = requested_.insert(item.seq).second;
      if (!here) {
        const auto queued =
            std::find_if(tasks_.begin(), tasks_.end(), [&](const Item& t) { return t.seq == item.seq; });
        if (queued != tasks_.end()) {
          tasks_.erase(queued);
          here = true;
        }
      }
      if (here) {
        lock.unlock();
        Sample s = prepare(item);
        lock.lock();
        return ready_.insert_or_assign(item.seq, std::move(s)).first->second;
      }
      ready_cv_.wait(lock);
    }
  }

  std::optional<Batch> next_share() {
    std::unique_lock source(source_mutex_);
    schedule_ahead();
    Plan plan;
    Slice own;
    for (;;) {  // until no rank reports a failure among its rows
      int64_t used = epoch_used_;
      bool from_start = epoch_from_start_;
      plan = plan_batch(0, used, from_start);
      own = batch_slice(static_cast<int64_t>(plan.rows.size()), share_.world, share_.rank);
      schedule(plan);
      std::vector<Failure> failed;
      for (int64_t i = own.first; i < own.first + own.rows; ++i) {
        const Item& item = window_[plan.rows[i]].item;
        const Sample& s = obtain(item);
        if (!s.ok) failed.push_back({item.epoch, item.index, s.reason});
      }
      const std::vector<Failure> all = exchange(failed);
      if (all.empty()) break;
      for (const Failure& f : all) {
        const auto x = std::find_if(window_.begin(), window_.end(), [&](const Planned& p) {
          return !p.item.epoch_end && p.item.epoch == f.epoch && p.item.index == f.index;
        });
        CLIP_CHECK(x != window_.end() && x->usable, "the processes disagree on the data: another process could not ",
                   "prepare the record at epoch ", f.epoch, ", sample ", f.index,
                   x == window_.end() ? ", which this one has not read" : ", which this one had skipped", " (",
                   f.reason, ")");
        x->usable = false;
        x->reason = f.reason;
      }
    }

    // Consume the batch's items as take() does in one process; this rank keeps its rows.
    Batch batch;
    const int64_t R = options_.resolution, T = options_.context_length;
    batch.images.reserve(static_cast<size_t>(own.rows * 3 * R * R));
    batch.tokens.reserve(static_cast<size_t>(own.rows * T));
    batch.first = own.first;
    batch.global_size = static_cast<int64_t>(plan.rows.size());
    int64_t row = 0;
    for (size_t o = 0; o < plan.end; ++o) {
      Planned x = std::move(window_.front());
      window_.pop_front();
      Sample s;
      s.epoch = x.item.epoch;
      s.index = x.item.index;
      s.epoch_end = x.item.epoch_end;
      s.ok = x.usable;
      s.reason = std::move(x.reason);
      if (x.item.epoch_end || !x.usable) {
        take(std::move(s), nullptr);
        continue;
      }
      const bool mine = row >= own.first && row < own.first + own.rows;
      ++row;
      if (!mine) {
        take(std::move(s), nullptr);
        continue;
      }
      Sample prepared;
      {
        std::lock_guard lock(mutex_);
        const auto it = ready_.find(x.item.seq);
        CLIP_CHECK(it != ready_.end() && it->second.ok, "internal error: row ", row - 1, " was not prepared");
        prepared = std::move(it->second);
        ready_.erase(it);
      }
      take(std::move(prepared), &batch);
    }
    {  // forget what the consumed items left behind (rows that moved to other ranks)
      std::lock_guard lock(mutex_);
      front_seq_ = window_.empty() ? next_seq_ : window_.front().item.seq;
      ready_.erase(ready_.begin(), ready_.lower_bound(front_seq_));
      requested_.erase(requested_.begin(), requested_.lower_bound(front_seq_));
      std::erase_if(tasks_, [&](const Item& t) { return t.seq < front_seq_; });
    }
    schedule_ahead();
    if (batch.global_size == 0) return std::nullopt;
    return batch;
  }

  // A worker of a shared loader: prepares the rows schedule() hands out.
  void work_on_share() {
    for (;;) {
      Item item;
      {
        std::unique_lock lock(mutex_);
        work_cv_.wait(lock, [&] { return stop_ || !tasks_.empty(); });
        if (stop_) return;
        item = std::move(tasks_.front());
        tasks_.pop_front();
      }
      const int64_t seq = item.seq;
      Sample sample = prepare(std::move(item));
      {
        std::lock_guard lock(mutex_);
        if (seq >= front_seq_) ready_.insert_or_assign(seq, std::move(sample));
      }
      ready_cv_.notify_all();
    }
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

  // A shared loader's window (source_mutex_): the items from the next batch's first on, read
  // ahead, with what is known of each; its hand-over to the workers is under mutex_.
  struct Planned {
    Item item;
    bool usable = true;  // false: skipped, for `reason`
    std::string reason;
  };
  BatchShare share_;
  int64_t ahead_ = 1;             // batches the workers prepare ahead
  std::deque<Planned> window_;
  bool window_finished_ = false;  // the stream has ended (loop = false)
  std::deque<Item> tasks_;        // rows for the workers (mutex_)
  std::set<int64_t> requested_;   // seqs queued, in preparation or in ready_ (mutex_)
  int64_t front_seq_ = 0;         // results below it are no longer needed (mutex_)

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
