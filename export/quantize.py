"""int8 variants through onnxruntime's own quantized operators.

Every ``MatMul`` of a traced graph whose second operand is a 2-D weight becomes
``com.microsoft.DynamicQuantizeMatMul``: the weight stored as int8 with one symmetric scale per
output column (7 bits of it: QGEMM_WEIGHT_MAX), the activation quantized to uint8 per tensor at
run time, and onnxruntime's QGEMM (U8S8) picks AMX, AVX512-VNNI, AVX-VNNI or AVX2 for the
processor it runs on. The decoder's token embedding table (the largest tensor of a small model) is
stored as int8 rows with one scale per row and dequantized after the lookup. Weights named by
``keep`` keep their activations in fp32: with ``kept="fp32"`` they stay fp32 MatMuls; with
``kept="int8-weights"`` they become ``com.microsoft.MatMulNBits`` with 8-bit weights (one scale
per block of 32 along K) and ``accuracy_level`` 0, i.e. fp32 activations and fp32 arithmetic on
weights dequantized block by block: a quarter of fp32's bytes and only the weights' rounding as
error (5e-3 of the largest output), none of the activation quantization that the outlier-sensitive
layers cannot take. It dequantizes the whole weight on every call, so it nears fp32's speed only
on thousands of rows (Zen 5, GMR-3B MLP shapes: 351-417 GOP/s against fp32's 417-437 at 4,096
rows, 5 against 39 at 8): a memory option (benchmarks/README.md "int8 export").

The values are produced while the weight file is streamed (``quantized_value``), one tensor at
a time, from the fp32 tensor the checkpoint gives.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import numpy as np

SUFFIXES = (".int8", ".scale", ".zero", ".w8", ".w8scale", ".smooth")
KEPT = ("int8-weights", "fp32")  # what a kept weight becomes (see above)
BLOCK = 32  # MatMulNBits block along K of the kept weights
CONSTANTS = "quant."  # the small constants of the per-row rewrite stay inside the graph


def keep_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Glob patterns over graph parameter names (``layers.0.down.weight``, ``merger.*``)."""
    patterns = list(patterns)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


CHUNK_ROWS = 4096  # rows quantized at a time: temporaries stay small even for a 152k x 3584 table


# The largest |q| of a GEMM weight: 7 bits, as onnxruntime's ``reduce_range``. Without VNNI
# (AVX2, and AVX-512 before Cascade Lake) onnxruntime's U8S8 QGEMM multiplies with VPMADDUBSW,
# which sums each pair of uint8 x int8 products into int16 with saturation: at |q| <= 64 a pair
# stays within 2 * 255 * 64 = 32,640 <= 32,767, at 127 it reaches 64,770. Measured on an AMD EPYC
# of family 23 (AVX2 only): all-positive activations against weights at full range came out 1.8%
# off against 0.05% for the rounding itself. The cost elsewhere is small: the weights' own
# rounding error doubles (GMR-3B MLP shape, Gaussian weights: 0.008 to 0.017 of the product), but
# the activations' rounding dominates the total (per tensor with outlier channels 0.178 to 0.179,
# per token 0.075 to 0.076). VNNI and AMX accumulate in int32 and never saturate.
QGEMM_WEIGHT_MAX = 64


