// The training data pipeline: tar shards (against GNU tar where it is installed), shard lists,
// CSV tables, the shuffle buffer, the augmentation (against crop + resize and against CLIP's
// preprocessing), and the loader: every sample once per epoch with its caption's tokens and its
// exact preprocessed image, damaged data skipped and counted, batches bitwise independent of the
// worker count, resuming from position() continuing with exactly the original batches, and the
// ranks of a data-parallel job each preparing only their rows, exactly the one-process rows.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <boost/test/unit_test.hpp>

#include <stb_image_write.h>
#include <turbojpeg.h>

#include "clip/data/augment.hpp"
#include "clip/data/csv.hpp"
#include "clip/data/loader.hpp"
#include "clip/data/random.hpp"
#include "clip/data/shards.hpp"
#include "clip/data/shuffle_buffer.hpp"
#include "clip/data/tar.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/image/decode.hpp"
#include "clip/image/preprocess.hpp"
#include "clip/text/bpe_tokenizer.hpp"
#include "messages.hpp"

using namespace clip;
using namespace clip::data;
using namespace std::literals;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("clip_test_data_" + std::to_string(::getpid()) + "_" + std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  fs::path write(const std::string& name, const std::vector<uint8_t>& bytes) const {
    fs::path p = path / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return p;
  }
};

std::vector<uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

std::vector<uint8_t> bytes_of(std::string_view s) { return std::vector<uint8_t>(s.begin(), s.end()); }

std::vector<uint8_t> random_bytes(size_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<uint8_t> out(n);
  for (uint8_t& b : out) b = static_cast<uint8_t>(rng.next());
  return out;
}

// A w x h image with smooth structure plus noise (so resampling has something to do).
image::Image test_image(int w, int h, image::Mode mode, uint64_t seed) {
  image::Image img(w, h, mode);
  Rng rng(seed);
  const int c = img.channels();
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int ch = 0; ch < c; ++ch)
        img.row(y)[x * c + ch] = static_cast<uint8_t>((x * 7 + y * 5 + ch * 60 + seed * 13) % 200 + rng.below(56));
  return img;
}

std::vector<uint8_t> png_bytes(const image::Image& img) {
  std::vector<uint8_t> out;
  auto sink = [](void* context, void* data, int size) {
    auto* v = static_cast<std::vector<uint8_t>*>(context);
    v->insert(v->end(), static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + size);
  };
  BOOST_TEST_REQUIRE(stbi_write_png_to_func(sink, &out, img.width, img.height, img.channels(), img.pixels.data(),
                                            static_cast<int>(img.row_bytes())) != 0);
  return out;
}

