// Writes the fuzzers' seed corpora (tests/fuzz/corpus/<target>/) with the project's own writers
// (SafeTensorsWriter, TarWriter, save_checkpoint), TurboJPEG and stb_image_write for tiny
// images, and a few hand-made inputs. Run once when the formats change:
//   build-fuzz/tests/fuzz/make-fuzz-seeds tests/fuzz/corpus
#include <stb_image_write.h>
#include <turbojpeg.h>

#include <fstream>
#include <iostream>
#include <iterator>

#include "clip/data/tar.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/checkpoint.hpp"
#include "fuzz_checkpoint.hpp"

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

namespace {

fs::path root;

void put(const std::string& target, const std::string& name, const Bytes& bytes) {
  fs::create_directories(root / target);
  std::ofstream out(root / target / name, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}
void put(const std::string& target, const std::string& name, std::string_view text) {
  put(target, name, Bytes(text.begin(), text.end()));
}
Bytes read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A w x h gradient with `channels` samples per pixel.
Bytes pixels(int w, int h, int channels) {
  Bytes p;
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < channels; ++c) p.push_back(static_cast<uint8_t>(x * 37 + y * 11 + c * 80));
  return p;
}

Bytes jpeg(int w, int h, int pixel_format, int subsampling, int flags) {
  tjhandle tj = tjInitCompress();
  unsigned char* out = nullptr;
  unsigned long size = 0;
  Bytes p = pixels(w, h, tjPixelSize[pixel_format]);
  if (tjCompress2(tj, p.data(), w, 0, h, pixel_format, &out, &size, subsampling, 75, flags) != 0) std::abort();
  Bytes bytes(out, out + size);
  tjFree(out);
  tjDestroy(tj);
  return bytes;
}

void append(void* context, void* data, int size) {
  auto* bytes = static_cast<Bytes*>(context);
  bytes->insert(bytes->end(), static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + size);
}
Bytes png(int w, int h, int channels) {
  Bytes bytes, p = pixels(w, h, channels);
  stbi_write_png_to_func(append, &bytes, w, h, channels, p.data(), w * channels);
  return bytes;
}
Bytes bmp(int w, int h, int channels) {
  Bytes bytes, p = pixels(w, h, channels);
  stbi_write_bmp_to_func(append, &bytes, w, h, channels, p.data());
  return bytes;
}

void images() {
  put("image", "rgb420.jpg", jpeg(17, 9, TJPF_RGB, TJSAMP_420, 0));
  put("image", "rgb444.jpg", jpeg(8, 8, TJPF_RGB, TJSAMP_444, 0));
  put("image", "gray.jpg", jpeg(9, 5, TJPF_GRAY, TJSAMP_GRAY, 0));
  put("image", "cmyk.jpg", jpeg(8, 8, TJPF_CMYK, TJSAMP_444, 0));
  put("image", "progressive.jpg", jpeg(16, 16, TJPF_RGB, TJSAMP_422, TJFLAG_PROGRESSIVE));
  put("image", "gray.png", png(5, 3, 1));
  put("image", "gray_alpha.png", png(4, 4, 2));
  put("image", "rgb.png", png(7, 6, 3));
  put("image", "rgba.png", png(3, 9, 4));
  put("image", "rgb.bmp", bmp(5, 4, 3));
  put("image", "rgba.bmp", bmp(4, 4, 4));
  // GIFs as in tests/test_image.cpp: a 1x1 frame with a transparent index, and a gray ramp.
  put("image", "transparent.gif",
      Bytes{'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0x80, 0, 0, 255, 255, 255, 0, 0, 0, 0x21, 0xF9, 4, 1, 0, 0,
            0, 0, 0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0x44, 1, 0, 0x3B});
  put("image", "ramp.gif", Bytes{'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0x80, 0, 0, 0, 0, 0, 1, 1, 1, 0x2C, 0,
                                 0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0x4C, 1, 0, 0x3B});
}

void safetensors(const fs::path& scratch) {
  clip::SafeTensorsWriter w;
  const float values[6] = {1.5f, -2.0f, 0.0f, 3.25f, 1e-3f, -7.0f};
  const int64_t counters[2] = {7, -1};
  w.add("visual.weight", {2, 3}, values);
  w.add("scalar", {}, values);
  w.add("empty", {0, 4}, values);
  w.add_integers("num_batches_tracked", {2}, counters);
  w.set_metadata("format", "pt");
  w.write(scratch / "w.safetensors");
  put("safetensors", "writer.safetensors", read(scratch / "w.safetensors"));
  // The other dtypes the reader converts, by hand: F16, BF16, F64, I32.
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]},)"
      R"("d":{"dtype":"F64","shape":[1],"data_offsets":[8,16]},"i":{"dtype":"I32","shape":[1,1],"data_offsets":[16,20]}})";
  Bytes file(8);
  const uint64_t n = header.size();
  std::memcpy(file.data(), &n, 8);
  file.insert(file.end(), header.begin(), header.end());
  for (uint8_t b : {0x00, 0x3C, 0x01, 0x80, 0x80, 0x3F, 0x00, 0xC0, 0, 0, 0, 0, 0, 0, 0xF0, 0x3F, 42, 0, 0, 0})
    file.push_back(b);
  put("safetensors", "dtypes.safetensors", file);
}

