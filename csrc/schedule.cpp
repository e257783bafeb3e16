#include "schedule.hpp"

#include <algorithm>
#include <numeric>
#include <sstream>

#include "errors.hpp"

namespace gmr {

double batch_bytes(int64_t rows, int64_t width, int64_t context, const BatchLimits& limits) {
    const double tokens = static_cast<double>(rows) * static_cast<double>(width);
    return tokens * limits.bytes_per_token +
           tokens * static_cast<double>(width + context) * limits.bytes_per_score;
}

std::vector<std::vector<int64_t>> schedule_batches(const std::vector<int64_t>& lengths,
                                                   const std::vector<int64_t>& context,
                                                   const BatchLimits& limits) {
    if (limits.max_batch_tokens <= 0 || limits.max_batch_size <= 0)
        throw Error("max_batch_tokens and max_batch_size must be positive");
    if (!(limits.min_fill >= 0.0 && limits.min_fill <= 1.0)) throw Error("min_fill must be in [0, 1]");
    if (limits.bytes_per_token < 0 || limits.bytes_per_score < 0 || limits.max_batch_bytes < 0)
        throw Error("byte costs and max_batch_bytes must be >= 0");
    if (!context.empty() && context.size() != lengths.size()) throw Error("context must be empty or one per row");
    auto ctx = [&](int64_t i) { return context.empty() ? int64_t{0} : context[i]; };
    std::vector<int64_t> order(lengths.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
    std::vector<std::vector<int64_t>> batches;
    size_t i = 0;
    while (i < order.size()) {
        const int64_t longest = lengths[order[i]];  // sorted: the first row is the widest
        int64_t widest_context = ctx(order[i]);
        std::vector<int64_t> batch{order[i++]};
        while (i < order.size()) {
            const int64_t rows = static_cast<int64_t>(batch.size()) + 1;
            const int64_t c = std::max(widest_context, ctx(order[i]));
            if (rows > limits.max_batch_size || rows * longest > limits.max_batch_tokens ||
                static_cast<double>(lengths[order[i]]) < limits.min_fill * static_cast<double>(longest) ||
                (limits.max_batch_bytes > 0 && batch_bytes(rows, longest, c, limits) > limits.max_batch_bytes))
                break;
            widest_context = c;
            batch.push_back(order[i++]);
        }
        batches.push_back(std::move(batch));
    }
    return batches;
}

void build_batch(const std::vector<PromptView>& prompts, int64_t width, int64_t pad_id, bool left_padding,
                 int64_t* input_ids, int64_t* attention_mask, int64_t* position_ids, int64_t* next_position) {
    const int64_t rows = static_cast<int64_t>(prompts.size());
    const int64_t plane = rows * width;
    for (int64_t r = 0; r < rows; ++r) {
        const PromptView& p = prompts[r];
        if (p.length > width) {
            std::ostringstream msg;
            msg << "row " << r << ": prompt of " << p.length << " tokens does not fit width " << width;
            throw Error(msg.str());
        }
        const int64_t pad = width - p.length;
        const int64_t first = left_padding ? pad : 0;  // column of the first real token
        int64_t* ids = input_ids + r * width;
        int64_t* mask = attention_mask + r * width;
        int64_t* pos[3] = {position_ids + r * width, position_ids + plane + r * width, position_ids + 2 * plane + r * width};
        const int64_t pad_begin = left_padding ? 0 : p.length;
        for (int64_t j = pad_begin; j < pad_begin + pad; ++j) {
            ids[j] = pad_id;
            mask[j] = 0;
            pos[0][j] = pos[1][j] = pos[2][j] = 1;
        }
        for (int64_t j = 0; j < p.length; ++j) {
            ids[first + j] = p.ids[j];
            mask[first + j] = 1;
        }
        // Text advances one position on every axis; an image's merged patches sit at
        // (start, start + row, start + column) and the next token starts at start + max(h, w),
        // which is the largest position used so far + 1.
        int64_t next = p.start_position, cursor = 0;
        auto text_until = [&](int64_t end) {
            for (; cursor < end; ++cursor, ++next)
                pos[0][first + cursor] = pos[1][first + cursor] = pos[2][first + cursor] = next;
        };
        for (int64_t k = 0; k < p.n_images; ++k) {
            const int64_t* s = p.spans + 4 * k;
            const int64_t start = s[0], end = s[1], gh = s[2], gw = s[3];
            if (start < cursor || end > p.length || gh <= 0 || gw <= 0 || end - start != gh * gw) {
                std::ostringstream msg;
                msg << "row " << r << ": image " << k << " span [" << start << ", " << end
                    << ") does not match its " << gh << "x" << gw << " merged grid";
                throw Error(msg.str());
            }
            text_until(start);
            for (int64_t t = 0; t < gh * gw; ++t) {
                pos[0][first + start + t] = next;
                pos[1][first + start + t] = next + t / gw;
                pos[2][first + start + t] = next + t % gw;
            }
            cursor = end;
            next += std::max(gh, gw);
        }
        text_until(p.length);
        next_position[r] = next;
    }
}

}  // namespace gmr
