"""Model inputs for training, built by the runtime's own code: prompts by gmr_fast's
PromptBuilder (the engine's renderer and tokenizer) and pixels by gmr_fast's C++ preprocessing,
so what the model trains on is what the engine will be fed (train/serve parity by construction).
Rows are left-padded, as the runtime pads."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import torch

from gmr_fast.errors import ImageError
from gmr_fast.families import get_family
from gmr_fast.gmr_config import GmrConfig
from gmr_fast.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from gmr_fast.preprocess import hardware_threads, patchify, smart_resize
from gmr_fast.prompt import Item, PromptBuilder


class FeatureBuilder:
    def __init__(self, checkpoint: str, gmr: GmrConfig, pad_id: int | None = None, image_cache_size: int = 4096):
        self.gmr = gmr
        self.prompts = PromptBuilder(os.path.join(checkpoint, "tokenizer.json"), gmr)
        # padding is masked; the runtime pads with <|endoftext|> too
        self.pad_id = int(pad_id if pad_id is not None else self.prompts.tokenizer.token_to_id("<|endoftext|>"))
        with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        with open(os.path.join(checkpoint, "preprocessor_config.json"), encoding="utf-8") as f:
            preprocessor = json.load(f)
        # the same spec the exported engine's manifest will carry
        self.spec = get_family(config["model_type"]).preprocess_spec(preprocessor, config.get("vision_config", {}), gmr)
        self._cache: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self.cache_size = image_cache_size

    def _images(self, paths: list[str], where: dict[str, str]) -> None:
        todo = [p for p in dict.fromkeys(paths) if p not in self._cache]
        if todo:
            spec = self.spec
            decoded, sizes = [], []
            for i, path in enumerate(todo):
                try:
                    image = decode_image(path, i, DEFAULT_MAX_IMAGE_PIXELS)
                    size = smart_resize(image.height, image.width, spec.min_pixels, spec.max_pixels, factor=spec.factor)
                except ImageError as e:
                    raise ImageError(e.index, e.cause, e.source, label=f"{where[path]} image") from None
                except ValueError as e:  # aspect ratio
                    raise ImageError(i, str(e), path, label=f"{where[path]} image") from None
                decoded.append(image)
                sizes.append(size)
            pixels, grid = patchify(decoded, np.array(sizes, np.int64), spec, hardware_threads())
            bounds = np.concatenate([[0], np.cumsum(np.prod(grid, axis=1))])
            for k, p in enumerate(todo):
                self._cache[p] = (pixels[bounds[k]:bounds[k + 1]], grid[k])
        for p in paths:
            self._cache.move_to_end(p)
        while len(self._cache) > max(self.cache_size, len(paths)):
            self._cache.popitem(last=False)

    def decode(self, paths: list[str], where: str) -> None:
        """Decodes the images not cached yet (and caches them); ImageError names ``where``."""
        self._images(paths, {p: where for p in paths})

    def pixels(self, paths: list[str], where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches and grids of images (paths), in order, through the same cache and spec."""
        self.decode(paths, where)
        return (torch.from_numpy(np.concatenate([self._cache[p][0] for p in paths])),
                torch.from_numpy(np.stack([self._cache[p][1] for p in paths]).astype(np.int64)))

    def build(self, rows: list[tuple[str, Item, Item]], labels: list[str]) -> dict[str, torch.Tensor]:
        """rows: (instruction, query, document); labels name each row's group in errors."""
        paths, where = [], {}
        for (_, q, d), label in zip(rows, labels):
            for side in (q, d):
                if side.has_image:
                    paths.append(side.image)
                    where.setdefault(side.image, label)
        self._images(paths, where)
        encoded, pixels, grids = [], [], []
        for (instruction, q, d), label in zip(rows, labels):
            tokens = []
            for side in (q, d):
                if side.has_image:
                    px, grid = self._cache[side.image]
                    pixels.append(px)
                    grids.append(grid)
                    tokens.append(int(grid[1] * grid[2]) // self.spec.merge_size ** 2)
            it = iter(tokens)
            qn = next(it) if q.has_image else 0
            dn = next(it) if d.has_image else 0
            encoded.append(self.prompts.encode(instruction, q, d, qn, dn, where=label).ids)
        width = max(len(e) for e in encoded)
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for r, e in enumerate(encoded):
            ids[r, width - len(e):] = e
            mask[r, width - len(e):] = 1
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
               "mm_token_type_ids": torch.from_numpy((ids == self.prompts.image_pad_id).astype(np.int32))}
        if pixels:
            out["pixel_values"] = torch.from_numpy(np.concatenate(pixels))
            out["image_grid_thw"] = torch.from_numpy(np.stack(grids).astype(np.int64))
        return out
