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
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "scored_this_session": self.scored, "failed_this_session": self.failed,
                "seconds": round(self.seconds, 3),
                "pairs_per_s": self.scored / self.seconds if self.seconds else 0.0,
                "tokens_per_s": self.real_tokens / self.seconds if self.seconds else 0.0,
                "padding_efficiency": self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0,
                "images_encoded": self.images_encoded, "image_cache_hits": self.image_cache_hits}


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


def score_chunk(reranker: Any, chunk: list[Task], written: Callable[[Hashable], bool]) -> Iterator[Output]:
    """Scores one chunk: its failures first, then each batch of its plan whose pairs are not
    all ``written`` already. The same chunk and settings always give the same outputs, which is
    what a resumed or distributed job relies on (only batches with unwritten rows run again,
    bit for bit)."""
    live = [t for t in chunk if t.error is None]
    plan = reranker.plan([(t.query, t.document) for t in live], instruction=[t.instruction for t in live],
                         labels=[t.label for t in live])
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
              progress: Progress, stats: Stats) -> None:
    """Scores every task not yet in ``scores`` or ``errors``, in this process; see the module
    docstring. (``gmr_fast.ray_pool.run_tasks`` does the same over Ray actors.)"""
    start_time = time.perf_counter()
    written = lambda key: key in scores.done or key in errors.done  # noqa: E731
    for k in pending_chunks(tasks, bounds, written):
        a, b = bounds[k]
        for output in score_chunk(reranker, tasks[a:b], written):
            record(output, scores, errors, progress, stats)
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
