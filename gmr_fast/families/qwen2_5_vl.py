"""Qwen2.5-VL (GMR-3B / GMR-7B, lychee-rerank-mm): windowed vision attention with a few
full-attention blocks, RMSNorm and SwiGLU in the vision tower."""

from __future__ import annotations

from ..errors import CheckpointError
from ..manifest import PreprocessSpec
from . import Family, Source, concat, same, transposed, transposed_concat
from .qwen2_vl import tiny_text_config

# The released GMR checkpoints' widths (REFERENCE.md, "Real checkpoints"); depth may be reduced.
SHAPES = {
    "gmr-3b": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                   num_hidden_layers=36, vocab_size=151936, tie_word_embeddings=True, max_window_layers=70),
    "gmr-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                   num_hidden_layers=28, vocab_size=152064, tie_word_embeddings=False, max_window_layers=28),
}
VISION_SHAPE = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31])


class Qwen25VL(Family):
    name = "qwen2_5_vl"
    hf_class_name = "Qwen2_5_VLForConditionalGeneration"
    lora_targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    windowed = True
    shapes = SHAPES

    def vision_dims(self, config, spec: PreprocessSpec) -> dict:
        v = config.vision_config
        full = sorted(int(i) for i in v.fullatt_block_indexes)
        return dict(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads, intermediate_size=v.intermediate_size,
                    out_hidden_size=v.out_hidden_size, patch_dim=spec.patch_dim, merge_size=spec.merge_size, norm="rms",
                    mlp="swiglu", full_blocks=full, windowed=True,
                    rope_theta=float((getattr(v, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))

    def vision_sources(self, vision: dict) -> dict[str, Source]:
        v = "visual"
        out = {"patch_embed.weight": Source((f"{v}.patch_embed.proj.weight",),
                                            lambda w: w.reshape(w.shape[0], -1).T.copy()),
               "merger.norm.weight": same(f"{v}.merger.ln_q.weight"),
               "merger.fc1.weight": transposed(f"{v}.merger.mlp.0.weight"), "merger.fc1.bias": same(f"{v}.merger.mlp.0.bias"),
               "merger.fc2.weight": transposed(f"{v}.merger.mlp.2.weight"), "merger.fc2.bias": same(f"{v}.merger.mlp.2.bias")}
        for i in range(vision["depth"]):
            b = f"{v}.blocks.{i}"
            out.update({
                f"blocks.{i}.norm1.weight": same(f"{b}.norm1.weight"), f"blocks.{i}.norm2.weight": same(f"{b}.norm2.weight"),
                f"blocks.{i}.qkv.weight": transposed(f"{b}.attn.qkv.weight"), f"blocks.{i}.qkv.bias": same(f"{b}.attn.qkv.bias"),
                f"blocks.{i}.proj.weight": transposed(f"{b}.attn.proj.weight"), f"blocks.{i}.proj.bias": same(f"{b}.attn.proj.bias"),
                f"blocks.{i}.gate_up.weight": transposed_concat(f"{b}.mlp.gate_proj.weight", f"{b}.mlp.up_proj.weight"),
                f"blocks.{i}.gate_up.bias": concat(f"{b}.mlp.gate_proj.bias", f"{b}.mlp.up_proj.bias"),
                f"blocks.{i}.down.weight": transposed(f"{b}.mlp.down_proj.weight"), f"blocks.{i}.down.bias": same(f"{b}.mlp.down_proj.bias"),
            })
        return out

    def tiny_config(self, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vision_hidden: int = 32,
                    vision_depth: int = 2, vision_heads: int = 2, fullatt_block_indexes: list[int] | None = None,
                    tie_word_embeddings: bool = False, intermediate_size: int | None = None):
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=vision_heads, out_hidden_size=hidden_size, window_size=112,
                      fullatt_block_indexes=fullatt_block_indexes or [vision_depth - 1], patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2_5_VLConfig(text_config=tiny_text_config(hidden_size, layers, heads, kv_heads, intermediate_size),
                                vision_config=vision, tie_word_embeddings=tie_word_embeddings)

    def released_tensors(self, config: dict) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, kind) of every tensor of a Qwen2.5-VL checkpoint in the released layout;
        kind: "matrix" (random), "norm" (ones), "bias" (random, small)."""
        h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
        d = h // heads
        v = config["vision_config"]
        vh, vi = v["hidden_size"], v["intermediate_size"]
        out = [("model.embed_tokens.weight", (config["vocab_size"], h), "matrix")]
        for i in range(layers):
            p = f"model.layers.{i}"
            out += [(f"{p}.input_layernorm.weight", (h,), "norm"),
                    (f"{p}.self_attn.q_proj.weight", (heads * d, h), "matrix"), (f"{p}.self_attn.q_proj.bias", (heads * d,), "bias"),
                    (f"{p}.self_attn.k_proj.weight", (kv * d, h), "matrix"), (f"{p}.self_attn.k_proj.bias", (kv * d,), "bias"),
                    (f"{p}.self_attn.v_proj.weight", (kv * d, h), "matrix"), (f"{p}.self_attn.v_proj.bias", (kv * d,), "bias"),
                    (f"{p}.self_attn.o_proj.weight", (h, heads * d), "matrix"),
                    (f"{p}.post_attention_layernorm.weight", (h,), "norm"),
                    (f"{p}.mlp.gate_proj.weight", (inter, h), "matrix"), (f"{p}.mlp.up_proj.weight", (inter, h), "matrix"),
                    (f"{p}.mlp.down_proj.weight", (h, inter), "matrix")]
        out.append(("model.norm.weight", (h,), "norm"))
        if not config.get("tie_word_embeddings", False):
            out.append(("lm_head.weight", (config["vocab_size"], h), "matrix"))
        out.append(("visual.patch_embed.proj.weight", (vh, 3, v["temporal_patch_size"], v["patch_size"], v["patch_size"]), "matrix"))
        for i in range(v["depth"]):
            p = f"visual.blocks.{i}"
            out += [(f"{p}.norm1.weight", (vh,), "norm"), (f"{p}.norm2.weight", (vh,), "norm"),
                    (f"{p}.attn.qkv.weight", (3 * vh, vh), "matrix"), (f"{p}.attn.qkv.bias", (3 * vh,), "bias"),
                    (f"{p}.attn.proj.weight", (vh, vh), "matrix"), (f"{p}.attn.proj.bias", (vh,), "bias"),
                    (f"{p}.mlp.gate_proj.weight", (vi, vh), "matrix"), (f"{p}.mlp.gate_proj.bias", (vi,), "bias"),
                    (f"{p}.mlp.up_proj.weight", (vi, vh), "matrix"), (f"{p}.mlp.up_proj.bias", (vi,), "bias"),
                    (f"{p}.mlp.down_proj.weight", (vh, vi), "matrix"), (f"{p}.mlp.down_proj.bias", (vh,), "bias")]
        merged = vh * 4
        out += [("visual.merger.ln_q.weight", (vh,), "norm"), ("visual.merger.mlp.0.weight", (merged, merged), "matrix"),
                ("visual.merger.mlp.0.bias", (merged,), "bias"), ("visual.merger.mlp.2.weight", (h, merged), "matrix"),
                ("visual.merger.mlp.2.bias", (h,), "bias")]
        return out

    def shape_config(self, shape: str, layers: int | None, vision_layers: int | None) -> dict:
        """config.json as the released Qwen2.5-VL / lychee-rerank-mm checkpoints write it
        (transformers 4.x layout: text fields at the top level, rope_scaling)."""
        if shape not in SHAPES:
            raise CheckpointError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        text = dict(SHAPES[shape])
        if layers is not None:
            text["num_hidden_layers"] = int(layers)
        vision = dict(VISION_SHAPE)
        if vision_layers is not None:
            depth = int(vision_layers)
            # keep the released pattern: a full-attention block closes every group of 8, and the last block is full
            full = sorted({i for i in VISION_SHAPE["fullatt_block_indexes"] if i < depth} | {depth - 1})
            vision.update(depth=depth, fullatt_block_indexes=full)
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
            "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "initializer_range": 0.02,
            "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "sliding_window": 32768, "use_sliding_window": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.49.0", "use_cache": True,
            **text,
            "vision_config": {"hidden_act": "silu", "in_chans": 3, "out_hidden_size": text["hidden_size"],
                              "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                              "temporal_patch_size": 2, "tokens_per_second": 2, **vision},
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        }


