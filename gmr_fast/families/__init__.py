"""Model families: everything that differs between Qwen2-VL, Qwen2.5-VL and whatever comes next.

One module per family owns its facts: the HuggingFace classes and how a checkpoint loads, the
preprocessing spec written to the engine manifest (patch size, merge size, mean/std, windows),
the visual-token count, which inputs its vision graph takes, how checkpoint tensors map onto the
graph modules' parameters, the LoRA targets, and the configs the checkpoint factory builds.
Everything else asks the family. Adding a family = one module here (a ``Family`` subclass
registered in ``FAMILIES``) plus its graph modules if the existing ones do not fit.

The runtime uses only the torch-free part (``preprocess_spec``, ``vision_inputs``,
``vision_feeds``); the rest imports torch / transformers lazily, inside the methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import CheckpointError, EngineError
from ..gmr_config import GmrConfig
from ..manifest import PreprocessSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Source:
    """Where a graph parameter comes from: checkpoint tensors (canonical key names, see
    ``export.checkpoint``) and how to combine them (float32 numpy arrays in, one array out).
    ``rows`` reads only those rows of a single key (the yes/no rows of the LM head)."""

    keys: tuple[str, ...]
    combine: Callable[..., np.ndarray]
    rows: tuple[int, ...] | None = None


def transposed(key: str) -> Source:
    """A torch Linear weight [out, in] as the graph's [in, out]."""
    return Source((key,), lambda w: np.ascontiguousarray(w.T))


def same(key: str) -> Source:
    return Source((key,), lambda w: w)


def transposed_concat(*keys: str) -> Source:
    """Several Linear weights side by side: [in, out_1 + out_2 + ...]."""
    return Source(tuple(keys), lambda *ws: np.ascontiguousarray(np.concatenate([w.T for w in ws], axis=1)))


def concat(*keys: str) -> Source:
    return Source(tuple(keys), lambda *bs: np.concatenate(bs))


