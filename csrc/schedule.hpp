// Pair scheduling: length-sorted batches under a token budget and an activation-memory budget,
// and the padded decoder inputs of a batch (left or right padding, M-RoPE positions with
// HuggingFace's get_rope_index semantics, optionally continuing after a shared prefix).
#pragma once

#include <cstdint>
#include <vector>

namespace gmr {

// What a batch of B rows padded to L tokens, attending to at most P prefix tokens, may cost.
struct BatchLimits {
    int64_t max_batch_tokens = 8192;  // B * L
    int64_t max_batch_size = 32;      // B
    double min_fill = 0.8;            // every row >= min_fill * L (length buckets)
    double bytes_per_token = 0.0;     // activation bytes per padded token (hidden states, MLP)
    double bytes_per_score = 0.0;     // activation bytes per attention score (query x key)
    double max_batch_bytes = 0.0;     // B*L*bytes_per_token + B*L*(L+P)*bytes_per_score <= this (0: no limit)
};

// Batches of row indices: rows sorted by length (longest first, ties by index), packed greedily
// under `limits`; `context[i]` is the prefix length row i attends to (empty: none). A row that
// alone exceeds a limit gets a batch of its own.
std::vector<std::vector<int64_t>> schedule_batches(const std::vector<int64_t>& lengths,
                                                   const std::vector<int64_t>& context,
                                                   const BatchLimits& limits);

// Estimated activation bytes of one batch (the formula schedule_batches packs against).
double batch_bytes(int64_t rows, int64_t width, int64_t context, const BatchLimits& limits);

// One prompt (or prompt suffix) of a batch: its token ids and its images' pad runs.
struct PromptView {
    const int64_t* ids = nullptr;
    int64_t length = 0;
    const int64_t* spans = nullptr;  // [n_images, 4]: start, end, merged grid h, merged grid w
    int64_t n_images = 0;
    int64_t start_position = 0;      // M-RoPE position of the first token (a prefix's next position)
};

// Fills input_ids / attention_mask [rows, width] and position_ids [3, rows, width]; padding
// (pad_id, mask 0, position 1) goes in front (left_padding) or behind. next_position[r] is the
// position a continuation of row r would start at: the largest position used + 1.
void build_batch(const std::vector<PromptView>& prompts, int64_t width, int64_t pad_id, bool left_padding,
                 int64_t* input_ids, int64_t* attention_mask, int64_t* position_ids, int64_t* next_position);

}  // namespace gmr
