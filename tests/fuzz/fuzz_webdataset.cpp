// WebDataset sample grouping (clip/data/records.hpp) over a tar shard: keys and extensions,
// consecutive members grouped, image/caption/label picked, damage counted instead of thrown.
// A pass reading bodies and a pass reading headers only (bodies taken later, as a resumed run
// does) must see the same records with the same bytes.
#include "clip/data/records.hpp"
#include "fuzz_input.hpp"

namespace {

struct Seen {
  std::string key;
  std::vector<uint8_t> image, caption, label;
};

std::vector<Seen> records(const std::vector<clip::data::DataSource>& sources, bool bodies,
                          clip::data::StreamIssues& issues) {
  clip::data::RecordStream stream(sources, 1234, 0, issues);
  std::vector<Seen> out;
  while (std::optional<clip::data::Record> r = stream.next(bodies)) {
    // (a group of members that are none of image, caption, label is still a record: the loader
    // skips it and counts it as one without an image)
    if (r->key.empty()) __builtin_trap();
    Seen seen{r->key, {}, {}, {}};
    clip::fuzz::refusing_bad_input([&] {
      if (r->image.present) seen.image = r->image.take();
      if (r->caption.present) seen.caption = r->caption.take();
      if (r->label.present) seen.label = r->label.take();
    });
    out.push_back(std::move(seen));
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path path = clip::fuzz::as_file(data, size, ".tar");
  const std::vector<clip::data::DataSource> sources = {{path, nullptr}};
  clip::data::StreamIssues with_bodies, headers_only;
  const std::vector<Seen> a = records(sources, true, with_bodies);
  const std::vector<Seen> b = records(sources, false, headers_only);
  if (a.size() != b.size() || with_bodies.truncated_shards != headers_only.truncated_shards) __builtin_trap();
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].key != b[i].key || a[i].image != b[i].image || a[i].caption != b[i].caption || a[i].label != b[i].label)
      __builtin_trap();
  return 0;
}