class Family:
    """Base class; see the module docstring. Subclasses set the class attributes."""

    name: str = ""
    hf_class_name: str = ""
    lora_targets: str = ""  # regex over module names: the language model's projections
    windowed: bool = False  # vision attention per window in most blocks (Qwen2.5-VL)
    shapes: dict = {}  # named real shapes the factory can build (e.g. "gmr-3b")

    # ------------------------------------------------------------------ runtime (torch-free)
    def preprocess_spec(self, preprocessor: dict, vision_config: dict, gmr: GmrConfig) -> PreprocessSpec:
        """The spec written to the manifest: the checkpoint's preprocessor_config.json values
        where it has them (as HF's processor reads them), the family's defaults otherwise, and
        the pixel bounds from gmr.json."""
        return PreprocessSpec(
            patch_size=int(preprocessor.get("patch_size", 14)), merge_size=int(preprocessor.get("merge_size", 2)),
            temporal_patch_size=int(preprocessor.get("temporal_patch_size", 2)),
            image_mean=tuple(float(x) for x in preprocessor.get("image_mean", CLIP_MEAN)),
            image_std=tuple(float(x) for x in preprocessor.get("image_std", CLIP_STD)),
            rescale_factor=float(preprocessor.get("rescale_factor", 1 / 255)),
            min_pixels=gmr.min_pixels, max_pixels=gmr.max_pixels,
            window_size=int(vision_config.get("window_size", 112)) if self.windowed else None)

    def vision_inputs(self, spec: PreprocessSpec) -> tuple[str, ...]:
        from ..vision_layout import COMMON_INPUTS, WINDOW_INPUTS

        return tuple(COMMON_INPUTS) + (tuple(WINDOW_INPUTS) if self.windowed else ())

    def vision_feeds(self, image_grid_thw: np.ndarray, spec: PreprocessSpec) -> dict[str, np.ndarray]:
        """Every grid-derived input of the vision graph (besides the patches)."""
        from ..vision_layout import vision_graph_inputs

        return vision_graph_inputs(image_grid_thw, spec.window_size if self.windowed else None, spec.merge_size,
                                   spec.patch_size)

    # ------------------------------------------------------------------ checkpoints (torch side)
    def hf_class(self):
        import transformers

        return getattr(transformers, self.hf_class_name)

    def hf_config(self, checkpoint):
        """The checkpoint's config as transformers reads it (old and new layouts alike)."""
        import transformers

        return transformers.AutoConfig.from_pretrained(checkpoint, local_files_only=True)

    def load_hf_model(self, checkpoint, dtype=None, attn_implementation: str = "eager"):
        """The HF model from a local directory only (safetensors, no remote code)."""
        import torch

        model = self.hf_class().from_pretrained(checkpoint, dtype=dtype or torch.float32,
                                                attn_implementation=attn_implementation, local_files_only=True,
                                                trust_remote_code=False, use_safetensors=True)
        return model.eval()

    def decoder_dims(self, config):
        from ..manifest import DecoderDims

        t = config.text_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        rope = getattr(t, "rope_parameters", None) or {}
        section = rope.get("mrope_section") or [16, 24, 24]
        if sum(section) != head_dim // 2:
            raise CheckpointError(f"mrope_section {section} does not sum to head_dim / 2 = {head_dim // 2}")
        return DecoderDims(hidden_size=t.hidden_size, num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                           num_kv_heads=t.num_key_value_heads, head_dim=head_dim, intermediate_size=t.intermediate_size,
                           vocab_size=t.vocab_size, rms_norm_eps=float(t.rms_norm_eps),
                           rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 1e6))),
                           mrope_section=tuple(int(x) for x in section),
                           tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                           image_token_id=int(config.image_token_id))

    def vision_dims(self, config, spec: PreprocessSpec) -> dict:
        raise NotImplementedError

    def decoder_sources(self, dims, yes_id: int, no_id: int, has_lm_head: bool) -> dict[str, Source]:
        """Graph parameter -> checkpoint tensors, for the (shared) Qwen2 language model."""
        p = "model"
        out = {"embed": same(f"{p}.embed_tokens.weight"), "norm.weight": same(f"{p}.norm.weight")}
        for i in range(dims.num_layers):
            a, m = f"{p}.layers.{i}.self_attn", f"{p}.layers.{i}.mlp"
            out.update({
                f"layers.{i}.input_norm.weight": same(f"{p}.layers.{i}.input_layernorm.weight"),
                f"layers.{i}.q.weight": transposed(f"{a}.q_proj.weight"), f"layers.{i}.q.bias": same(f"{a}.q_proj.bias"),
                f"layers.{i}.kv.weight": transposed_concat(f"{a}.k_proj.weight", f"{a}.v_proj.weight"),
                f"layers.{i}.kv.bias": concat(f"{a}.k_proj.bias", f"{a}.v_proj.bias"),
                f"layers.{i}.o.weight": transposed(f"{a}.o_proj.weight"),
                f"layers.{i}.post_norm.weight": same(f"{p}.layers.{i}.post_attention_layernorm.weight"),
                f"layers.{i}.gate_up.weight": transposed_concat(f"{m}.gate_proj.weight", f"{m}.up_proj.weight"),
                f"layers.{i}.down.weight": transposed(f"{m}.down_proj.weight"),
            })
        head = "lm_head.weight" if has_lm_head and not dims.tie_word_embeddings else f"{p}.embed_tokens.weight"
        # the fused head: W[yes] - W[no], taken in fp32 from the two rows only
        out["score_row"] = Source((head,), lambda rows: rows[0] - rows[1], rows=(yes_id, no_id))
        return out

    def vision_sources(self, vision: dict) -> dict[str, Source]:
        raise NotImplementedError

    # ------------------------------------------------------------------ factory configs
    def tiny_config(self, **kwargs):
        raise NotImplementedError

    def shape_config(self, shape: str, layers: int | None, vision_layers: int | None) -> dict:
        """config.json of a named real shape, in the layout released checkpoints have."""
        raise CheckpointError(f"family {self.name} has no named shapes")

    def released_tensors(self, config: dict) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, kind) of every tensor of a released checkpoint with this config."""
        raise CheckpointError(f"family {self.name} has no released layout to write")


def _registry() -> dict[str, Family]:
    from .qwen2_5_vl import Qwen25VL
    from .qwen2_vl import Qwen2VL

    return {f.name: f for f in (Qwen2VL(), Qwen25VL())}


FAMILIES: Sequence[str] = ("qwen2_vl", "qwen2_5_vl")


def get_family(name: str) -> Family:
    families = _registry()
    if name not in families:
        raise EngineError(f"model family {name!r} is not supported; supported: {', '.join(families)}")
    return families[name]
