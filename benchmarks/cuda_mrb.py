"""The MRB workload and the two search-latency calls on a CUDA GPU: gmr_fast's torch backend
(the engine's bf16 variant, prefixes shared and not) against HuggingFace's strong form in bf16
and fp32 on the same GPU, in one process, for the few minutes a lent GPU machine gives.

    python benchmarks/cuda_mrb.py --shapes gmr-3b:6:8,gmr-3b:36:32 --out benchmarks/results/cuda_mrb_h200.json

Per shape (``name:decoder_layers:vision_layers``, GMR-3B's widths, random weights): the checkpoint
is generated, exported with ``--dtype bf16`` (the variant a GPU runs), then every task of
``mrb_workload.py`` (t2t, i2t, t2i, it2it: the same pairs, queries x candidates) is scored by
gmr_fast with prefixes shared and not shared, by HF bf16 and by HF fp32 (the ranking reference;
TF32 off, so fp32 arithmetic), each after a warm-up on other pairs, the best of ``--repeat``
timed runs. Then ``rank(query, 50 text documents)`` and one query with one image document, p50
over ``--latency-requests`` calls against HF bf16 on the same calls. Both sides get the same
token budget per batch (``--batch-tokens``, ``--batch-size``); gmr_fast's memory budgets are
raised to the GPU's scale (``--activation-mb``, ``--kv-mb``). Two more gmr_fast contenders, in the
throughput rows and the latency calls: ``gmr_shared_masked_gqa``, the decoder's attention as it was
before 5 Dec (grouped keys under a mask in one sdpa call, which CUDA runs on its math kernel:
graphs.decoder ``masked_gqa``), and ``gmr_defaults``, the Reranker with its default settings,
which are sized for a CPU (``--no-masked-gqa``, ``--no-defaults`` leave them out). The latency
calls run every gmr_fast contender, prefixes not shared and each ``--min-fill`` included: a short
call's time follows the number of runs it makes (benchmarks/README.md "Host operations").

The export validates bf16 on a tiny set on the machine's CPU, with the ranking bars off
(``--accept-*`` at their floor): on a few pairs one near tie would refuse the only variant and
end the run; this benchmark measures ranking itself, on the GPU, against HF fp32 over every
pair of every task (per-query Kendall tau, top-10 overlap), as the export's criterion reads it.
A stage that fails is recorded with its error and the run goes on; stages not started before
``--deadline`` seconds are recorded as skipped. The JSON is rewritten after every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from mrb_workload import TARGETS, TASKS, WORDS, _image, task_pairs  # noqa: E402

STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


def write(path: str, doc: dict) -> None:
    """common.write, but atomic (a device call killed at its limit leaves the last whole JSON)
    and with non-JSON values (the Reranker's ``choice``) as strings."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(p)


def device_info(torch) -> dict:
    from importlib import metadata

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info.update(gpu=prop.name, gpu_memory_bytes=prop.total_memory, multiprocessors=prop.multi_processor_count,
                    capability=f"{prop.major}.{prop.minor}")
    for dist in ("transformers", "numpy", "onnxruntime", "tokenizers"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    info["cpu_cores"] = os.cpu_count()
    return info


class Timed:
    """A contender's score(pairs) -> np.ndarray, timed after a warm-up, best of ``repeat``."""

    def __init__(self, name: str, fn, torch, device: str):
        self.name, self.fn, self.torch, self.device = name, fn, torch, device

    def run(self, pairs: list, warm: list, repeat: int) -> dict:
        torch = self.torch
        self.fn(warm)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        best, scores = None, None
        for _ in range(repeat):
            start = time.perf_counter()
            scores = np.asarray(self.fn(pairs), np.float64)  # numpy on the host: the GPU's work is done
            t = time.perf_counter() - start
            best = t if best is None else min(best, t)
        row = {"pairs": len(pairs), "seconds": best, "pairs_per_s": len(pairs) / best, "scores": scores.tolist()}
        if self.device.startswith("cuda"):
            row["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        return row


def latency(fn, calls: list, torch, device: str) -> dict:
    fn(calls[0])
    times = []
    for c in calls[1:]:
        start = time.perf_counter()
        fn(c)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"requests": len(times), "p50_ms": 1e3 * float(np.percentile(times, 50)),
            "p95_ms": 1e3 * float(np.percentile(times, 95)), "times_ms": [1e3 * t for t in times]}


def latency_calls(what: str, requests: int) -> list:
    """The same calls as mrb_workload.py's latency part (its seed and lengths)."""
    rng = np.random.default_rng(7)
    text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731
    if what == "rank50":
        calls = []
        for _ in range(requests + 1):
            docs = [text(30, 400) for _ in range(50)]
            q = text(4, 12)
            calls.append([(q, d) for d in docs])
        return calls
    return [[(text(4, 12), {"image": _image(rng, 256, 768)})] for _ in range(requests + 1)]


def checkpoint_dir(spec: str, work: pathlib.Path) -> pathlib.Path:
    """Where ``name:decoder_layers:vision_layers``'s checkpoint lives under ``work``."""
    shape, layers, vlayers = spec.split(":")
    return work / f"{shape}-L{layers}-V{vlayers}"


def engine_dir(ckpt: pathlib.Path) -> pathlib.Path:
    """Where a checkpoint's bf16 engine is exported: beside it."""
    return ckpt.parent / f"{ckpt.name}-engine-bf16"


def build_checkpoint(spec: str, ckpt: pathlib.Path, tokenizer_cache: str | None) -> None:
    """The random-weight checkpoint of ``spec`` (GMR's widths, reduced depth), unless it is there."""
    from export.factory import build_shape_checkpoint

    shape, layers, vlayers = spec.split(":")
    if not (ckpt / "model.safetensors.index.json").exists():
        build_shape_checkpoint(ckpt, shape, int(layers), int(vlayers), cache_dir=tokenizer_cache)


def export_bf16(ckpt: pathlib.Path, engine: pathlib.Path, validation: list[int]) -> dict:
    """``python -m export --dtype bf16`` of ``ckpt`` into ``engine``, validated on the machine's CPU
    on ``validation`` = [queries, documents] with the ranking bars at their floor (see above);
    returns what the run records of it."""
    from export.engine_export import ExportOptions, export_engine
    from export.validate import Criterion

    floor = Criterion(min_query_tau=-1.0, min_mean_top10=0.0, min_top10=0.0, min_long_tau=-1.0)
    m = export_engine(ckpt, engine, ExportOptions(
        dtypes=("bf16",), force=True, validation_queries=validation[0], validation_documents=validation[1],
        validation_long_documents=0, criterion=floor, reference_cache=False))
    return {"variants": list(m.variants), "weight_bytes": sum(f.stat().st_size for f in engine.iterdir()),
            "bf16_validation_cpu": {k: m.variants["bf16"].validation.get(k)
                                    for k in ("query_kendall_tau_mean", "max_abs_diff", "pairs")}}


def run_shape(spec: str, a, doc: dict, torch) -> None:
    from export.validate import compare
    from gmr_fast import Reranker
    from hf_baseline import HFStrong

    out = doc["shapes"].setdefault(spec, {"stages": {}})
    stages = out["stages"]
    work = pathlib.Path(a.work)
    if a.checkpoint:  # a given checkpoint (a quick check of this script on any machine)
        ckpt = pathlib.Path(a.checkpoint)
    else:
        ckpt = checkpoint_dir(spec, work)
    engine = engine_dir(work / ckpt.name)

    def stage(name: str, fn):
        if elapsed() > a.deadline:
            stages[name] = {"skipped": f"past the {a.deadline:.0f} s deadline at {elapsed():.0f} s"}
            write(a.out, doc)
            return None
        start = time.perf_counter()
        print(f"[{elapsed():6.1f} s] {spec} {name} ...", flush=True)
        try:
            result = fn()
            stages[name] = {"seconds": round(time.perf_counter() - start, 2), "ok": True}
            return result
        except Exception as e:  # recorded; the run goes on with what it has
            stages[name] = {"seconds": round(time.perf_counter() - start, 2), "ok": False,
                            "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            print(stages[name]["traceback"], flush=True)
            return None
        finally:
            write(a.out, doc)

    def build():
        if not a.checkpoint:
            build_checkpoint(spec, ckpt, a.tokenizer_cache)
        return True

    if not stage("checkpoint", build):
        return

    def export():
        out["engine"] = export_bf16(ckpt, engine, a.validation)
        return True

    if not stage("export", export):
        return
    settings = {"max_batch_tokens": a.batch_tokens, "max_batch_size": a.batch_size}
    gmr_settings = {**settings, "activation_budget_mb": a.activation_mb, "kv_budget_mb": a.kv_mb}
    out["settings"] = {"hf": settings, "gmr": gmr_settings, "gmr_min_fill": a.min_fill, "device": a.device}
    contenders = {}

    def load():
        for i, fill in enumerate(a.min_fill):  # the first is the plain contenders, others suffixed @fill
            for name, share in (("gmr_shared", True), ("gmr_not_shared", False)):
                name = name if i == 0 else f"{name}@{fill:g}"
                r = Reranker(engine, device=a.device, share_prefix=share, min_fill=fill, **gmr_settings)
                contenders[name] = Timed(name, r.score, torch, a.device)
                out.setdefault("gmr_choice", r.choice)
        if a.masked_gqa:  # the decoder's attention as before 5 Dec: grouped keys under a mask (graphs.decoder)
            r = Reranker(engine, device=a.device, min_fill=a.min_fill[0], **gmr_settings)
            for decoder in (r.backend.decoder, r.backend.exact_decoder):
                for layer in decoder.layers if decoder is not None else ():
                    layer.masked_gqa = True
            contenders["gmr_shared_masked_gqa"] = Timed("gmr_shared_masked_gqa", r.score, torch, a.device)
        if a.defaults:  # what a user gets: Reranker(engine, device=...) and nothing else
            contenders["gmr_defaults"] = Timed("gmr_defaults", Reranker(engine, device=a.device).score, torch, a.device)
        for dtype in ("bf16", "fp32"):
            hf = HFStrong(ckpt, dtype, device=a.device, **settings)
            contenders[f"hf_{dtype}"] = Timed(f"hf_{dtype}", lambda pairs, hf=hf: hf.score(pairs)[0], torch, a.device)
        return True

    if not stage("load", load):
        return
    out["tasks"] = {}
    for task in a.tasks:
        def measure(task=task):
            pairs = task_pairs(task, a.queries, a.candidates)
            warm = task_pairs(task, 1, 4, seed=99)
            rows = {}
            for name, c in contenders.items():  # a contender that fails is recorded; the others still run
                try:
                    rows[name] = c.run(pairs, warm, a.repeat if name != "hf_fp32" else 1)
                except Exception as e:
                    rows[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
                    print(rows[name]["traceback"], flush=True)
            out["tasks"][task] = rows
            ran = {n: r for n, r in rows.items() if "error" not in r}
            sizes = [a.candidates] * a.queries
            scores = {n: np.array(r.pop("scores")) for n, r in ran.items()}
            for name, row in ran.items():
                if "hf_fp32" in scores:
                    fig = compare(scores["hf_fp32"], scores[name], sizes)
                    row.update(query_kendall_tau_mean=fig["query_kendall_tau_mean"], kendall_tau=fig["kendall_tau"],
                               top10_overlap_mean=fig["top10_overlap_mean"], max_abs_diff=fig["max_abs_diff"])
                if "hf_bf16" in ran:
                    row["speedup_vs_hf_bf16"] = row["pairs_per_s"] / ran["hf_bf16"]["pairs_per_s"]
            rows["target_vs_hf_bf16"] = TARGETS[task]
            print(json.dumps({task: {n: [round(r[k], 3) for k in ("pairs_per_s", "speedup_vs_hf_bf16",
                                                                  "query_kendall_tau_mean") if k in r]
                                     for n, r in ran.items()}}), flush=True)
            if len(ran) < len(contenders):
                raise RuntimeError(f"{', '.join(sorted(set(contenders) - set(ran)))} failed (recorded in the rows)")
            return True

        stage(f"task_{task}", measure)
    out["latency"] = {}
    for what in ("rank50", "one_image_pair"):
        def measure_latency(what=what):
            calls = latency_calls(what, a.latency_requests)
            rows = {"hf_bf16": latency(contenders["hf_bf16"].fn, calls, torch, a.device)}
            out["latency"][what] = rows
            # every gmr_fast contender: prefixes not shared and other length buckets (min_fill) change
            # the number of runs a call makes, which is what these short calls are most sensitive to
            # (benchmarks/README.md "Host operations")
            named = {"gmr_shared": "gmr", "gmr_shared_masked_gqa": "gmr_masked_gqa"}
            for name in sorted((n for n in contenders if n.startswith("gmr")), key=lambda n: n != "gmr_shared"):
                row = named.get(name, name)
                gmr = contenders[name].fn.__self__
                rows[row] = latency(lambda pairs, gmr=gmr: gmr.rank(pairs[0][0], [d for _, d in pairs]), calls, torch,
                                    a.device)
                rows[row]["p50_speedup_vs_hf_bf16"] = rows["hf_bf16"]["p50_ms"] / rows[row]["p50_ms"]
                rows[row]["decoder_batches"] = gmr.last_stats["batches"]  # of the last call
            print(json.dumps({what: {n: round(r["p50_ms"], 1) for n, r in rows.items()}}), flush=True)
            return True

        stage(f"latency_{what}", measure_latency)
    contenders.clear()
    if a.device.startswith("cuda"):
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def table(doc: dict) -> str:
    lines = ["| shape | task | gmr shared pairs/s | not shared | HF bf16 | HF fp32 | shared vs HF bf16 (target) "
             "| tau shared / HF bf16 vs HF fp32 |", "|---|---|---|---|---|---|---|---|"]
    for spec, out in doc["shapes"].items():
        for task, rows in (out.get("tasks") or {}).items():
            if any("query_kendall_tau_mean" not in rows[k] or "speedup_vs_hf_bf16" not in rows[k]
                   for k in ("gmr_shared", "gmr_not_shared", "hf_bf16", "hf_fp32")):
                lines.append(f"| {spec} | {task} | failed: see the JSON |")
                continue
            g, n, b, f = (rows[k] for k in ("gmr_shared", "gmr_not_shared", "hf_bf16", "hf_fp32"))
            lines.append(f"| {spec} | {task} | {g['pairs_per_s']:.1f} | {n['pairs_per_s']:.1f} | {b['pairs_per_s']:.1f} "
                         f"| {f['pairs_per_s']:.1f} | {g['speedup_vs_hf_bf16']:.2f}x ({rows['target_vs_hf_bf16']}x) "
                         f"| {g['query_kendall_tau_mean']:.3f} / {b['query_kendall_tau_mean']:.3f} |")
        for what, rows in (out.get("latency") or {}).items():
            if "gmr" not in rows:
                lines.append(f"| {spec} | {what} | failed: see the JSON |")
                continue
            lines.append(f"| {spec} | {what} p50 ms | {rows['gmr']['p50_ms']:.0f} | | {rows['hf_bf16']['p50_ms']:.0f} | "
                         f"| {rows['gmr']['p50_speedup_vs_hf_bf16']:.2f}x | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="gmr-3b:6:8", help="comma-separated name:decoder_layers:vision_layers")
    p.add_argument("--checkpoint", help="an existing checkpoint instead of --shapes (to check this script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--latency-requests", type=int, default=5)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--min-fill", default="0.8", help="gmr_fast's length buckets (Reranker min_fill), comma-separated: "
                   "the first is the gmr_shared / gmr_not_shared rows and the latency calls, each other value adds "
                   "both contenders as NAME@VALUE (how much padding pays on the GPU against more batches)")
    p.add_argument("--masked-gqa", action=argparse.BooleanOptionalAction, default=True,
                   help="also run gmr_shared with the decoder's attention as before 5 Dec (grouped keys and a mask "
                        "in one sdpa call, which CUDA runs on the math kernel), for the throughput rows and latency")
    p.add_argument("--defaults", action=argparse.BooleanOptionalAction, default=True,
                   help="also run gmr_fast with the Reranker's default settings (CPU-sized memory budgets and "
                        "batches), as gmr_defaults")
    p.add_argument("--activation-mb", type=int, default=16384)
    p.add_argument("--kv-mb", type=int, default=8192)
    p.add_argument("--validation", default="1,3", help="QUERIES,DOCUMENTS of the export's (CPU) validation")
    p.add_argument("--tokenizer-cache", help="a folder holding qwen2_tokenizer.json (export.factory's cache)")
    p.add_argument("--deadline", type=float, default=1e9, help="seconds after which no new stage starts")
    p.add_argument("--work", default="/tmp/gmr_cuda")
    p.add_argument("--out", default="benchmarks/results/cuda_mrb.json")
    a = p.parse_args(argv)
    a.tasks = [t for t in a.tasks.split(",") if t]
    a.min_fill = [float(f) for f in a.min_fill.split(",") if f]
    a.validation = [int(n) for n in a.validation.split(",")]
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # HF fp32 is the ranking reference: fp32 arithmetic
    torch.backends.cudnn.allow_tf32 = False
    doc = {"device": device_info(torch), "command": " ".join(sys.argv), "queries": a.queries,
           "candidates": a.candidates, "repeat": a.repeat, "shapes": {}}
    write(a.out, doc)
    for spec in [a.checkpoint] if a.checkpoint else filter(None, a.shapes.split(",")):
        run_shape(spec, a, doc, torch)
    doc["wall_seconds"] = elapsed()
    write(a.out, doc)
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
