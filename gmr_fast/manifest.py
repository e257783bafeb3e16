"""The engine manifest: everything the runtime knows about an engine, loaded once and typed.

``manifest.json`` is written by ``python -m export`` after validation and is the runtime's only
source of truth: prompt building reads ``gmr`` and ``tokens``, preprocessing reads
``preprocessing``, scheduling and the backends read ``decoder`` and the variants' graphs. An
engine of another format version, or whose graphs lack an input the runtime feeds, is refused
with a message saying to re-export.

Format 2 (this runtime) holds one or more *variants* of the same model, each a way to run it:

- ``fp32``: ONNX graphs with fp32 weights, run by onnxruntime (or by the torch backend, which
  reads the same weight file);
- ``int8``: ONNX graphs whose large matrix multiplies use onnxruntime's int8 operators;
- ``bf16``: the torch backend in bfloat16, over the fp32 variant's weights or, in an engine
  exported without fp32, over bfloat16 weight files of its own (entries of dtype ``bfloat16``).

Each variant carries the validation figures measured at export against the fp32 reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from .errors import EngineError
from .gmr_config import GmrConfig

FORMAT_VERSION = 2
MANIFEST = "manifest.json"

# The inputs the runtime feeds to each graph (a versioned contract: a graph lacking one is refused).
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids", "image_embeds", "past_kv", "past_mask", "past_index",
                  "kv_rows")
DECODER_OUTPUTS = ("score", "present_kv")
VISION_OUTPUTS = ("image_embeds",)
PRECISIONS = ("fp32", "int8", "bf16")


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become vision patches and how many tokens they take (from the model family)."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    min_pixels: int
    max_pixels: int
    window_size: int | None  # pixels per attention window side (Qwen2.5-VL); None: full attention only

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image resized to height x width."""
        return 1, height // self.patch_size, width // self.patch_size

    def patches(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size)

    def visual_tokens(self, height: int, width: int) -> int:
        """Decoder tokens of an image resized to height x width (one per merged patch)."""
        return self.patches(height, width) // (self.merge_size * self.merge_size)

    def merged_grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size // self.merge_size, width // self.patch_size // self.merge_size


@dataclass(frozen=True)
class TokenIds:
    yes: int
    no: int
    image_pad: int
    vision_start: int
    vision_end: int
    pad: int


@dataclass(frozen=True)
class DecoderDims:
    """The language model's shape: what the scheduler's memory model and the KV cache need."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool
    image_token_id: int

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 keys + values of one token over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints and dimension names

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        return cls(d["file"], tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]))


@dataclass(frozen=True)
class WeightFile:
    """A flat file of tensors (the ONNX graphs' external data) and where each tensor lies in it,
    so that the torch backend can read the same weights without onnx."""

    file: str
    tensors: dict  # name -> {"offset", "length", "dtype", "shape"}


@dataclass(frozen=True)
class Variant:
    precision: str  # fp32 | int8 | bf16
    backend: str  # onnxruntime | torch
    graphs: dict  # "vision" / "decoder" -> GraphSpec (ONNX variants)
    weights: dict  # "vision" / "decoder" -> WeightFile
    validation: dict  # figures measured at export against the fp32 reference
    details: dict = field(default_factory=dict)  # e.g. which layers stayed in fp32


@dataclass(frozen=True)
class Manifest:
    format_version: int
    family: str
    created: str
    source: dict  # checkpoint path, weights sha256, stored dtype
    gmr: GmrConfig
    tokens: TokenIds
    preprocessing: PreprocessSpec
    decoder: DecoderDims
    vision: dict  # family-specific vision dimensions
    variants: dict  # precision -> Variant
    validation: dict  # the criterion and the pairs it was measured on

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.variants)

    def variant(self, precision: str) -> Variant:
        if precision not in self.variants:
            raise EngineError(f"this engine has no {precision} variant (it has {', '.join(self.variants) or 'none'}); "
                              f"re-export with --dtype {precision} to add it")
        return self.variants[precision]

    def to_dict(self) -> dict:
        def conv(x: Any):
            if dataclasses.is_dataclass(x):
                return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [conv(v) for v in x]
            return x
        return conv(self)

    def save(self, engine_dir: os.PathLike) -> None:
        path = pathlib.Path(engine_dir) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        try:
            variants = {}
            for name, v in d["variants"].items():
                variants[name] = Variant(v["precision"], v["backend"],
                                         {g: GraphSpec.from_dict(s) for g, s in v.get("graphs", {}).items()},
                                         {g: WeightFile(w["file"], w["tensors"]) for g, w in v.get("weights", {}).items()},
                                         v.get("validation", {}), v.get("details", {}))
            pre = dict(d["preprocessing"])
            pre["image_mean"], pre["image_std"] = tuple(pre["image_mean"]), tuple(pre["image_std"])
            dec = dict(d["decoder"])
            dec["mrope_section"] = tuple(dec["mrope_section"])
            return cls(d["format_version"], d["family"], d.get("created", ""), d["source"],
                       GmrConfig.from_dict(d["gmr"], f"{where} (gmr)"), TokenIds(**d["tokens"]), PreprocessSpec(**pre),
                       DecoderDims(**dec), d.get("vision", {}), variants, d.get("validation", {}))
        except (KeyError, TypeError) as e:
            raise EngineError(f"{where}: malformed manifest ({type(e).__name__}: {e}); re-export the engine "
                              "with `python -m export`") from None


def load_manifest(engine_dir: os.PathLike) -> Manifest:
    """Reads and checks ``engine_dir/manifest.json``; refuses engines this runtime cannot run."""
    path = pathlib.Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise EngineError(f"{engine_dir} is not an engine directory (no {MANIFEST}); create one with `python -m export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e}); re-export the engine") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise EngineError(f"{path}: engine format {version} is not the one this runtime runs ({FORMAT_VERSION}); "
                          "re-export the checkpoint with this version's `python -m export`")
    manifest = Manifest.from_dict(data, str(path))
    from .families import get_family  # the family registry checks the family name

    family = get_family(manifest.family)
    for name, variant in manifest.variants.items():
        if variant.backend != "onnxruntime":
            continue
        for graph, required in (("vision", family.vision_inputs(manifest.preprocessing)), ("decoder", DECODER_INPUTS)):
            spec = variant.graphs.get(graph)
            if spec is None:
                raise EngineError(f"{path}: the {name} variant has no {graph} graph; re-export the engine")
            missing = [n for n in required if n not in spec.input_names]
            if missing:
                raise EngineError(f"{path}: the {name} variant's {graph} graph lacks input(s) {missing} that this "
                                  "runtime feeds; re-export the checkpoint with this version's `python -m export`")
    return manifest
