"""Qwen2-VL: full attention in every vision block, LayerNorm and quick-GELU MLPs in the tower."""

from __future__ import annotations

from ..manifest import PreprocessSpec
from . import Family, Source, same, transposed

QWEN2_VOCAB = 151936  # embedding rows of the Qwen2 / Qwen2.5 language models (padded vocabulary)


def tiny_text_config(hidden_size: int, layers: int, heads: int, kv_heads: int, intermediate_size: int | None) -> dict:
    head_dim = hidden_size // heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2
    return dict(vocab_size=QWEN2_VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
                bos_token_id=151643, eos_token_id=151645)


class Qwen2VL(Family):
    name = "qwen2_vl"
    hf_class_name = "Qwen2VLForConditionalGeneration"
    lora_targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    windowed = False

    def vision_dims(self, config, spec: PreprocessSpec) -> dict:
        v = config.vision_config
        return dict(depth=v.depth, hidden_size=v.embed_dim, num_heads=v.num_heads,
                    intermediate_size=int(v.embed_dim * v.mlp_ratio), out_hidden_size=v.hidden_size,
                    patch_dim=spec.patch_dim, merge_size=spec.merge_size, norm="layer", mlp="quick_gelu",
                    full_blocks=list(range(v.depth)), windowed=False,
                    rope_theta=float((getattr(v, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))

    def vision_sources(self, vision: dict) -> dict[str, Source]:
        v = "visual"
        out = {"patch_embed.weight": Source((f"{v}.patch_embed.proj.weight",),
                                            lambda w: w.reshape(w.shape[0], -1).T.copy()),
               "merger.norm.weight": same(f"{v}.merger.ln_q.weight"), "merger.norm.bias": same(f"{v}.merger.ln_q.bias"),
               "merger.fc1.weight": transposed(f"{v}.merger.mlp.0.weight"), "merger.fc1.bias": same(f"{v}.merger.mlp.0.bias"),
               "merger.fc2.weight": transposed(f"{v}.merger.mlp.2.weight"), "merger.fc2.bias": same(f"{v}.merger.mlp.2.bias")}
        for i in range(vision["depth"]):
            b = f"{v}.blocks.{i}"
            out.update({
                f"blocks.{i}.norm1.weight": same(f"{b}.norm1.weight"), f"blocks.{i}.norm1.bias": same(f"{b}.norm1.bias"),
                f"blocks.{i}.norm2.weight": same(f"{b}.norm2.weight"), f"blocks.{i}.norm2.bias": same(f"{b}.norm2.bias"),
                f"blocks.{i}.qkv.weight": transposed(f"{b}.attn.qkv.weight"), f"blocks.{i}.qkv.bias": same(f"{b}.attn.qkv.bias"),
                f"blocks.{i}.proj.weight": transposed(f"{b}.attn.proj.weight"), f"blocks.{i}.proj.bias": same(f"{b}.attn.proj.bias"),
                f"blocks.{i}.fc1.weight": transposed(f"{b}.mlp.fc1.weight"), f"blocks.{i}.fc1.bias": same(f"{b}.mlp.fc1.bias"),
                f"blocks.{i}.fc2.weight": transposed(f"{b}.mlp.fc2.weight"), f"blocks.{i}.fc2.bias": same(f"{b}.mlp.fc2.bias"),
            })
        return out

    def tiny_config(self, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vision_hidden: int = 32,
                    vision_depth: int = 2, vision_heads: int = 2, tie_word_embeddings: bool = False,
                    intermediate_size: int | None = None, **_):
        from transformers import Qwen2VLConfig

        vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden_size, num_heads=vision_heads,
                      mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=tiny_text_config(hidden_size, layers, heads, kv_heads, intermediate_size),
                             vision_config=vision, tie_word_embeddings=tie_word_embeddings)
