"""``python -m gmr_fast.score``: rerank an MRB-style suite (or any pairs file) with an engine.

    python -m gmr_fast.score --engine ENGINE --data SUITE_OR_DATASET --out OUT [--top-k 100]
        [--datasets a,b] [--resume] [--max-batch-tokens N] [--metrics ndcg_cut_10,recip_rank,...]
    python -m gmr_fast.score --engine ENGINE --input pairs.jsonl --output scores.jsonl [--resume]

Suite mode writes, per dataset, ``OUT/<dataset>/scores.jsonl`` (qid, docid, score,
first_stage_rank), ``errors.jsonl`` and ``run.trec``; then ``OUT/report.json``/``report.md``
(first stage beside reranked, per dataset, task, category, MRB average) and ``OUT/run.json``.
Exit code 0 when the job ran (per-pair failures are recorded, not fatal); 2 when the input is
malformed, the output directory belongs to another job, or nothing could be scored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from importlib import metadata

from dataclasses import dataclass

from .errors import BackendError, ConfigError, EngineError, GmrError
from .evaluation import DEFAULT_METRICS, build_report, evaluate, parse_metrics, report_markdown
from .jobs import JobError, Journal, Progress, Stats, Task, chunk_bounds, run_tasks, write_atomic
from .manifest import load_manifest
from .memory import available_memory
from .options import add_arguments, fingerprint, from_args, option
from .prompt import Item, text_problem
from .reranker import TEXT_DECODER, RerankerOptions, choose_image_precision, choose_precision, choose_text_precision
from .suite import (Dataset, InputError, PathRefused, Record, find_datasets, load_dataset, read_jsonl,
                    resolve_image, trec_order)

RUN_TAG = "gmr_fast"
IMAGE_PLAN_AUTO_MB = 4096  # the image cache plan's largest budget when --image-cache-mb leaves it (_Job)
EXIT_INPUT = 2  # malformed input, bad arguments, an output directory holding another job, nothing scorable
EXIT_RUNTIME = 3  # the engine, the backend or the file system failed (disk full, unreadable engine, ...)


@dataclass
class ScoreJobOptions:
    """A batch job: what to read, where to write, how to chunk. The Reranker's own settings live
    in ``RerankerOptions``; both give the CLI its flags and the resume fingerprint."""

    engine: str = option(None, "engine directory written by python -m export", metavar="DIR")
    data: str | None = option(None, "a suite (directory of datasets) or one dataset directory", metavar="DIR")
    out: str | None = option(None, "output directory (suite mode)", metavar="DIR")
    input: str | None = option(None, "pairs mode: JSONL rows {id, query, document, instruction?}", metavar="FILE")
    output: str | None = option(None, "pairs mode: scores JSONL to write", metavar="FILE")
    image_root: str | None = option(None, "pairs mode: directory image paths are relative to (default: the input's)",
                                    metavar="DIR")
    top_k: int = option(100, "rerank each query's top K candidates", determinism=True)
    datasets: str | None = option(None, "comma-separated dataset names to run (default: all in the suite)")
    resume: bool = option(False, "continue a job in --out/--output, skipping finished pairs")
    metrics: str = option(",".join(DEFAULT_METRICS), "trec_eval measure names, comma-separated")
    chunk_pairs: int = option(512, "pairs planned together (images decoded per chunk)", determinism=True)
    image_cache_plan: bool = option(True, "keep each image a later chunk uses again until that use, within "
                                          "--image-cache-mb (0: a quarter of the memory available once the engine "
                                          "is loaded, the GPU's on CUDA, at most 4 GiB; on Ray per actor, that quarter "
                                          "shared by the actors of a node or GPU), dropping the one needed furthest ahead; "
                                          "without it the image cache is the LRU of --image-cache-mb / --image-cache-size")
    progress: bool = option(False, "report progress even when stderr is not a terminal")
    quiet: bool = option(False, "no progress and no summary")
    ray: str | None = option(None, "score on Ray: a cluster address, or 'local' to start one here", metavar="ADDRESS")
    workers: int = option(1, "Ray actors, each holding one Reranker")
    worker_gpus: float = option(0.0, "GPUs per Ray actor (the actor then runs the torch backend on CUDA)")
    worker_cpus: float = option(1.0, "CPUs per Ray actor (also its threads)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gmr_fast.score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, ScoreJobOptions)
    add_arguments(p, RerankerOptions)
    return p


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("gmr_fast", "numpy", "onnxruntime", "tokenizers", "pillow", "pytrec-eval-terrier"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _item(record_or_value, root: str, where: str) -> tuple[Item | None, str | None]:
    """An Item with its image path resolved inside ``root``, or (None, reason)."""
    text, image = record_or_value
    if image is None:
        return Item(text=text or ""), None
    try:
        return Item(text=text or "", image=resolve_image(root, image)), None
    except PathRefused as e:
        return None, f"{where}: {e}"


class _Job:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.options = from_args(ScoreJobOptions, args)
        self.reranker_options = from_args(RerankerOptions, args)
        if args.ray:  # an actor computes with its own CPUs: the same threads as a single process given --threads C
            self.reranker_options.num_threads = max(1, int(args.worker_cpus))
        self.reranker_options.validate()
        self.progress_enabled = not args.quiet and (args.progress or sys.stderr.isatty())
        manifest = load_manifest(args.engine)  # first: it says what is wrong with a directory that is no engine
        self.engine_sha = _sha256(os.path.join(args.engine, "manifest.json"))
        ro = self.reranker_options
        precision, backend, why = choose_precision(manifest, ro.precision, ro.backend, ro.device,
                                                   bool(ro.providers or ro.backend_options), ro.image_precision,
                                                   ro.text_precision)
        images, image_why = choose_image_precision(manifest, ro.precision, precision, backend, ro.device,
                                                   ro.image_precision)
        route_text, text_why = choose_text_precision(manifest, ro.precision, precision, images, ro.text_precision)
        texts = TEXT_DECODER[images] if route_text else precision
        if images:
            why = f"{why}; {image_why}"
        if route_text:
            why = f"{why}; {text_why}"
        # everything that changes which pairs are scored or the exact bits of a score: a resumed
        # job must match (the precisions as resolved on this machine, not "auto")
        self.settings = {"engine_sha256": self.engine_sha, **fingerprint(self.options), **fingerprint(ro),
                         "precision": precision, "image_precision": images or precision, "text_precision": texts,
                         "backend": backend}
        self.choice = {"precision": precision, "image_precision": images or precision, "text_precision": texts,
                       "backend": backend, "reason": why}
        if args.ray:
            self.choice.update(ray=args.ray, workers=args.workers, worker_cpus=args.worker_cpus, worker_gpus=args.worker_gpus)
        self._reranker = None
        self._pool = None

    @property
    def reranker(self):
        if self._reranker is None:  # loaded only when something is left to score
            from .reranker import Reranker
            self._reranker = Reranker(self.args.engine, self.reranker_options)
        return self._reranker

    def image_budget_bytes(self) -> int | None:
        """What the job's plan for the image cache may keep (ScoreJobOptions.image_cache_plan), or
        None (no plan: the Reranker's LRU). Left to itself, a quarter of the memory available with
        the engine loaded (the GPU's on CUDA, where the embeddings stay), at most IMAGE_PLAN_AUTO_MB:
        at GMR-3B width an image of N visual tokens takes N x 8 KiB (2-10 MiB), so 4 GiB hold
        400-2,000 of them, while the rest stays for the activation budget (2 GiB by default) and
        what the system needs."""
        if not self.options.image_cache_plan:
            return None
        if self.reranker_options.image_cache_mb > 0:
            return self.reranker_options.image_cache_mb * 2**20
        self.reranker  # noqa: B018  (loaded first: the memory left beside its weights)
        device = self.reranker_options.device
        if device.startswith("cuda"):
            import torch

            free = int(torch.cuda.mem_get_info(torch.device(device))[0])
        else:
            free = available_memory()
        return min(IMAGE_PLAN_AUTO_MB * 2**20, free // 4)

    def run_tasks(self, tasks, bounds, scores, errors, progress, stats) -> None:
        """Scores the pending chunks here, or on Ray actors with --ray (same outputs, same order)."""
        if not self.args.ray:
            run_tasks(self.reranker, tasks, bounds, scores, errors, progress, stats, self.image_budget_bytes())
            return
        if self._pool is None:
            from .ray_pool import RayPool

            a = self.args
            self._pool = RayPool(a.ray, a.workers, a.engine, self.reranker_options, a.worker_gpus, a.worker_cpus)
        budget = (self.reranker_options.image_cache_mb, IMAGE_PLAN_AUTO_MB * 2**20) if self.options.image_cache_plan else None
        self._pool.run_tasks(tasks, bounds, scores, errors, progress, stats, budget)

    def check_job_file(self, path: str, resume: bool, what: str) -> None:
        """A new job writes ``path`` (its settings); a resumed one must match them."""
        if os.path.exists(path):
            if not resume:
                raise JobError(f"{what} already holds a job ({path}); pass --resume to continue it, or choose a new one")
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            # a setting added since the job started counts as what the runtime did before it existed
            # (text_precision: text pairs ran in the variant's precision)
            before = {"text_precision": self.settings["precision"]}
            diff = [k for k in self.settings if old.get(k, before.get(k)) != self.settings.get(k)]
            if diff:
                raise JobError(f"cannot resume {what}: it was started with different " + ", ".join(
                    f"{k} ({old.get(k)!r} then, {self.settings.get(k)!r} now)" for k in diff))
        else:
            write_atomic(path, json.dumps(self.settings, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- suite
def _dataset_tasks(ds: Dataset, top_k: int, instruction: str | None) -> tuple[list[Task], list[int]]:
    tasks, sizes = [], []
    resolved: dict[str, tuple[Item | None, str | None]] = {}

    def side(rec: Record | None, kind: str, rid: str):
        key = f"{kind}:{rid}"
        if key not in resolved:
            if rec is None:  # a candidate whose document row is missing or unreadable (listed in problems)
                resolved[key] = None, f"{kind} {rid!r}: not in corpus.jsonl"
            elif rec.error is not None:  # a malformed row: its pairs fail, naming file and line
                resolved[key] = None, f"{kind} {rid!r}: {rec.error}"
            else:
                resolved[key] = _item((rec.text, rec.image), ds.root, f"{kind} {rid!r}")
        return resolved[key]

    for qid in ds.query_order():
        cands = ds.candidates[qid][:top_k]
        q, q_err = side(ds.queries[qid], "query", qid)
        for rank, (docid, _) in enumerate(cands, 1):
            d, d_err = side(ds.corpus.get(docid), "document", docid)
            tasks.append(Task((qid, docid), q, d, instruction or ds.instruction,
                              {"qid": qid, "docid": docid, "first_stage_rank": rank},
                              f"query {qid!r} / document {docid!r}", q_err or d_err))
        sizes.append(len(cands))
    return tasks, sizes


def _reranked_run(ds: Dataset, top_k: int, scores: list[dict]) -> dict[str, dict[str, float]]:
    """Scored candidates by score; failed ones keep their first-stage order below every scored one
    (their run scores are synthetic: lowest real score - 1, - 2, ...)."""
    by_query: dict[str, dict[str, float]] = {}
    for row in scores:
        by_query.setdefault(row["qid"], {})[row["docid"]] = row["score"]
    run = {}
    for qid in ds.query_order():
        got = by_query.get(qid, {})
        floor = math.floor(min(got.values())) if got else 0.0
        missing = [d for d, _ in ds.candidates[qid][:top_k] if d not in got]
        run[qid] = {**got, **{d: floor - 1.0 - i for i, d in enumerate(missing)}}
    return run


def _trec_lines(run: dict[str, dict[str, float]], order: list[str]) -> str:
    lines = []
    for qid in order:
        for rank, (docid, score) in enumerate(trec_order(run[qid]), 1):
            lines.append(f"{qid} Q0 {docid} {rank} {score!r} {RUN_TAG}\n")
    return "".join(lines)


def run_suite(job: _Job) -> int:
    a = job.args
    metrics = parse_metrics(a.metrics)
    names = [n.strip() for n in a.datasets.split(",") if n.strip()] if a.datasets else None
    datasets, unreadable = _load_suite(find_datasets(a.data, names))  # all read before any work
    seen = {}
    for ds in datasets:
        if ds.name in seen:
            raise InputError(os.path.join(ds.root, "dataset.json"), f"dataset name {ds.name!r} is also used by {seen[ds.name]}")
        seen[ds.name] = ds.root
    os.makedirs(a.out, exist_ok=True)
    job.check_job_file(os.path.join(a.out, "job.json"), a.resume, f"--out {a.out}")

    started = time.time()
    per_dataset, run_stats, total_scored = {}, {}, 0
    for ds in datasets:
        out_dir = os.path.join(a.out, ds.name)
        os.makedirs(out_dir, exist_ok=True)
        tasks, sizes = _dataset_tasks(ds, a.top_k, a.instruction)
        scores = Journal(os.path.join(out_dir, "scores.jsonl"), _suite_key)
        errors = Journal(os.path.join(out_dir, "errors.jsonl"), _suite_key)
        _record_problems(errors, [(os.path.relpath(e.path, ds.root), e) for e in ds.problems])
        stats = Stats(pairs=len(tasks))
        left = sum(1 for t in tasks if t.key not in scores.done and t.key not in errors.done)
        progress = Progress(left, job.progress_enabled, f"{ds.name}: ")
        try:
            if left:
                job.run_tasks(tasks, chunk_bounds(sizes, a.chunk_pairs), scores, errors, progress, stats)
        finally:
            progress.close()
            scores.close()
            errors.close()
        run_stats[ds.name] = {**stats.as_dict(), "malformed_rows": len(ds.problems)}

        run = _reranked_run(ds, a.top_k, scores.rows)
        run_path = os.path.join(out_dir, "run.trec")
        if not os.path.exists(run_path):  # finished output is never rewritten
            write_atomic(run_path, _trec_lines(run, ds.query_order()))
        first_stage = {q: dict(ds.candidates[q][:a.top_k]) for q in ds.query_order()}
        judged = {q: r for q, r in ds.qrels.items() if q in first_stage}
        fs_means, _ = evaluate(judged, first_stage, metrics)
        rr_means, per_query = evaluate(judged, run, metrics)
        total_scored += len(scores.rows)
        per_dataset[ds.name] = {"task": ds.task, "category": ds.category, "queries": len(per_query),
                                "pairs": len(tasks), "scored": len(scores.rows),
                                "failed": sum(1 for r in errors.rows if "qid" in r), "malformed_rows": len(ds.problems),
                                "truncated": sum(1 for r in scores.rows if r.get("truncated")),
                                "first_stage": fs_means, "reranked": rr_means}

    report = build_report(per_dataset, metrics, unreadable)
    write_atomic(os.path.join(a.out, "report.json"), json.dumps(report, indent=2) + "\n")
    write_atomic(os.path.join(a.out, "report.md"), report_markdown(report))
    _write_run_json(job, os.path.join(a.out, "run.json"), started, run_stats, unreadable)
    if not a.quiet:
        print(report_markdown(report))
    if total_scored == 0:
        raise JobError("nothing could be scored: every pair failed (see errors.jsonl in each dataset's output)")
    if unreadable:
        raise JobError(f"{len(unreadable)} of {len(unreadable) + len(datasets)} datasets could not be read and were "
                       f"left out of the report ({', '.join(unreadable)}); the others are scored and evaluated. "
                       "Fix them and rerun with --resume: finished datasets are not redone")
    return 0


def _load_suite(roots: list[str]) -> tuple[list[Dataset], dict[str, str]]:
    """Every dataset of the suite read and checked. One that cannot be used at all (a missing or
    invalid dataset.json, a missing file) is left out, named on stderr and returned with its error
    (directory name -> message), so that one broken directory does not stop a suite; when nothing
    is usable, or the path is a single dataset, its error stops the job before anything is written."""
    datasets, unreadable, first = [], {}, None
    for root in roots:
        try:
            datasets.append(load_dataset(root))
        except InputError as e:
            unreadable[os.path.basename(os.path.normpath(root))] = str(e)
            first = first or e
    if not datasets:
        raise first
    for name, message in unreadable.items():
        print(f"gmr_fast.score: dataset {name} left out: {message}", file=sys.stderr)
    return datasets, unreadable


def _suite_key(row: dict):
    """A pair's row is keyed by (qid, docid); a malformed input line's by its file and line."""
    return (row["qid"], row["docid"]) if "qid" in row else ("input", row["file"], row["line"])


def _record_problems(errors: Journal, problems: list[tuple[str, InputError]]) -> None:
    """Malformed input lines, each an error row ``{"file", "line", "error"}`` (once: a resumed job
    finds them in the journal), warned about on stderr."""
    rows = [{"file": name, "line": e.line, "error": str(e)} for name, e in problems]
    new = [r for r in rows if ("input", r["file"], r["line"]) not in errors.done]
    if new:
        errors.append(new)
    for r in rows[:5]:
        print(f"gmr_fast.score: skipped malformed input: {r['error']}", file=sys.stderr)
    if len(rows) > 5:
        print(f"gmr_fast.score: ... and {len(rows) - 5} more malformed lines (see the errors file)", file=sys.stderr)


def _write_run_json(job: _Job, path: str, started: float, run_stats: dict, unreadable: dict | None = None) -> None:
    scored = sum(s["scored_this_session"] for s in run_stats.values())
    seconds = sum(s["seconds"] for s in run_stats.values())
    tokens = sum(s["tokens_per_s"] * s["seconds"] for s in run_stats.values())
    history = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            history = json.load(f).get("sessions", [])
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "wall_seconds": time.time() - started,
               "resumed": bool(job.args.resume), "pairs_scored": scored, **job.choice,
               "pairs_per_s": scored / seconds if seconds else 0.0,
               "tokens_per_s": tokens / seconds if seconds else 0.0, "datasets": run_stats,
               "unreadable_datasets": unreadable or {}}
    doc = {"engine": {"path": os.path.abspath(job.args.engine), "manifest_sha256": job.engine_sha},
           "arguments": {k: v for k, v in vars(job.args).items()}, "settings": job.settings,
           "versions": _versions(), "sessions": history + [session]}
    write_atomic(path, json.dumps(doc, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- pairs
def _side(value, path: str, n: int, name: str) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and set(value) <= {"text", "image"} and value:
        text, image = value.get("text"), value.get("image")
        if (text is None or isinstance(text, str)) and (image is None or (isinstance(image, str) and image)):
            return text, image
    raise InputError(path, f"'{name}' must be a string or {{\"text\", \"image\"}}, got {json.dumps(value)[:80]}", n)


def _pairs_tasks(path: str, image_root: str) -> tuple[list[Task], list[InputError]]:
    """The rows as tasks, and the lines that cannot be one. A malformed row with a usable, unique
    id is a task that fails (its error row carries the id); a line without one (not JSON, no id,
    an id seen before) is listed, to be recorded by line."""
    tasks, seen, problems = [], {}, []
    for n, row in read_jsonl(path, problems):
        rid = row.get("id")
        if not isinstance(rid, str) or not rid:
            problems.append(InputError(path, f"'id' must be a non-empty string, got {rid!r}", n))
            continue
        if text_problem(rid) is not None:  # the output could not hold it (a lone surrogate)
            problems.append(InputError(path, f"'id' {rid!r}: {text_problem(rid)}; ids are written to UTF-8 outputs", n))
            continue
        if rid in seen:
            problems.append(InputError(path, f"duplicate id {rid!r} (first on line {seen[rid]})", n))
            continue
        seen[rid] = n
        try:
            for name in ("query", "document"):
                if name not in row:
                    raise InputError(path, f"row {rid!r} has no '{name}'", n)
            instruction = row.get("instruction")
            if instruction is not None and not isinstance(instruction, str):
                raise InputError(path, "'instruction' must be a string", n)
            q, q_err = _item(_side(row["query"], path, n, "query"), image_root, f"row {rid!r} query")
            d, d_err = _item(_side(row["document"], path, n, "document"), image_root, f"row {rid!r} document")
        except InputError as e:
            tasks.append(Task(rid, None, None, None, {"id": rid}, f"row {rid!r}", str(e)))
            continue
        tasks.append(Task(rid, q, d, instruction, {"id": rid}, f"row {rid!r}", q_err or d_err))
    return tasks, problems


def run_pairs(job: _Job) -> int:
    a = job.args
    image_root = a.image_root or os.path.dirname(os.path.abspath(a.input))
    tasks, problems = _pairs_tasks(a.input, image_root)
    stem = a.output[:-len(".jsonl")] if a.output.endswith(".jsonl") else a.output
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    job.check_job_file(f"{stem}.job.json", a.resume, f"--output {a.output}")
    started = time.time()
    # a pair's row is keyed by its id; a line that is not a usable row by its line number
    key = lambda row: row["id"] if "id" in row else ("input", row["file"], row["line"])  # noqa: E731
    scores, errors = Journal(a.output, key), Journal(f"{stem}.errors.jsonl", key)
    _record_problems(errors, [(os.path.basename(a.input), e) for e in problems])
    stats = Stats(pairs=len(tasks))
    left = sum(1 for t in tasks if t.key not in scores.done and t.key not in errors.done)
    progress = Progress(left, job.progress_enabled)
    try:
        if left:
            job.run_tasks(tasks, chunk_bounds([1] * len(tasks), a.chunk_pairs), scores, errors, progress, stats)
    finally:
        progress.close()
        scores.close()
        errors.close()
    _write_run_json(job, f"{stem}.run.json", started, {"pairs": {**stats.as_dict(), "malformed_rows": len(problems)}})
    if not a.quiet:
        failed = sum(1 for r in errors.rows if "id" in r)
        print(f"{len(scores.rows)} scored, {failed} failed of {len(tasks)} pairs"
              + (f", {len(problems)} malformed lines skipped" if problems else "") + f" -> {a.output}", file=sys.stderr)
    if (tasks or problems) and not scores.rows:
        raise JobError(f"nothing could be scored: every pair failed (see {stem}.errors.jsonl)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.engine:
        parser.error("--engine is required")
    suite_mode = args.data is not None or args.out is not None
    pairs_mode = args.input is not None or args.output is not None
    if suite_mode == pairs_mode or (suite_mode and not (args.data and args.out)) or (pairs_mode and not (args.input and args.output)):
        parser.error("give either --data and --out (suite mode) or --input and --output (pairs mode)")
    for flag in ("top_k", "max_batch_tokens", "max_batch_size", "chunk_pairs", "workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.worker_cpus <= 0 or args.worker_gpus < 0:
        parser.error("--worker-cpus must be > 0 and --worker-gpus >= 0")
    try:
        job = _Job(args)
        return run_suite(job) if suite_mode else run_pairs(job)
    except (EngineError, BackendError) as e:
        print(f"gmr_fast.score: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except (ConfigError, JobError, GmrError) as e:
        print(f"gmr_fast.score: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:  # the file system, not the input: say which file and why
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"gmr_fast.score: I/O error{where}: {e.strerror or e}; finished work is kept, rerun with --resume",
              file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())