Bytes tar(const fs::path& scratch, clip::data::TarLongNames names,
          const std::vector<std::pair<std::string, std::string>>& members) {
  clip::data::TarWriter w(scratch / "t.tar", names);
  for (const auto& [name, body] : members) w.add(name, body);
  w.close();
  return read(scratch / "t.tar");
}

void tars(const fs::path& scratch) {
  const std::string long_name = "shard/" + std::string(120, 'n') + "/00001.txt";
  const std::string deep = std::string(90, 'p') + "/" + std::string(60, 'q') + "/x.txt";  // ustar prefix
  put("tar", "pax.tar", tar(scratch, clip::data::TarLongNames::pax, {{"a.txt", "hello"}, {long_name, "long"}, {deep, "d"}}));
  put("tar", "gnu.tar", tar(scratch, clip::data::TarLongNames::gnu, {{"a.txt", "hello"}, {long_name, "long"}}));
  Bytes cut = tar(scratch, clip::data::TarLongNames::pax, {{"a.txt", std::string(700, 'a')}, {"b.txt", "b"}});
  cut.resize(1024 + 300);
  put("tar", "truncated.tar", cut);

  const Bytes image = jpeg(8, 8, TJPF_RGB, TJSAMP_420, 0);
  const std::string jpg(image.begin(), image.end());
  put("webdataset", "shard.tar",
      tar(scratch, clip::data::TarLongNames::pax,
          {{"00000.jpg", jpg}, {"00000.txt", "a photo of a cat"}, {"00000.cls", "3"},
           {"00001.png", "not really a png"}, {"00001.txt", "a dog"}, {"00001.json", "{}"},
           {"d/00002.JPEG", jpg}, {"d/00002.txt", "red car"}, {"noextension", "x"}, {"00003.txt", "alone"}}));
  put("webdataset", "gnu.tar",
      tar(scratch, clip::data::TarLongNames::gnu,
          {{long_name.substr(0, long_name.size() - 4) + ".jpg", jpg}, {long_name, "a long key"}}));
}

void checkpoint(const fs::path& scratch) {
  using Params = clip::Clip<clip::fuzz::FuzzTiny>::Params;
  auto params = std::make_unique<Params>();
  clip::AdamW<Params> optimizer(*params);
  clip::CheckpointInfo info;
  info.variant = clip::fuzz::FuzzTiny::name;
  info.step = 12;
  info.epoch = 1;
  info.samples = 40;
  info.seed = 7;
  clip::save_checkpoint(scratch / "c.safetensors", *params, optimizer, info);
  const Bytes file = read(scratch / "c.safetensors");
  uint64_t header = 0;
  std::memcpy(&header, file.data(), 8);
  put("checkpoint", "tiny_header.json", Bytes(file.begin() + 8, file.begin() + 8 + static_cast<std::ptrdiff_t>(header)));
}

void texts() {
  const char* captions[] = {
      "a photo of a cat", "A Photo of THE   dog!\n\tits 2 friends' toys", "caf\xC3\xA9 na\xC3\xAFve \xE6\x97\xA5\xE6\x9C\xAC",
      "&amp;lt;b&amp;gt; &#39;quoted&#x27; &copy &notin; &unknown;", "cafe\xCC\x81 (decomposed) \xF0\x9F\x98\x80",
      "don't we'll I'm they've she's 123 4567"};
  for (int i = 0; i < 6; ++i) {
    put("bpe_tokenizer", "caption" + std::to_string(i) + ".txt", captions[i]);
    put("sentencepiece", "caption" + std::to_string(i) + ".txt", captions[i]);
  }
  put("json", "metrics.json", R"({"step":3,"loss":0.125,"lr":1e-05,"time_s":1.5,"note":"caf\u00e9 \ud83d\ude00"})");
  put("json", "header.json", R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})");
  put("json", "values.json", R"([null,true,false,-0.0,1E+2,"\"\\\/\b\f\n\r\t",[[[]]],{}])");
  put("csv", "comma.csv", std::string(",") + "filepath,title\nimages/a.jpg,a photo of a cat\n\"b,c.jpg\",\"a \"\"quoted\"\" caption\nover two lines\"\r\n\n");
  put("csv", "tab.tsv", std::string("\t") + "\xEF\xBB\xBFtitle\tfilepath\r\ncaption one\t/abs/one.png\rcaption two\ttwo.png");
  put("shard_list", "range.txt", "data/{00000..00099}.tar");
  put("shard_list", "mixed.txt", "a/{train,extra}-{0..30..10}.tar::b/{a..e}{9..7}.tar");
  put("shard_list", "nested.txt", "x/{a,{b,c}{1..2},d}.tar");
  const std::string argv1("--batch-size\0" "64\0--output=out\0--verbose\0--\0-file", 47);
  const std::string argv2("--model\0ViT-B/32\0-\0--batch-size=0\0--help", 40);
  put("cli_args", "options.bin", argv1);
  put("cli_args", "more.bin", argv2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: make-fuzz-seeds CORPUS_FOLDER\n";
    return 2;
  }
  root = argv[1];
  const fs::path scratch = fs::temp_directory_path() / ("clip-fuzz-seeds-" + std::to_string(getpid()));
  fs::create_directories(scratch);
  images();
  safetensors(scratch);
  tars(scratch);
  checkpoint(scratch);
  texts();
  fs::remove_all(scratch);
  return 0;
}
