"""Tiny random-weight GMR checkpoints for tests and demos, built from configs in seconds.

They have the real Qwen2 tokenizer (rebuilt from qwen.tiktoken) and the real vocabulary size
151936, so prompts, token ids and the yes/no head are exactly those of GMR; only the widths and
depths are small. Qwen2.5-VL checkpoints have window attention with one full-attention block.
Written to a cache directory (never committed).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from gmr_fast.gmr_config import GmrConfig

from . import qwen_tokenizer

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GMR_FAST_CACHE", pathlib.Path.home() / ".cache" / "gmr_fast"))


def tokenizer_json(cache_dir: os.PathLike | None = None) -> str:
    """The converted Qwen2 tokenizer.json text, cached (conversion takes a few seconds)."""
    path = pathlib.Path(cache_dir or default_cache_dir()) / "qwen2_tokenizer.json"
    if path.exists():
        return path.read_text(encoding="utf-8")
    text = qwen_tokenizer.build_tokenizer_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text


def tiny_config(family: str, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                vision_hidden: int = 32, vision_depth: int = 2, vision_heads: int = 2,
                fullatt_block_indexes: list[int] | None = None, tie_word_embeddings: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    head_dim = hidden_size // heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2
    text = dict(
        vocab_size=qwen_tokenizer.MODEL_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        bos_token_id=151643, eos_token_id=151645,
    )
    if family == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=vision_heads, out_hidden_size=hidden_size, window_size=112,
                      fullatt_block_indexes=fullatt_block_indexes or [vision_depth - 1], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings)
    if family == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden_size, num_heads=vision_heads,
                      mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_checkpoint(out_dir: os.PathLike, family: str = "qwen2_5_vl", seed: int = 0,
                     gmr: GmrConfig | None = None, cache_dir: os.PathLike | None = None, init_std: float | None = 0.08,
                     **config_kwargs) -> pathlib.Path:
    """Writes a random-weight GMR checkpoint (safetensors, tokenizer, preprocessor_config.json,
    gmr.json) to out_dir and returns it. ``init_std`` widens the matrices' random init so that
    untrained scores spread like a real model's (what parity tests want); ``None`` keeps
    transformers' own initialisation (what training from scratch wants)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    out = pathlib.Path(out_dir)
    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model_cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = model_cls(config).eval()
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, init_std)
    gmr = gmr or GmrConfig()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    qwen_tokenizer.save_hf_tokenizer(out, tokenizer_json(cache_dir))
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": gmr.min_pixels, "max_pixels": gmr.max_pixels,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_rescale": True, "do_normalize": True, "do_resize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "resample": 3,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    gmr.save(out)
    return out


def cached_checkpoint(family: str = "qwen2_5_vl", seed: int = 0, cache_dir: os.PathLike | None = None) -> pathlib.Path:
    """A tiny checkpoint in the cache directory, built on first use."""
    root = pathlib.Path(cache_dir or default_cache_dir())
    path = root / f"tiny-{family}-seed{seed}"
    if (path / "gmr.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        build_checkpoint(tmp, family, seed, cache_dir=root)
        try:
            os.replace(tmp, path)
        except OSError:  # built concurrently by someone else
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m export.factory",
                                     description="Write a tiny random-weight GMR checkpoint (real Qwen2 tokenizer).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_checkpoint(args.out, args.family, args.seed))


if __name__ == "__main__":
    main()
