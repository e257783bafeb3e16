"""A copy of a checkpoint with activation outlier channels, computing exactly the same function.

Random-weight checkpoints have no activation outliers (largest input channel / median <= 4.7
measured), while trained LLMs have a few channels, the same in every layer, that carry values
tens of times larger than the rest at the inputs of their projections. That is what per-tensor
int8 activations handle worst (one scale for all channels: the outliers set it, the other
channels keep few levels) and what SmoothQuant-style scale migration (``export --int8-smooth``)
is for. This rewrite gives a random checkpoint such channels without changing what it computes:

- decoder layers: ``input_layernorm`` and ``post_attention_layernorm`` weights x ``scale`` on
  ``channels`` hidden channels, and the columns (input channels) of q/k/v and gate/up that read
  them / ``scale``; ``up_proj``'s rows (output channels) x ``scale`` on ``channels``
  intermediate channels and the matching columns of ``down_proj`` / ``scale`` (silu(gate) x up
  is linear in up), so ``down``'s input has outliers too;
- vision blocks: the same for ``norm1`` -> qkv and ``norm2`` -> gate/up (fc1 in Qwen2-VL, whose
  LayerNorm bias is scaled with its weight), and up -> down in Qwen2.5-VL (bias scaled with rows).

``scale`` must be a power of two: multiplying by it is exact in bf16 and fp32, so every product
of the scaled model equals the original's bit for bit and its fp32 reference scores are
identical (tested). The channels are one seeded choice per width, shared by every layer, as
trained models' outlier channels are.

    python -m export.outliers --checkpoint /tmp/gmr-3b-L6 --out /tmp/gmr-3b-L6-outliers
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil

import numpy as np

from gmr_fast.errors import CheckpointError

from .checkpoint import CheckpointReader

# (pattern over canonical names, width scope of the input channels (columns) scaled down or None,
#  width scope of the output channels (rows / vector entries) scaled up or None)
RULES = (
    (r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight", None, "hidden"),
    (r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.weight", "hidden", None),
    (r"model\.layers\.\d+\.mlp\.gate_proj\.weight", "hidden", None),
    (r"model\.layers\.\d+\.mlp\.up_proj\.weight", "hidden", "intermediate"),
    (r"model\.layers\.\d+\.mlp\.down_proj\.weight", "intermediate", None),
    (r"visual\.blocks\.\d+\.norm[12]\.(weight|bias)", None, "vision"),
    (r"visual\.blocks\.\d+\.attn\.qkv\.weight", "vision", None),
    (r"visual\.blocks\.\d+\.mlp\.(gate_proj|fc1)\.weight", "vision", None),
    (r"visual\.blocks\.\d+\.mlp\.up_proj\.weight", "vision", "vision_intermediate"),
    (r"visual\.blocks\.\d+\.mlp\.up_proj\.bias", None, "vision_intermediate"),
    (r"visual\.blocks\.\d+\.mlp\.down_proj\.weight", "vision_intermediate", None),
)
WRITABLE = ("BF16", "F32")


def _from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return values.astype(np.float32)
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact: x power-of-two of a bf16


def add_outlier_channels(checkpoint: os.PathLike, out: os.PathLike, scale: float = 64.0, channels: int = 8,
                         seed: int = 0) -> dict:
    """Writes the rewritten copy to ``out``; returns {scope: [channels]} (see the module docstring)."""
    if scale <= 0 or math.frexp(scale)[0] != 0.5:
        raise ValueError(f"scale must be a power of two (exact in bf16), not {scale}")
    src, dst = pathlib.Path(checkpoint), pathlib.Path(out)
    if dst.exists():
        raise CheckpointError(f"{dst} already exists")
    CheckpointReader(src)  # raises on a directory without readable safetensors, before anything is copied
    rules = [(re.compile(p), cols, rows) for p, cols, rows in RULES]
    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    chosen: dict[str, np.ndarray] = {}

    def pick(scope: str, width: int) -> np.ndarray:
        if scope not in chosen:
            chosen[scope] = np.sort(rng.choice(width, size=min(channels, width), replace=False))
        if chosen[scope].max() >= width:
            raise CheckpointError(f"{scope} channels of different widths in one checkpoint")
        return chosen[scope]

    touched = 0
    reader = CheckpointReader(dst)  # canonical names, absolute offsets; the header parsed once
    for name, info in reader.tensors.items():
        match = next(((cols, rows) for rx, cols, rows in rules if rx.fullmatch(name)), None)
        if match is None:
            continue
        if info.dtype not in WRITABLE:
            raise CheckpointError(f"{name}: dtype {info.dtype} is not rewritten (bf16 or fp32 only)")
        values = reader.get(name)
        cols, rows = match
        if cols is not None:  # [out, in]: the input channels that now carry outliers
            values[:, pick(cols, values.shape[1])] /= scale
        if rows is not None:  # a vector ([C]) or a matrix's output rows
            values[pick(rows, values.shape[0])] *= scale
        with open(info.file, "r+b") as f:
            f.seek(info.start)
            f.write(_from_float32(values, info.dtype).tobytes())
        touched += 1
    if not touched:
        raise CheckpointError(f"{src}: no tensor matched the Qwen2(.5)-VL names this rewrite knows")
    (dst / "outliers.json").write_text(json.dumps({"scale": scale, "seed": seed, "tensors": touched,
                                                   "channels": {k: v.tolist() for k, v in chosen.items()}}, indent=2))
    return {k: v.tolist() for k, v in chosen.items()}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m export.outliers", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=64.0, help="a power of two (default 64)")
    p.add_argument("--channels", type=int, default=8, help="outlier channels per width (default 8)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(add_outlier_channels(a.checkpoint, a.out, a.scale, a.channels, a.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