std::vector<uint8_t> jpeg_bytes(const image::Image& rgb) {
  tjhandle tj = tjInitCompress();
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  const int rc = tjCompress2(tj, rgb.pixels.data(), rgb.width, 0, rgb.height, TJPF_RGB, &buffer, &size, TJSAMP_420,
                             90, 0);
  std::vector<uint8_t> out(buffer, buffer + (rc == 0 ? size : 0));
  tjFree(buffer);
  tjDestroy(tj);
  BOOST_TEST_REQUIRE(rc == 0);
  return out;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

bool any_contains(const std::vector<std::string>& texts, const std::string& part) {
  return std::any_of(texts.begin(), texts.end(), [&](const std::string& t) { return contains(t, part); });
}

struct Member {
  std::string name;
  std::vector<uint8_t> bytes;
};

std::vector<Member> read_all(const fs::path& path) {
  TarReader reader(path);
  std::vector<Member> out;
  while (std::optional<TarEntry> e = reader.next()) out.push_back({e->name, reader.read()});
  return out;
}

const text::BpeTokenizer& tokenizer() {
  static const text::BpeTokenizer t;
  return t;
}

// Runs a shell command; its exit status.
int shell(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool have_gnu_tar() { return shell("tar --version 2>/dev/null | grep -q 'GNU tar'") == 0; }

// A WebDataset: `counts[s]` samples in shard s, keys "s<shard>_<i>", PNGs of assorted sizes and
// modes, captions, "cls" labels and an ignored "json" member. Remembers what it wrote.
struct Dataset {
  struct Sample {
    std::vector<uint8_t> image;
    std::string caption;
    int label;
  };
  std::vector<std::string> shards;
  std::map<std::string, Sample> samples;

  Dataset(const TempDir& dir, const std::vector<int>& counts, const std::string& stem = "shard") {
    for (size_t s = 0; s < counts.size(); ++s) {
      char name[32];
      std::snprintf(name, sizeof name, "%s-%05zu.tar", stem.c_str(), s);
      const fs::path path = dir.path / name;
      TarWriter tar(path);
      for (int i = 0; i < counts[s]; ++i) {
        const std::string key = stem + std::to_string(s) + "_" + std::to_string(i);
        const int k = static_cast<int>(samples.size());
        const image::Mode mode = k % 5 == 3 ? image::Mode::L : k % 7 == 4 ? image::Mode::RGBA : image::Mode::RGB;
        const image::Image img = test_image(12 + (k * 5) % 17, 12 + (k * 3) % 13, mode, static_cast<uint64_t>(k));
        Sample sample{png_bytes(img), "a photo of item number " + std::to_string(k), k % 10};
        if (k % 4 == 1) sample.caption += ", a rather long caption that the context length truncates for sure";
        tar.add(key + ".png", sample.image);
        tar.add(key + ".txt", sample.caption);
        tar.add(key + ".cls", std::to_string(sample.label) + "\n");
        tar.add(key + ".json", "{\"key\": \"" + key + "\"}");
        samples[key] = std::move(sample);
      }
      tar.close();
      shards.push_back(path.string());
    }
  }

  // The list in brace notation, as a user gives it.
  std::string brace_list(const TempDir& dir, const std::string& stem = "shard") const {
    char last[16];
    std::snprintf(last, sizeof last, "%05zu", shards.size() - 1);
    return (dir.path / (stem + "-{00000.." + last + "}.tar")).string();
  }
};

std::vector<Batch> take_batches(DataLoader& loader, int n) {
  std::vector<Batch> out;
  for (int i = 0; i < n; ++i) {
    std::optional<Batch> b = loader.next();
    BOOST_TEST_REQUIRE(b.has_value());
    out.push_back(std::move(*b));
  }
  return out;
}

bool same_batches(const std::vector<Batch>& a, const std::vector<Batch>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    // Bitwise image comparison: memcmp, so that -0 / NaN would not hide a difference.
    if (a[i].size != b[i].size || a[i].keys != b[i].keys || a[i].tokens != b[i].tokens || a[i].labels != b[i].labels ||
        a[i].images.size() != b[i].images.size() ||
        std::memcmp(a[i].images.data(), b[i].images.data(), a[i].images.size() * sizeof(float)) != 0)
      return false;
  }
  return true;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(tar_archives)

BOOST_AUTO_TEST_CASE(members_round_trip_with_every_size_and_long_names_in_both_formats) {
  TempDir dir;
  const std::string long_flat(230, 'n');                         // needs a pax/GNU record
  const std::string splittable = std::string(120, 'd') + "/" + std::string(90, 'f');  // ustar prefix + name
  const std::vector<Member> members = {
      {"empty.txt", {}},           {"one.bin", random_bytes(1, 1)},   {"b511.bin", random_bytes(511, 2)},
      {"b512.bin", random_bytes(512, 3)}, {"b513.bin", random_bytes(513, 4)}, {std::string(100, 'x') + ".c", random_bytes(7, 5)},
      {std::string(96, 'y') + ".bin", random_bytes(9, 8)},
      {long_flat + ".jpg", random_bytes(10000, 6)}, {splittable, random_bytes(600, 7)}, {"dir/sub/k.txt", bytes_of("caption")}};
  for (TarLongNames format : {TarLongNames::pax, TarLongNames::gnu}) {
    const fs::path path = dir.path / (format == TarLongNames::pax ? "pax.tar" : "gnu.tar");
    TarWriter writer(path, format);
    for (const Member& m : members) writer.add(m.name, m.bytes);
    BOOST_TEST(!fs::exists(path));  // nothing under the name before close()
    writer.close();
    BOOST_TEST(writer.members() == static_cast<int64_t>(members.size()));

    TarReader reader(path);
    for (const Member& m : members) {
      std::optional<TarEntry> e = reader.next();
      BOOST_TEST_REQUIRE(e.has_value());
      BOOST_TEST(e->name == m.name);
      BOOST_TEST(e->size == static_cast<int64_t>(m.bytes.size()));
      BOOST_TEST(e->offset % 512 == 0);
      BOOST_TEST((reader.read() == m.bytes), m.name.substr(0, 20));
    }
    BOOST_TEST(!reader.next().has_value());
    BOOST_TEST(!reader.truncated(), reader.problem());

    // Skipping bodies (reading only headers) sees the same names.
    TarReader skipper(path);
    std::vector<std::string> names;
    while (std::optional<TarEntry> e = skipper.next()) names.push_back(e->name);
    BOOST_TEST(names.size() == members.size());
    BOOST_TEST(!skipper.truncated());

    // GNU tar, where installed, extracts what was written.
    if (have_gnu_tar()) {
      const fs::path out = dir.path / ("x_" + path.stem().string());
      fs::create_directories(out);
      BOOST_TEST_REQUIRE(shell("tar -xf '" + path.string() + "' -C '" + out.string() + "' 2>/dev/null") == 0);
      for (const Member& m : members) BOOST_TEST((read_bytes(out / m.name) == m.bytes), m.name.substr(0, 20));
    }
  }
}

BOOST_AUTO_TEST_CASE(archives_made_by_gnu_tar_read_back_regular_files_only) {
  if (!have_gnu_tar()) {
    BOOST_TEST_MESSAGE("SKIPPED: GNU tar is not installed");
    return;
  }
  TempDir dir;
  const fs::path src = dir.path / "src";
  const std::string deep = std::string(60, 'a') + "/" + std::string(70, 'b') + "/" + std::string(150, 'c') + ".txt";
  std::map<std::string, std::vector<uint8_t>> files = {
      {"k1.jpg", random_bytes(3000, 1)}, {"k1.txt", bytes_of("one")}, {"empty.txt", {}}, {deep, random_bytes(700, 2)}};
  for (const auto& [name, bytes] : files) dir.write("src/" + name, bytes);
  fs::create_directories(src / "emptydir");
  fs::create_symlink("k1.txt", src / "link.txt");
  for (const std::string format : {"gnu", "pax"}) {
    const fs::path archive = dir.path / (format + ".tar");
    BOOST_TEST_REQUIRE(shell("tar --format=" + format + " -cf '" + archive.string() + "' -C '" + src.string() + "' .") == 0);
    TarReader reader(archive);
    std::map<std::string, std::vector<uint8_t>> got;
    while (std::optional<TarEntry> e = reader.next()) got["./" == e->name.substr(0, 2) ? e->name.substr(2) : e->name] = reader.read();
    BOOST_TEST(!reader.truncated(), reader.problem());
    BOOST_TEST((got == files), format);  // no directory, no symlink, the 280-byte name whole
  }
}

BOOST_AUTO_TEST_CASE(a_cut_archive_keeps_every_complete_member_and_says_where_it_ends) {
  TempDir dir;
  const fs::path path = dir.path / "full.tar";
  const std::vector<Member> members = {{"m0.jpg", random_bytes(700, 1)}, {"m0.txt", bytes_of("zero")},
                                       {"m1.jpg", random_bytes(1500, 2)}, {"m1.txt", bytes_of("one")}};
  TarWriter writer(path);
  for (const Member& m : members) writer.add(m.name, m.bytes);
  writer.close();
  const std::vector<uint8_t> full = read_bytes(path);
  // Layout: m0.jpg header 0, body 512..1212 (padded to 1536); m0.txt header 1536, body 2048;
  // m1.jpg header 2560, body 3072..4572 (padded 4608); m1.txt header 4608, body 5120; end 5632.
  BOOST_TEST_REQUIRE(full.size() == size_t{5632 + 1024});
  struct Cut {
    size_t at;
    size_t complete;
    std::string says;
  };
  const std::vector<Cut> cuts = {
      {100, 0, "inside a header at byte 0"},  {1000, 0, "'m0.jpg' is cut short"},
      {1212, 1, "ends at byte 1536 (after member 'm0.jpg') without"},  // only the padding is gone
      {2600, 2, "inside a header at byte 2560"}, {4000, 2, "'m1.jpg' is cut short"},
      {4608, 3, "without its end-of-archive marker"}, {5632, 4, "without its end-of-archive marker"},
      {5800, 4, "inside a header at byte 5632"}};
  for (const Cut& cut : cuts) {
    const fs::path cut_path = dir.write("cut" + std::to_string(cut.at) + ".tar",
                                        std::vector<uint8_t>(full.begin(), full.begin() + cut.at));
    TarReader reader(cut_path);
    size_t n = 0;
    while (std::optional<TarEntry> e = reader.next()) {
      BOOST_TEST_REQUIRE(n < members.size());
      BOOST_TEST(e->name == members[n].name);
      BOOST_TEST((reader.read() == members[n].bytes));
      ++n;
    }
    BOOST_TEST(n == cut.complete, "cut at " << cut.at);
    BOOST_TEST(reader.truncated(), "cut at " << cut.at);
    BOOST_TEST(contains(reader.problem(), cut.says), "cut at " << cut.at << ": " << reader.problem());
  }
  // One zero block is enough for an end.
  BOOST_TEST(read_all(dir.write("one_zero_block.tar", std::vector<uint8_t>(full.begin(), full.begin() + 5632 + 512)))
                 .size() == members.size());

  // A damaged header stops the reading there.
  std::vector<uint8_t> damaged = full;
  damaged[2560 + 10] ^= 0x40;  // in m1.jpg's name
  TarReader reader(dir.write("damaged.tar", damaged));
  int n = 0;
  while (reader.next()) ++n;
  BOOST_TEST(n == 2);
  BOOST_TEST(contains(reader.problem(), "header at byte 2560 (after member 'm0.txt') is corrupt (bad checksum)"),
             reader.problem());
}

BOOST_AUTO_TEST_CASE(any_cut_or_damage_is_survived_and_keeps_the_members_before_it) {
  TempDir dir;
  const fs::path path = dir.path / "full.tar";
  TarWriter writer(path);
  for (int i = 0; i < 6; ++i) writer.add(std::string(i * 40 + 1, 'k') + ".bin", random_bytes(i * 300, i));
  writer.close();
  const std::vector<uint8_t> full = read_bytes(path);
  std::vector<int64_t> body_end;
  {
    TarReader reader(path);
    while (std::optional<TarEntry> e = reader.next()) body_end.push_back(e->offset + e->size);
  }
  BOOST_TEST_REQUIRE(body_end.size() == size_t{6});
  for (size_t cut = 0; cut < full.size(); cut += 7) {
    // A new file each time: on ext4, truncating a file that has data waits for it to reach the disk.
    TarReader reader(dir.write("cut" + std::to_string(cut) + ".tar", std::vector<uint8_t>(full.begin(), full.begin() + cut)));
    int64_t n = 0;
    while (reader.next()) reader.read(), ++n;
    const int64_t expected = std::count_if(body_end.begin(), body_end.end(), [&](int64_t e) { return e <= int64_t(cut); });
    BOOST_TEST_REQUIRE(n == expected, "cut at " << cut);
    BOOST_TEST_REQUIRE(reader.truncated() == (cut < full.size() - 512), "cut at " << cut);  // one zero block ends it
  }
  Rng rng(17);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<uint8_t> damaged = full;
    for (int k = 0; k < 3; ++k) damaged[rng.below(damaged.size())] = static_cast<uint8_t>(rng.next());
    TarReader reader(dir.write("damaged" + std::to_string(trial) + ".tar", damaged));
    int n = 0;
    while (reader.next()) reader.read(), ++n;  // never throws, never runs away
    BOOST_TEST_REQUIRE(n <= 6);
  }
}

BOOST_AUTO_TEST_CASE(an_unclosed_writer_leaves_nothing_and_replaces_nothing) {
  TempDir dir;
  const fs::path path = dir.path / "shard.tar";
  {
    TarWriter writer(path);
    writer.add("a.txt", "never written");
  }
  BOOST_TEST(!fs::exists(path));
  BOOST_TEST(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 0);
  {
    TarWriter writer(path);
    writer.add("a.txt", "first");
    writer.close();
  }
  const std::vector<uint8_t> first = read_bytes(path);
  {
    TarWriter writer(path);
    writer.add("a.txt", "second");
  }
  BOOST_TEST((read_bytes(path) == first));
  BOOST_TEST(contains(test::message_of([&] { TarReader r(dir.path / "none.tar"); }), "cannot open the tar archive"));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_CASE(shard_lists_expand_like_braceexpand) {
  using V = std::vector<std::string>;
  BOOST_TEST((expand_shard_list("data/{00000..00003}.tar") ==
              V{"data/00000.tar", "data/00001.tar", "data/00002.tar", "data/00003.tar"}));
  BOOST_TEST((expand_shard_list("plain.tar") == V{"plain.tar"}));
  BOOST_TEST((expand_shard_list("{8..11}") == V{"8", "9", "10", "11"}));
  BOOST_TEST((expand_shard_list("{08..11}") == V{"08", "09", "10", "11"}));
  BOOST_TEST((expand_shard_list("{3..1}") == V{"3", "2", "1"}));
  BOOST_TEST((expand_shard_list("{0..10..5}") == V{"0", "5", "10"}));
  BOOST_TEST((expand_shard_list("{10..0..-4}") == V{"10", "6", "2"}));
  BOOST_TEST((expand_shard_list("{-1..1}") == V{"-1", "0", "1"}));
  BOOST_TEST((expand_shard_list("{a..c}") == V{"a", "b", "c"}));
  BOOST_TEST((expand_shard_list("{a,b}{1..2}.tar") == V{"a1.tar", "a2.tar", "b1.tar", "b2.tar"}));
  BOOST_TEST((expand_shard_list("x{a,{b,c}d}y") == V{"xay", "xbdy", "xcdy"}));
  BOOST_TEST((expand_shard_list("s/{0..1}.tar::t/{a,b}.tar::u.tar") ==
              V{"s/0.tar", "s/1.tar", "t/a.tar", "t/b.tar", "u.tar"}));
  BOOST_TEST(expand_shard_list("laion/{000000..231349}.tar").size() == size_t{231350});

  const auto error = [](const char* spec) { return test::message_of([&] { expand_shard_list(spec); }); };
  BOOST_TEST(contains(error("data/{0..3.tar"), "unmatched '{' at character 6"), error("data/{0..3.tar"));
  BOOST_TEST(contains(error("data/0..3}.tar"), "unmatched '}' at character 10"));
  BOOST_TEST(contains(error("a{}b"), "empty brace group {} at character 2"));
  BOOST_TEST(contains(error("{abc}"), "{abc} at character 1 of the shard list '{abc}' is neither a comma list nor a range"));
  BOOST_TEST(contains(error("{1..x}"), "needs two integers"));
  BOOST_TEST(contains(error("{0..4..0}"), "step of 0"));
  BOOST_TEST(contains(error("{a,,b}"), "has an empty element"));
  BOOST_TEST(contains(error("a.tar::::b.tar"), "empty element between '::'"));
  BOOST_TEST(contains(error(""), "the shard list is empty"));
  BOOST_TEST(contains(error("{0..99999999}"), "more than the limit of 10000000"));
  // The limit holds for products of groups and for "::" lists too, and can be lowered.
  BOOST_TEST(contains(error("{0..9999}{0..9999}"), "expands to more than the limit of 10000000 names"));
  BOOST_TEST(expand_shard_list("{0..9}{0..9}", 100).size() == 100u);
  BOOST_TEST(contains(test::message_of([] { expand_shard_list("{0..9}{0..9}::x", 100); }),
                      "names more than the limit of 100 files"));
  BOOST_TEST(contains(test::message_of([] { expand_shard_list("{a,b}{0..99}", 100); }),
                      "expands to more than the limit of 100 names"));
}

namespace {

// One ustar header block, checksum included, for archives no writer would make.
std::vector<uint8_t> tar_header(const std::string& name, const std::string& size_octal, char type) {
  std::vector<uint8_t> block(512, 0);
  std::copy(name.begin(), name.end(), block.begin());
  std::copy(size_octal.begin(), size_octal.end(), block.begin() + 124);
  block[156] = static_cast<uint8_t>(type);
  std::memcpy(block.data() + 257, "ustar\0" "00", 8);
  std::fill(block.begin() + 148, block.begin() + 156, ' ');
  unsigned sum = 0;
  for (uint8_t b : block) sum += b;
  std::snprintf(reinterpret_cast<char*>(block.data() + 148), 8, "%06o", sum);
  return block;
}

}  // namespace

// Sizes from pax records reach 2^63 - 1: offset + size must not wrap around to pass the check
// against the file's size (it did, and read() then asked for 2^63 bytes).
BOOST_AUTO_TEST_CASE(a_pax_size_near_2_to_the_63_is_a_cut_member_not_an_overflow) {
  TempDir dir;
  const std::string record = "28 size=9223372036854775807\n";
  std::vector<uint8_t> archive = tar_header("././@PaxHeader", "00000000034", 'x');
  std::vector<uint8_t> body(512, 0);
  std::copy(record.begin(), record.end(), body.begin());
  archive.insert(archive.end(), body.begin(), body.end());
  const std::vector<uint8_t> member = tar_header("huge.bin", "00000000001", '0');
  archive.insert(archive.end(), member.begin(), member.end());
  archive.resize(archive.size() + 3 * 512, 0);
  TarReader reader(dir.write("huge.tar", archive));
  BOOST_TEST(!reader.next().has_value());
  BOOST_TEST(reader.truncated());
  BOOST_TEST(contains(reader.problem(), "member 'huge.bin' is cut short"), reader.problem());
  BOOST_TEST(clip::limits::kMaxTarMemberBytes == int64_t{1} << 30);
}

// An unclosed quote would make the rest of a table one field: the field limit stops it there.
BOOST_AUTO_TEST_CASE(a_csv_field_past_the_limit_names_the_line_where_its_quote_opened) {
  const std::string text = "filepath,title\na.jpg,\"open" + std::string(clip::limits::kMaxCsvFieldBytes, 'x');
  const std::string message = test::message_of([&] { parse_csv(text, ',', "big.csv"); });
  BOOST_TEST(contains(message, "'big.csv' has a field longer than the limit of 1048576 bytes in the quoted field "
                               "that starts on line 2"),
             message);
  const std::string plain = "filepath,title\n" + std::string(clip::limits::kMaxCsvFieldBytes + 1, 'y') + ",t\n";
  BOOST_TEST(contains(test::message_of([&] { parse_csv(plain, ',', "wide.csv"); }), "'wide.csv' line 2 has a field"));
}

BOOST_AUTO_TEST_CASE(csv_fields_follow_rfc_4180_quoting) {
  const std::string text =
      "\xEF\xBB\xBF" "filepath,title,extra\r\n"
      "a.jpg,plain caption,1\r\n"
      "\n"
      "\"b,c.jpg\",\"with, comma and \"\"quotes\"\"\",2\n"
      "d.jpg,\"two\nlines\",3\n"
      "e.jpg,un\"quoted\"inside,4\r"
      "f.jpg,,5\n"
      "g.jpg\n"
      "\"h.jpg\"x,last";
  const std::vector<CsvRecord> r = parse_csv(text, ',');
  BOOST_TEST_REQUIRE(r.size() == size_t{8});
  BOOST_TEST((r[0].fields == std::vector<std::string>{"filepath", "title", "extra"}));
  BOOST_TEST((r[1].fields == std::vector<std::string>{"a.jpg", "plain caption", "1"}));
  BOOST_TEST((r[2].fields == std::vector<std::string>{"b,c.jpg", "with, comma and \"quotes\"", "2"}));
  BOOST_TEST(r[2].line == 4);
  BOOST_TEST((r[3].fields == std::vector<std::string>{"d.jpg", "two\nlines", "3"}));
  BOOST_TEST(r[4].line == 7);  // after the two-line record
  BOOST_TEST((r[4].fields == std::vector<std::string>{"e.jpg", "un\"quoted\"inside", "4"}));
  BOOST_TEST((r[5].fields == std::vector<std::string>{"f.jpg", "", "5"}));
  BOOST_TEST((r[6].fields == std::vector<std::string>{"g.jpg"}));
  BOOST_TEST((r[7].fields == std::vector<std::string>{"h.jpgx", "last"}));
  BOOST_TEST(contains(test::message_of([] { parse_csv("a,b\n1,\"open\nnever closed", ',', "t.csv"); }),
                      "'t.csv' ends inside the quoted field that starts on line 2"));

  TempDir dir;
  const fs::path table_path = dir.write("sub/table.tsv", bytes_of("url\tcap\n"
                                                                  "img/1.png\tfirst one\n"
                                                                  "/abs/2.png\t\"quoted\ttab\"\n"));
  const CaptionTable t = read_caption_table(table_path, CsvOptions{"url", "cap", 0});
  BOOST_TEST_REQUIRE(t.rows.size() == size_t{2});
  BOOST_TEST(t.rows[0].path == dir.path / "sub" / "img/1.png");
  BOOST_TEST(t.rows[0].caption == "first one");
  BOOST_TEST(t.rows[1].path == fs::path("/abs/2.png"));
  BOOST_TEST(t.rows[1].caption == "quoted\ttab");
  BOOST_TEST(t.rows[1].line == 3);
  const std::string missing = test::message_of([&] { read_caption_table(table_path); });
  BOOST_TEST(contains(missing, "has no image path column 'filepath' (its header names 'url', 'cap'; separator tab)"),
             missing);
  BOOST_TEST(csv_separator_for("x.CSV", 0) == ',');
  BOOST_TEST(csv_separator_for("x.tsv", 0) == '\t');
  BOOST_TEST(csv_separator_for("x.csv", ';') == ';');
}

BOOST_AUTO_TEST_CASE(random_draws_are_uniform_and_seeds_separate_uses) {
  Rng rng(42);
  std::vector<int> counts(10);
  const int n = 200000;
  for (int i = 0; i < n; ++i) ++counts[rng.below(10)];
  for (int c : counts) BOOST_TEST(std::abs(c - n / 10) < 600);  // about 4.5 standard deviations
  double sum = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rng.uniform();
    BOOST_TEST_REQUIRE((u >= 0.0 && u < 1.0));
    sum += u;
  }
  BOOST_TEST(std::abs(sum / n - 0.5) < 0.003);
  BOOST_TEST(derive_seed(1, RandomUse::augment, {0, 1}) != derive_seed(1, RandomUse::augment, {1, 0}));
  BOOST_TEST(derive_seed(1, RandomUse::augment, {0, 1}) != derive_seed(2, RandomUse::augment, {0, 1}));
  BOOST_TEST(derive_seed(1, RandomUse::augment, {0}) != derive_seed(1, RandomUse::shuffle_buffer, {0}));
  BOOST_TEST(Rng(7).next() == Rng(7).next());
}

BOOST_AUTO_TEST_CASE(the_shuffle_buffer_permutes_within_its_reach) {
  for (int64_t capacity : {1, 2, 5, 50, 1000}) {
    ShuffleBuffer<int> buffer(capacity, 9);
    std::vector<int> out;
    for (int i = 0; i < 200; ++i)
      if (std::optional<int> x = buffer.push(i)) out.push_back(*x);
    while (std::optional<int> x = buffer.drain()) out.push_back(*x);
    std::vector<int> sorted = out;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int> identity(200);
    for (int i = 0; i < 200; ++i) identity[i] = i;
    BOOST_TEST((sorted == identity), "capacity " << capacity);
    // The t-th item out was among the first t + capacity in.
    for (int t = 0; t < 200; ++t) BOOST_TEST_REQUIRE(out[t] < t + std::max<int64_t>(capacity, 1));
    BOOST_TEST(((out == identity) == (capacity == 1)), "capacity " << capacity);
  }
}

BOOST_AUTO_TEST_CASE(random_square_crops_stay_in_bounds_and_cover_them) {
  struct Case {
    int w, h;
    float scale;
    int smallest;
  };
  for (const Case c : {Case{40, 30, 0.8f, 24}, Case{30, 40, 0.5f, 15}, Case{5, 9, 0.8f, 4}, Case{28, 28, 1.0f, 28},
                       Case{100, 7, 0.01f, 1}}) {
    Rng rng(3);
    const int shorter = std::min(c.w, c.h);
    int lo = shorter, hi = 0, max_left = 0, max_top = 0;
    for (int i = 0; i < 4000; ++i) {
      const SquareCrop s = random_square_crop(c.w, c.h, c.scale, rng);
      BOOST_TEST_REQUIRE((s.side >= c.smallest && s.side <= shorter && s.left >= 0 && s.top >= 0 &&
                          s.left + s.side <= c.w && s.top + s.side <= c.h));
      lo = std::min(lo, s.side), hi = std::max(hi, s.side);
      max_left = std::max(max_left, s.left + s.side), max_top = std::max(max_top, s.top + s.side);
    }
    BOOST_TEST(lo == c.smallest);  // both ends of the side range are drawn
    BOOST_TEST(hi == shorter);
    BOOST_TEST(max_left == c.w);   // and the square reaches the far edges
    BOOST_TEST(max_top == c.h);
  }
  Rng rng(1);
  BOOST_TEST(contains(test::message_of([&] { random_square_crop(10, 10, 0.0f, rng); }), "must lie in (0, 1]"));
}

BOOST_AUTO_TEST_CASE(augmentation_is_crop_then_resize_and_off_is_clip_preprocessing) {
  for (image::Mode mode : {image::Mode::RGB, image::Mode::L, image::Mode::RGBA}) {
    const image::Image img = test_image(37, 23, mode, 5);
    for (uint64_t seed = 0; seed < 20; ++seed) {
      Rng a(seed), b(seed);
      const AugmentOptions options{true, 0.6f, 0};
      const image::Image ours = augment_rgb8(img, 16, options, a);
      const SquareCrop c = random_square_crop(img.width, img.height, options.min_crop_scale, b);
      const image::Image expected = image::to_rgb(image::resize(image::crop(img, c.left, c.top, c.side, c.side), 16, 16));
      BOOST_TEST_REQUIRE(ours.mode == image::Mode::RGB);
      BOOST_TEST_REQUIRE((ours.pixels == expected.pixels));
    }
    // Off: exactly CLIP's preprocessing, floats included, whatever the generator holds.
    Rng rng(0);
    std::vector<float> out(3 * 16 * 16);
    augment(img, 16, AugmentOptions{false, 0.8f, 0}, rng, out);
    const std::vector<float> clip = image::clip_preprocess(img, 16);
    BOOST_TEST(std::memcmp(out.data(), clip.data(), out.size() * sizeof(float)) == 0);
  }
  // Shifts move pixels and fill with black; the draws follow the crop's.
  const image::Image img = test_image(6, 5, image::Mode::RGB, 1);
  const image::Image moved = shift(img, 2, -1);
  for (int y = 0; y < 5; ++y)
    for (int x = 0; x < 6; ++x)
      for (int ch = 0; ch < 3; ++ch) {
        const bool inside = x - 2 >= 0 && y + 1 < 5;
        BOOST_TEST_REQUIRE(moved.row(y)[x * 3 + ch] == (inside ? img.row(y + 1)[(x - 2) * 3 + ch] : 0));
      }
  const image::Image square = test_image(20, 20, image::Mode::RGB, 2);
  Rng a(11), b(11);
  const image::Image shifted = augment_rgb8(square, 20, AugmentOptions{true, 1.0f, 2}, a);
  random_square_crop(20, 20, 1.0f, b);  // side 20 at (0, 0): the resize is a copy
  const int dx = static_cast<int>(b.below(5)) - 2, dy = static_cast<int>(b.below(5)) - 2;
  BOOST_TEST((shifted.pixels == shift(square, dx, dy).pixels));
}

BOOST_AUTO_TEST_SUITE(data_loader)

BOOST_AUTO_TEST_CASE(one_epoch_delivers_every_sample_once_with_its_tokens_image_and_label) {
  TempDir dir;
  const Dataset data(dir, {10, 9, 4});
  DataOptions options{.resolution = 16, .context_length = 12, .batch = 5, .workers = 2, .shuffle_buffer = 6,
                      .seed = 1, .augment = false, .loop = false};
  DataLoader loader({data.brace_list(dir)}, tokenizer(), options);
  std::set<std::string> seen;
  std::vector<int64_t> sizes;
  while (std::optional<Batch> b = loader.next()) {
    sizes.push_back(b->size);
    BOOST_TEST_REQUIRE(b->images.size() == size_t(b->size * 3 * 16 * 16));
    BOOST_TEST_REQUIRE(b->tokens.size() == size_t(b->size * 12));
    for (int64_t i = 0; i < b->size; ++i) {
      const std::string& key = b->keys[i];
      BOOST_TEST_REQUIRE(data.samples.count(key) == 1u);
      BOOST_TEST(seen.insert(key).second, key << " delivered twice");
      const Dataset::Sample& s = data.samples.at(key);
      const std::vector<int> expected_tokens = tokenizer().tokenize(s.caption, 12, true);
      BOOST_TEST(std::equal(expected_tokens.begin(), expected_tokens.end(), b->tokens.begin() + i * 12), key);
      const std::vector<float> expected_image = image::clip_preprocess(image::decode(s.image), 16);
      BOOST_TEST(std::memcmp(expected_image.data(), b->images.data() + i * 3 * 16 * 16,
                             expected_image.size() * sizeof(float)) == 0, key);
      BOOST_TEST(b->labels[i] == s.label);
    }
  }
  BOOST_TEST(seen.size() == data.samples.size());
  BOOST_TEST((sizes == std::vector<int64_t>{5, 5, 5, 5, 3}));
  BOOST_TEST(!loader.next().has_value());
  const DataStats stats = loader.stats();
  BOOST_TEST(stats.samples == 23);
  BOOST_TEST(stats.skipped == 0);
  BOOST_TEST(stats.truncated_shards == 0);
  BOOST_TEST(loader.position().epoch == 1);
  BOOST_TEST(loader.position().samples == 0);
  // The truncating tokenizer really truncated something.
  BOOST_TEST(tokenizer().encode(data.samples.at("shard0_1").caption).size() > size_t{10});
}

BOOST_AUTO_TEST_CASE(damaged_samples_and_a_cut_shard_are_skipped_counted_and_named) {
  TempDir dir;
  const image::Image img = test_image(20, 14, image::Mode::RGB, 1);
  const std::vector<uint8_t> good = png_bytes(img), jpeg = jpeg_bytes(img);
  {
    TarWriter tar(dir.path / "bad-00000.tar");
    tar.add("g0.png", good), tar.add("g0.txt", "good zero");
    tar.add("cj.jpg", std::vector<uint8_t>(jpeg.begin(), jpeg.begin() + jpeg.size() / 2)), tar.add("cj.txt", "corrupt");
    tar.add("u8.png", good), tar.add("u8.txt", "caf\xC3 bad utf-8");
    tar.add("nc.png", good);  // no caption
    tar.add("bl.png", good), tar.add("bl.txt", "  \n");
    tar.add("wp.webp", bytes_of("RIFF\x10\0\0\0WEBPVP8 "sv)), tar.add("wp.txt", "webp");
    tar.add("no_extension", "ignored");
    tar.add("g1.jpg", jpeg), tar.add("g1.txt", "good one");
    tar.close();
  }
  {
    TarWriter tar(dir.path / "bad-00001.tar");
    tar.add("c0.png", good), tar.add("c0.txt", "before the cut 0");
    tar.add("c1.png", good), tar.add("c1.txt", "before the cut 1");
    tar.add("c2.txt", "its image is cut"), tar.add("c2.png", good);
    tar.close();
    const std::vector<Member> members = read_all(dir.path / "bad-00001.tar");
    BOOST_TEST_REQUIRE(members.back().name == "c2.png");
    TarReader reader(dir.path / "bad-00001.tar");
    std::optional<TarEntry> last;
    while (std::optional<TarEntry> e = reader.next()) last = e;
    const std::vector<uint8_t> full = read_bytes(dir.path / "bad-00001.tar");  // cut in the middle of c2.png
    dir.write("bad-00001.tar", std::vector<uint8_t>(full.begin(), full.begin() + last->offset + last->size / 2));
  }
  fs::create_directories(dir.path / "bad-00002.tar");  // exists, but cannot be read
  for (int workers : {0, 2}) {
    DataLoader loader({(dir.path / "bad-{00000..00002}.tar").string()}, tokenizer(),
                      DataOptions{.resolution = 8, .context_length = 8, .batch = 100, .workers = workers, .loop = false});
    std::optional<Batch> b = loader.next();
    BOOST_TEST_REQUIRE(b.has_value());
    std::set<std::string> keys(b->keys.begin(), b->keys.end());
    BOOST_TEST((keys == std::set<std::string>{"g0", "g1", "c0", "c1"}));
    BOOST_TEST(!loader.next().has_value());
    const DataStats s = loader.stats();
    BOOST_TEST(s.samples == 4);
    BOOST_TEST(s.skipped == 6);  // cj, u8, nc, bl, wp, and c2 without its image
    BOOST_TEST(s.truncated_shards == 1);
    BOOST_TEST(s.unreadable_shards == 1);
    BOOST_TEST(s.shard_problems.size() == 2u);
    BOOST_TEST(any_contains(s.shard_problems, "bad-00001.tar: member 'c2.png' is cut short"));
    BOOST_TEST(any_contains(s.shard_problems, "bad-00002.tar': it is a directory"));
    BOOST_TEST(any_contains(s.skipped_reasons, "bad-00000.tar:cj.jpg': corrupt"));
    BOOST_TEST(any_contains(s.skipped_reasons, "bad-00000.tar:u8.txt: the caption is not valid UTF-8 (byte 3)"));
    BOOST_TEST(any_contains(s.skipped_reasons, "bad-00000.tar: record 'nc' has no caption"));
    BOOST_TEST(any_contains(s.skipped_reasons, "bad-00000.tar:bl.txt: the caption is blank"));
    BOOST_TEST(any_contains(s.skipped_reasons, "bad-00000.tar:wp.webp': not a JPEG, PNG, BMP or GIF file"));
    BOOST_TEST(any_contains(s.skipped_reasons, "bad-00001.tar: record 'c2' has no image"));
  }
}

BOOST_AUTO_TEST_CASE(caption_tables_resolve_paths_and_skip_unreadable_images) {
  TempDir dir;
  std::map<std::string, std::vector<uint8_t>> images;
  for (int i = 0; i < 4; ++i) {
    const std::string name = "img/" + std::to_string(i) + ".png";
    images[name] = png_bytes(test_image(10 + i, 12, image::Mode::RGB, static_cast<uint64_t>(i)));
    dir.write("data/" + name, images[name]);
  }
  dir.write("data/train.csv", bytes_of("id,filepath,title\n"
                                       "0,img/0.png,\"zero, with a comma\"\n"
                                       "1,img/1.png,one\n"
                                       "2,img/missing.png,gone\n"
                                       "3,img/2.png,\"two\nlines\"\n"
                                       "4,img/3.png,\n"));
  DataLoader loader({(dir.path / "data/train.csv").string()}, tokenizer(),
                    DataOptions{.resolution = 8, .context_length = 10, .batch = 10, .workers = 1, .augment = false,
                                .loop = false});
  std::optional<Batch> b = loader.next();
  BOOST_TEST_REQUIRE(b.has_value());
  BOOST_TEST_REQUIRE(b->size == 3);
  const std::map<std::string, std::string> captions = {{"img/0.png", "zero, with a comma"}, {"img/1.png", "one"},
                                                       {"img/2.png", "two\nlines"}};
  for (int64_t i = 0; i < b->size; ++i) {
    BOOST_TEST_REQUIRE(captions.count(b->keys[i]) == 1u);
    const std::vector<int> expected = tokenizer().tokenize(captions.at(b->keys[i]), 10, true);
    BOOST_TEST(std::equal(expected.begin(), expected.end(), b->tokens.begin() + i * 10));
    const std::vector<float> image = image::clip_preprocess(image::decode(images.at(b->keys[i])), 8);
    BOOST_TEST(std::memcmp(image.data(), b->images.data() + i * 3 * 64, image.size() * sizeof(float)) == 0);
    BOOST_TEST(b->labels[i] == -1);
  }
  const DataStats s = loader.stats();
  BOOST_TEST(s.skipped == 2);
  BOOST_TEST(any_contains(s.skipped_reasons, "img/missing.png': No such file or directory"));
  BOOST_TEST(any_contains(s.skipped_reasons, "train.csv line 7: record 'img/3.png' has no caption"));
}

BOOST_AUTO_TEST_CASE(configuration_mistakes_are_errors_that_say_what_is_wrong) {
  TempDir dir;
  const Dataset data(dir, {3});
  const DataOptions options{.resolution = 8, .context_length = 8, .batch = 2, .workers = 0};
  const auto error = [&](std::vector<std::string> sources, DataPosition at = {}) {
    return test::message_of([&] { DataLoader loader(sources, tokenizer(), options, at); });
  };
  BOOST_TEST(contains(error({}), "no training data was given"));
  const std::string missing = (dir.path / "shard-{00000..00001}.tar").string();
  BOOST_TEST(contains(error({missing}), "the data source '" + (dir.path / "shard-00001.tar").string() +
                                            "' does not exist (from the list '" + missing + "')"),
             error({missing}));
  dir.write("x.parquet", {1});
  BOOST_TEST(contains(error({(dir.path / "x.parquet").string()}), "give WebDataset shards (.tar) or a caption table"));
  BOOST_TEST(contains(error({data.shards[0]}, {0, 4}), "epoch 0, sample 4: that epoch has only 3 records"));
  BOOST_TEST(error({data.shards[0]}, {5, 3}).empty());  // the very end of an epoch is a valid place
  {
    TarWriter empty(dir.path / "empty.tar");
    empty.close();
  }
  const std::string none = test::message_of([&] {
    DataLoader loader({(dir.path / "empty.tar").string()}, tokenizer(), options);
    loader.next();
  });
  BOOST_TEST(contains(none, "the data sources hold no records"), none);
  {
    TarWriter bad(dir.path / "useless.tar");
    bad.add("a.png", "not an image"), bad.add("a.txt", "caption");
    bad.close();
  }
  const std::string useless = test::message_of([&] {
    DataLoader loader({(dir.path / "useless.tar").string()}, tokenizer(), options);
    loader.next();
  });
  BOOST_TEST(contains(useless, "no record of epoch 0 could be used (1 skipped)"), useless);
  BOOST_TEST(contains(useless, "useless.tar:a.png"), useless);
}

BOOST_AUTO_TEST_CASE(batches_are_bitwise_the_same_for_any_worker_count) {
  TempDir dir;
  const Dataset data(dir, {10, 9, 4});
  std::vector<std::vector<Batch>> runs;
  for (int workers : {0, 1, 3}) {
    DataOptions options{.resolution = 16, .context_length = 12, .batch = 4, .workers = workers, .shuffle_buffer = 8,
                        .seed = 5, .min_crop_scale = 0.5f, .max_shift = 1, .prefetch = 6};
    DataLoader loader({data.brace_list(dir)}, tokenizer(), options);
    runs.push_back(take_batches(loader, 15));  // 60 samples: two and a half epochs
    BOOST_TEST(loader.position().epoch == 2);
    BOOST_TEST(loader.position().samples == 60 - 46);
  }
  BOOST_TEST(same_batches(runs[0], runs[1]));
  BOOST_TEST(same_batches(runs[0], runs[2]));
  // Each epoch is a permutation of the data, in a different order each epoch.
  std::vector<std::string> order;
  for (const Batch& b : runs[0]) order.insert(order.end(), b.keys.begin(), b.keys.end());
  for (int e = 0; e < 2; ++e) {
    std::set<std::string> epoch(order.begin() + 23 * e, order.begin() + 23 * (e + 1));
    BOOST_TEST(epoch.size() == data.samples.size());
  }
  BOOST_TEST(!std::equal(order.begin(), order.begin() + 23, order.begin() + 23));
  // The same sample is augmented differently in different epochs.
  const auto image_of = [&](int epoch, const std::string& key) {
    const size_t at = std::find(order.begin() + 23 * epoch, order.begin() + 23 * (epoch + 1), key) - order.begin();
    const Batch& b = runs[0][at / 4];
    return std::vector<float>(b.images.begin() + (at % 4) * 768, b.images.begin() + (at % 4 + 1) * 768);
  };
  BOOST_TEST((image_of(0, "shard0_0") != image_of(1, "shard0_0")));
  // Another seed, another order.
  DataLoader other({data.brace_list(dir)}, tokenizer(),
                   DataOptions{.resolution = 16, .context_length = 12, .batch = 4, .workers = 1, .shuffle_buffer = 8,
                               .seed = 6});
  BOOST_TEST(!same_batches(take_batches(other, 3), std::vector<Batch>(runs[0].begin(), runs[0].begin() + 3)));
}

BOOST_AUTO_TEST_CASE(a_loader_built_at_a_position_continues_with_the_same_batches) {
  TempDir dir;
  const Dataset data(dir, {10, 9, 4, 7});
  // A damaged shard in the mix: its skipped records take stream places, and resuming must agree.
  {
    TarWriter tar(dir.path / "shard-00004.tar");
    const image::Image img = test_image(20, 14, image::Mode::RGB, 1);
    tar.add("d0.png", png_bytes(img)), tar.add("d0.txt", "fine");
    tar.add("d1.png", "broken"), tar.add("d1.txt", "broken");
    tar.add("d2.png", png_bytes(img)), tar.add("d2.txt", "fine too");
    tar.add("d3.png", png_bytes(img));
    tar.close();
  }
  const std::string list = (dir.path / "shard-{00000..00004}.tar").string();
  const DataOptions options{.resolution = 12, .context_length = 10, .batch = 7, .workers = 2, .shuffle_buffer = 10,
                            .seed = 3, .max_shift = 2};
  DataLoader original({list}, tokenizer(), options);
  std::vector<DataPosition> positions;
  std::vector<Batch> batches;
  for (int i = 0; i < 16; ++i) {  // 112 samples: three epochs of 32 usable records and a part
    positions.push_back(original.position());
    batches.push_back(*original.next());
  }
  BOOST_TEST(original.stats().skipped == 6);  // d1 and d3 in each of three epochs
  for (int k : {0, 3, 4, 5, 9, 13}) {
    for (int workers : {0, 3}) {
      DataOptions resumed_options = options;
      resumed_options.workers = workers;
      DataLoader resumed({list}, tokenizer(), resumed_options, positions[k]);
      const std::vector<Batch> rest = take_batches(resumed, 16 - k);
      BOOST_TEST(same_batches(rest, std::vector<Batch>(batches.begin() + k, batches.end())),
                 "resumed after " << k << " batches at epoch " << positions[k].epoch << ", sample "
                                  << positions[k].samples << " with " << workers << " workers");
    }
  }
  // The positions count stream places, skipped records included: 34 records per epoch.
  BOOST_TEST(positions[5].epoch == 1);
  BOOST_TEST(positions[5].samples >= 3);  // 3 usable records of epoch 1 after the 32 of epoch 0
  BOOST_TEST(positions[5].samples <= 5);  // and up to both damaged ones
}

BOOST_AUTO_TEST_SUITE_END()

namespace {

// The collective of BatchShare::exchange for ranks that are threads of this process: every rank
// waits for all to arrive, then each gets the bytes of all in rank order. Counts the reports
// (non-empty parts) and remembers who made them.
class ThreadExchange {
 public:
  explicit ThreadExchange(int world) : world_(world), in_(static_cast<size_t>(world)) {}

  std::vector<std::string> exchange(int rank, const std::string& mine) {
    std::unique_lock lock(mutex_);
    in_[rank] = mine;
    const int64_t round = round_;
    if (++arrived_ == world_) {
      out_ = in_;
      for (int r = 0; r < world_; ++r)
        if (!in_[r].empty()) reporters_.insert(r), ++reports_;
      arrived_ = 0;
      ++round_;
      cv_.notify_all();
      return out_;
    }
    // A rank that failed after this round ended is no reason to fail it.
    cv_.wait_for(lock, std::chrono::seconds(60), [&] { return round_ != round || broken_; });
    if (round_ == round) throw std::runtime_error("a rank did not reach the exchange");
    return out_;
  }

  void give_up() {
    std::lock_guard lock(mutex_);
    broken_ = true;
    cv_.notify_all();
  }

  int64_t rounds() const { return round_; }
  int64_t reports() const { return reports_; }
  const std::set<int>& reporters() const { return reporters_; }

 private:
  const int world_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::string> in_, out_;
  int arrived_ = 0;
  int64_t round_ = 0, reports_ = 0;
  bool broken_ = false;
  std::set<int> reporters_;
};

// What one rank of a shared loader handed out: its batches, and the position and stats after each.
struct RankRun {
  std::vector<Batch> batches;
  std::vector<DataPosition> positions;
  DataStats stats;
  std::string error;
};

// W ranks, each a thread with its own loader on a BatchShare, `n` batches each.
std::vector<RankRun> run_shared(const std::vector<std::string>& sources, const DataOptions& options, int world, int n,
                                DataPosition start, ThreadExchange& exchange) {
  std::vector<RankRun> runs(static_cast<size_t>(world));
  std::vector<std::thread> ranks;
  for (int r = 0; r < world; ++r)
    ranks.emplace_back([&, r] {
      try {
        BatchShare share{world, r, [&, r](const std::string& mine) { return exchange.exchange(r, mine); }};
        DataLoader loader(sources, tokenizer(), options, start, share);
        for (int i = 0; i < n; ++i) {
          std::optional<Batch> b = loader.next();
          if (!b) throw std::runtime_error("the loader ran out of batches");
          runs[r].batches.push_back(std::move(*b));
          runs[r].positions.push_back(loader.position());
        }
        runs[r].stats = loader.stats();
      } catch (const std::exception& e) {
        runs[r].error = e.what();
        exchange.give_up();
      }
    });
  for (std::thread& t : ranks) t.join();
  return runs;
}

// Rows [first, first + rows) of a one-process batch.
Batch rows_of(const Batch& b, int64_t first, int64_t rows, int64_t image_floats, int64_t T) {
  Batch out;
  out.size = rows;
  out.images.assign(b.images.begin() + first * image_floats, b.images.begin() + (first + rows) * image_floats);
  out.tokens.assign(b.tokens.begin() + first * T, b.tokens.begin() + (first + rows) * T);
  out.keys.assign(b.keys.begin() + first, b.keys.begin() + first + rows);
  out.labels.assign(b.labels.begin() + first, b.labels.begin() + first + rows);
  return out;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(batch_shares)

// Each rank of a data-parallel job prepares only its rows, and they are exactly the one-process
// loader's rows, damaged records (caption checks every rank makes, images only their owner can
// find broken) anywhere in the batch, across epochs, with and without workers, and resumed.
BOOST_AUTO_TEST_CASE(each_rank_gets_exactly_its_rows_of_the_one_process_batches) {
  TempDir dir;
  const Dataset data(dir, {10, 9, 4});
  const std::vector<uint8_t> good = png_bytes(test_image(20, 14, image::Mode::RGB, 1));
  {
    TarWriter tar(dir.path / "shard-00003.tar");
    tar.add("d0.png", good), tar.add("d0.txt", "fine");
    tar.add("d1.png", "not an image"), tar.add("d1.txt", "corrupt image");
    tar.add("d2.png", good), tar.add("d2.txt", "caf\xC3 bad utf-8");
    tar.add("d3.png", std::vector<uint8_t>(good.begin(), good.begin() + good.size() / 2)), tar.add("d3.txt", "cut png");
    tar.add("d4.png", good), tar.add("d4.txt", "  ");
    tar.add("d5.png", good), tar.add("d5.txt", "fine again");
    tar.add("d6.png", bytes_of("GIF89a broken")), tar.add("d6.txt", "corrupt gif");
    tar.close();
  }
  // A caption table too: one image file missing (found only by the rank that reads it).
  for (int i = 0; i < 4; ++i)
    dir.write("img/" + std::to_string(i) + ".png", png_bytes(test_image(9 + i, 11, image::Mode::RGB, 7 + i)));
  dir.write("table.csv", bytes_of("filepath,title\nimg/0.png,zero\nimg/1.png,one\nimg/gone.png,missing\n"
                                  "img/2.png,two\nimg/3.png,three\n"));
  const std::vector<std::string> sources = {(dir.path / "shard-{00000..00003}.tar").string(),
                                            (dir.path / "table.csv").string()};
  // 23 + 7 + 5 records, 6 of them skipped each epoch: 29 usable. 13 batches of 7: three epochs and
  // the start of a fourth.
  DataOptions options{.resolution = 12, .context_length = 10, .batch = 7, .workers = 0, .shuffle_buffer = 10,
                      .seed = 3, .max_shift = 2, .prefetch = 9};
  const int64_t image_floats = 3 * 12 * 12, T = 10;
  const int n = 13;
  DataLoader one(sources, tokenizer(), options);
  std::vector<Batch> reference;
  std::vector<DataPosition> positions;
  for (int i = 0; i < n; ++i) {
    positions.push_back(one.position());
    reference.push_back(*one.next());
  }
  positions.push_back(one.position());
  const DataStats stats = one.stats();
  BOOST_TEST_REQUIRE(stats.skipped >= 18);  // the 6 damaged records in three epochs
  BOOST_TEST_REQUIRE(positions[n].epoch == 3);

  for (int world : {2, 3}) {
    for (int workers : {0, 2}) {
      for (int from : {0, 5}) {
        const std::string what = "W = " + std::to_string(world) + ", " + std::to_string(workers) +
                                 " workers, from batch " + std::to_string(from);
        DataOptions o = options;
        o.workers = workers;
        ThreadExchange exchange(world);
        const std::vector<RankRun> runs = run_shared(sources, o, world, n - from, positions[from], exchange);
        for (int r = 0; r < world; ++r) {
          BOOST_TEST_REQUIRE(runs[r].error.empty(), what << ", rank " << r << ": " << runs[r].error);
          for (int i = from; i < n; ++i) {
            const Batch& got = runs[r].batches[i - from];
            const dist::Slice slice = dist::batch_slice(reference[i].size, world, r);
            BOOST_TEST(got.first == slice.first, what);
            BOOST_TEST(got.global_size == reference[i].size, what);
            BOOST_TEST(same_batches({got}, {rows_of(reference[i], slice.first, slice.rows, image_floats, T)}),
                       what << ", rank " << r << ", batch " << i);
            BOOST_TEST(runs[r].positions[i - from].epoch == positions[i + 1].epoch, what);
            BOOST_TEST(runs[r].positions[i - from].samples == positions[i + 1].samples, what);
          }
          if (from == 0) {  // every rank's stats are those of one process
            BOOST_TEST(runs[r].stats.samples == stats.samples, what);
            BOOST_TEST(runs[r].stats.skipped == stats.skipped, what);
            BOOST_TEST(runs[r].stats.skipped_reasons == stats.skipped_reasons, what);
          }
        }
        // Broken images were found by more than one rank, so rows moved on ranks that read fine
        // images only; a caption problem costs no exchange.
        BOOST_TEST(exchange.reports() >= 3, what);
        BOOST_TEST(exchange.reporters().size() >= 2u, what);
        BOOST_TEST(exchange.rounds() >= n - from, what);
      }
    }
  }
  BOOST_TEST(any_contains(stats.skipped_reasons, "shard-00003.tar:d1.png"));
  BOOST_TEST(any_contains(stats.skipped_reasons, "img/gone.png': No such file or directory"));
  BOOST_TEST(any_contains(stats.skipped_reasons, "d2.txt: the caption is not valid UTF-8"));
}

BOOST_AUTO_TEST_CASE(a_short_last_batch_is_split_too_and_then_the_loader_ends) {
  TempDir dir;
  const Dataset data(dir, {10, 9, 4});
  DataOptions options{.resolution = 8, .context_length = 8, .batch = 10, .workers = 1, .shuffle_buffer = 4,
                      .seed = 2, .loop = false};
  DataLoader one({data.brace_list(dir)}, tokenizer(), options);
  std::vector<Batch> reference;
  while (std::optional<Batch> b = one.next()) reference.push_back(std::move(*b));
  BOOST_TEST_REQUIRE(reference.size() == 3u);
  BOOST_TEST_REQUIRE(reference[2].size == 3);
  ThreadExchange exchange(2);
  const std::vector<RankRun> runs = run_shared({data.brace_list(dir)}, options, 2, 3, {}, exchange);
  for (int r = 0; r < 2; ++r) {
    BOOST_TEST_REQUIRE(runs[r].error.empty(), runs[r].error);
    for (int i = 0; i < 3; ++i) {
      const dist::Slice slice = dist::batch_slice(reference[i].size, 2, r);
      BOOST_TEST(same_batches({runs[r].batches[i]}, {rows_of(reference[i], slice.first, slice.rows, 3 * 64, 8)}));
    }
  }
  BOOST_TEST(runs[0].batches[2].size == 2);
  BOOST_TEST(runs[1].batches[2].size == 1);
}

// Data no record of which can be used: every rank fails as one process does, none waits forever.
BOOST_AUTO_TEST_CASE(unusable_data_fails_on_every_rank_alike) {
  TempDir dir;
  {
    TarWriter bad(dir.path / "useless.tar");
    bad.add("a.png", "not an image"), bad.add("a.txt", "caption");
    bad.add("b.png", png_bytes(test_image(9, 9, image::Mode::RGB, 1))), bad.add("b.txt", "  ");
    bad.close();
  }
  for (int workers : {0, 2}) {
    ThreadExchange exchange(2);
    const DataOptions options{.resolution = 8, .context_length = 8, .batch = 2, .workers = workers};
    const std::vector<RankRun> runs = run_shared({(dir.path / "useless.tar").string()}, options, 2, 1, {}, exchange);
    for (const RankRun& run : runs) {
      BOOST_TEST(contains(run.error, "no record of epoch 0 could be used (2 skipped)"), run.error);
      BOOST_TEST(contains(run.error, "useless.tar:a.png"), run.error);
      BOOST_TEST(contains(run.error, "useless.tar:b.txt: the caption is blank"), run.error);
    }
  }
}

BOOST_AUTO_TEST_CASE(a_share_without_an_exchange_or_with_a_bad_rank_is_refused) {
  TempDir dir;
  const Dataset data(dir, {3});
  const DataOptions options{.resolution = 8, .context_length = 8, .batch = 2, .workers = 0};
  const auto error = [&](BatchShare share) {
    return test::message_of([&] { DataLoader loader({data.shards[0]}, tokenizer(), options, {}, share); });
  };
  BOOST_TEST(contains(error({2, 0, nullptr}), "needs the exchange of failed records"));
  BOOST_TEST(contains(error({2, 2, [](const std::string& s) { return std::vector<std::string>{s, s}; }}),
                      "rank 2 is not in a world of 2 processes"));
}

BOOST_AUTO_TEST_SUITE_END()
