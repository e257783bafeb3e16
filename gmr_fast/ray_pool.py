"""Scale-out for ``python -m gmr_fast.score --ray ADDRESS|local --workers N``: the job's chunks
are scored by a pool of Ray actors, each holding one Reranker, while the driver alone writes the
journals and the reports.

Ray's own machinery does the work: the driver hands each idle actor the next chunk
(``actor.score.remote``), waits on whichever finishes (``ray.wait``), and appends results in the
chunks' order, holding a chunk that finished early until those before it are written. So the
files are exactly what a single process writes, in the same order (byte-identical to a run with
the same ``--threads``, which ``--worker-cpus`` sets), and no actor idles while an earlier chunk
is still running elsewhere. A chunk is handed out only while fewer than ``AHEAD_PER_WORKER``
chunks per actor lie between it and the first one not yet written, which bounds what a killed
driver's resume scores again. A worker that dies in the middle of a chunk is restarted by Ray and
the chunk is retried (``max_restarts`` / ``max_task_retries``); since the driver writes a chunk
only once its whole result arrived, nothing is written twice. A killed driver resumes with
``--resume`` as a single-process job does. A worker that cannot load the engine fails the job
with its reason instead of leaving it waiting.

The job's plan for the image cache (``jobs.ImagePlan``) travels with the chunks: each carries,
per image it names, the position of the next chunk that uses it (``jobs.ChunkImages``), so an
actor keeps an image only while a later chunk needs it and, over its budget, drops the one needed
furthest ahead. Which actor takes that later chunk is not known ahead, so an actor that keeps an
image for a later chunk also puts its embeddings in Ray's object store (``ray.put``) and returns
the reference; the driver hands it, with the chunk that uses the image next, to whichever actor
takes that chunk, which adds it to its own cache instead of encoding the image again (counted in
run.json as ``images_shared``, among the cache hits). The driver holds at most one actor's budget
of such references, dropping the one needed furthest ahead, and lets each go once the last chunk
that uses it is handed out. Each actor's budget is ``--image-cache-mb``, or a quarter of the
memory its node (or its GPU) has available with every actor loaded, shared among the actors
there, at most the single-process cap. Scores are the same with or without it, bit for bit,
where the actors run on one kind of processor (an image's embeddings are what a vision run of
that image alone computes); a reference whose owner died is skipped and the image encoded.

The engine directory, the data and gmr_fast itself must be visible to every worker under the
same paths (a shared file system, or a Ray runtime environment).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any

from .errors import GmrError
from .jobs import ChunkImages, ImagePlan, JobError, Journal, Stats, Task, pending_chunks, record, score_chunk
from .progress import Progress

# Chunks an actor may run ahead of the first chunk not yet written (their results wait for it).
AHEAD_PER_WORKER = 4


class ScoreWorker:
    """A Ray actor's body: one Reranker, scoring whole chunks."""

    def __init__(self, engine: str, options: dict):
        import os

        from .reranker import Reranker, RerankerOptions

        self.reranker = Reranker(engine, RerankerOptions(**options))
        self.pid = os.getpid()

    def ready(self) -> dict:
        """Who this actor is, where, and the memory it sees free with its engine loaded (its GPU's
        on CUDA, where image embeddings stay)."""
        import ray

        from .memory import available_memory

        device = self.reranker.choice.get("device", "cpu")
        if device.startswith("cuda"):
            import torch

            free = int(torch.cuda.mem_get_info(torch.device(device))[0])
        else:
            free = available_memory()
        return {"pid": self.pid, **self.reranker.choice, "query_images_apart": self.reranker.query_images_apart,
                "node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                "free_bytes": free}

    def score(self, chunk: list[Task], written: list, images: ChunkImages | None = None,
              shared: dict | None = None) -> dict:
        """The chunk's outputs; with ``images`` (its share of the job's image plan), ``shared``
        gives embeddings other actors computed ({image ref: (content key, object ref)}), and the
        result's ``shared`` the ones this actor keeps for a later chunk, put in the object store
        ({image ref: (content key, object ref, bytes)})."""
        done = set(written)
        taken = self._take(shared, images) if images is not None and shared else 0
        outputs = list(score_chunk(self.reranker, chunk, lambda key: key in done, images))
        return {"outputs": outputs, "taken": taken, "shared": self._give(images, shared or {}) if images else {}}

    def _take(self, shared: dict, images: ChunkImages) -> int:
        import ray

        from .reranker import CachePlan

        entries = {}
        held = self.reranker.cache_holds(tuple(key) for key, _ in shared.values())
        for key, ref in shared.values():
            if tuple(key) in held:  # it encoded this one itself, and kept it
                continue
            try:
                entries[tuple(key)] = ray.get(ref, timeout=60)
            except ray.exceptions.RayError:
                continue  # its owner died (a restarted actor): the image is encoded here
        # kept for this chunk (its next use is now), then as the chunk's own plan says
        return self.reranker.add_cached_images(entries, CachePlan(images.budget_bytes, images.position,
                                                                  {key: images.position for key in entries}))

    def _give(self, images: ChunkImages, shared: dict) -> dict:
        import ray

        from .reranker import _nbytes

        later = {images.content_keys[ref]: ref for ref, n in images.next_use.items()
                 if n is not None and ref in images.content_keys and ref not in shared}
        return {later[key]: (key, ray.put(e), _nbytes(e)) for key, e in self.reranker.cached_images(later).items()}

    def clear_image_cache(self) -> None:
        self.reranker.clear_image_cache()


class _SharedImages:
    """The driver's references to embeddings in the object store (ScoreWorker.score's
    ``shared``), by image ref, within ``budget_bytes``; over it, the one whose next use is
    furthest ahead goes (the plan's order, as the actors' caches)."""

    def __init__(self, plan: ImagePlan, budget_bytes: int):
        self.plan, self.budget_bytes = plan, budget_bytes
        self.held: dict = {}  # image ref -> (content key, object ref, bytes)
        self.bytes = 0

    def add(self, entries: dict, position: int) -> None:
        """Holds ``entries`` (ScoreWorker.score's ``shared``) for the chunks after ``position``,
        the last one handed out."""

        def ahead(ref) -> float:  # when a chunk not yet handed out uses it next
            n = self.plan.next_use(ref, position)
            return math.inf if n is None else n

        for ref, (key, obj, size) in entries.items():
            if ref in self.held or size > self.budget_bytes:
                continue
            nxt = ahead(ref)
            if nxt == math.inf:
                continue
            while self.bytes + size > self.budget_bytes:
                victim = max(self.held, key=ahead)
                if ahead(victim) <= nxt:
                    break
                self.drop(victim)
            if self.bytes + size <= self.budget_bytes:
                self.held[ref] = (key, obj, size)
                self.bytes += size

    def for_chunk(self, part: ChunkImages) -> dict:
        """What the chunk of ``part`` can take; the references no later chunk needs are let go."""
        out = {ref: self.held[ref][:2] for ref in part.next_use if ref in self.held}
        for ref in out:
            if part.next_use[ref] is None:
                self.drop(ref)
        return out

    def drop(self, ref) -> None:
        self.bytes -= self.held.pop(ref)[2]


class RayPool:
    def __init__(self, address: str, workers: int, engine: str, reranker_options, worker_gpus: float = 0.0,
                 worker_cpus: float = 1.0, retries: int = 3, ready_timeout: float = 600.0):
        try:
            import ray
        except ImportError:
            raise GmrError("--ray needs Ray: pip install 'gmr_fast[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=max(1, int(round(workers * worker_cpus))), num_gpus=workers * worker_gpus or None,
                         include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        options = dataclasses.asdict(reranker_options)
        if worker_gpus and options.get("device", "cpu") == "cpu":
            options["device"] = "cuda"
        actor = ray.remote(ScoreWorker).options(num_cpus=worker_cpus, num_gpus=worker_gpus, max_restarts=retries,
                                                max_task_retries=retries)
        self.actors = [actor.remote(engine, options) for _ in range(workers)]
        try:
            self.workers = ray.get([a.ready.remote() for a in self.actors], timeout=ready_timeout)
        except ray.exceptions.GetTimeoutError:
            raise JobError(f"Ray workers did not start within {ready_timeout:.0f} s (does the cluster have "
                           f"{worker_cpus} CPUs{f' and {worker_gpus} GPUs' if worker_gpus else ''} free per worker?)") from None
        except ray.exceptions.RayError as e:
            raise JobError(f"a Ray worker could not load the engine {engine}: {_cause(e)}") from None

    def image_budgets(self, budget_mb: int, cap_bytes: int) -> list[int]:
        """Each actor's budget for the image plan: ``budget_mb`` where given (> 0), else a quarter
        of what its node (or its GPU) has free, shared among the actors there, at most
        ``cap_bytes``. The least any of them saw free is taken: the last to load saw the others'
        engines loaded too."""
        if budget_mb > 0:
            return [budget_mb * 2**20] * len(self.actors)
        where = [(w["node"], *w["gpus"]) for w in self.workers]
        free = {k: min(w["free_bytes"] for w, at in zip(self.workers, where) if at == k) for k in set(where)}
        return [min(cap_bytes, free[k] // 4 // where.count(k)) for k in where]

    def run_tasks(self, tasks: list[Task], bounds: list[tuple[int, int]], scores: Journal, errors: Journal,
                  progress: Progress, stats: Stats, image_budget: tuple[int, int] | None = None) -> None:
        """As ``jobs.run_tasks``, with chunks scored by the actors and written here in order.
        ``image_budget``: (``--image-cache-mb``, the automatic budget's cap in bytes) to follow the
        job's plan for the image cache (module docstring); None: each actor's LRU."""
        ray = self.ray
        start_time = time.perf_counter()
        written = lambda key: key in scores.done or key in errors.done  # noqa: E731
        chunks = pending_chunks(tasks, bounds, written)
        images, budgets, shared = None, [], None
        if image_budget is not None:
            budgets = self.image_budgets(*image_budget)
            images = ImagePlan(tasks, bounds, chunks, min(budgets), self.workers[0]["query_images_apart"])
            shared = _SharedImages(images, min(budgets))
            stats.image_cache_budget_mb = round(min(budgets) / 2**20, 1)
            stats.recurring_images += images.recurring

        def submit(i: int, position: int):
            a, b = bounds[chunks[position]]
            chunk = tasks[a:b]
            part = images.chunk(position, chunk, budgets[i]) if images is not None else None
            given = shared.for_chunk(part) if shared is not None else None
            return self.actors[i].score.remote(chunk, [t.key for t in chunk if written(t.key)], part, given)

        idle = collections.deque(range(len(self.actors)))
        running: dict = {}  # future -> (actor index, position)
        finished: dict = {}  # position -> outputs, until the chunks before it are written
        handed, first_unwritten = 0, 0
        ahead = AHEAD_PER_WORKER * len(self.actors)
        try:
            while first_unwritten < len(chunks):
                while idle and handed < len(chunks) and handed < first_unwritten + ahead:
                    i = idle.popleft()
                    running[submit(i, handed)] = (i, handed)
                    handed += 1
                ready, _ = ray.wait(list(running), num_returns=1)
                for future in ready:
                    i, position = running.pop(future)
                    result = ray.get(future)
                    idle.append(i)
                    finished[position] = result["outputs"]
                    stats.images_shared += result["taken"]
                    if shared is not None:
                        shared.add(result["shared"], handed - 1)
                while first_unwritten in finished:
                    for output in finished.pop(first_unwritten):
                        record(output, scores, errors, progress, stats)
                    first_unwritten += 1
        except ray.exceptions.RayError as e:
            raise JobError(f"a chunk failed on the Ray workers after retries: {_cause(e)}; finished chunks are written, "
                           "rerun with --resume") from None
        finally:
            if images is not None:  # the plan ends with the job's tasks (as jobs.run_tasks)
                self._clear_image_caches()
        stats.seconds += time.perf_counter() - start_time

    def _clear_image_caches(self) -> None:
        try:
            self.ray.get([a.clear_image_cache.remote() for a in self.actors], timeout=60)
        except self.ray.exceptions.RayError:
            pass  # an actor lost or restarted holds nothing of the plan

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def _cause(e: Exception) -> str:
    text = str(e)
    for line in reversed(text.splitlines()):  # the original exception's last line says what went wrong
        line = line.strip()
        if line and not line.startswith(("File ", "^", "Traceback")):
            return line
    return text


def job_settings(args: Any) -> dict:
    """The Ray settings that do not change any output (recorded, not fingerprinted)."""
    return {"ray": args.ray, "workers": args.workers, "worker_gpus": args.worker_gpus, "worker_cpus": args.worker_cpus}
