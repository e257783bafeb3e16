// The only file that knows about Python: converts numpy buffers (and Pillow's zero-copy Arrow
// export) to plain views, releases the GIL around every native call, and turns gmr::Error into
// gmr_fast.errors.CoreError (a GmrError, re-exported as gmr_fast._core.CoreError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <sstream>
#include <string>

#include "image_preprocess.hpp"
#include "module_support.hpp"
#include "parallel.hpp"
#include "schedule.hpp"
#include "vision_indices.hpp"

namespace py = pybind11;

namespace {

// Arrow C data interface (https://arrow.apache.org/docs/format/CDataInterface.html), a stable ABI.
struct ArrowSchema {
    const char* format;
    const char* name;
    const char* metadata;
    int64_t flags;
    int64_t n_children;
    ArrowSchema** children;
    ArrowSchema* dictionary;
    void (*release)(ArrowSchema*);
    void* private_data;
};
struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void** buffers;
    ArrowArray** children;
    ArrowArray* dictionary;
    void (*release)(ArrowArray*);
    void* private_data;
};

[[noreturn]] void fail(size_t index, const std::string& why) {
    std::ostringstream msg;
    msg << "image " << index << ": " << why;
    throw gmr::Error(msg.str());
}

// Pillow exports RGB/RGBA images as a fixed-size list of 4 uint8 per pixel ("+w:4" of "C"),
// one pixel per element, rows contiguous.
gmr::ImageView view_from_arrow(const py::tuple& item, size_t index) {
    if (item.size() != 4) fail(index, "arrow item must be (schema, array, height, width)");
    auto* schema = static_cast<ArrowSchema*>(PyCapsule_GetPointer(item[0].ptr(), "arrow_schema"));
    auto* array = static_cast<ArrowArray*>(PyCapsule_GetPointer(item[1].ptr(), "arrow_array"));
    if (schema == nullptr || array == nullptr) {
        PyErr_Clear();
        fail(index, "not an Arrow schema/array capsule pair");
    }
    const int64_t height = item[2].cast<int64_t>(), width = item[3].cast<int64_t>();
    if (std::strcmp(schema->format, "+w:4") != 0 || schema->n_children != 1 ||
        std::strcmp(schema->children[0]->format, "C") != 0)
        fail(index, std::string("unsupported Arrow image layout '") + schema->format + "'");
    if (array->length != height * width || array->n_children != 1 || array->offset != 0)
        fail(index, "Arrow array length does not match the image size");
    const ArrowArray* child = array->children[0];
    if (child->n_buffers < 2 || child->buffers[1] == nullptr || child->offset != 0 ||
        child->length != height * width * 4)
        fail(index, "Arrow child buffer does not hold height*width*4 bytes");
    gmr::ImageView v;
    v.data = static_cast<const uint8_t*>(child->buffers[1]);
    v.height = height;
    v.width = width;
    v.pixel_stride = 4;
    v.row_stride = width * 4;
    return v;
}

gmr::ImageView view_from_numpy(const py::handle& obj, size_t index) {
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (!arr.dtype().is(py::dtype::of<uint8_t>())) fail(index, "pixel array must be uint8");
    if (arr.ndim() != 3 || (arr.shape(2) != 3 && arr.shape(2) != 4))
        fail(index, "pixel array must be HxWx3 (or HxWx4 RGBX)");
    if (arr.strides(2) != 1 || arr.strides(1) != arr.shape(2) || arr.strides(0) < arr.shape(1) * arr.shape(2))
        fail(index, "pixel array rows must be C-contiguous");
    gmr::ImageView v;
    v.data = static_cast<const uint8_t*>(arr.data());
    v.height = arr.shape(0);
    v.width = arr.shape(1);
    v.pixel_stride = arr.shape(2);
    v.row_stride = arr.strides(0);
    return v;
}

std::vector<gmr::GridThw> grids_from_numpy(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& g) {
    if (g.ndim() != 2 || g.shape(1) != 3) throw gmr::Error("image_grid_thw must have shape [n, 3]");
    std::vector<gmr::GridThw> grids(static_cast<size_t>(g.shape(0)));
    auto r = g.unchecked<2>();
    for (py::ssize_t i = 0; i < g.shape(0); ++i) grids[i] = {r(i, 0), r(i, 1), r(i, 2)};
    return grids;
}