def quantize_columns(w: np.ndarray, levels: int = QGEMM_WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float32 -> (int8 [K, N] in [-levels, levels], scale float32 [N]) with w ~= q * scale,
    symmetric."""
    peak = np.zeros(w.shape[1], np.float32)
    for start in range(0, w.shape[0], CHUNK_ROWS):
        np.maximum(peak, np.abs(w[start:start + CHUNK_ROWS]).max(axis=0), out=peak)
    scale = np.where(peak > 0, peak / float(levels), 1.0).astype(np.float32)
    q = np.empty(w.shape, np.int8)
    for start in range(0, w.shape[0], CHUNK_ROWS):
        q[start:start + CHUNK_ROWS] = np.clip(np.rint(w[start:start + CHUNK_ROWS] / scale), -levels, levels)
    return q, scale


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[V, H] -> (int8 [V, H], scale float32 [V, 1]): one symmetric scale per row."""
    q = np.empty(w.shape, np.int8)
    scale = np.empty((w.shape[0], 1), np.float32)
    for start in range(0, w.shape[0], CHUNK_ROWS):
        rows = w[start:start + CHUNK_ROWS]
        peak = np.abs(rows).max(axis=1, keepdims=True)
        s = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        q[start:start + CHUNK_ROWS] = np.clip(np.rint(rows / s), -127, 127)
        scale[start:start + CHUNK_ROWS] = s
    return q, scale


def quantize_blocks(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float32 -> MatMulNBits' 8-bit layout: (uint8 [N, ceil(K / block), block] holding
    q + 128 with q = round(w / scale) in [-127, 127], scale float32 [N * ceil(K / block)]), one
    symmetric scale per block of ``block`` along K (K padded with zeros to whole blocks); the
    operator's default zero point for 8 bits is 128."""
    k, n = w.shape
    blocks = -(-k // block)
    q = np.empty((n, blocks, block), np.uint8)
    scale = np.empty((n, blocks), np.float32)
    for start in range(0, n, CHUNK_ROWS):
        cols = np.zeros((min(CHUNK_ROWS, n - start), blocks * block), np.float32)
        cols[:, :k] = w[:, start:start + CHUNK_ROWS].T
        cols = cols.reshape(len(cols), blocks, block)
        peak = np.abs(cols).max(axis=2)
        s = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        q[start:start + len(cols)] = (np.clip(np.rint(cols / s[..., None]), -127, 127) + 128).astype(np.uint8)
        scale[start:start + len(cols)] = s
    return q, scale.reshape(-1)


def smoothing_scales(act_peak: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel ``s`` for ``x @ weight`` (weight [K, N]; export/calibrate.py):
    ``max|x_j|^alpha / max|W_j|^(1 - alpha)``."""
    w_peak = np.abs(weight).max(axis=1)
    a = np.maximum(act_peak.astype(np.float64), 1e-5)
    w = np.maximum(w_peak.astype(np.float64), 1e-5)
    return np.clip(a ** alpha / w ** (1.0 - alpha), 1e-5, None).astype(np.float32)


def _placeholder():
    raise RuntimeError("quantized weights are produced by the weight streamer, not read from the graph")


def _per_row(graph, node, x, q, scale, ir):
    """x @ W with the activation quantized per row (symmetric: scale_r = max|x_r| / 127), then
    both scales applied: MatMulInteger's int32 result is exact, so the only error is each row's
    own rounding, whatever the other rows of the batch hold. The rounded activation is stored as
    uint8 (value + 128, one zero point 128 for every row): that is onnxruntime's U8S8 QGEMM, the
    path with AMX / VNNI kernels (int8 x int8 MatMulInteger runs a generic one at ~30 GOP/s,
    benchmarks/int8_kernels.py)."""
    def op(op_type, inputs, **attrs):
        n = ir.Node("", op_type, inputs, attributes=[ir.AttrInt64(k, v) if isinstance(v, int) else ir.AttrInts(k, v)
                                                     for k, v in attrs.items()], num_outputs=1)
        return n

    def const(name, array):
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
        v.const_value = ir.tensor(array, name=name)
        if name not in graph.initializers:
            graph.register_initializer(v)
        return graph.initializers[name]

    axes, tiny, c127 = (const("quant.axes_last", np.array([-1], np.int64)), const("quant.tiny", np.array(1e-12, np.float32)),
                        const("quant.127", np.array(127.0, np.float32)))
    c128, zero = const("quant.128", np.array(128.0, np.float32)), const("quant.zero_u8", np.array(128, np.uint8))
    a = op("Abs", [x])
    m = op("ReduceMax", [a.outputs[0], axes], keepdims=1)
    floor = op("Max", [m.outputs[0], tiny])
    s = op("Div", [floor.outputs[0], c127])
    scaled = op("Div", [x, s.outputs[0]])
    rounded = op("Round", [scaled.outputs[0]])  # in [-127, 127]
    shifted = op("Add", [rounded.outputs[0], c128])  # in [1, 255]: exact in uint8
    xq = op("Cast", [shifted.outputs[0]], to=ir.DataType.UINT8.value)
    mm = op("MatMulInteger", [xq.outputs[0], q, zero])
    yf = op("Cast", [mm.outputs[0]], to=ir.DataType.FLOAT.value)
    y1 = op("Mul", [yf.outputs[0], s.outputs[0]])
    y = op("Mul", [y1.outputs[0], scale])
    nodes = [a, m, floor, s, scaled, rounded, shifted, xq, mm, yf, y1, y]
    graph.insert_before(node, nodes)
    return y


def rewrite(model, keep: Callable[[str], bool], embedding: str | None = None, activations: str = "row",
            kept: str = "fp32", smooth: Iterable[str] = ()) -> dict[str, str]:
    """Rewrites ``model`` in place; returns {new initializer: original weight} for the streamer.
    ``activations``: "row" (per-token scales, U8S8 MatMulInteger) or "tensor" (onnxruntime's
    fused DynamicQuantizeMatMul, one scale for the whole activation matrix). ``kept``: what the
    MatMuls of kept weights become ("fp32": unchanged; "int8-weights": MatMulNBits, see above).
    ``smooth``: weights whose int8 MatMul gets SmoothQuant's migration (export/calibrate.py): the
    activation is multiplied by ``{weight}.smooth`` (1 / s, one value per input channel) before it
    is quantized, and the weight is quantized as diag(s) W (``QuantizedValues``)."""
    if kept not in KEPT:
        raise ValueError(f"kept must be one of {KEPT}, not {kept!r}")
    import onnx_ir as ir

    graph = model.graph
    inits = graph.initializers
    produced: dict[str, str] = {}
    smooth = set(smooth)

    def new_init(name: str, dtype, shape) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        value.const_value = ir.LazyTensor(_placeholder, dtype, ir.Shape(shape), name=name)
        graph.register_initializer(value)
        return value

    for node in list(graph):
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            w = node.inputs[1]
            if w is None or w.name not in inits or w.shape is None or len(w.shape) != 2:
                continue
            k, n = (int(d) for d in w.shape)
            if keep(w.name) and kept == "fp32":
                continue
            if keep(w.name):  # 8-bit weight blocks, fp32 activations and arithmetic
                blocks = -(-k // BLOCK)
                q = new_init(w.name + ".w8", ir.DataType.UINT8, [n, blocks, BLOCK])
                scale = new_init(w.name + ".w8scale", ir.DataType.FLOAT, [n * blocks])
                produced[q.name] = produced[scale.name] = w.name
                out = ir.Node("com.microsoft", "MatMulNBits", [node.inputs[0], q, scale], num_outputs=1,
                              attributes=[ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 8),
                                          ir.AttrInt64("block_size", BLOCK), ir.AttrInt64("accuracy_level", 0)],
                              name=(node.name or w.name) + "/w8")
                graph.insert_before(node, out)
            else:
                q = new_init(w.name + ".int8", ir.DataType.INT8, [k, n])
                scale = new_init(w.name + ".scale", ir.DataType.FLOAT, [n])
                zero = new_init(w.name + ".zero", ir.DataType.INT8, [n]) if activations != "row" else None
                x = node.inputs[0]
                if w.name in smooth:  # right after its weight's other pieces: the streamer reads the weight once
                    inverse = new_init(w.name + ".smooth", ir.DataType.FLOAT, [k])
                    produced[inverse.name] = w.name
                    scaled = ir.Node("", "Mul", [x, inverse], num_outputs=1, name=(node.name or w.name) + "/smooth")
                    graph.insert_before(node, scaled)
                    x = scaled.outputs[0]
                for v in (q, scale, zero):
                    if v is not None:
                        produced[v.name] = w.name
                if activations == "row":
                    out = _per_row(graph, node, x, q, scale, ir)
                else:
                    out = ir.Node("com.microsoft", "DynamicQuantizeMatMul", [x, q, scale, zero],
                                  num_outputs=1, name=(node.name or w.name) + "/int8")
                    graph.insert_before(node, out)
            out.outputs[0].shape, out.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
            ir.convenience.replace_all_uses_with(node.outputs[0], out.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
        elif embedding and node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].name == embedding:
            table, ids = node.inputs[0], node.inputs[1]
            if keep(table.name):
                continue
            v, h = (int(d) for d in table.shape)
            q = new_init(table.name + ".int8", ir.DataType.INT8, [v, h])
            scale = new_init(table.name + ".scale", ir.DataType.FLOAT, [v, 1])
            produced[q.name] = produced[scale.name] = table.name
            rows = ir.Node("", "Gather", [q, ids], attributes=[ir.AttrInt64("axis", 0)], num_outputs=1)
            as_float = ir.Node("", "Cast", [rows.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT.value)],
                               num_outputs=1)
            scales = ir.Node("", "Gather", [scale, ids], attributes=[ir.AttrInt64("axis", 0)], num_outputs=1)
            out = ir.Node("", "Mul", [as_float.outputs[0], scales.outputs[0]], num_outputs=1)
            out.outputs[0].shape, out.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
            graph.insert_before(node, [rows, as_float, scales, out])
            ir.convenience.replace_all_uses_with(node.outputs[0], out.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
    for name in set(produced.values()):
        if name in inits and not inits[name].uses():
            del inits[name]
    model.opset_imports["com.microsoft"] = 1
    return produced


class QuantizedValues:
    """value_of(name) for the streamer: fp32 tensors pass through, quantized pieces are computed
    from their original (each original read once: its pieces are asked for one after another).
    ``embedding`` names the table quantized per row (the others are per output column)."""

    def __init__(self, produced: dict[str, str], fp32_value: Callable[[str], np.ndarray], embedding: str | None = None,
                 smooth: dict[str, np.ndarray] | None = None, alpha: float = 0.5):
        self.produced, self.fp32_value, self.embedding = produced, fp32_value, embedding
        self.smooth, self.alpha = smooth or {}, alpha  # activation ranges of the smoothed weights
        self._name, self._parts = None, {}

    def __call__(self, name: str) -> np.ndarray:
        original = self.produced.get(name)
        if original is None:
            return self.fp32_value(name)
        if self._name != original:
            w = self.fp32_value(original)
            if name.endswith((".w8", ".w8scale")):  # a kept weight: 8-bit blocks, fp32 arithmetic
                q, scale = quantize_blocks(w)
                self._parts = {".w8": q, ".w8scale": scale}
            elif original == self.embedding:
                q, scale = quantize_rows(w)
                self._parts = {".int8": q, ".scale": scale}
            else:
                inverse = None
                if original + ".smooth" in self.produced:
                    s = smoothing_scales(self.smooth[original], w, self.alpha)
                    w, inverse = w * s[:, None], (1.0 / s).astype(np.float32)
                q, scale = quantize_columns(w)
                self._parts = {".int8": q, ".scale": scale, ".zero": np.zeros(scale.shape, np.int8), ".smooth": inverse}
            self._name = original
        return self._parts[name[len(original):]]
