// Tar archives as WebDataset shards are written: POSIX ustar, with pax extended headers for long
// names (Python's tarfile, which img2dataset writes through, uses the pax format) or GNU tar's
// "././@LongLink" records.
//
// TarReader streams an archive member by member: it reads one 512-byte header, hands out the
// member's name, size and offset, and reads the body only when asked (skipping it otherwise, so
// a pass that needs the names alone reads little more than the headers). Only regular files are
// returned; directories, links, devices and GNU sparse files are stepped over.
//
// A shard cut short (a failed download, a full disk) keeps every member that lies entirely
// before the cut: the reader knows the file's size, so a member whose body runs past the end is
// reported instead of returned, and reading stops there with truncated() set and problem()
// saying where. A header with a bad checksum (garbage in the middle) stops reading the same way.
//
// TarWriter writes ustar members (mode 0644, owner 0, mtime 0, so the same members give the same
// bytes) into a temporary file beside the target and moves it into place in close(): an archive
// left unfinished never appears under its name.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "clip/core/checked_math.hpp"
#include "clip/core/error.hpp"
#include "clip/core/limits.hpp"

namespace clip::data {

// A regular file in the archive.
struct TarEntry {
  std::string name;    // full path: pax path, GNU long name, or ustar prefix + "/" + name
  int64_t size = 0;    // bytes of the body
  int64_t offset = 0;  // where the body starts in the archive file
};

namespace tar_detail {

inline constexpr int64_t kBlock = 512;
inline constexpr int64_t padded(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// Header layout (offset, width) of the fields used here.
inline constexpr size_t kName = 0, kNameLen = 100;
inline constexpr size_t kMode = 100, kUid = 108, kGid = 116, kSize = 124, kMtime = 136, kChecksum = 148;
inline constexpr size_t kType = 156, kMagic = 257, kVersion = 263, kPrefix = 345, kPrefixLen = 155;

// The text of a NUL-padded field.
inline std::string field_text(const uint8_t* field, size_t width) {
  const char* p = reinterpret_cast<const char*>(field);
  return std::string(p, std::find(p, p + width, '\0'));
}

// A numeric field: octal digits between optional spaces/NULs, or GNU's base-256 form (first
// byte's high bit set, then a big-endian number) used for values that do not fit the digits.
inline std::optional<int64_t> parse_number(const uint8_t* field, size_t width) {
  if (field[0] & 0x80) {
    if (field[0] != 0x80) return std::nullopt;  // negative or more than 63 bits
    uint64_t v = 0;
    for (size_t i = 1; i < width; ++i) {
      if (v >> 55) return std::nullopt;
      v = (v << 8) | field[i];
    }
    return static_cast<int64_t>(v);
  }
  size_t i = 0;
  while (i < width && (field[i] == ' ' || field[i] == '\0')) ++i;
  int64_t v = 0;
  bool digits = false;
  for (; i < width && field[i] >= '0' && field[i] <= '7'; ++i) {
    if (v >> 60) return std::nullopt;
    v = v * 8 + (field[i] - '0');
    digits = true;
  }
  for (; i < width; ++i)
    if (field[i] != ' ' && field[i] != '\0') return std::nullopt;
  return digits ? std::optional<int64_t>(v) : std::optional<int64_t>(0);
}

// The header checksum: the sum of its bytes with the checksum field read as spaces. Some old
// writers summed signed chars; both sums are accepted, as GNU tar does.
inline bool checksum_ok(const uint8_t* block) {
  const std::optional<int64_t> stored = parse_number(block + kChecksum, 8);
  if (!stored) return false;
  int64_t unsigned_sum = 0, signed_sum = 0;
  for (size_t i = 0; i < kBlock; ++i) {
    const bool in_field = i >= kChecksum && i < kChecksum + 8;
    unsigned_sum += in_field ? ' ' : block[i];
    signed_sum += in_field ? ' ' : static_cast<int8_t>(block[i]);
  }
  return *stored == unsigned_sum || *stored == signed_sum;
}

inline bool is_zero_block(const uint8_t* block) {
  return std::all_of(block, block + kBlock, [](uint8_t b) { return b == 0; });
}

// What a pax extended header ('x') says about the next member. Records are "LEN key=value\n",
// LEN counting the whole record in decimal.
struct PaxValues {
  std::optional<std::string> path;
  std::optional<int64_t> size;
};

inline std::optional<PaxValues> parse_pax(std::string_view text) {
  PaxValues values;
  while (!text.empty()) {
    if (text.front() == '\0') break;  // NUL padding after the last record
    size_t length = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), length);
    const size_t digits = static_cast<size_t>(end - text.data());
    if (ec != std::errc() || digits == 0 || length <= digits + 1 || length > text.size() || *end != ' ' ||
        text[length - 1] != '\n')
      return std::nullopt;
    const std::string_view record = text.substr(digits + 1, length - digits - 2);
    const size_t eq = record.find('=');
    if (eq == std::string_view::npos) return std::nullopt;
    const std::string_view key = record.substr(0, eq), value = record.substr(eq + 1);
    if (key == "path") values.path = std::string(value);
    if (key == "size") {
      int64_t size = 0;
      const auto [vend, vec] = std::from_chars(value.data(), value.data() + value.size(), size);
      if (vec != std::errc() || vend != value.data() + value.size() || size < 0) return std::nullopt;
      values.size = size;
    }
    text.remove_prefix(length);
  }
  return values;
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

}  // namespace tar_detail

class TarReader {
 public:
  explicit TarReader(const std::filesystem::path& path) : path_(path) {
    std::error_code ec;
    CLIP_CHECK(!std::filesystem::is_directory(path, ec), "cannot read the tar archive '", path.string(),
               "': it is a directory");
    file_.reset(std::fopen(path.c_str(), "rb"));
    CLIP_CHECK(file_, "cannot open the tar archive '", path.string(), "': ", std::strerror(errno));
    std::setvbuf(file_.get(), nullptr, _IOFBF, 1 << 16);
    const auto size = std::filesystem::file_size(path, ec);
    CLIP_CHECK(!ec, "cannot tell the size of the tar archive '", path.string(), "': ", ec.message());
    size_ = static_cast<int64_t>(size);
  }

