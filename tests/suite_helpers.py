"""Writes small datasets in the score CLI's format for tests (hand-made, deterministic), and runs
code in a fresh interpreter (for what is process-wide: seccomp filters, allocator settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
from PIL import Image


def write_dataset(root: str, name: str, task: str, queries: list[dict], corpus: list[dict],
                  qrels: list[tuple[str, str, int]], candidates: list[tuple[str, str, float]],
                  instruction: str | None = "Given a query, find relevant documents.") -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    meta = {"name": name, "task": task}
    if instruction is not None:
        meta["instruction"] = instruction
    with open(os.path.join(path, "dataset.json"), "w") as f:
        json.dump(meta, f)
    for fname, rows in (("queries.jsonl", queries), ("corpus.jsonl", corpus)):
        with open(os.path.join(path, fname), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(path, "qrels.tsv"), "w") as f:
        f.write("query_id\tdoc_id\trelevance\n")
        f.writelines(f"{q}\t{d}\t{r}\n" for q, d, r in qrels)
    with open(os.path.join(path, "candidates.trec"), "w") as f:
        ranks: dict[str, int] = {}
        for q, d, s in candidates:
            ranks[q] = ranks.get(q, 0) + 1
            f.write(f"{q} Q0 {d} {ranks[q]} {s} first\n")
    return path


def save_image(path: str, seed: int, size=(64, 48)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def mixed_dataset(root: str, name: str = "mixed", n_queries: int = 6, n_docs: int = 14, seed: int = 0) -> str:
    """Text and image queries/documents with random judgements and a shuffled candidate list."""
    rng = np.random.default_rng(seed)
    path = os.path.join(root, name)
    words = ["red", "circle", "blue", "square", "three", "green", "small", "large", "triangle", "two"]
    queries, corpus = [], []
    for i in range(n_queries):
        row = {"id": f"q{i}", "text": " ".join(rng.choice(words, 4))}
        if i % 3 == 1:
            save_image(os.path.join(path, "images", f"q{i}.png"), seed * 1000 + i)
            row["image"] = f"images/q{i}.png"
        queries.append(row)
    for j in range(n_docs):
        row = {"id": f"d{j}", "text": " ".join(rng.choice(words, int(rng.integers(3, 30))))}
        if j % 4 == 2:
            save_image(os.path.join(path, "images", f"d{j}.png"), seed * 1000 + 500 + j)
            row["image"] = f"images/d{j}.png"
            if j % 8 == 2:
                del row["text"]
        corpus.append(row)
    qrels, candidates = [], []
    for i in range(n_queries):
        docs = rng.permutation(n_docs)[:10]
        for d in docs[:3]:
            qrels.append((f"q{i}", f"d{d}", int(rng.integers(0, 3))))
        for r, d in enumerate(docs):
            candidates.append((f"q{i}", f"d{d}", round(10.0 - r * 0.5, 3)))
    return write_dataset(root, name, "it2it", queries, corpus, qrels, candidates)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_json(code: str, env: dict | None = None, timeout: float = 300) -> dict:
    """Runs ``code`` in a new interpreter with the repository (and benchmarks/) importable, and
    returns the JSON object on the last line of its output."""
    prelude = f"import sys\nsys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'benchmarks')!r}]\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_two_runs_meet(backend, timeout: float = 60) -> threading.Barrier:
    """Wraps ``backend.score`` so that its first two calls wait for each other at a barrier:
    they pass only if two decoder runs can be in flight at once (lanes), and a call raises
    BrokenBarrierError after ``timeout`` seconds otherwise. Later calls go straight through."""
    barrier, entered, lock = threading.Barrier(2, timeout=timeout), [0], threading.Lock()
    real_score = backend.score

    def meeting_score(batch, images):
        with lock:
            entered[0] += 1
            first_two = entered[0] <= 2
        if first_two:
            barrier.wait()
        return real_score(batch, images)
    backend.score = meeting_score
    return barrier
