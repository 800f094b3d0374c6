// Image decoding and CLIP preprocessing against Pillow 9.4 + torchvision (golden
// preprocess.safetensors): every pixel of every golden image at 224 and 336, the JPEG decoder
// on its own, the resampler on its own, the errors for broken files, and clip-preprocess.
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "clip/image/decode.hpp"
#include "clip/image/preprocess.hpp"
#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "golden.hpp"
#include "messages.hpp"

using namespace clip;
using namespace clip::image;
namespace fs = std::filesystem;

namespace {

const char* const kGoldenImages[] = {"astronaut.png", "coffee.png",       "rocket.jpg",
                                     "coins.png",     "chelsea_rgba.png", "coffee_palette.png"};

// A scratch folder removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("clip_test_image_" + std::to_string(::getpid()) + "_" +
                                        std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  fs::path write(const std::string& name, const std::vector<uint8_t>& bytes) const {
    fs::path p = path / name;
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return p;
  }
};

std::vector<uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// Compares n x n RGB bytes and our floats with a golden normalised tensor [3,n,n]: the bytes
// recovered as round((x * std + mean) * 255) must be equal everywhere, the floats within 1e-6.
void check_against_golden(const Image& rgb, const std::vector<float>& ours, const Tensor& golden,
                          const std::string& what) {
  const int n = rgb.width;
  BOOST_TEST_REQUIRE((golden.shape == Shape{3, n, n}), what << ": golden shape " << shape_string(golden.shape));
  BOOST_TEST_REQUIRE(rgb.height == n);
  BOOST_TEST_REQUIRE(ours.size() == golden.values.size());
  const size_t plane = static_cast<size_t>(n) * n;
  size_t byte_mismatches = 0, float_mismatches = 0;
  int max_level_diff = 0;
  double max_float_diff = 0;
  for (int c = 0; c < 3; ++c)
    for (size_t i = 0; i < plane; ++i) {
      const float g = golden.values[c * plane + i];
      const int golden_byte = static_cast<int>(std::lround((g * kClipStd[c] + kClipMean[c]) * 255.0));
      const int our_byte = rgb.pixels[i * 3 + c];
      if (golden_byte != our_byte) {
        ++byte_mismatches;
        max_level_diff = std::max(max_level_diff, std::abs(golden_byte - our_byte));
      }
      const double d = std::abs(static_cast<double>(ours[c * plane + i]) - g);
      max_float_diff = std::max(max_float_diff, d);
      if (d > 1e-6) ++float_mismatches;
    }
  BOOST_TEST(byte_mismatches == 0u, what << ": " << byte_mismatches << " of " << 3 * plane
                                         << " bytes differ, by up to " << max_level_diff << " levels");
  BOOST_TEST(float_mismatches == 0u, what << ": " << float_mismatches << " floats off by more than 1e-6 (max "
                                          << max_float_diff << ")");
}

// The golden file's metadata entry for one image (mode, size, resize and crop geometry).
const json::Value* find_image_info(const json::Value& images, const std::string& file) {
  for (const json::Value& info : images.as_array())
    if (info["file"].as_string() == file) return &info;
  return nullptr;
}

// Expects decode_file(path) to throw a clip::Error naming the file and saying `what`.
void expect_decode_error(const fs::path& path, const std::string& what) {
  try {
    decode_file(path);
    BOOST_ERROR("decoding " << path << " did not fail");
  } catch (const Error& e) {
    const std::string message = e.what();
    BOOST_TEST_MESSAGE(message);
    BOOST_TEST(message.find(path.string()) != std::string::npos, "message does not name the file: " << message);
    BOOST_TEST(message.find(what) != std::string::npos, "message does not say '" << what << "': " << message);
  }
}

// A PNG of just a signature and an IHDR chunk (CRC left zero: no decoder gets that far).
std::vector<uint8_t> png_header(uint32_t width, uint32_t height, uint8_t color_type) {
  std::vector<uint8_t> b = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
  for (uint32_t v : {width, height})
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
  for (uint8_t v : {uint8_t{8}, color_type, uint8_t{0}, uint8_t{0}, uint8_t{0}, uint8_t{0}, uint8_t{0},
                    uint8_t{0}, uint8_t{0}})
    b.push_back(v);
  return b;
}

