"""Reranking throughput: gmr_fast.Reranker (onnxruntime, scheduled batches) against
HuggingFace transformers measured in the same run.

Checkpoints are generated (random weights, real Qwen2 tokenizer and vocabulary): the tiny test
model and a ~180M-parameter one. Workloads: (a) text pairs with an MRB-like length mix (short
queries, documents of 30..1500 tokens), (b) pairs with an image document. Baselines:
`hf_plain` = HF as its users write it (batches in input order, sdpa, full logits) and
`hf_strong` = its strongest plain form (sdpa, logits_to_keep=1, batches sorted by length).
Reports pairs/s, tokens/s, padding efficiency and achieved decoder GFLOP/s; JSON + table.

    python benchmarks/throughput.py --out benchmarks/results/throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import gmr_fast  # noqa: E402

MODELS = {
    "tiny": dict(),
    "180m": dict(hidden_size=512, layers=8, heads=8, kv_heads=4),
}


def workload(kind: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = "the of and a to in is for on that with as by this are from at be an or which image document query".split()
    text = lambda k: " ".join(rng.choice(words, int(k)))  # noqa: E731
    if kind == "text":
        lengths = np.clip(rng.lognormal(np.log(250), 0.9, n), 30, 1500).astype(int)  # MRB-like: most short, long tail
        return [(text(rng.integers(4, 16)), text(k)) for k in lengths]
    images = [rng.integers(0, 256, (int(rng.integers(200, 500)), int(rng.integers(200, 500)), 3), dtype=np.uint8) for _ in range(8)]
    return [(text(rng.integers(4, 16)), {"text": text(rng.integers(10, 60)), "image": images[i % 8]}) for i in range(n)]


def decoder_flops(model_cfg, tokens: int, attn_tokens_sq: int) -> float:
    """Forward FLOPs of the language model's layers (matmuls), without the vocabulary head."""
    h, layers = model_cfg.hidden_size, model_cfg.num_hidden_layers
    kv = model_cfg.num_key_value_heads * (h // model_cfg.num_attention_heads)
    inter = model_cfg.intermediate_size
    per_token = 2 * (h * h + 2 * h * kv + h * h + 3 * h * inter)
    return layers * (per_token * tokens + 4 * h * attn_tokens_sq)


class HFScorer:
    def __init__(self, ckpt, strong: bool, batch_size: int):
        from export.reference import ReferenceScorer

        self.ref = ReferenceScorer(ckpt, attn_implementation="sdpa")
        self.strong, self.batch_size = strong, batch_size

    def score(self, pairs):
        import torch

        order = list(range(len(pairs)))
        if self.strong:
            lengths = [len(self.ref.tokenizer(self.ref.prompt_text(self.ref.gmr.default_instruction, q, d)[0])["input_ids"])
                       for q, d in pairs]
            order = sorted(order, key=lambda i: -lengths[i])
        out = np.empty(len(pairs), np.float32)
        for s in range(0, len(pairs), self.batch_size):
            idx = order[s:s + self.batch_size]
            batch = self.ref.encode([pairs[i] for i in idx])
            with torch.inference_mode():
                kw = {"logits_to_keep": 1} if self.strong else {}
                logits = self.ref.model(**batch, **kw).logits[:, -1].float()
            out[idx] = (logits[:, self.ref.yes_id] - logits[:, self.ref.no_id]).numpy()
        return out


def timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/throughput_cpu.json")
    parser.add_argument("--models", default="tiny,180m")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    args = parser.parse_args()

    import torch

    from export.engine_export import ExportOptions, export_engine
    from export.factory import build_checkpoint

    torch.set_num_threads(os.cpu_count())
    work = pathlib.Path(tempfile.mkdtemp(prefix="gmr-throughput-"))
    rows = []
    for name in args.models.split(","):
        ckpt = build_checkpoint(work / f"{name}-ckpt", "qwen2_5_vl", **MODELS[name])
        export_engine(ckpt, work / f"{name}-engine", ExportOptions(validation_pairs=8))
        reranker = gmr_fast.Reranker(work / f"{name}-engine", max_batch_tokens=args.max_batch_tokens, max_batch_size=64)
        plain = HFScorer(ckpt, strong=False, batch_size=args.hf_batch_size)
        strong = HFScorer(ckpt, strong=True, batch_size=args.hf_batch_size)
        params = sum(p.numel() for p in plain.ref.model.parameters())
        for kind in ("text", "image"):
            pairs = workload(kind, args.pairs)
            ours_s, ours = timed(lambda: reranker.score(pairs), args.repeats)
            stats = dict(reranker.last_stats)
            plain_s, ref = timed(lambda: plain.score(pairs), args.repeats)
            strong_s, _ = timed(lambda: strong.score(pairs), args.repeats)
            tokens = stats["real_tokens"]
            lengths = [len(reranker.prompts.encode(reranker.instruction, gmr_fast.prompt.as_item(q, "q"),
                                                   gmr_fast.prompt.as_item(d, "d"), 0, 0).ids) for q, d in pairs] if kind == "text" else None
            flops = decoder_flops(plain.ref.model.config.text_config, tokens, sum(l * l for l in lengths)) if lengths else None
            row = {"model": name, "params": params, "workload": kind, "pairs": len(pairs), "real_tokens": tokens,
                   "padding_efficiency": stats["padding_efficiency"], "max_abs_diff_vs_hf": float(np.abs(ours - ref).max()),
                   "ours_s": ours_s, "hf_plain_s": plain_s, "hf_strong_s": strong_s,
                   "ours_pairs_per_s": len(pairs) / ours_s, "hf_plain_pairs_per_s": len(pairs) / plain_s,
                   "hf_strong_pairs_per_s": len(pairs) / strong_s, "ours_tokens_per_s": tokens / ours_s,
                   "speedup_vs_hf_plain": plain_s / ours_s, "speedup_vs_hf_strong": strong_s / ours_s}
            if flops:
                row.update(ours_decoder_gflops=flops / ours_s / 1e9, hf_strong_decoder_gflops=flops / strong_s / 1e9)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    result = {"benchmark": "throughput", "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
              "args": vars(args), "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| model | workload | pairs/s ours | HF plain | HF strong | vs plain | vs strong | padding eff. | GFLOP/s ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = f"{r['ours_decoder_gflops']:.0f}" if "ours_decoder_gflops" in r else "-"
        print(f"| {r['model']} | {r['workload']} | {r['ours_pairs_per_s']:.1f} | {r['hf_plain_pairs_per_s']:.1f} | "
              f"{r['hf_strong_pairs_per_s']:.1f} | {r['speedup_vs_hf_plain']:.2f}x | {r['speedup_vs_hf_strong']:.2f}x | "
              f"{r['padding_efficiency']:.2f} | {g} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
