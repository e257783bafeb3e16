"""gmr_fast.Reranker: score (query, document) pairs with an exported GMR engine.

    reranker = Reranker("engine/")
    reranker.score([("a query", "a document"), ({"text": "q", "image": "cat.jpg"}, "doc")])
    reranker.rank("a query", ["doc one", {"image": "chart.png"}], top_k=5)

A call: sides are normalised (errors name the pair); each distinct image is decoded once
(content hash) and its grid fixes its token count, so every prompt's length is known before
any pixel work; the C++ scheduler sorts pairs by length and packs token-budget batches; while
onnxruntime runs one batch, a worker thread prepares the next (pixels, vision indices, padded
ids and M-RoPE positions built in C++). Scores come back in input order.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from . import _core
from .backends import create_backend
from .engine import load_manifest
from .errors import ImageError
from .gmr_config import GmrConfig
from .images import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from .preprocess import (CLIP_MEAN, CLIP_STD, MERGE_SIZE, PATCH_SIZE, RESCALE_FACTOR, TEMPORAL_PATCH_SIZE,
                         hardware_threads, pillow_vertical_first, smart_resize)
from .prompt import EncodedPrompt, Item, PromptBuilder, PromptError, as_item
from .vision_layout import vision_graph_inputs


@dataclass
class RankResult:
    index: int  # position of the document in the list given to rank()
    score: float
    document: Any = None


class Scores(np.ndarray):
    """float32 scores in input order (an ndarray), with ``errors`` {pair index: exception} for
    pairs that failed under ``on_error="nan"`` and ``truncated`` (bool per pair)."""

    errors: dict
    truncated: np.ndarray


def _content_key(image: Any) -> tuple[tuple, Any]:
    """Identity of an image's content (for decoding and encoding each distinct image once) and
    what to decode: a file is read here once and decoded from those bytes."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                data = f.read()
        except OSError:
            return ("path", os.fspath(image)), image  # decoding reports the error
        h.update(data)
        return ("bytes", h.hexdigest()), data
    if isinstance(image, (bytes, bytearray, memoryview)):
        h.update(image)
        return ("bytes", h.hexdigest()), image
    if isinstance(image, np.ndarray):
        h.update(np.ascontiguousarray(image).data)
        return ("array", image.shape, str(image.dtype), h.hexdigest()), image
    if hasattr(image, "tobytes") and hasattr(image, "mode"):
        h.update(image.tobytes())
        return ("pil", image.mode, image.size, h.hexdigest()), image
    return ("object", id(image)), image


@dataclass
class ScorePlan:
    """Reranker.plan's result: per pair (input order) its prompt or None, its images' content
    keys, and for failed pairs the error; the batches as arrays of pair indices, in run order."""

    size: int
    prompts: list  # [EncodedPrompt | None] per pair
    keys_per_pair: list  # [[content key, ...]] per pair, query image first
    images: dict  # content key -> _Image | ImageError
    errors: dict  # pair index -> ImageError | PromptError
    batches: list  # [int64[rows]]

    @property
    def truncated(self) -> np.ndarray:
        return np.array([bool(p is not None and p.truncated) for p in self.prompts], bool)

    @property
    def real_tokens(self) -> int:
        return int(sum(len(p.ids) for p in self.prompts if p is not None))


