// Qwen2-VL image preprocessing, identical to HuggingFace's Qwen2VLImageProcessorPil:
// smart resize -> Pillow bicubic -> rescale (double, then float32) -> normalise (float32)
// -> patchify in merge order with the frame repeated over the temporal patch. One pass per
// image, written straight into the caller's patch buffer.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "resample.hpp"

namespace gmr {

// HuggingFace's smart_resize: (height, width) rounded to multiples of `factor` with the pixel
// count brought inside [min_pixels, max_pixels]. Throws gmr::Error on aspect ratio > 200.
std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t factor,
                                         int64_t min_pixels, int64_t max_pixels);

struct PatchParams {
    double rescale_factor = 1.0 / 255.0;
    float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    int64_t patch_size = 14;
    int64_t merge_size = 2;
    int64_t temporal_patch_size = 2;
    // Pillow >= 13 resamples vertically first when the height shrinks by more than twice as
    // many pixels as the width; older Pillow always goes horizontal first. The Python layer
    // sets this from the installed Pillow so the bytes match whatever HuggingFace calls.
    bool vertical_first_rule = true;

    int64_t patch_dim() const { return 3 * temporal_patch_size * patch_size * patch_size; }
};

// Pillow's bicubic resize of a packed/RGBX image to (out_height, out_width) packed RGB, with
// the pass order chosen as PatchParams::vertical_first_rule says. Used to calibrate and test.
void resize_rgb(const ImageView& img, int64_t out_height, int64_t out_width,
                bool vertical_first_rule, uint8_t* out);

// Number of patch rows an image of the given resized size produces.
int64_t patch_count(int64_t resized_height, int64_t resized_width, const PatchParams& p);

// Preprocesses images[i] resized to resized[i] = (h, w) (multiples of patch*merge) into `out`,
// images concatenated in order, out having sum(patch_count) rows of p.patch_dim() floats.
// Work is spread over num_threads threads (<= 0: all); the bytes written never depend on it.
void preprocess_batch(const std::vector<ImageView>& images,
                      const std::vector<std::pair<int64_t, int64_t>>& resized,
                      const PatchParams& p, float* out, int num_threads);

}  // namespace gmr
