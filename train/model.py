"""The model side of training: load a GMR checkpoint, make it trainable (LoRA through peft, or
full fine-tuning; vision tower frozen unless asked), score documents as (z_yes, z_no) at the
last position, and write the result back as a GMR checkpoint that ``python -m export`` takes."""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from gmr_fast.errors import GmrError
from gmr_fast.gmr_config import GmrConfig

# what a checkpoint carries besides the weights (a base model's own training outputs are not copied)
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", "chat_template.json", "chat_template.jinja", "video_preprocessor_config.json")


def load_model(checkpoint: str, attn_implementation: str = "sdpa"):
    """The HF model of the checkpoint's family, in fp32 (master weights)."""
    from export.reference import load_model as load_reference_model

    return load_reference_model(checkpoint, torch.float32, attn_implementation)


def lora_targets(model) -> str:
    """The family's LoRA target modules: the language model's attention and MLP projections (not
    the vision tower's, which also has gate/up/down projections in Qwen2.5-VL)."""
    from gmr_fast.families import get_family

    return get_family(model.config.model_type).lora_targets


def make_trainable(model, *, full: bool, lora_r: int, lora_alpha: int | None, train_vision: bool,
                   freeze_embeddings: bool = False, freeze_lm_head: bool = False):
    """Returns (model to train, the underlying HF model). Full: every language-model parameter
    trains, except (``freeze_embeddings``) the vocabulary-sized token embedding and LM head or
    (``freeze_lm_head``) the LM head alone, of which the score uses two rows: with a 152k
    vocabulary they dominate a small model's optimizer step. LoRA: adapters on the family's targets,
    the rest frozen."""
    visual = model.model.visual
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
        if not train_vision:
            for p in visual.parameters():
                p.requires_grad_(False)
        if freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        if freeze_embeddings or freeze_lm_head:
            model.lm_head.weight.requires_grad_(False)
        return model, model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise GmrError("LoRA training needs peft: pip install 'gmr_fast[train]' (or pass --full)") from None
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, lora_dropout=0.0,
                        target_modules=lora_targets(model), bias="none")
    peft_model = get_peft_model(model, config)
    if train_vision:
        for p in visual.parameters():
            p.requires_grad_(True)
    return peft_model, model


class RerankHead(nn.Module):
    """(z_yes, z_no) in fp32 for a batch of prompts: the final-norm hidden state of the last
    position (rows are left-padded) dotted with the yes and no rows of the LM head, which is the
    score the exported engine computes (z_yes - z_no)."""

    def __init__(self, trainable: nn.Module, hf_model, yes_id: int, no_id: int):
        super().__init__()
        self.trainable = trainable  # registered so DDP/FSDP see every trainable parameter
        self.hf_model = hf_model
        self.register_buffer("ids", torch.tensor([yes_id, no_id]), persistent=False)

    def forward(self, align=None, **inputs):
        """(z_yes, z_no) at the last position; with ``align`` (the align objective's inputs) the
        [images, captions] cosine similarities of images and their captions instead."""
        if align is not None:
            return self.align_similarity(**align)
        out = self.hf_model.model(**inputs, use_cache=False)
        h = out.last_hidden_state[:, -1]
        dtype = torch.float64 if h.dtype == torch.float64 else torch.float32  # at least fp32 for the head
        h = h.to(dtype)
        w = self.hf_model.lm_head.weight[self.ids].to(dtype)
        z = h @ w.T
        # unbind gives views; cloned so that FSDP's pre-backward hook cannot be dropped by a later in-place op
        return z[:, 0].clone(), z[:, 1].clone()


    def align_similarity(self, pixel_values, image_grid_thw, caption_ids, caption_mask, merge: int):
        """Cosine similarities between each image's mean output embedding (what the decoder
        receives) and each caption's mean token embedding (held fixed: the vision tower moves
        towards the words, not the reverse)."""
        visual = self.hf_model.model.visual
        embeds = visual(pixel_values, grid_thw=image_grid_thw).pooler_output.float()
        counts = (image_grid_thw.prod(-1) // merge ** 2).tolist()
        images = torch.stack([e.mean(0) for e in embeds.split(counts)])
        with torch.no_grad():
            words = self.hf_model.get_input_embeddings()(caption_ids).float()
            text = (words * caption_mask[..., None]).sum(1) / caption_mask.sum(1, keepdim=True)
        images = torch.nn.functional.normalize(images, dim=-1)
        text = torch.nn.functional.normalize(text, dim=-1)
        return images @ text.T


def save_checkpoint(trainable, hf_model, base: str, out: str, gmr: GmrConfig) -> None:
    """Writes a GMR checkpoint: LoRA merged into the weights, the base's tokenizer and processor
    files, and gmr.json (written last: its presence marks a complete checkpoint)."""
    model = trainable.merge_and_unload() if hasattr(trainable, "merge_and_unload") else hf_model
    model.save_pretrained(out, safe_serialization=True)
    for name in CARRIED_FILES:
        src = os.path.join(base, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
    gmr.save(out)
