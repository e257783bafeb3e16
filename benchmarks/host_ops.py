"""What a call costs the host, counted on any machine: the aten operations and the model runs
that gmr_fast's torch backend, set up as it runs on CUDA, and HF bf16 issue for the same calls.

    python benchmarks/host_ops.py --out benchmarks/results/host_ops_cpu.json

On a GPU each operation that is not a view is a kernel launch, and each costs the host its
dispatch whether or not it launches. With short prompts a GPU's arithmetic is small: on an H200
(GMR-3B width, 6 decoder layers) ``rank(query, 50 text documents)`` kept the GPU busy 31 ms (cuDNN's attention), and
the call took 182 ms once cuDNN's per-shape graphs were gone (benchmarks/README.md "GPU"); what
the host issues is the likely rest, not yet measured on a GPU. This program counts it on a CPU,
where the counts are the same: eager torch dispatches the same operations on either device (only
``F.rms_norm``, one operation here, is one kernel on CUDA and six on a CPU). Its CPU seconds
are no GPU figure.

Calls (cuda_mrb.py's): ``rank50`` (a query, 50 text documents of 30-400 words),
``one_image_pair`` (a query, one image document) and ``t2t`` (2 queries x 50 candidates in one
``score`` call). Contenders: ``gmr_shared`` and ``gmr_not_shared`` (prefixes shared or not) with
cuda_mrb.py's batch settings and the torch backend as CUDA runs it (bf16, torch's own GEMMs,
keys repeated per query head: graphs.decoder ``masked_gqa`` off), ``gmr_defaults`` (the same with
the Reranker's default budgets; ``--min-fill`` adds rows with other length buckets: fewer runs
against more padding), and HF bf16 (benchmarks/hf_baseline.py) with the same token
budget per batch. Each counts its second call (the first warms up).

The counts do not depend on the model's width: each layer issues the same operations whatever
its size, and with cuda_mrb.py's budgets a batch is bounded by tokens and rows, not memory. So the
default checkpoint is narrow (hidden size 128, 4 query and 2 key/value heads: grouped-query
attention as GMR's) at ``--layers`` decoder layers, which counts in a minute where GMR-3B's width
takes an hour of CPU arithmetic. ``gmr_defaults`` is the exception: its 2 GB activation budget can
bind at real width (GMR-3B: ~209 KB a token before attention's), not here.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import in_child, machine, write  # noqa: E402

# Operations that make no kernel on CUDA (a view, or a no-op cast): counted apart
VIEWS = {"view", "reshape", "unsqueeze", "squeeze", "select", "slice", "t", "transpose", "expand", "permute",
         "_unsafe_view", "alias", "detach", "split", "chunk", "split_with_sizes", "unbind", "as_strided",
         "lift_fresh", "promote_types"}


def counted(fn, calls: list, workers: tuple = (), runs: collections.Counter | None = None) -> dict:
    """Runs ``fn`` on calls[0] (warm-up), then counts the aten operations of ``fn(calls[1])``,
    those of ``workers`` ((object, method name): what may run on another thread, as the Reranker's
    vision runs do) included wherever they run: a dispatch mode sees its own thread only.
    ``runs`` (the caller's count of model runs) is cleared before the counted call."""
    import threading

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = collections.Counter()
    lock = threading.Lock()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            with lock:
                ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    counting, main = [False], threading.get_ident()
    for obj, name in workers:
        def spy(*args, _fn=getattr(obj, name), **kwargs):
            if not counting[0] or threading.get_ident() == main:
                return _fn(*args, **kwargs)
            with torch.inference_mode(), Count():
                return _fn(*args, **kwargs)

        setattr(obj, name, spy)
    fn(calls[0])
    if runs is not None:
        runs.clear()
    with torch.inference_mode(), Count():
        counting[0] = True
        start = time.perf_counter()
        fn(calls[1])
        seconds = time.perf_counter() - start
        counting[0] = False
    return {"ops": sum(ops.values()), "non_view_ops": sum(n for k, n in ops.items() if k not in VIEWS),
            "cpu_seconds": round(seconds, 3), "top": dict(ops.most_common(15))}


def child_gmr(engine: str, what: str, share: bool, defaults: bool, batch_tokens: int, batch_size: int,
              min_fill: float = 0.8) -> dict:
    from cuda_mrb import latency_calls
    from gmr_fast import Reranker
    from mrb_workload import task_pairs

    settings = {} if defaults else {"max_batch_tokens": batch_tokens, "max_batch_size": batch_size,
                                    "activation_budget_mb": 16384, "kv_budget_mb": 8192, "min_fill": min_fill}
    r = Reranker(engine, backend="torch", precision="bf16", share_prefix=share,
                 backend_options={"bf16_gemm": "torch", "gemm": "blas"}, **settings)
    for layer in r.backend.decoder.layers:  # as on CUDA (backends.torch)
        layer.masked_gqa = False
    runs = collections.Counter()
    for name in ("_run", "encode_images"):
        def spy(*args, _name=name, _fn=getattr(r.backend, name), **kwargs):
            runs[_name] += 1
            return _fn(*args, **kwargs)

        setattr(r.backend, name, spy)
    calls = task_calls(what, latency_calls, task_pairs)
    fn = (lambda c: r.score(c)) if what == "t2t" else (lambda c: r.rank(c[0][0], [d for _, d in c]))  # noqa: E731
    out = counted(fn, calls, ((r.backend, "_run"), (r.backend, "encode_images")), runs)
    out.update(decoder_runs=runs["_run"], vision_runs=runs["encode_images"], lanes=r.choice["lanes"])
    return out


def child_hf(checkpoint: str, what: str, batch_tokens: int, batch_size: int) -> dict:
    from cuda_mrb import latency_calls
    from hf_baseline import HFStrong
    from mrb_workload import task_pairs

    hf = HFStrong(checkpoint, "bf16", max_batch_tokens=batch_tokens, max_batch_size=batch_size)
    runs = collections.Counter()
    model = hf.ref.model
    visual = model.model.visual if hasattr(getattr(model, "model", None), "visual") else model.visual
    model.register_forward_pre_hook(lambda *_: runs.update(["decoder"]))
    visual.register_forward_pre_hook(lambda *_: runs.update(["vision"]))
    calls = task_calls(what, latency_calls, task_pairs)
    out = counted(lambda c: hf.score(c), calls, runs=runs)
    out.update(decoder_runs=runs["decoder"], vision_runs=runs["vision"])
    return out


def task_calls(what: str, latency_calls, task_pairs) -> list:
    if what == "t2t":
        return [task_pairs("t2t", 2, 50, seed=seed) for seed in (1, 0)]
    return latency_calls(what, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6,
                   help="decoder layers of the narrow checkpoint built when no --checkpoint is given (cuda_mrb.py's "
                        "GPU shape has 6)")
    p.add_argument("--checkpoint", help="an existing checkpoint (with --engine) instead of the narrow one")
    p.add_argument("--engine", help="an engine of --checkpoint")
    p.add_argument("--calls", default="rank50,one_image_pair,t2t")
    p.add_argument("--min-fill", default="0.8,0.5,0.3,0",
                   help="Reranker min_fill of gmr_shared and gmr_not_shared; each value after the first adds both "
                        "as NAME@VALUE (fewer runs against more padding)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="cuda_mrb.py's")
    p.add_argument("--batch-size", type=int, default=64, help="cuda_mrb.py's")
    p.add_argument("--work", default="/tmp/gmr_host_ops")
    p.add_argument("--out", default="benchmarks/results/host_ops_cpu.json")
    a = p.parse_args(argv)
    if a.checkpoint:
        ckpt, engine = pathlib.Path(a.checkpoint), pathlib.Path(a.engine)
    else:  # narrow: the counts do not depend on the width (see above), the arithmetic does
        from export.engine_export import ExportOptions, export_engine
        from export.factory import build_checkpoint
        from export.validate import Criterion

        ckpt, engine = pathlib.Path(a.work) / f"narrow-L{a.layers}", pathlib.Path(a.work) / f"narrow-L{a.layers}-engine"
        if not (ckpt / "config.json").exists():
            build_checkpoint(ckpt, "qwen2_5_vl", hidden_size=128, layers=a.layers, heads=4, kv_heads=2,
                             vision_hidden=64, vision_depth=4)
        if not (engine / "manifest.json").exists():  # what is counted is operations, not ranking: no bar
            floor = Criterion(min_query_tau=-1.0, min_mean_top10=0.0, min_top10=0.0, min_long_tau=-1.0)
            export_engine(ckpt, engine, ExportOptions(dtypes=("bf16",), force=True, validation_queries=1,
                                                      validation_documents=3, validation_long_documents=0,
                                                      criterion=floor, reference_cache=False))
    import json

    dims = json.loads((engine / "manifest.json").read_text())["decoder"]
    doc = {"machine": machine(), "checkpoint": str(ckpt), "engine": str(engine), "decoder": dims,
           "command": " ".join(sys.argv),
           "batch_tokens": a.batch_tokens, "batch_size": a.batch_size, "calls": {}}
    for what in filter(None, a.calls.split(",")):
        rows = {"hf_bf16": in_child("host_ops:child_hf", str(ckpt), what, a.batch_tokens, a.batch_size)}
        for i, fill in enumerate(float(f) for f in a.min_fill.split(",") if f):
            for name, share in (("gmr_shared", True), ("gmr_not_shared", False)):
                rows[name if i == 0 else f"{name}@{fill:g}"] = in_child(
                    "host_ops:child_gmr", str(engine), what, share, False, a.batch_tokens, a.batch_size, fill)
        rows["gmr_defaults"] = in_child("host_ops:child_gmr", str(engine), what, True, True, a.batch_tokens,
                                        a.batch_size)
        doc["calls"][what] = rows
        write(a.out, doc)
        print(what, {n: (r["non_view_ops"], r["ops"], r["decoder_runs"], r["vision_runs"]) for n, r in rows.items()},
              flush=True)
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    lines = ["| call | contender | operations (not views) | all operations | decoder runs | vision runs |",
             "|---|---|---|---|---|---|"]
    for what, rows in doc["calls"].items():
        for name, r in rows.items():
            lines.append(f"| {what} | {name} | {r['non_view_ops']:,} | {r['ops']:,} | {r['decoder_runs']} | "
                         f"{r['vision_runs']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