  // The next regular file, or nothing at the end of the archive (or where it is cut short or
  // corrupt: then truncated() is true). Steps over the body of the previous entry if unread.
  std::optional<TarEntry> next() {
    using namespace tar_detail;
    if (done_) return std::nullopt;
    std::optional<std::string> long_name;
    std::optional<int64_t> pax_size;
    uint8_t block[kBlock];
    for (;;) {
      const int64_t at = next_header_;
      if (!seek(at)) return stop("cannot seek to byte ", at, " (", std::strerror(errno), ")");
      const size_t got = std::fread(block, 1, kBlock, file_.get());
      pos_ = at + static_cast<int64_t>(got);
      if (std::ferror(file_.get())) return stop("read error at byte ", at, " (", std::strerror(errno), ")");
      if (got == 0)
        return stop("the archive ends at byte ", at, after_last(), " without its end-of-archive marker");
      if (got < static_cast<size_t>(kBlock))
        return stop("the archive ends inside a header at byte ", at, after_last());
      if (is_zero_block(block)) {
        done_ = true;  // the end-of-archive marker (two zero blocks; the first one is enough)
        return std::nullopt;
      }
      if (!checksum_ok(block)) return stop("the header at byte ", at, after_last(), " is corrupt (bad checksum)");
      std::optional<int64_t> size = parse_number(block + kSize, 12);
      if (!size) return stop("the header at byte ", at, after_last(), " has an unreadable size field");
      const char type = static_cast<char>(block[kType]);
      const int64_t body = at + kBlock;

      if (type == 'L' || type == 'x') {  // metadata for the next header: read it whole
        if (*size > limits::kMaxTarExtendedHeaderBytes)
          return stop("the extended header at byte ", at, " has ", *size, " bytes, more than the limit of ",
                      limits::kMaxTarExtendedHeaderBytes);
        if (body + *size > size_) return stop("the archive ends inside the extended header at byte ", at, after_last());
        std::string text(static_cast<size_t>(*size), '\0');
        if (!read_at(body, text.data(), *size)) return stop("cannot read the extended header at byte ", at);
        next_header_ = body + padded(*size);
        if (type == 'L') {
          long_name = text.substr(0, text.find('\0'));
        } else {
          const std::optional<PaxValues> pax = parse_pax(text);
          if (!pax) return stop("the pax header at byte ", at, after_last(), " is malformed");
          if (pax->path) long_name = pax->path;
          if (pax->size) pax_size = pax->size;
        }
        continue;
      }
      const bool regular = type == '0' || type == '\0' || type == '7';
      if (regular) {
        if (pax_size) size = pax_size;
        std::string name;
        if (long_name) {
          name = *long_name;
        } else {
          name = field_text(block + kName, kNameLen);
          // Only POSIX ustar has a prefix field; GNU headers keep other data there.
          const bool posix = std::memcmp(block + kMagic, "ustar\0", 6) == 0;
          const std::string prefix = posix ? field_text(block + kPrefix, kPrefixLen) : std::string();
          if (!prefix.empty()) name = prefix + "/" + name;
        }
        // A size from a pax record can be anything up to 2^63 - 1: the sum is checked.
        const std::optional<int64_t> end = checked_add(body, *size);
        if (!end || *end > size_)
          return stop("member '", name, "' is cut short: its ", *size, " bytes from byte ", body,
                      " run past the end of the archive at byte ", size_);
        current_ = TarEntry{std::move(name), *size, body};
        has_current_ = true;
        last_name_ = current_.name;
        next_header_ = body + padded(*size);
        return current_;
      }
      // Links, character/block devices, directories and FIFOs ('1'..'6') have no body; every
      // other type (GNU 'K' long link names, 'g' global pax headers, 'S' sparse files, vendor
      // types) has `size` bytes of it, which are skipped.
      if (type >= '1' && type <= '6') {
        next_header_ = body;
      } else {
        // Past the end of the archive the next read reports it; the sum must not wrap first.
        if (*size > size_) return stop("the header at byte ", at, after_last(), " gives a size past the end of the archive");
        next_header_ = body + padded(*size);
      }
      long_name.reset();
      pax_size.reset();
    }
  }

