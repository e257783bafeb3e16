"""Scale-out for ``python -m gmr_fast.score --ray ADDRESS|local --workers N``: the job's chunks
are scored by a pool of Ray actors, each holding one Reranker, while the driver alone writes the
journals and the reports.

Ray's own machinery does the work: ``ray.util.ActorPool.map`` hands chunks to idle actors and
returns their results in submission order, so the driver appends exactly what a single process
would, in the same order (outputs are byte-identical to a single-process run with the same
``--threads``, which ``--worker-cpus`` sets). A worker that dies in the middle of a chunk is
restarted by Ray and the chunk is retried (``max_restarts`` / ``max_task_retries``); since the
driver writes a chunk only once its whole result arrived, nothing is written twice. A killed
driver resumes with ``--resume`` as a single-process job does. A worker that cannot load the
engine fails the job with its reason instead of leaving it waiting.

The job's plan for the image cache (``jobs.ImagePlan``) travels with the chunks: each carries,
per image it names, the position of the next chunk that uses it (``jobs.ChunkImages``), so an
actor keeps an image only while a later chunk needs it and, over its budget, drops the one needed
furthest ahead. Which actor takes that later chunk is not known ahead (the pool hands chunks to
whichever is idle), so an actor may keep an image that another one needs: then the entry's use
passes, and it goes first. Each actor's budget is ``--image-cache-mb``, or a quarter of the
memory its node (or its GPU) has available with every actor loaded, shared among the actors
there, at most the single-process cap. Scores are the same with or without it, bit for bit.

The engine directory, the data and gmr_fast itself must be visible to every worker under the
same paths (a shared file system, or a Ray runtime environment).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from .errors import GmrError
from .jobs import ChunkImages, ImagePlan, JobError, Journal, Stats, Task, pending_chunks, record, score_chunk
from .progress import Progress


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

    def score(self, chunk: list[Task], written: list, images: ChunkImages | None = None) -> list:
        done = set(written)
        return list(score_chunk(self.reranker, chunk, lambda key: key in done, images))

    def clear_image_cache(self) -> None:
        self.reranker.clear_image_cache()


class RayPool:
    def __init__(self, address: str, workers: int, engine: str, reranker_options, worker_gpus: float = 0.0,
                 worker_cpus: float = 1.0, retries: int = 3, ready_timeout: float = 600.0):
        try:
            import ray
            from ray.util import ActorPool
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
        self.pool = ActorPool(self.actors)

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
        start_time = time.perf_counter()
        written = lambda key: key in scores.done or key in errors.done  # noqa: E731
        chunks = pending_chunks(tasks, bounds, written)
        images, budgets = None, []
        if image_budget is not None:
            budgets = self.image_budgets(*image_budget)
            images = ImagePlan(tasks, bounds, chunks, min(budgets), self.workers[0]["query_images_apart"])
            stats.image_cache_budget_mb = round(min(budgets) / 2**20, 1)
            stats.recurring_images += images.recurring
        position = {k: i for i, k in enumerate(chunks)}

        def submit(actor, k):
            a, b = bounds[k]
            chunk = tasks[a:b]
            part = images.chunk(position[k], chunk, budgets[self.actors.index(actor)]) if images is not None else None
            return actor.score.remote(chunk, [t.key for t in chunk if written(t.key)], part)

        try:
            for outputs in self.pool.map(submit, chunks):
                for output in outputs:
                    record(output, scores, errors, progress, stats)
        except self.ray.exceptions.RayError as e:
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