@dataclass
class _Image:
    decoded: Any  # DecodedImage
    size: tuple[int, int]  # resized (h, w)

    @property
    def tokens(self) -> int:
        return (self.size[0] // PATCH_SIZE) * (self.size[1] // PATCH_SIZE) // (MERGE_SIZE * MERGE_SIZE)


class Reranker:
    def __init__(self, engine_dir: str | os.PathLike, *, backend: str = "onnxruntime", providers: Sequence[str] | None = None,
                 max_batch_tokens: int = 8192, max_batch_size: int = 32, min_fill: float = 0.8,
                 num_threads: int | None = None,
                 instruction: str | None = None, max_length: int | None = None, image_cache_size: int = 0,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, backend_options: dict | None = None):
        self.engine_dir = os.fspath(engine_dir)
        self.manifest = load_manifest(engine_dir)
        self.gmr = GmrConfig.from_dict(self.manifest["gmr"], f"{engine_dir}/manifest.json")
        if max_length is not None:  # prompts longer than this have their document text truncated
            self.gmr.max_length = int(max_length)
        self.prompts = PromptBuilder(os.path.join(self.engine_dir, "tokenizer.json"), self.gmr)
        self.instruction = instruction or self.gmr.default_instruction
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.min_fill = float(min_fill)  # a pair joins a batch only if >= min_fill x its longest
        self.num_threads = int(num_threads or hardware_threads())
        self.max_image_pixels = max_image_pixels
        pre = self.manifest["preprocessing"]
        self.window_size = pre.get("window_size")
        self.hidden_size = int(self.manifest["model"]["hidden_size"])
        self.pad_id = int(self.manifest["token_ids"]["pad"])
        self.backend = create_backend(backend, self.engine_dir, self.manifest, providers, self.num_threads,
                                      **(backend_options or {}))
        self._cache: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self.image_cache_size = int(image_cache_size)
        self.last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ preparation
    def _decode_images(self, keys: list[tuple], sources: list[tuple[Any, Any]]) -> dict[tuple, _Image | ImageError]:
        """sources[i] = (what the user gave, what to decode)."""
        def one(i: int):
            given, data = sources[i]
            path = os.fspath(given) if isinstance(given, (str, os.PathLike)) else None
            try:
                decoded = decode_image(data, i, self.max_image_pixels, path)
                return _Image(decoded, smart_resize(decoded.height, decoded.width, self.gmr.min_pixels, self.gmr.max_pixels))
            except ImageError as e:
                return e
            except ValueError as e:  # aspect ratio
                return ImageError(i, str(e), path)

        if len(keys) > 1 and self.num_threads > 1:
            with ThreadPoolExecutor(min(self.num_threads, len(keys))) as pool:
                results = list(pool.map(one, range(len(keys))))
        else:
            results = [one(i) for i in range(len(keys))]
        return dict(zip(keys, results))

    def _vision_embeddings(self, keys: list[tuple], images: dict[tuple, _Image]) -> dict[tuple, np.ndarray]:
        """Merged-patch embeddings of the distinct images `keys` (cache first, then one vision run)."""
        out, todo = {}, []
        for key in keys:
            if key in self._cache:
                self._cache.move_to_end(key)
                out[key] = self._cache[key]
            else:
                todo.append(key)
        if todo:
            sizes = np.array([images[k].size for k in todo], np.int64)
            grid = np.ones((len(todo), 3), np.int64)
            grid[:, 1:] = sizes // PATCH_SIZE
            counts = np.prod(grid, axis=1)
            pixels = np.empty((int(counts.sum()), 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE), np.float32)
            _core.preprocess_into([images[k].decoded.pixels for k in todo], sizes, pixels, RESCALE_FACTOR, CLIP_MEAN,
                                  CLIP_STD, PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE, pillow_vertical_first(),
                                  self.num_threads)
            feeds = {"pixel_values": pixels, **vision_graph_inputs(grid, self.window_size, MERGE_SIZE, PATCH_SIZE)}
            embeds = self.backend.encode_images(feeds)
            bounds = np.concatenate([[0], np.cumsum(counts // (MERGE_SIZE * MERGE_SIZE))])
            for i, key in enumerate(todo):
                out[key] = embeds[bounds[i]:bounds[i + 1]]
                if self.image_cache_size > 0:
                    self._cache[key] = out[key]
                    while len(self._cache) > self.image_cache_size:
                        self._cache.popitem(last=False)
        return out

    def _prepare(self, rows: np.ndarray, prompts: list[EncodedPrompt], pair_images: list[list[tuple]],
                 images: dict[tuple, _Image]) -> dict[str, np.ndarray]:
        width = max(len(prompts[r].ids) for r in rows)
        batch = len(rows)
        input_ids = np.empty((batch, width), np.int64)
        mask = np.empty((batch, width), np.int64)
        positions = np.empty((3, batch, width), np.int64)
        spans = []
        for r in rows:
            s = [(a, b, images[k].size[0] // PATCH_SIZE // MERGE_SIZE, images[k].size[1] // PATCH_SIZE // MERGE_SIZE)
                 for (a, b), k in zip(prompts[r].image_spans, pair_images[r])]
            spans.append(np.array(s, np.int64).reshape(-1, 4))
        _core.build_batch([prompts[r].ids for r in rows], spans, width, self.pad_id, input_ids, mask, positions)
        keys = list(dict.fromkeys(k for r in rows for k in pair_images[r]))  # distinct, first-use order
        embeds = self._vision_embeddings(keys, images) if keys else {}
        ordered = [embeds[k] for r in rows for k in pair_images[r]]
        image_embeds = np.concatenate(ordered) if ordered else np.zeros((0, self.hidden_size), np.float32)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
                "image_embeds": image_embeds.astype(np.float32, copy=False)}

    # ------------------------------------------------------------------ public API
    def plan(self, pairs: Sequence[tuple[Any, Any]], *, instruction: str | Sequence[str] | None = None,
             batch_size: int | None = None, labels: Sequence[str] | None = None) -> ScorePlan:
        """Everything about scoring ``pairs`` that is known before any pixel work: prompts (each
        distinct image decoded once to learn its grid), per-pair failures, and the batches the
        scheduler packs. Deterministic: the same pairs and settings give the same batches, which is
        what lets a batch job recompute exactly the batch it lost (``run(plan, skip=...)``).
        ``instruction`` is one string for all pairs or one per pair; ``labels`` name the pairs in
        error messages (default ``"pair <index>"``)."""
        pairs = list(pairs)
        if instruction is None or isinstance(instruction, str):
            instructions = [instruction or self.instruction] * len(pairs)
        else:
            instructions = [x or self.instruction for x in instruction]
            if len(instructions) != len(pairs):
                raise ValueError(f"got {len(instructions)} instructions for {len(pairs)} pairs")
        if labels is None:
            labels = [f"pair {i}" for i in range(len(pairs))]
        items: list[tuple[Item, Item]] = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise PromptError(f"pair {i}: expected a (query, document) pair, got {type(pair).__name__}")
            items.append((as_item(pair[0], f"pair {i} query"), as_item(pair[1], f"pair {i} document")))

        keys_per_pair, sources = [], {}
        for q, d in items:
            keys = []
            for side in (q, d):
                if side.has_image:
                    key, data = _content_key(side.image)
                    sources.setdefault(key, (side.image, data))
                    keys.append(key)
            keys_per_pair.append(keys)
        images = self._decode_images(list(sources), list(sources.values()))

        errors: dict[int, Exception] = {}
        prompts: list[EncodedPrompt | None] = []
        for i, ((q, d), keys) in enumerate(zip(items, keys_per_pair)):
            sides = (["query"] if q.has_image else []) + (["document"] if d.has_image else [])
            bad = next(((side, images[k]) for side, k in zip(sides, keys) if isinstance(images[k], ImageError)), None)
            try:
                if bad is not None:
                    raise ImageError(i, bad[1].cause, bad[1].source, label=f"{labels[i]} {bad[0]} image")
                tokens = iter(images[k].tokens for k in keys)
                qn = next(tokens) if q.has_image else 0
                dn = next(tokens) if d.has_image else 0
                prompts.append(self.prompts.encode(instructions[i], q, d, qn, dn, where=labels[i]))
            except (ImageError, PromptError) as e:
                errors[i] = e
                prompts.append(None)

        good = np.array([i for i, p in enumerate(prompts) if p is not None], np.int64)
        lengths = np.array([len(prompts[i].ids) for i in good], np.int64)
        batches = [good[b] for b in _core.schedule_batches(lengths, self.max_batch_tokens, int(batch_size or self.max_batch_size),
                                                            self.min_fill)] if len(good) else []
        return ScorePlan(len(pairs), prompts, keys_per_pair, images, errors, batches)

    def run(self, plan: ScorePlan, *, skip: Callable[[np.ndarray], bool] | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Scores ``plan``'s batches in order, yielding ``(rows, scores, padded_tokens)`` per batch
        (rows index the planned pairs). A batch for which ``skip(rows)`` is true is not computed.
        While the backend runs one batch, a worker thread prepares the next."""
        todo = [rows for rows in plan.batches if skip is None or not skip(rows)]
        with ThreadPoolExecutor(max_workers=1) as worker:
            pending = worker.submit(self._prepare, todo[0], plan.prompts, plan.keys_per_pair, plan.images) if todo else None
            for b, rows in enumerate(todo):
                feeds = pending.result()
                if b + 1 < len(todo):  # prepare the next batch while this one runs
                    pending = worker.submit(self._prepare, todo[b + 1], plan.prompts, plan.keys_per_pair, plan.images)
                yield rows, np.asarray(self.backend.score(feeds), np.float32), int(feeds["input_ids"].size)

    def score(self, pairs: Sequence[tuple[Any, Any]], *, instruction: str | Sequence[str] | None = None,
              normalize: bool = False, batch_size: int | None = None, show_progress_bar: bool | None = None,
              on_error: Literal["raise", "nan"] = "raise") -> Scores:
        """Relevance of each (query, document) pair, in input order: logit(yes) - logit(no), or
        with ``normalize=True`` its sigmoid, P(yes). ``on_error="nan"`` scores a pair whose image
        or length fails as NaN and records the error in ``result.errors``."""
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
        start_time = time.perf_counter()
        plan = self.plan(pairs, instruction=instruction, batch_size=batch_size)
        if plan.errors and on_error == "raise":
            raise plan.errors[min(plan.errors)]
        result = np.full(plan.size, np.nan, np.float32)
        scored = sum(len(rows) for rows in plan.batches)
        progress = sys.stderr.isatty() if show_progress_bar is None else show_progress_bar
        done, padded = 0, 0
        for rows, scores, padded_tokens in self.run(plan):
            result[rows] = scores
            done += len(rows)
            padded += padded_tokens
            if progress:
                rate = done / max(time.perf_counter() - start_time, 1e-9)
                print(f"\rgmr_fast: {done}/{scored} pairs, {rate:.1f} pairs/s", end="", file=sys.stderr)
        if progress and plan.batches:
            print(file=sys.stderr)
        real = plan.real_tokens
        self.last_stats = {"pairs": plan.size, "scored": scored, "failed": len(plan.errors), "batches": len(plan.batches),
                           "real_tokens": real, "padded_tokens": int(padded),
                           "padding_efficiency": real / padded if padded else 1.0,
                           "seconds": time.perf_counter() - start_time}
        if normalize:
            with np.errstate(over="ignore"):
                result = (1.0 / (1.0 + np.exp(-result.astype(np.float64)))).astype(np.float32)
        out = result.view(Scores)
        out.errors = plan.errors
        out.truncated = plan.truncated
        return out

    def rank(self, query: Any, documents: Sequence[Any], *, instruction: str | None = None, top_k: int | None = None,
             return_documents: bool = False) -> list[RankResult]:
        """Documents sorted by score, best first (ties keep input order)."""
        documents = list(documents)
        if not documents:
            return []
        scores = self.score([(query, d) for d in documents], instruction=instruction)
        order = sorted(range(len(documents)), key=lambda i: (-scores[i] if not math.isnan(scores[i]) else math.inf, i))
        if top_k is not None:
            order = order[:max(0, int(top_k))]
        return [RankResult(i, float(scores[i]), documents[i] if return_documents else None) for i in order]