  // The body of the entry next() returned last.
  std::vector<uint8_t> read() {
    CLIP_CHECK(has_current_, "TarReader::read() needs an entry from next() first");
    CLIP_CHECK(current_.size <= limits::kMaxTarMemberBytes, "member '", current_.name, "' of '", path_.string(),
               "' has ", current_.size, " bytes, more than the limit of ", limits::kMaxTarMemberBytes,
               " for one member read into memory");
    std::vector<uint8_t> bytes(static_cast<size_t>(current_.size));
    CLIP_CHECK(read_at(current_.offset, bytes.data(), current_.size), "cannot read member '", current_.name,
               "' of '", path_.string(), "': the archive is shorter than its header says (changed while read?)");
    return bytes;
  }

  // True when reading stopped before the end-of-archive marker; problem() says where and why.
  bool truncated() const { return !problem_.empty(); }
  const std::string& problem() const { return problem_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  bool seek(int64_t at) {
    if (at == pos_) return true;
    if (fseeko(file_.get(), static_cast<off_t>(at), SEEK_SET) != 0) return false;
    pos_ = at;
    return true;
  }

  bool read_at(int64_t at, void* out, int64_t n) {
    if (!seek(at)) return false;
    const size_t got = std::fread(out, 1, static_cast<size_t>(n), file_.get());
    pos_ = at + static_cast<int64_t>(got);
    return got == static_cast<size_t>(n);
  }

  std::string after_last() const { return last_name_.empty() ? std::string() : " (after member '" + last_name_ + "')"; }

  template <class... Parts>
  std::optional<TarEntry> stop(const Parts&... parts) {
    std::ostringstream message;
    (message << ... << parts);
    problem_ = message.str();
    done_ = true;
    return std::nullopt;
  }

  std::filesystem::path path_;
  std::unique_ptr<std::FILE, tar_detail::FileCloser> file_;
  int64_t size_ = 0, pos_ = 0, next_header_ = 0;
  TarEntry current_;
  std::string last_name_, problem_;
  bool has_current_ = false, done_ = false;
};

// How TarWriter stores a name that the ustar fields cannot hold.
enum class TarLongNames {
  pax,  // a pax 'x' header with a path record (POSIX.1-2001; what Python's tarfile writes)
  gnu,  // a GNU "././@LongLink" 'L' record (GNU tar's default format)
};

class TarWriter {
 public:
  explicit TarWriter(std::filesystem::path path, TarLongNames long_names = TarLongNames::pax)
      : path_(std::move(path)), long_names_(long_names) {
    std::random_device rd;
    temp_ = std::filesystem::path(path_.string() + ".tmp-" + std::to_string(rd()));
    file_.reset(std::fopen(temp_.c_str(), "wb"));
    CLIP_CHECK(file_, "cannot create '", temp_.string(), "' to write the tar archive '", path_.string(),
               "': ", std::strerror(errno));
  }
  TarWriter(const TarWriter&) = delete;
  TarWriter& operator=(const TarWriter&) = delete;

