"""The torch reference scorer: HuggingFace transformers' full forward pass in fp32.

This is the oracle every fast path is checked against. It deliberately shares nothing with the
runtime's prompt or image code beyond the checkpoint's own data (gmr.json's template): prompts
are expanded the way HuggingFace's Qwen2-VL processor does it (each image pad replaced by its
visual-token count in the text), tokenised with the checkpoint's HF tokenizer, images go
through HF's PIL image processor, and batches are left-padded by the tokenizer.
score = logit(yes) - logit(no) at the last position.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from gmr_fast.gmr_config import GmrConfig

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class CheckpointError(ValueError):
    """A checkpoint directory is missing something or is not a supported GMR checkpoint."""


def read_model_type(checkpoint: os.PathLike) -> str:
    path = pathlib.Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path} has no config.json: not a HuggingFace checkpoint")
    model_type = json.loads(cfg.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{cfg}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    return model_type


def load_model(checkpoint: os.PathLike, dtype=None, attn_implementation: str = "eager"):
    """The HF model from a local directory only (safetensors, no remote code)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    model_type = read_model_type(checkpoint)
    if not any(p.suffix == ".safetensors" for p in pathlib.Path(checkpoint).iterdir()):
        raise CheckpointError(f"{checkpoint} has no *.safetensors weights")
    cls = Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls.from_pretrained(checkpoint, dtype=dtype or torch.float32, attn_implementation=attn_implementation,
                                local_files_only=True, trust_remote_code=False, use_safetensors=True)
    return model.eval()


def _side(value: Any) -> tuple[str, Any]:
    if isinstance(value, str):
        return value, None
    return value.get("text") or "", value.get("image")


def load_pil(image):
    """A PIL image from a path, bytes, uint8 array or PIL image (as HF's processor takes it)."""
    import io

    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            return im.copy()
    if isinstance(image, bytes):
        im = Image.open(io.BytesIO(image))
        im.load()
        return im
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return image


def processor_prompt(gmr: GmrConfig, image_processor, instruction: str, query: Any, document: Any) -> tuple[str, list]:
    """The prompt text the HF processor would tokenise (each image's pad repeated once per
    merged patch) and the pair's images in order."""
    images, sides = [], []
    for value in (query, document):
        text, image = _side(value)
        if image is not None:
            pil = load_pil(image)
            grid = image_processor(images=[pil], return_tensors="np")["image_grid_thw"][0]
            images.append(pil)
            text = "<|vision_start|>" + "<|image_pad|>" * (int(np.prod(grid)) // 4) + "<|vision_end|>" + text
        sides.append(text)
    prompt = (gmr.prompt_template.replace("{system}", gmr.system_prompt).replace("{instruction}", instruction)
              .replace("{query}", sides[0]).replace("{document}", sides[1]))
    return prompt, images


class ReferenceScorer:
    """Scores (query, document) pairs with the HF model in fp32 on CPU (or `device`)."""

    def __init__(self, checkpoint: os.PathLike, device: str = "cpu", attn_implementation: str = "eager"):
        import torch
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.checkpoint = pathlib.Path(checkpoint)
        self.gmr = GmrConfig.load(checkpoint)
        self.model = load_model(checkpoint, torch.float32, attn_implementation).to(device)
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        self.tokenizer.padding_side = "left"
        self.image_processor = Qwen2VLImageProcessorPil(min_pixels=self.gmr.min_pixels, max_pixels=self.gmr.max_pixels)
        self.yes_id = self.tokenizer.convert_tokens_to_ids(self.gmr.yes_token)
        self.no_id = self.tokenizer.convert_tokens_to_ids(self.gmr.no_token)
        self.image_token_id = self.model.config.image_token_id

    def prompt_text(self, instruction: str, query: Any, document: Any) -> tuple[str, list]:
        return processor_prompt(self.gmr, self.image_processor, instruction, query, document)

    def encode(self, pairs: Sequence[tuple[Any, Any]], instruction: str | None = None) -> dict:
        """Model inputs for a batch, as HF's processor would build them (left padding)."""
        import torch

        instruction = instruction or self.gmr.default_instruction
        texts, images = [], []
        for query, document in pairs:
            text, imgs = self.prompt_text(instruction, query, document)
            texts.append(text)
            images.extend(imgs)
        batch = dict(self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False))
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).to(torch.int32)
        if images:
            vis = self.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = vis["pixel_values"]
            batch["image_grid_thw"] = vis["image_grid_thw"]
        return {k: v.to(self.device) for k, v in batch.items()}

    def score(self, pairs: Sequence[tuple[Any, Any]], instruction: str | None = None, batch_size: int = 8) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(pairs), batch_size):
            batch = self.encode(pairs[start:start + batch_size], instruction)
            with torch.no_grad():
                logits = self.model(**batch).logits[:, -1, :].float()
            out.append((logits[:, self.yes_id] - logits[:, self.no_id]).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
