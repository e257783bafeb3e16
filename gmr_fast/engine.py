"""An exported engine directory, run with onnxruntime: manifest, prompts, graphs.

`EngineScorer` is the plain, readable scoring path (left-padded batches in input order): the
export validation uses it, and it is the baseline the scheduled runtime is checked against.
Needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from .errors import GmrError
from .gmr_config import GmrConfig
from .positions import rope_positions
from .preprocess import preprocess_images
from .prompt import PromptBuilder, as_item
from .vision_layout import vision_graph_inputs

MANIFEST_FORMAT = 1


class EngineError(GmrError, ValueError):
    """An engine directory is missing, incomplete or of an unknown format."""


def load_manifest(engine_dir: os.PathLike) -> dict:
    path = pathlib.Path(engine_dir) / "manifest.json"
    if not path.exists():
        raise EngineError(f"{engine_dir} is not an engine directory (no manifest.json); create one with `python -m export`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != MANIFEST_FORMAT:
        raise EngineError(f"{path}: format_version {manifest.get('format_version')} is not supported (expected {MANIFEST_FORMAT})")
    return manifest


class EngineScorer:
    def __init__(self, engine_dir: os.PathLike, providers: Sequence[str] | None = None, num_threads: int | None = None):
        from .backends.onnxruntime import OnnxRuntimeBackend

        self.dir = pathlib.Path(engine_dir)
        self.manifest = load_manifest(engine_dir)
        self.gmr = GmrConfig.from_dict(self.manifest["gmr"], f"{self.dir}/manifest.json")
        self.prompts = PromptBuilder(self.dir / "tokenizer.json", self.gmr)
        pre = self.manifest["preprocessing"]
        self.window_size = pre.get("window_size")
        self.merge = pre["merge_size"]
        self.backend = OnnxRuntimeBackend(self.dir, self.manifest, providers, num_threads or 0)
        self.vision, self.decoder = self.backend.vision, self.backend.decoder  # the raw sessions, for inspection
        self.hidden_size = int(self.manifest["model"]["hidden_size"])

    def _encode(self, pairs, instruction):
        prompts, images = [], []
        for i, (q, d) in enumerate(pairs):
            qi, di = as_item(q, f"pair {i} query"), as_item(d, f"pair {i} document")
            pair_images = [x.image for x in (qi, di) if x.has_image]
            batch = preprocess_images(pair_images, min_pixels=self.gmr.min_pixels, max_pixels=self.gmr.max_pixels)
            tokens = [int(np.prod(g)) // self.merge ** 2 for g in batch.image_grid_thw]
            qn = tokens.pop(0) if qi.has_image else 0
            dn = tokens.pop(0) if di.has_image else 0
            prompts.append(self.prompts.encode(instruction, qi, di, qn, dn, where=f"pair {i}"))
            images.append(batch)
        return prompts, images

    def score(self, pairs: Sequence[tuple[Any, Any]], instruction: str | None = None) -> np.ndarray:
        """Scores one batch of pairs (left padded, in input order)."""
        if not pairs:
            return np.zeros(0, np.float32)
        instruction = instruction or self.gmr.default_instruction
        prompts, images = self._encode(pairs, instruction)
        length = max(len(p.ids) for p in prompts)
        b = len(prompts)
        input_ids = np.full((b, length), self.prompts.tokenizer.token_to_id("<|endoftext|>"), np.int64)
        mask = np.zeros((b, length), np.int64)
        positions = np.ones((3, b, length), np.int64)
        for r, (p, im) in enumerate(zip(prompts, images)):
            n = len(p.ids)
            input_ids[r, length - n:] = p.ids
            mask[r, length - n:] = 1
            merged = [(int(h) // self.merge, int(w) // self.merge) for _, h, w in im.image_grid_thw]
            positions[:, r, length - n:] = rope_positions(n, p.image_spans, merged)
        pixel_values = [im.pixel_values for im in images if len(im.pixel_values)]
        if pixel_values:
            grid = np.concatenate([im.image_grid_thw for im in images if len(im.image_grid_thw)])
            feeds = {"pixel_values": np.concatenate(pixel_values), **vision_graph_inputs(grid, self.window_size, self.merge)}
            image_embeds = self.backend.encode_images(feeds)
        else:
            image_embeds = np.zeros((0, self.hidden_size), np.float32)
        return self.backend.score({"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
                                   "image_embeds": image_embeds.astype(np.float32)})
