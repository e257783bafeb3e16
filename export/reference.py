"""The torch reference scorer: HuggingFace transformers in fp32, the oracle of every fast path.

It shares nothing with the runtime's prompt or image code beyond the checkpoint's own data
(gmr.json's template): prompts are expanded the way HuggingFace's Qwen2-VL processor does it
(each image pad repeated once per merged patch), tokenised with the checkpoint's HF tokenizer,
images go through HF's PIL image processor, and batches are left-padded by the tokenizer.
score = logit(yes) - logit(no) at the last position.

``ReferenceScorer(mode="hf")`` runs the HF model (``logits_to_keep=1``). A model whose fp32
weights do not fit in memory (GMR-7B is 33 GB on a 24 GB machine) is scored with
``mode="streamed"``: HF's own vision tower (small), HF's own ``get_rope_index`` and the same
HF-made inputs, with the language model run in fp32 one layer at a time through the engine's
graph module (whose parity with HF's decoder is tested at real width), weights read from the
checkpoint per layer. Memory stays at one layer plus the embedding table.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from gmr_fast.errors import CheckpointError
from gmr_fast.families import FAMILIES, Family, get_family
from gmr_fast.gmr_config import GmrConfig
from gmr_fast.memory import available_memory

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def read_model_type(checkpoint: os.PathLike) -> str:
    path = pathlib.Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path} has no config.json: not a HuggingFace checkpoint")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{cfg}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    return model_type


def family_of(checkpoint: os.PathLike) -> Family:
    return get_family(read_model_type(checkpoint))


def load_model(checkpoint: os.PathLike, dtype=None, attn_implementation: str = "eager"):
    """The HF model from a local directory only (safetensors, no remote code)."""
    if not any(p.suffix == ".safetensors" for p in pathlib.Path(checkpoint).iterdir()):
        raise CheckpointError(f"{checkpoint} has no *.safetensors weights")
    return family_of(checkpoint).load_hf_model(checkpoint, dtype, attn_implementation)


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
    merge = getattr(image_processor, "merge_size", 2)
    for value in (query, document):
        text, image = _side(value)
        if image is not None:
            pil = load_pil(image)
            grid = image_processor(images=[pil], return_tensors="np")["image_grid_thw"][0]
            images.append(pil)
            text = "<|vision_start|>" + "<|image_pad|>" * (int(np.prod(grid)) // merge ** 2) + "<|vision_end|>" + text
        sides.append(text)
    prompt = gmr.fill(instruction=instruction, query=sides[0], document=sides[1])
    return prompt, images


def fp32_bytes(checkpoint: os.PathLike) -> int:
    """Bytes of the checkpoint's weights in fp32."""
    from .checkpoint import DTYPES, CheckpointReader

    reader = CheckpointReader(checkpoint)
    return sum(t.nbytes // DTYPES[t.dtype][1] * 4 for t in reader.tensors.values())


def fp32_memory(checkpoint: os.PathLike) -> tuple[int, int]:
    """(bytes the checkpoint's fp32 weights need with 3 GB for a run's activations, bytes available
    now). The one rule for what fits in fp32: where need < have the export's reference loads the HF
    model whole, else it streams the decoder, and a bf16-stored checkpoint's fp32 variant runs over
    bf16 files (``engine_export.fp32_over_bf16``)."""
    return fp32_bytes(checkpoint) + (3 << 30), available_memory()


class ReferenceScorer:
    """Scores (query, document) pairs in fp32 on CPU (or ``device``); see the module docstring.
    ``dtype="bf16"`` (HF mode only) loads the model as bf16: the HF bf16 baseline of the benchmarks."""

    def __init__(self, checkpoint: os.PathLike, device: str = "cpu", attn_implementation: str = "eager",
                 mode: str = "hf", gmr: GmrConfig | None = None, dtype: str = "fp32"):
        import torch
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if mode not in ("hf", "streamed"):
            raise ValueError(f"mode must be 'hf' or 'streamed', got {mode!r}")
        self.checkpoint = pathlib.Path(checkpoint)
        self.family = family_of(checkpoint)
        self.gmr = gmr or GmrConfig.load(checkpoint)
        self.mode, self.device = mode, device
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        self.tokenizer.padding_side = "left"
        pre = json.loads((self.checkpoint / "preprocessor_config.json").read_text())
        kwargs = {k: pre[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
                  if k in pre}
        self.image_processor = Qwen2VLImageProcessorPil(min_pixels=self.gmr.min_pixels, max_pixels=self.gmr.max_pixels,
                                                        **kwargs)
        self.yes_id = self.tokenizer.convert_tokens_to_ids(self.gmr.yes_token)
        self.no_id = self.tokenizer.convert_tokens_to_ids(self.gmr.no_token)
        if dtype not in ("fp32", "bf16") or (dtype != "fp32" and mode != "hf"):
            raise ValueError(f"dtype must be 'fp32' (or 'bf16' with mode 'hf'), got {dtype!r}")
        if mode == "hf":  # bf16 (the HF bf16 baseline) loads as bf16: GMR-7B in fp32 would not fit in 24 GB
            torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
            self.model = load_model(checkpoint, torch_dtype, attn_implementation).to(device)
            self.image_token_id = self.model.config.image_token_id
        else:
            self.model = None
            self._streamed = _StreamedModel(checkpoint, self.family, self.yes_id, self.no_id)
            self.image_token_id = self._streamed.config.image_token_id

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

        batches = [self.encode(pairs[start:start + batch_size], instruction) for start in range(0, len(pairs), batch_size)]
        if self.model is None:  # every batch through each layer, each layer's weights read once
            with torch.no_grad():
                out = self._streamed.score(batches)
            return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
        out = []
        for batch in batches:
            with torch.no_grad():
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
            out.append((logits[:, self.yes_id] - logits[:, self.no_id]).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class _StreamedModel:
    """See the module docstring: HF vision tower and positions, decoder layer by layer."""

    def __init__(self, checkpoint, family: Family, yes_id: int, no_id: int):
        import torch

        from .checkpoint import CheckpointReader

        self.reader = CheckpointReader(checkpoint)
        self.family = family
        self.config = family.hf_config(checkpoint)
        self.dims = family.decoder_dims(self.config)
        with torch.device("meta"):
            shell = family.hf_class()(self.config)
        self.rope_model = shell.model  # get_rope_index needs the config only
        visual = shell.model.visual
        visual.to_empty(device="cpu")
        state = {k[len("visual."):]: torch.from_numpy(self.reader.get(k)) for k in self.reader.keys()
                 if k.startswith("visual.")}
        missing, unexpected = visual.load_state_dict(state, strict=False)
        buffers = {n for n, _ in visual.named_buffers()}
        if [m for m in missing if m not in buffers] or unexpected:
            raise CheckpointError(f"vision weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for module in visual.modules():  # non-persistent buffers (rotary frequencies) are recomputed
            if hasattr(module, "inv_freq") and hasattr(module, "compute_axial_rope_parameters"):
                module.inv_freq, _ = module.compute_axial_rope_parameters(module.config)
        self.visual = visual.float().eval()
        self.sources = family.decoder_sources(self.dims, yes_id, no_id, "lm_head.weight" in self.reader)
        self.layer_hook = None  # called with (index, DecoderLayer) once its weights are in (export/calibrate.py)

    def _tensor(self, name):
        import torch

        return torch.from_numpy(self.reader.resolve(self.sources[name]))

    def score(self, batches: list[dict]) -> list[np.ndarray]:
        import torch

        from gmr_fast.graphs.decoder import DecoderLayer, ScoreDecoder

        d = self.dims
        with torch.device("meta"):
            shell = ScoreDecoder(d)
        shell.embed = torch.nn.Parameter(self._tensor("embed"), requires_grad=False)
        for name, value in shell.constant_buffers().items():
            setattr(shell, name, value)
        states = []  # per batch: hidden states and what every layer needs
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            image_embeds = torch.zeros(0, d.hidden_size)
            if "pixel_values" in batch:
                image_embeds = self.visual(batch["pixel_values"].float(), grid_thw=batch["image_grid_thw"]).pooler_output
            if "image_grid_thw" in batch:  # as HF's forward: M-RoPE indices when there are images, else plain arange
                position_ids, _ = self.rope_model.get_rope_index(ids, batch["mm_token_type_ids"],
                                                                 image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
            else:
                position_ids = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
            x = shell.embed_tokens(ids, image_embeds)
            cos, sin = shell.rotary(position_ids, x.dtype)
            b, s = ids.shape
            pos = torch.arange(s)
            real = mask > 0
            visible = ((pos[None, :] <= pos[:, None])[None] & real[:, None, :]) | torch.eye(s, dtype=torch.bool)[None]
            visible = torch.cat([torch.zeros(b, s, 1, dtype=torch.bool), visible], -1).unsqueeze(1)
            last = (mask.to(torch.int64) * pos[None, :]).argmax(-1)
            empty = torch.zeros(b, d.num_kv_heads, 1, d.head_dim)
            states.append([x, cos, sin, visible, last, empty])
        shell.embed = None  # the table is the largest tensor; free it before the layers
        for i in range(d.num_layers):
            with torch.device("meta"):
                layer = DecoderLayer(d)
            layer.to_empty(device="cpu")
            for name, p in layer.named_parameters():
                p.data = self._tensor(f"layers.{i}.{name}")
            if self.layer_hook is not None:
                self.layer_hook(i, layer)
            final = i == d.num_layers - 1
            for st in states:
                x, cos, sin, visible, last, empty = st
                st[0], _, _ = layer(x, cos, sin, empty, empty, visible, last if final else None)
            del layer
        shell.norm.weight = torch.nn.Parameter(self._tensor("norm.weight"), requires_grad=False)
        score_row = self._tensor("score_row")
        return [(shell.norm(st[0][:, 0]).float() @ score_row).numpy() for st in states]
