"""``python -m gmr_fast.score`` on one process against Ray with 1 and 2 workers, on this machine.

    python benchmarks/ray_scaleout.py --engine ENGINE --out benchmarks/results/ray_scaleout_cpu.json

The same pairs job (text queries x 8 documents of 30-400 words, fixed seed) runs three ways:
one process with all cores' threads (the baseline), ``--ray local --workers 1 --worker-cpus N``
and ``--ray local --workers 2 --worker-cpus N/2``. Ray runs inside a network namespace that has
only loopback (``unshare -n``; Ray otherwise binds to the machine's address), as in the tests.
Reported: wall seconds of the whole command (Ray start-up and engine loads included) and the
scoring pairs/s the job records in its run.json, plus whether the scores equal the baseline's
byte for byte. On a 2-core machine two 1-thread workers do the work of one 2-thread process, so
little gain is expected here; the point of Ray is more machines and GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import ROOT, machine, write  # noqa: E402

WORDS = "the of and a to in is for on that with as by this are from at be river mountain chart table photo".split()


def pairs_file(path: str, queries: int, documents: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731
    n = 0
    with open(path, "w") as f:
        for q in range(queries):
            query = text(4, 12)
            for d in range(documents):
                f.write(json.dumps({"id": f"q{q}-d{d}", "query": query, "document": text(30, 400)}) + "\n")
                n += 1
    return n


def in_namespace(args: list[str]) -> list[str]:
    return ["unshare", "-n", "--", "bash", "-c", 'ip link set lo up && exec "$@"', "bash", *args]


def run(engine: str, pairs: str, out: str, extra: list[str], namespace: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "gmr_fast.score", "--engine", engine, "--input", pairs, "--output", out, "--quiet",
           *extra]
    start = time.perf_counter()
    proc = subprocess.run(in_namespace(cmd) if namespace else cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    session = json.load(open(out[:-len(".jsonl")] + ".run.json"))["sessions"][-1]
    return {"wall_seconds": wall, "pairs_per_s": session["pairs_per_s"], "precision": session.get("precision"),
            "pairs": session["pairs_scored"], "scores": open(out, "rb").read()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--documents", type=int, default=8)
    p.add_argument("--chunk-pairs", type=int, default=16)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default="benchmarks/results/ray_scaleout_cpu.json")
    a = p.parse_args(argv)
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        pairs = os.path.join(tmp, "pairs.jsonl")
        n = pairs_file(pairs, a.queries, a.documents)
        common = ["--chunk-pairs", str(a.chunk_pairs)]
        rows = {"single_process": run(a.engine, pairs, os.path.join(tmp, "single.jsonl"),
                                      [*common, "--threads", str(cores)], False, a.timeout)}
        for workers in (1, 2):
            rows[f"ray_{workers}_workers"] = run(
                a.engine, pairs, os.path.join(tmp, f"ray{workers}.jsonl"),
                [*common, "--ray", "local", "--workers", str(workers), "--worker-cpus", str(max(1, cores // workers))],
                True, a.timeout)
    base = rows["single_process"]
    for row in rows.values():
        row["identical_scores"] = row["scores"] == base["scores"]
        row["wall_speedup"] = base["wall_seconds"] / row["wall_seconds"]
        row["pairs_per_s_ratio"] = row["pairs_per_s"] / base["pairs_per_s"]
    for row in rows.values():
        row.pop("scores")
    doc = {"machine": machine(), "engine": os.path.abspath(a.engine), "pairs": n, "rows": rows}
    write(a.out, doc)
    for name, row in rows.items():
        print(f"{name:16s} wall {row['wall_seconds']:7.1f} s  {row['pairs_per_s']:6.2f} pairs/s  "
              f"x{row['pairs_per_s_ratio']:.2f}  identical={row['identical_scores']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