  // An archive that was not closed is removed; the target keeps whatever it held before.
  ~TarWriter() {
    if (!file_) return;
    file_.reset();
    std::error_code ignored;
    std::filesystem::remove(temp_, ignored);
  }

  void add(std::string_view name, std::span<const uint8_t> body) {
    CLIP_CHECK(file_, "cannot add '", name, "' to the tar archive '", path_.string(), "': it is already closed");
    CLIP_CHECK(!name.empty() && name.find('\0') == std::string_view::npos, "a tar member needs a name without NUL bytes");
    const int64_t size = static_cast<int64_t>(body.size());
    std::string short_name(name), prefix;
    // GNU tar has no prefix field: its format stores every long name in a record.
    if (name.size() > tar_detail::kNameLen &&
        (long_names_ == TarLongNames::gnu || !split_ustar(name, prefix, short_name))) {
      // The long name goes in a record of its own; the header keeps a truncated copy.
      std::string record;
      if (long_names_ == TarLongNames::gnu) {
        record = std::string(name) + '\0';
        write_header("././@LongLink", "", static_cast<int64_t>(record.size()), 'L');
      } else {
        record = pax_record("path", name);
        write_header("././@PaxHeader", "", static_cast<int64_t>(record.size()), 'x');
      }
      write_body(record.data(), static_cast<int64_t>(record.size()));
      short_name = std::string(name.substr(0, tar_detail::kNameLen));
      prefix.clear();
    }
    write_header(short_name, prefix, size, '0');
    write_body(body.data(), size);
    ++members_;
  }

