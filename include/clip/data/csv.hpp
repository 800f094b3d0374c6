// Image-caption tables in CSV/TSV files, open_clip's second data format: a header row names the
// columns, one column holds image paths (--csv-img-key, default "filepath") and one the captions
// (--csv-caption-key, default "title"), separated by --csv-separator (open_clip's default is a
// tab; here a ".csv" file defaults to a comma and anything else to a tab).
//
// Fields are read as pandas.read_csv reads them (RFC 4180 quoting): a field that starts with a
// double quote runs to the closing quote and may hold separators, newlines and doubled quotes
// ("" for "); a quote inside an unquoted field is an ordinary character; records end at \n, \r\n
// or \r outside quotes; blank lines are skipped; a UTF-8 byte order mark is dropped.
//
// Relative image paths are taken relative to the folder of the table (open_clip takes them
// relative to the working directory; the table's folder is what keeps a dataset movable).
// Rows with an empty image or caption cell are kept: the data loader skips and counts them.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/core/limits.hpp"

namespace clip::data {

struct CsvRecord {
  int64_t line = 0;  // where the record starts, counting from 1
  std::vector<std::string> fields;
};

// Every record of `text`, the header included. `name` is what errors call the text.
inline std::vector<CsvRecord> parse_csv(std::string_view text, char separator, std::string_view name = "<memory>") {
  CLIP_CHECK(separator != '"' && separator != '\n' && separator != '\r' && separator != '\0',
             "a CSV separator cannot be a quote, a line break or NUL");
  if (text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);
  std::vector<CsvRecord> records;
  CsvRecord record;
  std::string field;
  int64_t line = 1;
  size_t i = 0;
  const auto end_of_line = [&](size_t& k) {  // at \n, \r\n or \r: consumes it
    if (text[k] == '\r' && k + 1 < text.size() && text[k + 1] == '\n') ++k;
    ++k;
    ++line;
  };
  while (i < text.size()) {
    // The start of a record: blank lines are skipped.
    if (text[i] == '\n' || text[i] == '\r') {
      end_of_line(i);
      continue;
    }
    record.line = line;
    record.fields.clear();
    for (;;) {  // one field per pass
      field.clear();
      if (i < text.size() && text[i] == '"') {
        const int64_t opened = line;
        ++i;
        for (;;) {
          CLIP_CHECK(i < text.size(), "the CSV file '", name, "' ends inside the quoted field that starts on line ",
                     opened);
          if (text[i] == '"') {
            if (i + 1 < text.size() && text[i + 1] == '"') {
              field += '"';
              i += 2;
              continue;
            }
            ++i;
            break;
          }
          if (text[i] == '\n' || (text[i] == '\r' && !(i + 1 < text.size() && text[i + 1] == '\n'))) ++line;
          field += text[i++];
          CLIP_CHECK(field.size() <= limits::kMaxCsvFieldBytes, "the CSV file '", name,
                     "' has a field longer than the limit of ", limits::kMaxCsvFieldBytes,
                     " bytes in the quoted field that starts on line ", opened, " (a quote left open?)");
        }
      }
      // Unquoted text, or what follows a closing quote, up to the separator or the line's end.
      while (i < text.size() && text[i] != separator && text[i] != '\n' && text[i] != '\r') field += text[i++];
      CLIP_CHECK(field.size() <= limits::kMaxCsvFieldBytes, "the CSV file '", name, "' line ", line,
                 " has a field longer than the limit of ", limits::kMaxCsvFieldBytes, " bytes");
      record.fields.push_back(field);
      if (i < text.size() && text[i] == separator) {
        ++i;
        continue;
      }
      if (i < text.size()) end_of_line(i);
      break;
    }
    records.push_back(record);
  }
  return records;
}

struct CsvOptions {
  std::string image_key = "filepath";  // the column of image paths
  std::string caption_key = "title";   // the column of captions
  char separator = 0;                  // 0: ',' for a .csv file, a tab otherwise
};

inline char csv_separator_for(const std::filesystem::path& file, char separator) {
  if (separator) return separator;
  std::string ext = file.extension().string();
  for (char& c : ext) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return ext == ".csv" ? ',' : '\t';
}

struct CaptionRow {
  int64_t line = 0;             // where the row starts in the file
  std::string image;            // the cell as written
  std::filesystem::path path;   // the image file: absolute, or relative to the table's folder
  std::string caption;
};

struct CaptionTable {
  std::filesystem::path file;
  std::vector<CaptionRow> rows;
};

inline CaptionTable read_caption_table(const std::filesystem::path& file, const CsvOptions& options = {}) {
  std::ifstream in(file, std::ios::binary);
  CLIP_CHECK(in, "cannot open the caption table '", file.string(), "': ", std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  CLIP_CHECK(!in.bad(), "cannot read the caption table '", file.string(), "'");
  const std::string text = buffer.str();
  const char separator = csv_separator_for(file, options.separator);
  std::vector<CsvRecord> records = parse_csv(text, separator, file.string());
  CLIP_CHECK(!records.empty(), "the caption table '", file.string(), "' is empty: it needs a header row naming the ",
             options.image_key, " and ", options.caption_key, " columns");

  const std::vector<std::string>& header = records.front().fields;
  const auto column = [&](const std::string& key, const char* what) {
    for (size_t c = 0; c < header.size(); ++c)
      if (header[c] == key) return c;
    std::string names;
    for (const std::string& h : header) names += (names.empty() ? "'" : ", '") + h + "'";
    CLIP_FAIL("the caption table '", file.string(), "' has no ", what, " column '", key, "' (its header names ",
              names, "; separator ", separator == '\t' ? std::string("tab") : "'" + std::string(1, separator) + "'",
              ")");
  };
  const size_t image_column = column(options.image_key, "image path");
  const size_t caption_column = column(options.caption_key, "caption");

  CaptionTable table;
  table.file = file;
  const std::filesystem::path folder = file.parent_path();
  table.rows.reserve(records.size() - 1);
  for (size_t r = 1; r < records.size(); ++r) {
    CsvRecord& record = records[r];
    CaptionRow row;
    row.line = record.line;
    if (image_column < record.fields.size()) row.image = std::move(record.fields[image_column]);
    if (caption_column < record.fields.size()) row.caption = std::move(record.fields[caption_column]);
    if (!row.image.empty()) {
      const std::filesystem::path p(row.image);
      row.path = p.is_absolute() ? p : folder / p;
    }
    table.rows.push_back(std::move(row));
  }
  return table;
}

}  // namespace clip::data
