"""Tracing the graph modules to ONNX with placeholder weights, and streaming the real ones in.

The modules are built on PyTorch's ``meta`` device (no memory behind any parameter) and traced
with ``torch.onnx.export(dynamo=True)``; the resulting graph names each initializer after the
module parameter it came from. ``WeightWriter`` then fills a flat weight file one tensor at a
time from a callback (checkpoint tensors read, combined and converted on demand), and every
initializer of the graph is pointed at its bytes in that file. At no point is more than one
tensor of the model in memory.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable

import numpy as np

ALIGNMENT = 64  # bytes; every tensor starts on a 64-byte boundary of the weight file

NUMPY_TO_IR = {"float32": "FLOAT", "int8": "INT8", "uint8": "UINT8", "int64": "INT64", "float16": "FLOAT16",
               "bool": "BOOL"}


class WeightWriter:
    """Appends tensors to one file and remembers where each lies (the manifest's weight index)."""

    def __init__(self, path: os.PathLike):
        self.path = pathlib.Path(path)
        self.tensors: dict[str, dict] = {}
        self._file = open(self.path, "wb")
        self._offset = 0

    def add(self, name: str, array: np.ndarray, dtype: str | None = None) -> dict:
        """``dtype``: the entry's dtype when the bytes are not numpy's own (bf16 as raw 16-bit words:
        ``"bfloat16"``, which numpy has no name for)."""
        array = np.ascontiguousarray(array)
        pad = (-self._offset) % ALIGNMENT
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        self._file.write(memoryview(array).cast("B"))
        entry = {"offset": self._offset, "length": int(array.nbytes), "dtype": dtype or str(array.dtype),
                 "shape": [int(x) for x in array.shape]}
        self._offset += array.nbytes
        self.tensors[name] = entry
        return entry

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    @property
    def nbytes(self) -> int:
        return self._offset


def read_weight(directory: os.PathLike, file: str, entry: dict) -> np.ndarray:
    """One tensor back from a weight file (plain read, no mapping)."""
    buf = np.empty(entry["length"], np.uint8)
    with open(pathlib.Path(directory) / file, "rb") as f:
        f.seek(entry["offset"])
        f.readinto(memoryview(buf))
    return buf.view(entry["dtype"]).reshape(entry["shape"])


def trace(module, args: tuple, input_names: list[str], output_names: list[str], dynamic_shapes: dict):
    """The module traced to an onnx_ir model (meta-device parameters become data-less
    initializers named after the parameters)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, input_names=input_names, output_names=output_names, dynamo=True,
                                    dynamic_shapes=dynamic_shapes, optimize=False, verbose=False)
    return program.model


def attach_weights(model, writer: WeightWriter, value_of: Callable[[str], np.ndarray],
                   external: Callable[[str], bool] = lambda name: True) -> None:
    """Fills every initializer of ``model`` for which ``external(name)`` holds from
    ``value_of(name)`` through ``writer`` and points it at the written bytes (the others, small
    constants the optimiser made, stay inside the graph, where shape inference needs them)."""
    import onnx_ir as ir

    base = str(writer.path.parent)
    for name, value in list(model.graph.initializers.items()):
        if not external(name):
            continue
        array = value_of(name)
        expected = tuple(int(d) for d in value.shape) if value.shape is not None else array.shape
        if tuple(array.shape) != expected:
            raise ValueError(f"initializer {name}: checkpoint gives shape {array.shape}, the graph expects {expected}")
        entry = writer.add(name, array)
        value.const_value = ir.ExternalTensor(writer.path.name, entry["offset"], entry["length"],
                                              getattr(ir.DataType, NUMPY_TO_IR[str(array.dtype)]),
                                              shape=ir.Shape(array.shape), name=name, base_dir=base)
        value.dtype = getattr(ir.DataType, NUMPY_TO_IR[str(array.dtype)])
        value.shape = ir.Shape(array.shape)


def save(model, path: os.PathLike) -> None:
    """Optimises (constant folding of small tensors, dead code) and writes the graph; the weight
    file written by ``attach_weights`` stays where it is."""
    import onnx_ir as ir
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model)
    ir.save(model, str(path))


def io_spec(model_path: os.PathLike) -> dict:
    """Inputs and outputs of a saved graph, for the manifest."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    elem = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}

    def conv(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            out.append({"name": v.name, "dtype": elem[t.elem_type], "shape": dims})
        return out
    return {"inputs": conv(m.graph.input), "outputs": conv(m.graph.output)}


def decoder_trace_args(dims):
    """Example inputs (on meta) and dynamic dimensions for the decoder graph."""
    import torch

    D = torch.export.Dim
    b, s, n, npf, p, r = 3, 7, 5, 2, 4, 2  # distinct sizes, none 0 or 1 (which tracing would specialise)
    with torch.device("meta"):
        args = (torch.zeros(b, s, dtype=torch.int64), torch.zeros(b, s, dtype=torch.int64),
                torch.zeros(3, b, s, dtype=torch.int64), torch.zeros(n, dims.hidden_size),
                torch.zeros(dims.num_layers, 2, npf, dims.num_kv_heads, p, dims.head_dim),
                torch.zeros(npf, p, dtype=torch.int64), torch.zeros(b, dtype=torch.int64), torch.zeros(r, dtype=torch.int64))
    B, S, N, NP, P, R = D("batch"), D("length"), D("image_tokens"), D("prefixes"), D("past_length"), D("kv_rows")
    shapes = {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: S}, "position_ids": {1: B, 2: S},
              "image_embeds": {0: N}, "past_kv": {2: NP, 4: P}, "past_mask": {0: NP, 1: P}, "past_index": {0: B},
              "kv_rows": {0: R}}
    return args, shapes


def vision_trace_args(vdims, windowed: bool):
    import torch

    D = torch.export.Dim
    n, s, lf, m, w, lw = 48, 3, 20, 12, 5, 16
    with torch.device("meta"):
        args = [torch.zeros(n, vdims.patch_dim), torch.zeros(n, 2, dtype=torch.int64), torch.zeros(s, lf, dtype=torch.int64),
                torch.zeros(s, lf, dtype=torch.bool), torch.zeros(n, dtype=torch.int64)]
        if windowed:
            args += [torch.zeros(m, dtype=torch.int64), torch.zeros(m, dtype=torch.int64), torch.zeros(w, lw, dtype=torch.int64),
                     torch.zeros(w, lw, dtype=torch.bool), torch.zeros(n, dtype=torch.int64)]
    N, S, LF = D("patches"), D("images"), D("image_len")
    shapes = {"pixel_values": {0: N}, "rot_pos_ids": {0: N}, "full_gather": {0: S, 1: LF}, "full_valid": {0: S, 1: LF},
              "full_inverse": {0: N}}
    if windowed:
        M, W, LW = D("merged"), D("windows"), D("window_len")
        shapes.update(window_index={0: M}, window_reverse={0: M}, window_gather={0: W, 1: LW},
                      window_valid={0: W, 1: LW}, window_inverse={0: N})
    return tuple(args), shapes