  void add(std::string_view name, std::string_view text) {
    add(name, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  }

  // Writes the end-of-archive marker, makes the file durable and moves it into place.
  void close() {
    CLIP_CHECK(file_, "the tar archive '", path_.string(), "' is already closed");
    const uint8_t zeros[2 * tar_detail::kBlock] = {};
    put(zeros, sizeof zeros);
    const bool flushed = std::fflush(file_.get()) == 0 && ::fsync(fileno(file_.get())) == 0;
    const bool closed = std::fclose(file_.release()) == 0;
    std::error_code ec;
    if (!flushed || !closed) {
      std::filesystem::remove(temp_, ec);
      CLIP_FAIL("writing the tar archive '", path_.string(), "' failed (disk full?); nothing was replaced");
    }
    std::filesystem::rename(temp_, path_, ec);
    if (ec) {
      std::error_code ignored;
      std::filesystem::remove(temp_, ignored);
      CLIP_FAIL("cannot move the finished tar archive into place at '", path_.string(), "': ", ec.message());
    }
  }

  int64_t members() const { return members_; }

 private:
  // ustar's own long names: prefix (up to 155 bytes) + "/" + name (up to 100 bytes).
  static bool split_ustar(std::string_view name, std::string& prefix, std::string& rest) {
    for (size_t slash = name.find('/'); slash != std::string_view::npos; slash = name.find('/', slash + 1)) {
      if (slash > tar_detail::kPrefixLen) break;
      if (name.size() - slash - 1 <= tar_detail::kNameLen && slash + 1 < name.size()) {
        prefix = std::string(name.substr(0, slash));
        rest = std::string(name.substr(slash + 1));
        return true;
      }
    }
    return false;
  }

  // "LEN key=value\n" where LEN counts the whole record, its own digits included.
  static std::string pax_record(std::string_view key, std::string_view value) {
    const size_t body = 1 + key.size() + 1 + value.size() + 1;  // " key=value\n"
    size_t length = body + 1;
    while (std::to_string(length).size() + body != length) length = std::to_string(length).size() + body;
    return std::to_string(length) + " " + std::string(key) + "=" + std::string(value) + "\n";
  }

  static void octal(uint8_t* field, size_t width, int64_t value) {
    // width - 1 digits and a NUL; values too large for them use GNU's base-256 form.
    if (value >= (int64_t{1} << (3 * (width - 1)))) {
      std::fill(field, field + width, 0);
      field[0] = 0x80;
      for (size_t i = width - 1; i > 0 && value; --i, value >>= 8) field[i] = static_cast<uint8_t>(value & 0xFF);
      return;
    }
    for (size_t i = width - 1; i-- > 0; value >>= 3) field[i] = static_cast<uint8_t>('0' + (value & 7));
    field[width - 1] = 0;
  }

  void write_header(std::string_view name, std::string_view prefix, int64_t size, char type) {
    using namespace tar_detail;
    uint8_t block[kBlock] = {};
    std::memcpy(block + kName, name.data(), std::min(name.size(), kNameLen));
    std::memcpy(block + kPrefix, prefix.data(), std::min(prefix.size(), kPrefixLen));
    octal(block + kMode, 8, 0644);
    octal(block + kUid, 8, 0);
    octal(block + kGid, 8, 0);
    octal(block + kSize, 12, size);
    octal(block + kMtime, 12, 0);
    block[kType] = static_cast<uint8_t>(type);
    if (long_names_ == TarLongNames::gnu) {
      std::memcpy(block + kMagic, "ustar  ", 8);  // GNU's magic and version, NUL-terminated
    } else {
      std::memcpy(block + kMagic, "ustar", 6);
      std::memcpy(block + kVersion, "00", 2);
    }
    std::memset(block + kChecksum, ' ', 8);
    unsigned sum = 0;
    for (uint8_t b : block) sum += b;
    std::snprintf(reinterpret_cast<char*>(block + kChecksum), 8, "%06o", sum);  // then NUL, space
    block[kChecksum + 7] = ' ';
    put(block, kBlock);
  }

  void write_body(const void* data, int64_t size) {
    put(data, static_cast<size_t>(size));
    const uint8_t zeros[tar_detail::kBlock] = {};
    put(zeros, static_cast<size_t>(tar_detail::padded(size) - size));
  }

  void put(const void* data, size_t n) {
    if (n && std::fwrite(data, 1, n, file_.get()) != n)
      CLIP_FAIL("writing the tar archive '", path_.string(), "' failed: ", std::strerror(errno));
  }

  std::filesystem::path path_, temp_;
  TarLongNames long_names_;
  std::unique_ptr<std::FILE, tar_detail::FileCloser> file_;
  int64_t members_ = 0;
};

}  // namespace clip::data
