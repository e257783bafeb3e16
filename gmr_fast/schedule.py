"""Scheduling: token sequences -> typed, padded batches, in a deterministic order of steps.

A pair is scored either as a whole prompt, or as a *suffix* (its document and the closing turn)
that continues a *prefix* (system prompt, instruction and query, image included) shared with
the other documents of its query. The plan is a list of steps:

- ``prefix``: run some prefixes and keep their keys/values;
- ``suffix``: score pairs against the keys/values of their prefixes (several prefixes may share
  a batch);
- ``whole``: score whole prompts.

Prefixes are taken in waves whose keys/values fit ``max_kv_bytes``; a wave's prefix steps come
first, then its suffix steps, then its keys/values are released. Within a kind, rows are sorted
by length and packed by the native scheduler under a token budget, a batch-size cap, length
buckets (``min_fill``) and an activation-memory estimate that counts attention scores, not only
tokens. Pairs marked ``exact`` (and the prefixes they continue) never share a batch with the
others: their batches run in fp32 where the rest run bf16 (Reranker ``image_precision``).
Everything here depends only on lengths, so the same inputs always give the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _core


@dataclass(frozen=True)
class Limits:
    """What one batch may cost (the native scheduler's BatchLimits)."""

    max_batch_tokens: int  # rows x padded length
    max_batch_size: int
    min_fill: float  # every row >= min_fill x the batch's longest
    bytes_per_token: float = 0.0  # activation bytes per padded token
    bytes_per_score: float = 0.0  # activation bytes per (query token, key token) of attention
    max_batch_bytes: float = 0.0  # 0: no memory limit

    def pack(self, lengths: np.ndarray, context: np.ndarray | None = None) -> list[np.ndarray]:
        """Batches of positions into ``lengths`` (longest first)."""
        lengths = np.asarray(lengths, np.int64)
        if not len(lengths):
            return []
        ctx = np.zeros(0, np.int64) if context is None else np.asarray(context, np.int64)
        return list(_core.schedule_batches(lengths, ctx, self.max_batch_tokens, self.max_batch_size, self.min_fill,
                                           self.bytes_per_token, self.bytes_per_score, self.max_batch_bytes))

    def bytes(self, rows: int, width: int, context: int = 0) -> float:
        return float(_core.batch_bytes(rows, width, context, self.bytes_per_token, self.bytes_per_score))


@dataclass
class Sequence:
    """Token ids the decoder runs (a whole prompt, a prefix or a suffix) and its images."""

    ids: np.ndarray  # int64 [L], image pads expanded
    spans: np.ndarray  # int64 [n_images, 4]: start, end, merged grid h, merged grid w
    image_keys: list  # content key of each image, in span order

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Step:
    kind: str  # "prefix" | "suffix" | "whole"
    rows: np.ndarray  # int64: prefix indices (prefix steps) or pair indices (the others)
    wave: int = -1  # prefix wave of prefix / suffix steps
    exact: bool = False  # runs in fp32 beside bf16 steps (Reranker image_precision)
    products: bool = True  # exact: with the route's exact products (False: Reranker ROUTE_PRODUCTS_IMAGE_QUERIES)


@dataclass
class Schedule:
    steps: list[Step]
    releases: dict[int, list[int]] = field(default_factory=dict)  # step index -> prefixes done after it

    def uses(self, step: Step, prefix_of: dict[int, int]) -> set[int]:
        """Prefixes a step needs alive."""
        if step.kind == "prefix":
            return set()
        if step.kind == "suffix":
            return {prefix_of[int(r)] for r in step.rows}
        return set()


def plan(whole: dict[int, int], suffixes: dict[int, tuple[int, int]], prefix_lengths: list[int],
         decode_limits: Limits, prefix_limits: Limits, kv_bytes_per_token: int, max_kv_bytes: float,
         exact: frozenset | set = frozenset(), plain: frozenset | set = frozenset()) -> Schedule:
    """``whole``: pair -> prompt length; ``suffixes``: pair -> (prefix, suffix length);
    ``prefix_lengths[k]``: tokens of prefix k. Prefixes are numbered in first-use order.
    ``exact``: pairs whose batches run apart (all pairs of a prefix must agree); ``plain``: those of
    them whose batches run without the route's exact products (Step.products), apart again."""
    steps: list[Step] = []
    releases: dict[int, list[int]] = {}
    by_prefix: dict[int, list[int]] = {}
    for pair, (k, _) in sorted(suffixes.items()):
        by_prefix.setdefault(k, []).append(pair)
    if not set(plain) <= set(exact):
        raise ValueError("plain pairs are exact pairs run without the route's exact products")

    def mode(p: int) -> int:  # 0: the decoder's own precision; 1: the route; 2: the route without its products
        return 2 if p in plain else 1 if p in exact else 0

    exact_prefix = {k: mode(pairs[0]) for k, pairs in by_prefix.items()}
    if any(mode(p) != exact_prefix[k] for k, pairs in by_prefix.items() for p in pairs):
        raise ValueError("a prefix's pairs must all be exact or all not, and all plain or all not")

    def modes(items: np.ndarray, of) -> list[tuple[int, np.ndarray]]:
        flags = np.array([of(int(i)) for i in items], np.int64)
        return [(m, items[flags == m]) for m in (0, 1, 2) if (flags == m).any()]

    order = sorted(by_prefix)
    wave, start = 0, 0
    while start < len(order):
        end, kv = start, 0.0
        while end < len(order) and (end == start or kv + prefix_lengths[order[end]] * kv_bytes_per_token <= max_kv_bytes):
            kv += prefix_lengths[order[end]] * kv_bytes_per_token
            end += 1
        for m, prefixes in modes(np.array(order[start:end], np.int64), exact_prefix.get):
            for batch in prefix_limits.pack(np.array([prefix_lengths[k] for k in prefixes])):
                steps.append(Step("prefix", prefixes[batch], wave, m > 0, m != 2))
        all_pairs = np.array([p for k in order[start:end] for p in by_prefix[int(k)]], np.int64)
        for m, pairs in modes(all_pairs, mode):
            lengths = np.array([suffixes[int(p)][1] for p in pairs], np.int64)
            context = np.array([prefix_lengths[suffixes[int(p)][0]] for p in pairs], np.int64)
            for batch in decode_limits.pack(lengths, context):
                steps.append(Step("suffix", pairs[batch], wave, m > 0, m != 2))
        releases[len(steps) - 1] = [int(k) for k in order[start:end]]
        wave, start = wave + 1, end
    if whole:
        for m, pairs in modes(np.array(sorted(whole), np.int64), mode):
            for batch in decode_limits.pack(np.array([whole[int(p)] for p in pairs]), np.ones(len(pairs), np.int64)):
                steps.append(Step("whole", pairs[batch], exact=m > 0, products=m != 2))
    return Schedule(steps, releases)


@dataclass
class DecoderBatch:
    """One decoder run, padded. Shapes beside the fields."""

    input_ids: np.ndarray  # int64 [B, S]
    attention_mask: np.ndarray  # int64 [B, S]: 1 = real token
    position_ids: np.ndarray  # int64 [3, B, S]: M-RoPE (continuing after the prefix for suffixes)
    next_position: np.ndarray  # int64 [B]: first position after each row (a prefix's continuation point)
    lengths: np.ndarray  # int64 [B]: real tokens per row
    rows: np.ndarray  # int64 [B]: pair index (or prefix index) of each row
    image_keys: list  # content keys of the images filling the pad runs, row-major order
    kind: str = "whole"  # "whole" | "prefix" | "suffix"
    past: list | None = None  # suffix batches: the prefixes' keys/values (backend objects), distinct
    past_index: np.ndarray | None = None  # int64 [B]: row -> position in ``past``
    past_lengths: np.ndarray | None = None  # int64 [len(past)]: tokens of each prefix
    exact: bool = False  # run in fp32 beside a bf16 decoder (backends.torch exact_images)
    products: bool = True  # exact: with the route's exact products, if it has any (backends.torch exact_products)

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())


