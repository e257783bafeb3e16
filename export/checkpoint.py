"""Reading GMR checkpoints tensor by tensor, without torch and without holding the model.

A checkpoint is a HuggingFace directory: ``model.safetensors``, or shards listed by
``model.safetensors.index.json`` (the released lychee-rerank-mm has four), in bf16, fp16 or
fp32. Key names differ between releases: checkpoints saved before transformers 5 (and the
released ones) use ``model.layers.*`` / ``model.embed_tokens`` / ``visual.*`` / ``lm_head.*``;
newer ones may use ``model.language_model.*`` / ``model.visual.*``. Everything here speaks the
*canonical* (released) names.

Tensors are read with plain file reads into a fresh buffer, one at a time, and converted to
float32; nothing is memory-mapped, so a pass over a 16 GB checkpoint does not leave 16 GB of
mapped pages counted against the process.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from dataclasses import dataclass

import numpy as np

from gmr_fast.errors import CheckpointError

DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4), "F64": (np.float64, 8)}
# newer layouts -> the canonical (released) names
PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("model.visual.", "visual."),
            ("language_model.lm_head.", "lm_head."))


def canonical(key: str) -> str:
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


@dataclass(frozen=True)
class TensorInfo:
    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw tensor bytes of a safetensors dtype -> float32 (bf16 widened exactly)."""
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    kind, _ = DTYPES[dtype]
    return raw.view(kind).astype(np.float32, copy=False)


class CheckpointReader:
    def __init__(self, checkpoint: os.PathLike):
        self.root = pathlib.Path(checkpoint)
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = sorted({self.root / f for f in weight_map.values()})
        else:
            files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.root} has no *.safetensors weights")
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            if not path.exists():
                raise CheckpointError(f"{index} lists {path.name}, which is missing")
            for key, info in self._header(path).items():
                name = canonical(key)
                if name in self.tensors:
                    raise CheckpointError(f"{self.root}: tensor {name} appears twice ({key} in {path.name})")
                self.tensors[name] = info

    @staticmethod
    def _header(path: pathlib.Path) -> dict[str, TensorInfo]:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file")
            (n,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
        size = path.stat().st_size
        out = {}
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            if meta["dtype"] not in DTYPES:
                raise CheckpointError(f"{path}: tensor {key} has dtype {meta['dtype']}; supported: {', '.join(DTYPES)}")
            begin, end = meta["data_offsets"]
            info = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), 8 + n + begin, 8 + n + end)
            if info.end > size:
                raise CheckpointError(f"{path}: tensor {key} lies beyond the end of the file (truncated download?)")
            out[key] = info
        return out

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def stored_dtypes(self) -> dict[str, int]:
        """Stored dtype -> number of tensors."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + 1
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def info(self, key: str) -> TensorInfo:
        if key not in self.tensors:
            raise CheckpointError(f"{self.root}: tensor {key!r} not found (is this a Qwen2-VL / Qwen2.5-VL checkpoint?)")
        return self.tensors[key]

    def _read(self, info: TensorInfo, start: int, length: int) -> np.ndarray:
        buf = np.empty(length, np.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.start + start)
            if f.readinto(memoryview(buf)) != length:
                raise CheckpointError(f"{info.file}: short read (truncated file?)")
        return buf

    def get(self, key: str) -> np.ndarray:
        """The whole tensor as float32."""
        info = self.info(key)
        return to_float32(self._read(info, 0, info.nbytes), info.dtype).reshape(info.shape)

    def get_rows(self, key: str, rows: tuple[int, ...]) -> np.ndarray:
        """Rows of a 2-D tensor as float32, reading only those rows."""
        info = self.info(key)
        if len(info.shape) != 2:
            raise CheckpointError(f"{key} is not a matrix")
        width = info.shape[1] * DTYPES[info.dtype][1]
        out = []
        for r in rows:
            if not 0 <= r < info.shape[0]:
                raise CheckpointError(f"row {r} of {key} does not exist (shape {info.shape})")
            out.append(to_float32(self._read(info, r * width, width), info.dtype))
        return np.stack(out)

    def resolve(self, source) -> np.ndarray:
        """A graph parameter's value from its ``families.Source``."""
        if source.rows is not None:
            return np.ascontiguousarray(source.combine(self.get_rows(source.keys[0], source.rows)), np.float32)
        return np.ascontiguousarray(source.combine(*(self.get(k) for k in source.keys)), np.float32)