py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v, std::vector<py::ssize_t> shape) {
    if (shape.size() == 1 && shape[0] == 0) shape[0] = static_cast<py::ssize_t>(v.size());
    auto* heap = new std::vector<int64_t>(std::move(v));
    py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
    return py::array_t<int64_t>(shape, heap->data(), owner);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "gmr_fast native core (private; use the gmr_fast package API)";
    // The Python class lives in gmr_fast.errors so that it is a GmrError like every other error
    // of the library; it is kept alive for the life of the process (never destroyed at exit).
    m.attr("CoreError") = gmr::translate_core_errors(/*local=*/false);

    m.def("hardware_threads", &gmr::hardware_threads);

    m.def("smart_resize", [](int64_t height, int64_t width, int64_t factor, int64_t min_pixels, int64_t max_pixels) {
        return gmr::smart_resize(height, width, factor, min_pixels, max_pixels);
    }, py::arg("height"), py::arg("width"), py::arg("factor"), py::arg("min_pixels"), py::arg("max_pixels"));

    m.def("preprocess_into", [](const py::list& images, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& resized,
                                py::array_t<float, py::array::c_style>& out, double rescale_factor,
                                const std::array<float, 3>& mean, const std::array<float, 3>& std,
                                int64_t patch_size, int64_t merge_size, int64_t temporal_patch_size,
                                bool vertical_first_rule, int num_threads) {
        gmr::PatchParams p;
        p.rescale_factor = rescale_factor;
        for (int c = 0; c < 3; ++c) { p.mean[c] = mean[c]; p.std[c] = std[c]; }
        p.patch_size = patch_size;
        p.merge_size = merge_size;
        p.temporal_patch_size = temporal_patch_size;
        p.vertical_first_rule = vertical_first_rule;
        if (resized.ndim() != 2 || resized.shape(1) != 2 || static_cast<size_t>(resized.shape(0)) != images.size())
            throw gmr::Error("resized must have shape [len(images), 2]");
        std::vector<gmr::ImageView> views;
        std::vector<std::pair<int64_t, int64_t>> sizes;
        int64_t rows = 0;
        auto rs = resized.unchecked<2>();
        for (size_t i = 0; i < images.size(); ++i) {
            py::handle item = images[i];
            views.push_back(py::isinstance<py::tuple>(item) ? view_from_arrow(py::reinterpret_borrow<py::tuple>(item), i)
                                                            : view_from_numpy(item, i));
            sizes.emplace_back(rs(i, 0), rs(i, 1));
            rows += gmr::patch_count(rs(i, 0), rs(i, 1), p);
        }
        if (out.ndim() != 2 || out.shape(0) != rows || out.shape(1) != p.patch_dim() || !out.writeable()) {
            std::ostringstream msg;
            msg << "out must be a writable float32 array of shape [" << rows << ", " << p.patch_dim() << "]";
            throw gmr::Error(msg.str());
        }
        float* dst = out.mutable_data();
        py::gil_scoped_release release;
        gmr::preprocess_batch(views, sizes, p, dst, num_threads);
    }, py::arg("images"), py::arg("resized"), py::arg("out"), py::arg("rescale_factor"), py::arg("mean"),
       py::arg("std"), py::arg("patch_size"), py::arg("merge_size"), py::arg("temporal_patch_size"),
       py::arg("vertical_first_rule"), py::arg("num_threads"));

    m.def("resize_rgb", [](const py::array& image, int64_t height, int64_t width, bool vertical_first_rule) {
        const gmr::ImageView view = view_from_numpy(image, 0);
        py::array_t<uint8_t> out({height, width, static_cast<int64_t>(3)});
        uint8_t* dst = out.mutable_data();
        {
            py::gil_scoped_release release;
            gmr::resize_rgb(view, height, width, vertical_first_rule, dst);
        }
        return out;
    }, py::arg("image"), py::arg("height"), py::arg("width"), py::arg("vertical_first_rule"));

    m.def("schedule_batches", [](const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths,
                                 const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& context,
                                 int64_t max_batch_tokens, int64_t max_batch_size, double min_fill,
                                 double bytes_per_token, double bytes_per_score, double max_batch_bytes) {
        std::vector<int64_t> v(lengths.data(), lengths.data() + lengths.size());
        std::vector<int64_t> c(context.data(), context.data() + context.size());
        gmr::BatchLimits limits;
        limits.max_batch_tokens = max_batch_tokens;
        limits.max_batch_size = max_batch_size;
        limits.min_fill = min_fill;
        limits.bytes_per_token = bytes_per_token;
        limits.bytes_per_score = bytes_per_score;
        limits.max_batch_bytes = max_batch_bytes;
        std::vector<std::vector<int64_t>> batches;
        {
            py::gil_scoped_release release;
            batches = gmr::schedule_batches(v, c, limits);
        }
        py::list out;
        for (auto& b : batches) out.append(to_numpy(std::move(b), {static_cast<py::ssize_t>(0)}));
        return out;
    }, py::arg("lengths"), py::arg("context"), py::arg("max_batch_tokens"), py::arg("max_batch_size"),
       py::arg("min_fill"), py::arg("bytes_per_token"), py::arg("bytes_per_score"), py::arg("max_batch_bytes"));

    m.def("batch_bytes", [](int64_t rows, int64_t width, int64_t context, double bytes_per_token, double bytes_per_score) {
        gmr::BatchLimits limits;
        limits.bytes_per_token = bytes_per_token;
        limits.bytes_per_score = bytes_per_score;
        return gmr::batch_bytes(rows, width, context, limits);
    }, py::arg("rows"), py::arg("width"), py::arg("context"), py::arg("bytes_per_token"), py::arg("bytes_per_score"));

    m.def("build_batch", [](const py::list& ids, const py::list& spans,
                            const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& start_positions,
                            int64_t width, int64_t pad_id, bool left_padding,
                            py::array_t<int64_t, py::array::c_style>& input_ids,
                            py::array_t<int64_t, py::array::c_style>& attention_mask,
                            py::array_t<int64_t, py::array::c_style>& position_ids,
                            py::array_t<int64_t, py::array::c_style>& next_position) {
        const auto rows = static_cast<py::ssize_t>(ids.size());
        if (static_cast<py::ssize_t>(spans.size()) != rows || start_positions.size() != rows)
            throw gmr::Error("ids, spans and start_positions differ in length");
        if (input_ids.ndim() != 2 || input_ids.shape(0) != rows || input_ids.shape(1) != width ||
            attention_mask.ndim() != 2 || attention_mask.shape(0) != rows || attention_mask.shape(1) != width ||
            position_ids.ndim() != 3 || position_ids.shape(0) != 3 || position_ids.shape(1) != rows ||
            position_ids.shape(2) != width || next_position.ndim() != 1 || next_position.shape(0) != rows)
            throw gmr::Error("output buffers must be [rows, width], [rows, width], [3, rows, width] and [rows]");
        std::vector<py::array_t<int64_t, py::array::c_style | py::array::forcecast>> keep;
        keep.reserve(2 * static_cast<size_t>(rows));
        std::vector<gmr::PromptView> views(rows);
        const int64_t* starts = start_positions.data();
        for (py::ssize_t r = 0; r < rows; ++r) {
            keep.emplace_back(ids[r]);
            views[r].ids = keep.back().data();
            views[r].length = keep.back().size();
            keep.emplace_back(spans[r]);
            const auto& sp = keep.back();
            if (sp.size() % 4 != 0) throw gmr::Error("spans must be [n_images, 4]");
            views[r].spans = sp.data();
            views[r].n_images = sp.size() / 4;
            views[r].start_position = starts[r];
        }
        int64_t* a = input_ids.mutable_data();
        int64_t* b = attention_mask.mutable_data();
        int64_t* c = position_ids.mutable_data();
        int64_t* d = next_position.mutable_data();
        py::gil_scoped_release release;
        gmr::build_batch(views, width, pad_id, left_padding, a, b, c, d);
    }, py::arg("ids"), py::arg("spans"), py::arg("start_positions"), py::arg("width"), py::arg("pad_id"),
       py::arg("left_padding"), py::arg("input_ids"), py::arg("attention_mask"), py::arg("position_ids"),
       py::arg("next_position"));

    m.def("vision_indices", [](const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& grid_thw,
                               int64_t merge_size, int64_t window_size, int64_t patch_size) {
        const auto grids = grids_from_numpy(grid_thw);
        std::vector<int64_t> rot, cu;
        gmr::WindowIndex win;
        {
            py::gil_scoped_release release;
            rot = gmr::vision_rot_pos_ids(grids, merge_size);
            cu = gmr::vision_cu_seqlens(grids);
            if (window_size > 0) win = gmr::vision_window_index(grids, merge_size, window_size, patch_size);
        }
        py::dict d;
        const auto n_rot = static_cast<py::ssize_t>(rot.size() / 2);
        d["rot_pos_ids"] = to_numpy(std::move(rot), {n_rot, 2});
        const auto n_cu = static_cast<py::ssize_t>(cu.size());
        d["cu_seqlens"] = to_numpy(std::move(cu), {n_cu});
        if (window_size > 0) {
            const auto n_wi = static_cast<py::ssize_t>(win.window_index.size());
            const auto n_cw = static_cast<py::ssize_t>(win.cu_window_seqlens.size());
            d["window_index"] = to_numpy(std::move(win.window_index), {n_wi});
            d["cu_window_seqlens"] = to_numpy(std::move(win.cu_window_seqlens), {n_cw});
        }
        return d;
    }, py::arg("image_grid_thw"), py::arg("spatial_merge_size"), py::arg("window_size"), py::arg("patch_size"));
}
