"""Load test of ``python -m gmr_fast.serve`` on loopback: 1, 4 and 16 concurrent clients sending
Cohere-style rerank requests of 20-50 documents; throughput and p50/p95/p99 latency, failures
counted (there must be none). Bounded in count and time.

    python benchmarks/serve.py --engine ENGINE --out benchmarks/results/serve_cpu.json

The baseline is one client sending the same requests one after another (each waits for the
previous answer): what a server without batching across requests would give at best. With more
clients, concurrent requests share the engine's token-budget batches (and a query's documents
share its prefix), and request parsing overlaps scoring. The levels alternate over ``--rounds``
(1, 4, 16, 1, 4, 16, ...) because this VM's speed drifts over minutes; each level reports its
median throughput and the latency percentiles of all its requests. One server runs per
``--lanes`` value (default 1 and 2: one engine run at a time, or two side by side), all started
at once so that their rounds alternate too. Each level also records the server process's CPU time
(Linux /proc): the cores it kept busy and its CPU cost per pair, which is what bounds the gain
from concurrency on a machine with few cores.

``--server-args`` passes options to every server (``--backend torch --device cuda``, budgets), and
``--shape name:decoder_layers:vision_layers`` generates that random-weight checkpoint of GMR's widths and
exports its bf16 engine first (cuda_mrb.py's, on the machine's CPU), so that a GPU machine that
has none of them can run this as one prepared call (benchmarks/cuda_prepare.sh)::

    python3 benchmarks/serve.py --shape gmr-3b:6:8 --tokenizer-cache .gpu --lanes 1 \
        --server-args "--backend torch --device cuda --max-batch-tokens 16384 --activation-budget-mb 16384" \
        --out $OUT/serve_cuda.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import ROOT, machine, write  # noqa: E402

WORDS = "the of and a to in is for on that with as by this are from at be river mountain chart table photo".split()


def requests(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731
    return [{"model": "gmr", "query": text(3, 10), "documents": [text(20, 120) for _ in range(int(rng.integers(20, 51)))]}
            for _ in range(n)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc), all its threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(url: str, reqs: list[dict], clients: int, timeout: float, server_pid: int | None = None) -> dict:
    import httpx

    latencies, failures = [], 0

    def send(client, body):
        start = time.perf_counter()
        r = client.post(url + "/v2/rerank", json=body, timeout=timeout)
        ok = r.status_code == 200 and len(r.json()["results"]) == len(body["documents"])
        return time.perf_counter() - start, ok

    cpu = cpu_seconds(server_pid) if server_pid else None
    started = time.perf_counter()
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for latency, ok in pool.map(lambda b: send(client, b), reqs):
            latencies.append(latency)
            failures += int(not ok)
    wall = time.perf_counter() - started
    pairs = sum(len(b["documents"]) for b in reqs)
    out = {"clients": clients, "requests": len(reqs), "failures": failures, "seconds": wall,
           "requests_per_s": len(reqs) / wall, "pairs_per_s": pairs / wall, "latencies_s": latencies}
    if server_pid:  # how busy the server kept the cores, and its CPU cost per pair
        cpu = cpu_seconds(server_pid) - cpu
        out.update(server_cpu_cores=cpu / wall, server_cpu_us_per_pair=1e6 * cpu / pairs)
    return out


def summarize(runs: list[dict]) -> dict:
    """One load level over its rounds: median throughput, latency percentiles of every request."""
    latencies = [x for r in runs for x in r["latencies_s"]]
    return {"clients": runs[0]["clients"], "requests": sum(r["requests"] for r in runs),
            "failures": sum(r["failures"] for r in runs), "seconds": sum(r["seconds"] for r in runs),
            "pairs_per_s": float(np.median([r["pairs_per_s"] for r in runs])),
            "pairs_per_s_rounds": [r["pairs_per_s"] for r in runs],
            **({k: float(np.median([r[k] for r in runs])) for k in ("server_cpu_cores", "server_cpu_us_per_pair")}
               if "server_cpu_cores" in runs[0] else {}),
            **{f"p{q}_ms": 1e3 * float(np.percentile(latencies, q)) for q in (50, 95, 99)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", help="an engine directory (or --shape)")
    p.add_argument("--shape", help="name:decoder_layers:vision_layers: generate this checkpoint and export its bf16 "
                                   "engine under --work first (unless there), and serve that")
    p.add_argument("--work", default="/tmp/gmr_cuda")
    p.add_argument("--tokenizer-cache", help="a folder holding qwen2_tokenizer.json (export.factory's cache)")
    p.add_argument("--validation", default="1,3", help="QUERIES,DOCUMENTS of the export's (CPU) validation")
    p.add_argument("--server-args", default="", help="more options for every server, one string "
                                                     "(e.g. \"--backend torch --device cuda\")")
    p.add_argument("--requests", type=int, default=96, help="requests per load level and round")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3, help="the levels alternate this many times")
    p.add_argument("--lanes", default="1,2", help="the servers' --lanes (engine runs side by side), one server each")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default="benchmarks/results/serve_cpu.json")
    a = p.parse_args(argv)
    if (a.engine is None) == (a.shape is None):
        p.error("give one of --engine and --shape")
    server_args = shlex.split(a.server_args)
    built = None
    if a.shape:
        from cuda_mrb import build_checkpoint, checkpoint_dir, engine_dir, export_bf16

        ckpt = checkpoint_dir(a.shape, pathlib.Path(a.work))
        a.engine = str(engine_dir(ckpt))
        started = time.perf_counter()
        build_checkpoint(a.shape, ckpt, a.tokenizer_cache)
        if not (pathlib.Path(a.engine) / "manifest.json").exists():
            built = export_bf16(ckpt, pathlib.Path(a.engine), [int(n) for n in a.validation.split(",")])
        print(f"engine {a.engine} ready in {time.perf_counter() - started:.1f} s", flush=True)
    lanes = [int(x) for x in a.lanes.split(",")]
    servers, urls, pids = [], {}, {}
    try:
        import httpx

        for n in lanes:  # one server per lanes setting, all up at once: the runs alternate between them
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            servers.append(subprocess.Popen([sys.executable, "-m", "gmr_fast.serve", "--engine", a.engine, "--port",
                                             str(port), "--lanes", str(n), "--log-level", "warning", *server_args],
                                            cwd=ROOT))
            urls[n], pids[n] = f"http://127.0.0.1:{port}", servers[-1].pid
        for url in urls.values():
            for _ in range(1200):
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        info = {n: httpx.get(url + "/info").json() for n, url in urls.items()}
        reqs = requests(a.requests)
        for url in urls.values():
            run_clients(url, requests(4, seed=1), 2, a.timeout)  # warm-up
        counts = [int(c) for c in a.clients.split(",")]
        runs = {(n, c): [] for n in lanes for c in counts}
        for _ in range(a.rounds):
            for n in lanes:
                for c in counts:
                    runs[n, c].append(run_clients(urls[n], reqs, c, a.timeout, pids[n]))
        levels = []
        for n in lanes:
            rows = [dict(lanes=n, **summarize(runs[n, c])) for c in counts]
            for row in rows:
                row["throughput_vs_one_client"] = row["pairs_per_s"] / rows[0]["pairs_per_s"]
                row["throughput_vs_one_client_one_lane"] = row["pairs_per_s"] / summarize(runs[lanes[0], counts[0]])["pairs_per_s"]
                print(json.dumps(row), flush=True)
            levels += rows
        metrics = {n: httpx.get(url + "/metrics").text for n, url in urls.items()}
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(60)
    rounds = {n: [line for line in m.splitlines() if line.startswith("gmr_round_pairs_")] for n, m in metrics.items()}
    doc = {"machine": machine(), "engine": os.path.abspath(a.engine), "shape": a.shape, "server_args": server_args,
           "servers": info, "lanes": lanes, "levels": levels, "round_pairs_metrics": rounds}
    if built:
        doc["export"] = built
    if any(x.startswith("cuda") for x in server_args):
        import torch
        from cuda_mrb import device_info

        doc["device"] = device_info(torch)
    write(a.out, doc)
    print("| lanes | clients | requests | failures | pairs/s | vs 1 client | p50 ms | p95 ms | p99 ms "
          "| server cores busy | server CPU us/pair |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in levels:
        print(f"| {r['lanes']} | {r['clients']} | {r['requests']} | {r['failures']} | {r['pairs_per_s']:.1f} | "
              f"{r['throughput_vs_one_client']:.2f}x | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r.get('server_cpu_cores', float('nan')):.2f} | {r.get('server_cpu_us_per_pair', float('nan')):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
