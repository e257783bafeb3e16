"""The one queue in front of the engine.

Requests become ``Job``s (their pairs, as plain Items) and wait in FIFO order. Two threads work
the queue as a pipeline. The planner takes every waiting job up to ``round_pairs`` pairs (at least
one whole job) and plans all their pairs together (``Reranker.plan``: prompts tokenized, images
decoded, token-budget batches across requests, each request's documents sharing its query's
prefix); the runner runs the plans in order, skipping batches whose pairs all belong to cancelled
jobs, and resolves each job's future on the event loop as soon as its last pair is scored. So the
next round is planned (Python and tokenizer work) while the engine runs this one (native code,
the GIL released); at most one planned round waits for the runner, and the planner takes the
waiting jobs only when the runner has taken the round before, so a round holds every request
that arrived while the engine ran the previous one. With ``Reranker(lanes=N)`` (``--lanes N``)
N runners take the planned rounds, which then run side by side, each on its share of the
backend's threads. A job whose pair fails (a corrupt image, a pair too long to fit) fails
alone, as soon as it is planned; the others in its round carry on. The event loop never runs
the engine.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import GmrError
from .metrics import Metrics

log = logging.getLogger("gmr_fast.server")


class QueueFull(GmrError):
    pass


class NotReady(GmrError):
    pass


class Truncated(GmrError):
    """A pair of a job that refuses truncation (TEI's ``truncate: false``) does not fit whole."""

    def __init__(self, index: int, label: str, max_length: int):
        super().__init__(f"{label}: the prompt with this text is longer than the engine's {max_length} tokens; send "
                         f"\"truncate\": true to have the text cut at its end")
        self.index, self.label = index, label


@dataclass
class Job:
    pairs: list  # [(Item, Item)]
    instruction: str | None
    labels: list  # names of the pairs in error messages, e.g. "documents[3]"
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: bool = False
    enqueued: float = field(default_factory=time.perf_counter)
    tokens: int = 0  # decoder tokens attributed to this job (its prompt tokens)
    refuse_truncation: bool = False  # a pair whose document text had to be cut fails the job (Truncated)
    max_length: int | None = None  # the request's cap on a prompt's tokens (vLLM's truncate_prompt_tokens)


class BatchQueue:
    def __init__(self, reranker, metrics: Metrics, max_queue_pairs: int = 4096, round_pairs: int = 512):
        self.reranker, self.metrics = reranker, metrics
        self.max_queue_pairs, self.round_pairs = int(max_queue_pairs), int(round_pairs)
        self._jobs: collections.deque[Job] = collections.deque()
        self._queued_pairs = 0
        self._cv = threading.Condition()
        self._closing = False
        self._planned: queue.Queue = queue.Queue()  # planned rounds waiting for the runner (at most one)
        # the planner takes jobs only once the runner has taken the round planned before: rounds
        # then gather every request that arrived while the engine ran (not only those that came
        # while the planner was free), and no more than one planned round ever waits
        self._slot = threading.Semaphore(1)
        self._planner = threading.Thread(target=self._plan_rounds, name="gmr-planner", daemon=True)
        # one runner per engine lane (Reranker(lanes=N)): rounds run side by side, each on its
        # share of the backend's threads
        self._runners = [threading.Thread(target=self._run_rounds, name=f"gmr-engine-{i}", daemon=True)
                         for i in range(reranker.lanes)]
        self._planner.start()
        for runner in self._runners:
            runner.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise NotReady("the server is shutting down")
            if self._queued_pairs and self._queued_pairs + len(job.pairs) > self.max_queue_pairs:
                raise QueueFull(f"the queue holds {self._queued_pairs} pairs; this request's {len(job.pairs)} would pass "
                                f"the limit of {self.max_queue_pairs}; retry later")
            self._jobs.append(job)
            self._queued_pairs += len(job.pairs)
            self.metrics.queue_pairs.set(self._queued_pairs)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: its pairs are not scored (those not yet started)."""
        job.cancelled = True

    def close(self, timeout: float = 60.0) -> None:
        """Stops taking jobs, finishes the ones queued, then stops the planner and the runners."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        self._planner.join(timeout)
        for runner in self._runners:
            runner.join(max(0.0, deadline - time.monotonic()))

    @property
    def queued_pairs(self) -> int:
        return self._queued_pairs

    # ------------------------------------------------------------------ planner and runner threads
    def _take(self) -> list[Job]:
        with self._cv:
            while not self._jobs and not self._closing:
                self._cv.wait()
            jobs, n = [], 0
            while self._jobs and (not jobs or n + len(self._jobs[0].pairs) <= self.round_pairs):
                job = self._jobs.popleft()
                if job.cancelled:
                    self._started(len(job.pairs))
                    continue
                jobs.append(job)
                n += len(job.pairs)
            return jobs

    def _started(self, pairs: int) -> None:
        """Pairs leave the count of those waiting (the queue limit, the metric) when the runner
        starts their round, or when they are dropped: a planned round still waits for the engine."""
        with self._cv:
            self._queued_pairs -= pairs
            self.metrics.queue_pairs.set(self._queued_pairs)

    def _plan_rounds(self) -> None:
        try:
            while True:
                self._slot.acquire()
                jobs = self._take()
                if not jobs:
                    self._slot.release()
                    if self._closing:
                        return
                    continue
                planned = self._plan_isolated(jobs)
                if planned is None:
                    self._slot.release()
                    continue
                self._planned.put(planned)
        finally:
            for _ in self._runners:  # each runner stops after the rounds already planned
                self._planned.put(None)

    def _plan_isolated(self, jobs: list[Job]) -> "_Round | None":
        """The round planned, or None when no job is left in it. Planning fails a pair, not a
        call, for the input faults it knows (images, text, length); should it raise all the same,
        the requests planned with the one at fault are not failed with it: each job is planned
        alone, a job that still fails gets that error (a 500 at worst), and the others are
        planned together again. A failure costs the round's planning twice; the server stays up."""
        try:
            return self._plan(jobs)
        except Exception as e:  # noqa: BLE001 - a planning failure fails requests, not the server
            log.exception("planning a round of %d request(s) failed", len(jobs))
            failure = e
        good = []
        if len(jobs) > 1:
            for job in jobs:
                try:
                    self._plan([job])
                    good.append(job)
                except Exception as e:  # noqa: BLE001
                    self._fail(job, e)
        else:
            self._fail(jobs[0], failure)
        if good:
            try:
                return self._plan(good)
            except Exception as e:  # noqa: BLE001 - planned alone each, not together: fail them
                log.exception("planning a round of %d request(s) failed again", len(good))
                for job in good:
                    self._fail(job, e)
        return None

    def _fail(self, job: Job, e: BaseException) -> None:
        self._started(len(job.pairs))
        _resolve(job, exception=e)

    def _run_rounds(self) -> None:
        while (planned := self._planned.get()) is not None:
            self._slot.release()  # the planner may take the jobs that wait now
            self._started(sum(len(job.pairs) for job in planned.jobs))
            try:
                self._run(planned)
            except Exception as e:  # noqa: BLE001 - an engine failure fails this round's requests, not the server
                log.exception("engine round failed")
                for job in planned.jobs:
                    _resolve(job, exception=e)

    def _plan(self, jobs: list[Job]) -> "_Round":
        pairs, instructions, labels, owner, limits = [], [], [], [], []
        for j, job in enumerate(jobs):
            pairs += job.pairs
            instructions += [job.instruction] * len(job.pairs)
            labels += job.labels
            owner += [j] * len(job.pairs)
            limits += [job.max_length] * len(job.pairs)
        plan = self.reranker.plan(pairs, instruction=instructions, labels=labels, max_length=limits)
        r = _Round(jobs, plan, np.array(owner, np.int64),
                   np.concatenate([[0], np.cumsum([len(job.pairs) for job in jobs])]).astype(np.int64))
        for i in sorted(plan.errors):  # the first failing pair of a job fails that job, now
            j = int(r.owner[i])
            if j not in r.failed:
                r.failed.add(j)
                _resolve(jobs[j], exception=plan.errors[i])
        truncated = plan.truncated if any(job.refuse_truncation for job in jobs) else None
        for j, job in enumerate(jobs):
            cut = np.flatnonzero(truncated[r.bounds[j]:r.bounds[j + 1]]) if job.refuse_truncation else ()
            if len(cut) and j not in r.failed:
                r.failed.add(j)
                _resolve(job, exception=Truncated(int(cut[0]), job.labels[int(cut[0])], self.reranker.gmr.max_length))
        return r

    def _run(self, r: "_Round") -> None:
        jobs, plan, owner, bounds, failed = r.jobs, r.plan, r.owner, r.bounds, r.failed
        scores = np.full(plan.size, np.nan, np.float32)
        left = collections.Counter(int(owner[i]) for rows in plan.batches for i in rows)
        dead = lambda rows: all(jobs[int(owner[i])].cancelled or int(owner[i]) in failed for i in rows)  # noqa: E731
        padded = 0
        for rows, values, padded_tokens in self.reranker.run(plan, skip=dead):
            scores[rows] = values
            padded += padded_tokens
            self.metrics.batches.inc()
            for i in rows:
                j = int(owner[i])
                left[j] -= 1
                if left[j] == 0 and j not in failed and not jobs[j].cancelled:
                    jobs[j].tokens = int(sum(len(plan.prompts[k].ids) for k in range(bounds[j], bounds[j + 1])))
                    _resolve(jobs[j], result=scores[bounds[j]:bounds[j + 1]].copy())
        for j, job in enumerate(jobs):  # jobs with nothing to run (all cancelled) still end
            if not job.future.done() and j not in failed:
                _resolve(job, exception=NotReady("cancelled"))
        self.metrics.pairs.inc(plan.size - sum(len(jobs[j].pairs) for j in failed))
        self.metrics.tokens.inc(plan.decoder_tokens)
        self.metrics.images.labels(source="encoded").inc(plan.image_counts["images_encoded"])
        self.metrics.images.labels(source="cache").inc(plan.image_counts["image_cache_hits"])
        self.metrics.round_pairs.observe(plan.size)
        if padded:
            self.metrics.batch_fill.observe(min(1.0, self.reranker._padding_efficiency(plan, padded)))


@dataclass
class _Round:
    """A planned round: its jobs, their pairs' plan, and which job owns each planned pair."""
    jobs: list[Job]
    plan: Any
    owner: np.ndarray  # job index of each pair
    bounds: np.ndarray  # job j's pairs are [bounds[j], bounds[j + 1])
    failed: set = field(default_factory=set)  # jobs failed at planning


def _resolve(job: Job, result: Any = None, exception: BaseException | None = None) -> None:
    def apply():
        if job.future.done():
            return
        if exception is not None:
            job.future.set_exception(exception)
        else:
            job.future.set_result(result)
    try:
        job.loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the loop is gone (shutdown): nobody waits for this job any more
        pass
