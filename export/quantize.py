"""int8 variants through onnxruntime's own quantized operators.

Every ``MatMul`` of a traced graph whose second operand is a 2-D weight becomes
``com.microsoft.DynamicQuantizeMatMul``: the weight stored as int8 with one symmetric scale per
output column, the activation quantized to uint8 per tensor at run time, and onnxruntime's QGEMM
(U8S8) picks AMX, AVX512-VNNI, AVX-VNNI or AVX2 for the processor it runs on. The decoder's
token embedding table (the largest tensor of a small model) is stored as int8 rows with one
scale per row and dequantized after the lookup. Weights named by ``keep`` stay fp32.

The values are produced while the weight file is streamed (``quantized_value``), one tensor at
a time, from the fp32 tensor the checkpoint gives.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import numpy as np

SUFFIXES = (".int8", ".scale", ".zero")


def keep_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Glob patterns over graph parameter names (``layers.0.down.weight``, ``merger.*``)."""
    patterns = list(patterns)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float32 -> (int8 [K, N], scale float32 [N]) with w ~= q * scale, symmetric."""
    peak = np.abs(w).max(axis=0)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[V, H] -> (int8 [V, H], scale float32 [V, 1])."""
    q, scale = quantize_columns(w.T)
    return np.ascontiguousarray(q.T), scale.reshape(-1, 1)


def _placeholder():
    raise RuntimeError("quantized weights are produced by the weight streamer, not read from the graph")


def rewrite(model, keep: Callable[[str], bool], embedding: str | None = None) -> dict[str, str]:
    """Rewrites ``model`` in place; returns {new initializer: original weight} for the streamer."""
    import onnx_ir as ir

    graph = model.graph
    inits = graph.initializers
    produced: dict[str, str] = {}

    def new_init(name: str, dtype, shape) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        value.const_value = ir.LazyTensor(_placeholder, dtype, ir.Shape(shape), name=name)
        graph.register_initializer(value)
        return value

    for node in list(graph):
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            w = node.inputs[1]
            if w is None or w.name not in inits or w.shape is None or len(w.shape) != 2 or keep(w.name):
                continue
            k, n = (int(d) for d in w.shape)
            q = new_init(w.name + ".int8", ir.DataType.INT8, [k, n])
            scale = new_init(w.name + ".scale", ir.DataType.FLOAT, [n])
            zero = new_init(w.name + ".zero", ir.DataType.INT8, [n])
            for v in (q, scale, zero):
                produced[v.name] = w.name
            qmm = ir.Node("com.microsoft", "DynamicQuantizeMatMul", [node.inputs[0], q, scale, zero], num_outputs=1,
                          name=(node.name or w.name) + "/int8")
            qmm.outputs[0].shape, qmm.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
            graph.insert_before(node, qmm)
            ir.convenience.replace_all_uses_with(node.outputs[0], qmm.outputs[0], replace_graph_outputs=True)
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
    from their original (each original read once: its pieces are asked for one after another)."""

    def __init__(self, produced: dict[str, str], fp32_value: Callable[[str], np.ndarray]):
        self.produced, self.fp32_value = produced, fp32_value
        self._name, self._parts = None, {}

    def __call__(self, name: str) -> np.ndarray:
        original = self.produced.get(name)
        if original is None:
            return self.fp32_value(name)
        if self._name != original:
            w = self.fp32_value(original)
            if name.endswith(".int8") and original + ".zero" not in self.produced:  # an embedding table
                q, scale = quantize_rows(w)
                self._parts = {".int8": q, ".scale": scale}
            else:
                q, scale = quantize_columns(w)
                self._parts = {".int8": q, ".scale": scale, ".zero": np.zeros(scale.shape, np.int8)}
            self._name = original
        return self._parts[name[len(original):]]