def build_decoder_batch(rows: np.ndarray, sequences: list[Sequence], pad_id: int, left_padding: bool,
                        start_positions: np.ndarray | None = None, kind: str = "whole") -> DecoderBatch:
    """Pads ``sequences`` (one per row) into a batch; ids, mask and M-RoPE positions are built by
    the native core (HF get_rope_index semantics, continuing from ``start_positions``)."""
    b = len(sequences)
    width = max(len(s) for s in sequences)
    input_ids = np.empty((b, width), np.int64)
    mask = np.empty((b, width), np.int64)
    positions = np.empty((3, b, width), np.int64)
    nxt = np.empty(b, np.int64)
    starts = np.zeros(b, np.int64) if start_positions is None else np.asarray(start_positions, np.int64)
    _core.build_batch([s.ids for s in sequences], [s.spans for s in sequences], starts, width, pad_id, left_padding,
                      input_ids, mask, positions, nxt)
    return DecoderBatch(input_ids, mask, positions, nxt, np.array([len(s) for s in sequences], np.int64),
                        np.asarray(rows, np.int64), [k for s in sequences for k in s.image_keys], kind)


@dataclass
class VisionBatch:
    """One vision run: the patches of some distinct images and the grid-derived index tensors."""

    pixel_values: np.ndarray  # float32 [N, patch_dim]
    image_grid_thw: np.ndarray  # int64 [n, 3]
    feeds: dict  # the family's index inputs (rot_pos_ids, full_gather, ... ; see vision_layout)
    keys: list  # content key of each image
    tokens: np.ndarray  # int64 [n]: merged tokens (decoder embeddings) per image
    query: bool = False  # the query's images (a backend may encode them apart: torch's query_vision)