fs::path program(const std::string& name) {
  if (const char* dir = std::getenv("CLIP_EXAMPLES_DIR"); dir && *dir) return fs::path(dir) / name;
  return fs::read_symlink("/proc/self/exe").parent_path().parent_path() / "examples" / name;
}

std::string quoted(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Runs a program with arguments, stderr to `log`; returns its exit status.
int run(const fs::path& exe, const std::vector<std::string>& args, const fs::path& log) {
  std::string command = quoted(exe.string());
  for (const std::string& a : args) command.append(" ").append(quoted(a));
  command.append(" >").append(quoted(log.string())).append(" 2>&1");
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

BOOST_AUTO_TEST_CASE(golden_preprocessing_is_exact_for_every_image_at_224_and_336) {
  auto golden_path = test::golden_file("preprocess.safetensors");
  if (!golden_path) return;
  const SafeTensors golden = SafeTensors::open(*golden_path);
  const json::Value images = json::parse(golden.metadata().at("images"));
  for (const char* file : kGoldenImages) {
    const Image image = decode_file(test::golden_dir() / "images" / file);
    const json::Value* info = find_image_info(images, file);
    BOOST_TEST_REQUIRE(info, "no metadata for " << file);
    BOOST_TEST(std::string(mode_name(image.mode)) == (*info)["mode"].as_string(), file);
    BOOST_TEST(image.width == (*info)["width"].as_int());
    BOOST_TEST(image.height == (*info)["height"].as_int());
    for (int n : {224, 336}) {
      const std::string what = std::string(file) + " at " + std::to_string(n);
      const json::Value& expected_plan = (*info)["plan" + std::to_string(n)];
      const TransformPlan plan = plan_clip_transform(image.width, image.height, n);
      BOOST_TEST(plan.resized_width == expected_plan["resized_wh"].as_array()[0].as_int(), what);
      BOOST_TEST(plan.resized_height == expected_plan["resized_wh"].as_array()[1].as_int(), what);
      BOOST_TEST(plan.resize_skipped == expected_plan["resize_skipped"].as_bool(), what);
      BOOST_TEST(plan.crop_left == expected_plan["crop_left"].as_int(), what);
      BOOST_TEST(plan.crop_top == expected_plan["crop_top"].as_int(), what);

      const Image rgb = clip_transform_rgb8(image, n);
      const std::vector<float> ours = clip_preprocess(image, n);
      check_against_golden(rgb, ours, golden.tensor("pre" + std::to_string(n) + "." + file), what);
    }
  }
}

BOOST_AUTO_TEST_CASE(jpeg_decodes_bit_for_bit_as_pillow) {
  auto jpeg = test::golden_file("images/rocket.jpg");
  auto pillow = test::golden_file("images/decoded/rocket.jpg.png");
  if (!jpeg || !pillow) return;
  const Image ours = decode_file(*jpeg);
  const Image reference = decode_file(*pillow);
  BOOST_TEST(ours.mode == Mode::RGB);
  BOOST_TEST(reference.mode == Mode::RGB);
  BOOST_TEST_REQUIRE(ours.width == reference.width);
  BOOST_TEST_REQUIRE(ours.height == reference.height);
  size_t differing = 0;
  for (size_t i = 0; i < ours.pixels.size(); ++i) differing += ours.pixels[i] != reference.pixels[i];
  BOOST_TEST(differing == 0u, differing << " of " << ours.pixels.size() << " JPEG samples differ from Pillow's");
}

BOOST_AUTO_TEST_CASE(resampling_alone_matches_on_pillows_jpeg_decoding) {
  auto golden_path = test::golden_file("preprocess.safetensors");
  auto pillow = test::golden_file("images/decoded/rocket.jpg.png");
  if (!golden_path || !pillow) return;
  const SafeTensors golden = SafeTensors::open(*golden_path);
  const Image decoded = decode_file(*pillow);
  for (int n : {224, 336})
    check_against_golden(clip_transform_rgb8(decoded, n), clip_preprocess(decoded, n),
                         golden.tensor("pre" + std::to_string(n) + ".rocket.jpg"),
                         "decoded/rocket.jpg.png at " + std::to_string(n));
}

BOOST_AUTO_TEST_CASE(decoding_from_memory_equals_decoding_the_file) {
  auto path = test::golden_file("images/coffee_palette.png");
  if (!path) return;
  const std::vector<uint8_t> bytes = read_bytes(*path);
  const Image a = decode(bytes, "palette");
  const Image b = decode_file(*path);
  BOOST_TEST(a.mode == Mode::P);
  BOOST_TEST((a.pixels == b.pixels));
}

BOOST_AUTO_TEST_CASE(crop_offsets_round_half_to_even_like_python) {
  // The cases MANIFEST.md names: 34.5 -> 34, 55.5 -> 56, 44.5 -> 44.
  BOOST_TEST(plan_clip_transform(229, 300, 224).crop_top == 34);
  BOOST_TEST(plan_clip_transform(640, 427, 224).crop_left == 56);
  BOOST_TEST(plan_clip_transform(384, 303, 336).crop_left == 44);
  const TransformPlan same = plan_clip_transform(224, 300, 224);
  BOOST_TEST(same.resize_skipped);
  BOOST_TEST(same.resized_height == 300);
  BOOST_TEST(same.crop_top == 38);
}

BOOST_AUTO_TEST_CASE(an_image_of_the_target_size_is_cropped_not_resampled) {
  Image image(224, 230, Mode::RGB);
  for (size_t i = 0; i < image.pixels.size(); ++i) image.pixels[i] = static_cast<uint8_t>(i * 7 % 251);
  const Image out = clip_transform_rgb8(image, 224);
  const Image expected = crop(image, 0, 3, 224, 224);
  BOOST_TEST((out.pixels == expected.pixels));
}

BOOST_AUTO_TEST_CASE(a_resize_window_equals_the_crop_of_the_whole_resize) {
  std::mt19937 rng(7);
  for (Mode mode : {Mode::L, Mode::LA, Mode::RGB, Mode::RGBA, Mode::P}) {
    Image image(97, 61, mode);
    for (uint8_t& v : image.pixels) v = static_cast<uint8_t>(rng());
    for (auto [w, h] : {std::pair{40, 25}, std::pair{97, 30}, std::pair{50, 61}, std::pair{150, 90}}) {
      const Image whole = resize(image, w, h);
      const Image window = resize(image, w, h, Window{w / 5, h / 4, w / 2, h / 2});
      BOOST_TEST((window.pixels == crop(whole, w / 5, h / 4, w / 2, h / 2).pixels),
                 mode_name(mode) << " " << w << "x" << h);
    }
  }
}

namespace {

// A bottom-up BMP with a BITMAPINFOHEADER: `palette` (BGRX entries) then rows padded to 4 bytes.
std::vector<uint8_t> bmp_file(int width, int height, int bits, const std::vector<uint8_t>& palette,
                              const std::vector<std::vector<uint8_t>>& rows_top_down) {
  std::vector<uint8_t> data;
  for (auto row = rows_top_down.rbegin(); row != rows_top_down.rend(); ++row) {
    data.insert(data.end(), row->begin(), row->end());
    data.resize((data.size() + 3) / 4 * 4, 0);
  }
  auto put32 = [](std::vector<uint8_t>& b, uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
  };
  const uint32_t offset = 54 + static_cast<uint32_t>(palette.size());
  std::vector<uint8_t> b = {'B', 'M'};
  put32(b, offset + static_cast<uint32_t>(data.size()));
  put32(b, 0);
  put32(b, offset);
  put32(b, 40);
  put32(b, static_cast<uint32_t>(width));
  put32(b, static_cast<uint32_t>(height));
  b.push_back(1), b.push_back(0), b.push_back(static_cast<uint8_t>(bits)), b.push_back(0);
  for (uint32_t v : {0u, static_cast<uint32_t>(data.size()), 2835u, 2835u, 0u, 0u}) put32(b, v);
  b.insert(b.end(), palette.begin(), palette.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

}  // namespace

BOOST_AUTO_TEST_CASE(bmp_modes_and_samples_follow_pillow) {
  // 16-bit 5-5-5: Pillow widens a 5-bit sample v to v * 255 / 31 (4 -> 32), not by replicating
  // bits (4 -> 33) as stb_image does.
  const uint16_t pixel = (4 << 10) | (17 << 5) | 31;
  const Image rgb555 = decode(bmp_file(1, 1, 16, {}, {{uint8_t(pixel & 0xFF), uint8_t(pixel >> 8)}}), "555");
  BOOST_TEST(rgb555.mode == Mode::RGB);
  BOOST_TEST((rgb555.pixels == std::vector<uint8_t>{32, 139, 255}));
  // An 8-bit palette that is the gray ramp makes an L image (resized bicubically), another a P one.
  std::vector<uint8_t> ramp, tinted;
  for (int i = 0; i < 256; ++i) {
    ramp.insert(ramp.end(), {uint8_t(i), uint8_t(i), uint8_t(i), 0});
    tinted.insert(tinted.end(), {uint8_t(i), uint8_t(i), uint8_t(255 - i), 0});
  }
  const Image gray = decode(bmp_file(2, 1, 8, ramp, {{77, 200}}), "gray");
  BOOST_TEST(gray.mode == Mode::L);
  BOOST_TEST((gray.pixels == std::vector<uint8_t>{77, 200}));
  const Image palette = decode(bmp_file(1, 2, 8, tinted, {{10}, {20}}), "palette");
  BOOST_TEST(palette.mode == Mode::P);
  BOOST_TEST((palette.pixels == std::vector<uint8_t>{245, 10, 10, 235, 20, 20}));  // BGR entries, top row first
}

BOOST_AUTO_TEST_CASE(gif_first_frames_follow_pillow) {
  // 1x1, palette {white, black}, transparent index 0 painted: Pillow shows the palette colour.
  const std::vector<uint8_t> transparent = {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0x80, 0, 0, 255, 255, 255, 0,
                                            0, 0, 0x21, 0xF9, 4, 1, 0, 0, 0, 0, 0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2,
                                            2, 0x44, 1, 0, 0x3B};
  const Image p = decode(transparent, "transparent.gif");
  BOOST_TEST(p.mode == Mode::P);
  BOOST_TEST((p.pixels == std::vector<uint8_t>{255, 255, 255}));
  // Palette {0, 1}: the gray ramp, so Pillow opens it as L with the index as level.
  const std::vector<uint8_t> ramp = {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0x80, 0, 0, 0, 0, 0, 1, 1, 1,
                                     0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0x4C, 1, 0, 0x3B};
  const Image l = decode(ramp, "ramp.gif");
  BOOST_TEST(l.mode == Mode::L);
  BOOST_TEST((l.pixels == std::vector<uint8_t>{1}));
}

BOOST_AUTO_TEST_CASE(broken_files_give_errors_that_name_them) {
  TempDir dir;
  expect_decode_error(dir.path / "does_not_exist.png", "cannot open");
  expect_decode_error(dir.write("empty.jpg", {}), "empty");
  expect_decode_error(dir.path, "directory");
  expect_decode_error(dir.write("text.png", {'h', 'e', 'l', 'l', 'o', '\n'}), "not a JPEG, PNG, BMP or GIF");
  expect_decode_error(dir.write("bomb.png", png_header(100000, 100000, 2)), "decompression bomb");
  expect_decode_error(dir.write("zero.png", png_header(0, 10, 2)), "empty size");
  expect_decode_error(dir.write("header_only.png", png_header(64, 64, 2)), "corrupt or truncated PNG");
  expect_decode_error(dir.write("bad_type.png", png_header(64, 64, 5)), "colour type");
  // A JPEG start-of-frame claiming 65000 x 65000 pixels.
  expect_decode_error(dir.write("bomb.jpg", {0xFF, 0xD8, 0xFF, 0xC0, 0, 17, 8, 0xFD, 0xE8, 0xFD, 0xE8, 3, 1, 0x22, 0,
                                             2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xDA, 0, 12, 3, 1, 0, 2, 0x11, 3, 0x11,
                                             0, 63, 0, 0xFF, 0xD9}),
                      "decompression bomb");

  auto jpeg = test::golden_file("images/rocket.jpg");
  auto png = test::golden_file("images/coffee.png");
  if (!jpeg || !png) return;
  std::vector<uint8_t> jpeg_bytes = read_bytes(*jpeg), png_bytes = read_bytes(*png);
  for (size_t keep : {size_t{4}, size_t{600}, jpeg_bytes.size() / 2, jpeg_bytes.size() - 40})
    expect_decode_error(dir.write("truncated_" + std::to_string(keep) + ".jpg",
                                  std::vector<uint8_t>(jpeg_bytes.begin(), jpeg_bytes.begin() + keep)),
                        "JPEG");
  for (size_t keep : {size_t{8}, size_t{20}, size_t{100}, png_bytes.size() / 2, png_bytes.size() - 20})
    expect_decode_error(dir.write("truncated_" + std::to_string(keep) + ".png",
                                  std::vector<uint8_t>(png_bytes.begin(), png_bytes.begin() + keep)),
                        "PNG");
  // Like Pillow, a baseline JPEG that lacks only its end marker still decodes.
  const Image complete = decode_file(*jpeg);
  const Image unterminated = decode_file(dir.write(
      "no_end_marker.jpg", std::vector<uint8_t>(jpeg_bytes.begin(), jpeg_bytes.end() - 2)));
  BOOST_TEST((unterminated.pixels == complete.pixels));
  // Corrupt bytes in the middle of the compressed data.
  std::vector<uint8_t> corrupt_png = png_bytes;
  for (size_t i = corrupt_png.size() / 3; i < corrupt_png.size() / 3 + 64; ++i) corrupt_png[i] ^= 0x5A;
  expect_decode_error(dir.write("corrupt.png", corrupt_png), "corrupt or truncated PNG");
  std::vector<uint8_t> corrupt_jpeg(jpeg_bytes.begin(), jpeg_bytes.begin() + 2);
  corrupt_jpeg.insert(corrupt_jpeg.end(), 5000, 0xFF);
  expect_decode_error(dir.write("corrupt.jpg", corrupt_jpeg), "JPEG");
}

// Regression (found by tests/fuzz/fuzz_image): width * height of a header giving 2^32 - 1 on both
// sides overflowed int64 in the very check meant to refuse it, and the image went on to stb_image.
BOOST_AUTO_TEST_CASE(the_pixel_limit_holds_for_sizes_whose_product_overflows) {
  TempDir dir;
  expect_decode_error(dir.write("max.png", png_header(4294967295u, 4294967295u, 2)), "decompression bomb");
  expect_decode_error(dir.write("max.png", png_header(4294967295u, 4294967295u, 2)), "4294967295x4294967295");
  expect_decode_error(dir.write("wide.png", png_header(4294967295u, 3, 2)), "decompression bomb");
  // Pillow's limit exactly: 178,956,970 pixels pass the check (stb_image then refuses the
  // header-only file), one more is a bomb.
  BOOST_TEST(clip::limits::kMaxImagePixels == 178'956'970);
  const std::string at_limit = test::message_of([&] { decode(png_header(178'956'970u, 1, 2), "at_limit.png"); });
  BOOST_TEST(at_limit.find("decompression bomb") == std::string::npos, at_limit);
  BOOST_TEST(at_limit.find("corrupt or truncated PNG") != std::string::npos, at_limit);
  expect_decode_error(dir.write("over.png", png_header(178'956'971u, 1, 2)), "decompression bomb");
  expect_decode_error(dir.write("over.png", png_header(178'956'971u, 1, 2)), "limit of 178956970");
}

// Regression (found by tests/fuzz/fuzz_image): a 219-byte BMP claiming 4 x 16,711,684 pixels
// decoded in 23 s into 267 MB of zeros (stb_image reads zeros past the end). Rows an
// uncompressed BMP lacks make it truncated, as in Pillow; a file that lacks only the last
// row's padding still decodes.
BOOST_AUTO_TEST_CASE(a_bmp_shorter_than_its_rows_is_truncated) {
  std::vector<uint8_t> tall = bmp_file(4, 1, 24, {}, {std::vector<uint8_t>(12, 7)});
  tall[22] = 0x04, tall[23] = 0x00, tall[24] = 0xFF, tall[25] = 0x00;  // height 16,711,684
  const std::string message = test::message_of([&] { decode(tall, "tall.bmp"); });
  BOOST_TEST(message.find("'tall.bmp'") != std::string::npos, message);
  BOOST_TEST(message.find("truncated BMP data: 4x16711684 pixels of 24 bits need 200540208 bytes") !=
                 std::string::npos,
             message);
  std::vector<uint8_t> unpadded = bmp_file(3, 2, 24, {}, {std::vector<uint8_t>(9, 50), std::vector<uint8_t>(9, 90)});
  unpadded.resize(unpadded.size() - 3);  // the first row in the file is the bottom one: 90s
  const Image image = decode(unpadded, "unpadded.bmp");
  BOOST_TEST((image.pixels == std::vector<uint8_t>{50, 50, 50, 50, 50, 50, 50, 50, 50, 90, 90, 90, 90, 90, 90, 90, 90, 90}));
  unpadded.pop_back();
  BOOST_TEST(test::message_of([&] { decode(unpadded, "short.bmp"); }).find("truncated BMP data") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(clip_preprocess_program_matches_the_golden_tensors) {
  auto golden_path = test::golden_file("preprocess.safetensors");
  if (!golden_path) return;
  const fs::path exe = program("clip-preprocess");
  if (!fs::exists(exe)) {
    if (test::under_ci()) BOOST_FAIL("program not built: " << exe);
    BOOST_TEST_MESSAGE("SKIPPED: program not built: " << exe << " (set CLIP_EXAMPLES_DIR)");
    return;
  }
  TempDir dir;
  const SafeTensors golden = SafeTensors::open(*golden_path);
  const std::string rocket = (test::golden_dir() / "images" / "rocket.jpg").string();
  const std::string rgba = (test::golden_dir() / "images" / "chelsea_rgba.png").string();
  const fs::path out = dir.path / "out.safetensors";
  BOOST_TEST_REQUIRE(run(exe, {"--size", "336", "--out", out.string(), rocket, rgba}, dir.path / "log") == 0,
                     read_text(dir.path / "log"));
  const SafeTensors written = SafeTensors::open(out);
  BOOST_TEST(written.entries().size() == 2u);
  for (auto [path, key] : {std::pair{rocket, "pre336.rocket.jpg"}, std::pair{rgba, "pre336.chelsea_rgba.png"}}) {
    const Tensor got = written.tensor(path), expected = golden.tensor(key);
    BOOST_TEST((got.shape == expected.shape));
    double max_diff = 0;
    for (size_t i = 0; i < got.values.size() && i < expected.values.size(); ++i)
      max_diff = std::max(max_diff, std::abs(static_cast<double>(got.values[i]) - expected.values[i]));
    BOOST_TEST(max_diff <= 1e-6, path << ": max difference " << max_diff);
  }

  // --help succeeds; bad arguments exit 2; a bad image exits 1, names the file and writes nothing.
  BOOST_TEST(run(exe, {"--help"}, dir.path / "log") == 0);
  BOOST_TEST(read_text(dir.path / "log").find("--size N") != std::string::npos);
  for (const std::vector<std::string>& bad : {std::vector<std::string>{"--out", "x.safetensors", rocket},
                                              {"--size", "224", rocket},
                                              {"--size", "0", "--out", "x.safetensors", rocket},
                                              {"--size", "22x", "--out", "x.safetensors", rocket},
                                              {"--size", "224", "--out", "x.safetensors"},
                                              {"--size", "224", "--out", "x.safetensors", "--colour", rocket},
                                              {"--size", "224", "--threads", "0", "--out", "x.safetensors", rocket},
                                              {"--size", "224", "--out", "x.safetensors", rocket, rocket}})
    BOOST_TEST(run(exe, bad, dir.path / "log") == 2, read_text(dir.path / "log"));
  const fs::path broken = dir.write("broken.jpg", {0xFF, 0xD8, 0xFF, 0xE0, 0, 16, 'J', 'F', 'I', 'F'});
  const fs::path failed_out = dir.path / "failed.safetensors";
  BOOST_TEST(run(exe, {"--size", "224", "--out", failed_out.string(), rocket, broken.string()}, dir.path / "log") == 1);
  BOOST_TEST(read_text(dir.path / "log").find(broken.string()) != std::string::npos, read_text(dir.path / "log"));
  BOOST_TEST(!fs::exists(failed_out));
  // A failure leaves an existing output as it was.
  BOOST_TEST(run(exe, {"--size", "224", "--out", out.string(), broken.string()}, dir.path / "log") == 1);
  BOOST_TEST(SafeTensors::open(out).entries().size() == 2u);
  // The message is a sentence for the user; --verbose adds the source line that raised it.
  const std::string plain = read_text(dir.path / "log");
  BOOST_TEST(plain.find(".hpp:") == std::string::npos, plain);
  BOOST_TEST(run(exe, {"--verbose", "--size", "224", "--out", failed_out.string(), broken.string()}, dir.path / "log") == 1);
  const std::string verbose = read_text(dir.path / "log");
  BOOST_TEST(verbose.find(broken.string()) != std::string::npos, verbose);
  BOOST_TEST(verbose.find("image/decode.hpp:") != std::string::npos, verbose);
  size_t leftovers = 0;
  for (const auto& entry : fs::directory_iterator(dir.path))
    leftovers += entry.path().filename().string().find(".tmp") != std::string::npos;
  BOOST_TEST(leftovers == 0u);
}
