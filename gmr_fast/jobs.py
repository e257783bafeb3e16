"""Resumable batch scoring: the engine of ``python -m gmr_fast.score``.

Work is a list of ``Task``s (one pair each, with a key: ``(qid, docid)`` or a pairs-file id)
cut into fixed chunks. A chunk is planned by ``Reranker.plan`` (deterministic batches) and its
batches are run in order; every batch's scores are appended to ``scores.jsonl`` as one write,
flushed and fsynced, and per-pair failures go to ``errors.jsonl`` the same way. On resume a
chunk whose pairs are all written is skipped without reading its images; in the chunk that was
in flight, the same plan is rebuilt and only batches with unwritten rows run again, so the
recomputed scores are bit-identical to the lost ones and the final files equal those of an
uninterrupted run. A line torn by a kill mid-write is cut off when the journal is reopened.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import GmrError
from .progress import Progress  # noqa: F401  (re-exported for the score CLI)
from .prompt import Item
from .suite import InputError


def dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(", ", ": "))


class Journal:
    """An append-only JSONL file of finished rows, keyed by ``key(row)``."""

    def __init__(self, path: str, key: Callable[[dict], Hashable]):
        self.path, self.key = path, key
        self.rows: list[dict] = []
        self.done: set[Hashable] = set()
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a line torn by a kill mid-write: it was never finished
                with open(path, "r+b") as f:
                    f.truncate(end)
            for n, raw in enumerate(data[:end].splitlines(), 1):
                try:
                    row = json.loads(raw)
                    k = key(row)
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise InputError(path, f"not a line this job wrote ({e}); move the file away to start over", n) from None
                self.rows.append(row)
                self.done.add(k)
        self._file = open(path, "ab")

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self._file.write("".join(dumps(r) + "\n" for r in rows).encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows.extend(rows)
        self.done.update(self.key(r) for r in rows)

    def close(self) -> None:
        self._file.close()


@dataclass
class Task:
    key: Hashable
    query: Item | None  # None when the task failed before scoring (``error``)
    document: Item | None
    instruction: str | None
    fields: dict  # what identifies the pair in output rows
    label: str  # names the pair in error messages
    error: str | None = None


@dataclass
class Stats:
    pairs: int = 0  # tasks in the job
    scored: int = 0  # scored in this session
    failed: int = 0  # failures recorded in this session
    real_tokens: int = 0
    padded_tokens: int = 0
    images_encoded: int = 0  # distinct images run through the vision tower (once per chunk, or cached)
    image_cache_hits: int = 0  # images taken from the Reranker's cache (image_cache_size / image_cache_mb)
    image_cache_budget_mb: float | None = None  # the job's plan for that cache (ImagePlan), when it has one
    recurring_images: int = 0  # images that more than one chunk uses (counted by the plan)
    images_shared: int = 0  # on Ray: embeddings an actor took from another's (ray_pool), among the hits
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "scored_this_session": self.scored, "failed_this_session": self.failed,
                "seconds": round(self.seconds, 3),
                "pairs_per_s": self.scored / self.seconds if self.seconds else 0.0,
                "tokens_per_s": self.real_tokens / self.seconds if self.seconds else 0.0,
                "padding_efficiency": self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0,
                "images_encoded": self.images_encoded, "image_cache_hits": self.image_cache_hits,
                **({"image_cache_budget_mb": self.image_cache_budget_mb, "recurring_images": self.recurring_images,
                    "images_shared": self.images_shared} if self.image_cache_budget_mb is not None else {})}


def chunk_bounds(group_sizes: Iterable[int], chunk_pairs: int) -> list[tuple[int, int]]:
    """Cuts consecutive groups (a query's candidates stay together) into chunks of at least
    ``chunk_pairs`` tasks (the last may be smaller)."""
    bounds, start, end = [], 0, 0
    for size in group_sizes:
        end += size
        if end - start >= chunk_pairs:
            bounds.append((start, end))
            start = end
    if end > start:
        bounds.append((start, end))
    return bounds


@dataclass
class Output:
    """What a chunk appends to one journal, in order: ``kind`` is "errors" (once per chunk) or
    "scores" (one per batch); ``tokens`` and ``padded`` are the batch's real and padded tokens,
    ``images_encoded`` and ``image_cache_hits`` the images its step and the steps before it since
    the last output needed."""

    kind: str
    rows: list
    tokens: int = 0
    padded: int = 0
    images_encoded: int = 0
    image_cache_hits: int = 0


def score_chunk(reranker: Any, chunk: list[Task], written: Callable[[Hashable], bool],
                images: ChunkImages | None = None) -> Iterator[Output]:
    """Scores one chunk: its failures first, then each batch of its plan whose pairs are not
    all ``written`` already. The same chunk and settings always give the same outputs, which is
    what a resumed or distributed job relies on (only batches with unwritten rows run again,
    bit for bit). ``images``: the chunk's share of the job's plan for the Reranker's image cache
    (ImagePlan.chunk)."""
    live = [t for t in chunk if t.error is None]
    plan = reranker.plan([(t.query, t.document) for t in live], instruction=[t.instruction for t in live],
                         labels=[t.label for t in live])
    if images is not None:
        plan.cache_plan = images.cache_plan(live, plan.image_keys)
    failed, li = [], 0
    for t in chunk:
        if t.error is None:
            e = plan.errors.get(li)
            li += 1
            if e is None:
                continue
            message = str(e)
        else:
            message = t.error
        if not written(t.key):
            failed.append({**t.fields, "error": message})
    yield Output("errors", failed)
    truncated = plan.truncated
    seen = {"images_encoded": 0, "image_cache_hits": 0}
    for rows, values, padded in reranker.run(plan, skip=lambda rows: all(written(live[r].key) for r in rows)):
        out = [{**live[r].fields, "score": float(values[j]), "truncated": bool(truncated[r])}
               for j, r in enumerate(rows) if not written(live[r].key)]
        counts = {k: plan.image_counts[k] - seen[k] for k in seen}
        seen.update((k, plan.image_counts[k]) for k in seen)
        yield Output("scores", out, int(sum(len(plan.prompts[r].ids) for r in rows)), int(padded), **counts)


def _image_refs(task: Task, query_apart: bool) -> list[Hashable]:
    """What names each image of ``task`` across the job, in ScorePlan.image_keys' order (the
    query's first): its file (suite and pairs rows name images by path), the query's apart
    where the Reranker encodes a query's images apart (Reranker.query_images_apart)."""
    refs = []
    for side, item in (("query", task.query), ("document", task.document)):
        if item is not None and item.has_image:
            ref = os.fspath(item.image) if isinstance(item.image, (str, os.PathLike)) else ("object", id(item.image))
            refs.append((side, ref) if side == "query" and query_apart else ("", ref))
    return refs


class ImagePlan:
    """A local job's plan for the Reranker's image cache. The job knows every pair it will score,
    so before any work it lists, per image file, the chunks (in run order) that use it; each
    chunk's call then keeps exactly the images a later chunk uses again, until that use, within
    ``budget_bytes``, dropping first the one needed furthest ahead (reranker.CachePlan). Top-k
    lists over one corpus (MRB's) share document images across queries, hence across chunks,
    while a chunk's own pairs encode each distinct image once anyway; an LRU cache of the same
    size would also keep the images no later chunk needs, and lose the recurring ones to them."""

    def __init__(self, tasks: list[Task], bounds: list[tuple[int, int]], chunks: list[int], budget_bytes: int,
                 query_apart: bool):
        self.budget_bytes, self.query_apart = int(budget_bytes), query_apart
        self.uses: dict[Hashable, list[int]] = {}
        for position, k in enumerate(chunks):
            a, b = bounds[k]
            for task in tasks[a:b]:
                if task.error is None:
                    for ref in _image_refs(task, query_apart):
                        seen = self.uses.setdefault(ref, [])
                        if not seen or seen[-1] != position:
                            seen.append(position)

    @property
    def recurring(self) -> int:
        """Images that more than one chunk uses."""
        return sum(1 for u in self.uses.values() if len(u) > 1)

    def next_use(self, ref: Hashable, position: int) -> int | None:
        uses = self.uses.get(ref, ())
        i = bisect.bisect_right(uses, position)
        return uses[i] if i < len(uses) else None

    def chunk(self, position: int, chunk: list[Task], budget_bytes: int | None = None) -> "ChunkImages":
        """The ``position``-th chunk's share of the plan (``budget_bytes``: its Reranker's, where
        it is not the plan's: a Ray actor's)."""
        next_use: dict = {}
        for task in chunk:
            if task.error is None:
                for ref in _image_refs(task, self.query_apart):
                    next_use[ref] = self.next_use(ref, position)
        return ChunkImages(position, next_use, self.budget_bytes if budget_bytes is None else int(budget_bytes),
                           self.query_apart)


@dataclass
class ChunkImages:
    """One chunk's share of a job's ImagePlan, all a Reranker needs to follow it for that chunk
    (and what a Ray actor receives with the chunk): per image the chunk names, the position of
    the next chunk that uses it, None where none does."""

    position: int
    next_use: dict
    budget_bytes: int
    query_apart: bool
    # filled by cache_plan: each image's content key (what the Reranker's cache names it by)
    content_keys: dict = dataclasses.field(default_factory=dict)

    def cache_plan(self, live: list[Task], image_keys: list) -> Any:
        """The CachePlan of the chunk's call: ``live`` its tasks that reach the Reranker,
        ``image_keys`` the plan's content keys of their images (ScorePlan.image_keys)."""
        from .reranker import CachePlan

        next_use: dict = {}
        for task, keys in zip(live, image_keys):
            for ref, key in zip(_image_refs(task, self.query_apart), keys):
                self.content_keys[ref] = key
                n = self.next_use.get(ref)
                if n is not None:  # two files of the same content: kept for the sooner use
                    next_use[key] = min(n, next_use.get(key, n))
        return CachePlan(self.budget_bytes, self.position, next_use)


def pending_chunks(tasks: list[Task], bounds: list[tuple[int, int]], written: Callable[[Hashable], bool]) -> list[int]:
    """Chunks with at least one task not yet in a journal."""
    return [k for k, (a, b) in enumerate(bounds) if not all(written(t.key) for t in tasks[a:b])]


def record(output: Output, scores: Journal, errors: Journal, progress: Progress, stats: Stats) -> None:
    """Appends one chunk output to its journal (one write, flushed and fsynced) and counts it."""
    if output.kind == "errors":
        errors.append(output.rows)
        stats.failed += len(output.rows)
    else:
        scores.append(output.rows)
        stats.scored += len(output.rows)
        stats.real_tokens += output.tokens
        stats.padded_tokens += output.padded
        stats.images_encoded += output.images_encoded
        stats.image_cache_hits += output.image_cache_hits
    progress.update(len(output.rows))


def run_tasks(reranker: Any, tasks: list[Task], bounds: list[tuple[int, int]], scores: Journal, errors: Journal,
              progress: Progress, stats: Stats, image_budget_bytes: int | None = None) -> None:
    """Scores every task not yet in ``scores`` or ``errors``, in this process; see the module
    docstring. ``image_budget_bytes``: the image cache follows the job's plan (ImagePlan) within
    that many bytes, and is emptied at the end; None: it is the Reranker's own (LRU, its options).
    (``gmr_fast.ray_pool.RayPool.run_tasks`` does the same over Ray actors.)"""
    start_time = time.perf_counter()
    written = lambda key: key in scores.done or key in errors.done  # noqa: E731
    chunks = pending_chunks(tasks, bounds, written)
    images = (ImagePlan(tasks, bounds, chunks, image_budget_bytes, reranker.query_images_apart)
              if image_budget_bytes is not None else None)
    if images is not None:
        stats.image_cache_budget_mb = round(image_budget_bytes / 2**20, 1)
        stats.recurring_images += images.recurring
    try:
        for position, k in enumerate(chunks):
            a, b = bounds[k]
            part = images.chunk(position, tasks[a:b]) if images is not None else None
            for output in score_chunk(reranker, tasks[a:b], written, part):
                record(output, scores, errors, progress, stats)
    finally:
        if images is not None:  # the plan ends with the job's tasks: what it kept is needed no more
            reranker.clear_image_cache()
    stats.seconds += time.perf_counter() - start_time


class JobError(GmrError):
    """The job cannot go on (nothing could be scored, or its output directory does not match)."""


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
