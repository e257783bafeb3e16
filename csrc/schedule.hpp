// Pair scheduling: length-sorted, token-budget batches, and the padded decoder inputs of a
// batch (left padding, M-RoPE positions with HuggingFace's get_rope_index semantics).
#pragma once

#include <cstdint>
#include <vector>

namespace gmr {

// Batches of pair indices: pairs sorted by length (longest first, ties by index), packed
// greedily so that rows * longest <= max_batch_tokens and rows <= max_batch_size; a pair joins
// a batch only while its length is at least min_fill * the batch's longest (length buckets,
// so padding stays below 1 - min_fill per row). A pair longer than the budget gets a batch alone.
std::vector<std::vector<int64_t>> schedule_batches(const std::vector<int64_t>& lengths,
                                                   int64_t max_batch_tokens, int64_t max_batch_size,
                                                   double min_fill);

// One prompt of a batch: its token ids and its images' pad runs with merged grids.
struct PromptView {
    const int64_t* ids = nullptr;
    int64_t length = 0;
    const int64_t* spans = nullptr;  // [n_images, 4]: start, end, merged grid h, merged grid w
    int64_t n_images = 0;
};

// Fills input_ids / attention_mask [rows, width] and position_ids [3, rows, width] (left
// padding: pad_id, mask 0 and position 1 in front). width >= every prompt's length.
void build_batch(const std::vector<PromptView>& prompts, int64_t width, int64_t pad_id,
                 int64_t* input_ids, int64_t* attention_mask, int64_t* position_ids);

}  // namespace gmr
