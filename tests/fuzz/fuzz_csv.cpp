// CSV/TSV caption tables (clip/data/csv.hpp): RFC 4180 quoting, line ends, the byte order mark,
// the field limit; the header's columns looked up as read_caption_table does. The first byte
// picks the separator (comma, tab, semicolon, or the byte itself).
#include "clip/data/csv.hpp"
#include "fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const char choices[] = {',', '\t', ';', static_cast<char>(data[0])};
  const char separator = choices[data[0] % 4];
  const std::string_view text = clip::fuzz::as_text(data + 1, size - 1);
  clip::fuzz::refusing_bad_input([&] {
    const std::vector<clip::data::CsvRecord> records = clip::data::parse_csv(text, separator, "fuzz.csv");
    int64_t line = 0;
    for (const clip::data::CsvRecord& r : records) {
      if (r.line <= line || r.fields.empty()) __builtin_trap();  // records in order, each a field at least
      line = r.line;
      for (const std::string& field : r.fields)
        if (field.size() > clip::limits::kMaxCsvFieldBytes) __builtin_trap();
    }
  });
  return 0;
}
