// The limits every reader of outside data holds to, in one place, each with its reason. A file
// that reaches one is refused with an error naming the file and the limit, before the memory or
// time it asks for is spent.
#pragma once

#include <cstddef>
#include <cstdint>

namespace clip::limits {

// Pixels in one image: Pillow raises DecompressionBombError above twice Image.MAX_IMAGE_PIXELS
// (2 x 89,478,485), so an image Pillow refuses is refused here too, from its header alone.
inline constexpr int64_t kMaxImagePixels = 2 * 89'478'485;

// Image files are read whole and handed to stb_image and TurboJPEG, which take an int length.
inline constexpr int64_t kMaxImageFileBytes = 2'147'483'647;

// The JSON header of a safetensors file: the safetensors crate's MAX_HEADER_SIZE (100 MB).
// Real checkpoints have headers well under 1 MiB.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// Nesting of JSON arrays and objects: the parser recurses once per level, so deeper text is
// refused rather than overflowing the stack (safetensors headers and metrics records nest 3 deep).
inline constexpr int kMaxJsonDepth = 256;

// A pax extended header or GNU long-name record is read whole: 16 MiB is far more than any
// path (PATH_MAX is 4 KiB) and keeps a corrupt size field from allocating gigabytes.
inline constexpr int64_t kMaxTarExtendedHeaderBytes = int64_t{1} << 24;

// A tar member read into memory (an image, a caption, a label): 1 GiB bounds what one member
// of a shard can allocate; WebDataset samples are kilobytes to a few megabytes.
inline constexpr int64_t kMaxTarMemberBytes = int64_t{1} << 30;

// A caption given to the tokenizer: CLIP reads 77 tokens (a few hundred bytes of text); 1 MiB
// keeps a wrong file named .txt from costing the BPE tokenizer minutes.
inline constexpr size_t kMaxCaptionBytes = size_t{1} << 20;

// One CSV/TSV field: an unclosed quote would make the rest of the file a single field; no image
// path or caption comes near 1 MiB, so the error names the line where the quote opened.
inline constexpr size_t kMaxCsvFieldBytes = size_t{1} << 20;

// Names one shard list expands to: the largest public pools come in about a million shards
// (DataComp's 12.8B-sample pool: 1.28M); ten times that is still a list, not a typo such as
// {0..99999999999} that would fill the memory with names.
inline constexpr size_t kMaxShardListNames = 10'000'000;

}  // namespace clip::limits
