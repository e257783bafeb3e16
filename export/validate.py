"""Export validation: an engine variant is accepted by comparing what users run (``Reranker``)
with the fp32 reference, on random queries each with many documents of every modality mix.

The criterion (recorded in the manifest) scales with the model:

- **fp32**: ``max |candidate - reference| <= 1e-3 x spread`` (spread = the reference scores'
  standard deviation) and Kendall tau >= 0.99. An fp32 engine differs from the reference only
  by the order of float32 additions: relative errors of ~1e-7 per operation, growing with width
  and depth to ~1e-5 of the spread measured at GMR-3B width (3e-6 at 4 layers); 1e-3 leaves
  two orders of magnitude for full depth, while a real defect (a shifted position, a wrong mask,
  swapped yes/no rows) moves scores by a sizeable fraction of the spread. An absolute bar
  cannot do this: scores span ~1 on toy models and ~80 at real width.
- **int8 / bf16**: ranking agreement only (their errors are by design far above fp32 noise), and
  per query, because a reranker only ever orders one query's candidates (scores of different
  queries are never compared, so a shift between queries is harmless): mean per-query Kendall
  tau >= 0.9 (at most 5% of a query's candidate pairs swapped on average), and the top-10
  overlap with the reference >= 0.9 on average and >= 0.8 for every query (one near-tie swap at
  the cut is tolerated; two on average are not). The tau over all pairs pooled is recorded too.
- **The long group**, judged on its own: one query with a large image (~900 visual tokens) and
  12 documents of 60-250 words, scored as whole prompts in the default (large) batches, must
  reach Kendall tau >= 0.9 too (66 document pairs: at most 3 swapped; each costs 0.03). The short
  groups alone hid a real failure: an int8 engine at GMR-7B width passed them (per-query tau
  0.953) and ranked 1,000-token image queries at tau 0.52, because onnxruntime's dynamic int8
  MatMul quantizes activations per tensor and a large image's activations widen that one scale
  for every row of the batch. Measured on that engine (3 decoder layers,
  benchmarks/results/long_group_7b_L3.json), this group gives int8 0.79, bf16 0.94, fp32 1.0;
  whole prompts are the harsher mode (with the prefix shared: int8 0.97, bf16 0.97).
  Judged apart because averaging it into the short groups' mean would dilute it.

The cost is bounded: queries x documents is fixed (default 4 x 20 short, 1 x 12 long), short
documents are short and their images small, so validating a 7B model costs minutes, not hours
(the long group is ~13k tokens, most of the reference's time at full depth). ``--accept-*`` flags override
the thresholds explicitly; the manifest records the figures and the thresholds used.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import numpy as np

# the modes validation rotates through, so that one export exercises what the runtime can do
MODES = ({"padding_side": "left", "share_prefix": True}, {"padding_side": "right", "share_prefix": True},
         {"padding_side": "left", "share_prefix": False}, {"padding_side": "right", "share_prefix": False})


@dataclass
class Criterion:
    fp32_max_rel_error: float = 1e-3
    fp32_min_tau: float = 0.99
    min_query_tau: float = 0.9
    min_mean_top10: float = 0.9
    min_top10: float = 0.8
    min_long_tau: float = 0.9

    def to_dict(self) -> dict:
        return asdict(self)


WORDS = ["cat", "red", "square", "the", "a", "of", "blue", "circle", "dog", "photo", "map", "Zürich", "数据", "2024",
         "is", "on", "(note)", "chart", "river", "green"]


def validation_groups(n_groups: int = 4, docs: int = 20, seed: int = 0) -> list[tuple]:
    """(query, [documents]) groups: queries cycle through text, image, text+image; every group's
    documents mix text, image and text+image. Texts are short and images 28-140 px."""
    rng = np.random.default_rng(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731
    image = lambda: rng.integers(0, 256, (int(rng.integers(28, 141)), int(rng.integers(28, 141)), 3), dtype=np.uint8)  # noqa: E731
    groups = []
    for g in range(n_groups):
        kind = g % 3
        query = text(2, 8) if kind == 0 else {"image": image()} if kind == 1 else {"text": text(1, 6), "image": image()}
        documents = []
        for j in range(docs):
            k = (j + g) % 4
            documents.append(text(3, 40) if k < 2 else {"image": image()} if k == 2 else
                             {"text": text(2, 20), "image": image()})
        groups.append((query, documents))
    return groups


LONG_IMAGE = (868, 812)  # pixels: 31 x 29 = 899 visual tokens for both families (28 px per token)
LONG_MODE = {"padding_side": "left", "share_prefix": False}  # in the default batch budgets


def long_group(docs: int = 12, seed: int = 0) -> tuple:
    """(query, [documents]): a text + large-image query and long text documents."""
    rng = np.random.default_rng(seed + 1)
    text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731
    query = {"text": text(2, 6), "image": rng.integers(0, 256, LONG_IMAGE + (3,), dtype=np.uint8)}
    return query, [text(60, 250) for _ in range(docs)]


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if len(a) < 2:
        return 1.0
    return float(kendalltau(a, b).statistic)


def compare(reference: np.ndarray, candidate: np.ndarray, group_sizes: list[int]) -> dict:
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    diff = np.abs(candidate - reference)
    spread = float(max(reference.std(), 1e-6))
    bounds = np.concatenate([[0], np.cumsum(group_sizes)])
    taus, overlaps = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        r, c = reference[a:b], candidate[a:b]
        taus.append(kendall_tau(r, c))
        k = min(10, b - a)
        top = lambda x: set(np.argsort(-x, kind="stable")[:k].tolist())  # noqa: E731
        overlaps.append(len(top(r) & top(c)) / k if k else 1.0)
    return {"pairs": int(len(reference)), "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
            "spread": spread, "max_rel_error": float(diff.max() / spread) if len(diff) else 0.0,
            "kendall_tau": kendall_tau(reference, candidate), "group_kendall_tau": [round(t, 4) for t in taus],
            "query_kendall_tau_mean": float(np.mean(taus)) if taus else 1.0,
            "top10_overlap_mean": float(np.mean(overlaps)) if overlaps else 1.0,
            "top10_overlap_min": float(np.min(overlaps)) if overlaps else 1.0,
            "reference_range": [float(reference.min()), float(reference.max())] if len(reference) else [0.0, 0.0]}


def verdict(precision: str, figures: dict, criterion: Criterion) -> str | None:
    """None when accepted, else the reason."""
    c = criterion
    if precision == "fp32":
        if not figures["max_rel_error"] <= c.fp32_max_rel_error:
            return (f"max |engine - reference| = {figures['max_abs_diff']:.3g} is {figures['max_rel_error']:.3g} of the "
                    f"score spread ({figures['spread']:.3g}), above {c.fp32_max_rel_error}")
        if not figures["kendall_tau"] >= c.fp32_min_tau:
            return f"Kendall tau {figures['kendall_tau']:.4f} < {c.fp32_min_tau}"
        return None
    if not figures["query_kendall_tau_mean"] >= c.min_query_tau:
        return (f"mean per-query Kendall tau {figures['query_kendall_tau_mean']:.4f} against the fp32 reference "
                f"< {c.min_query_tau}")
    if not figures["top10_overlap_mean"] >= c.min_mean_top10:
        return f"mean top-10 overlap {figures['top10_overlap_mean']:.3f} < {c.min_mean_top10}"
    if not figures["top10_overlap_min"] >= c.min_top10:
        return f"a query's top-10 overlap {figures['top10_overlap_min']:.3f} < {c.min_top10}"
    long = figures.get("long")
    if long is not None and not long["kendall_tau"] >= c.min_long_tau:
        return (f"Kendall tau {long['kendall_tau']:.4f} < {c.min_long_tau} on the long group (a ~900-token image "
                f"query, {long['pairs']} long documents, whole prompts)")
    return None


def run_candidate(engine_dir, precision: str, groups: list[tuple], instruction: str, num_threads: int | None = None,
                  device: str = "cpu", long: int = 0, **settings) -> tuple[np.ndarray, list[dict]]:
    """Scores every group with the Reranker, each group under one of MODES in turn (padding
    side x shared prefix) and small batch budgets, so many batch shapes are exercised; the last
    ``long`` groups under LONG_MODE (whole prompts, the default budgets). ``settings``: further
    Reranker options (e.g. ``image_precision``)."""
    import dataclasses

    from gmr_fast.reranker import Reranker, RerankerOptions

    small = {"max_batch_tokens": 1024, "max_batch_size": 6}
    defaults = {k: getattr(RerankerOptions(), k) for k in small}
    reranker = Reranker(engine_dir, precision=precision, num_threads=num_threads, device=device, **small, **settings)
    out, modes = [], []
    for g, (query, documents) in enumerate(groups):
        is_long = g >= len(groups) - long
        mode, budgets = (LONG_MODE, defaults) if is_long else (MODES[g % len(MODES)], small)
        reranker.options = dataclasses.replace(reranker.options, **mode, **budgets)  # read per call: no reload
        reranker._limits = reranker._memory_limits()  # the batch budgets are planned from these
        out.append(reranker.score([(query, d) for d in documents], instruction=instruction))
        modes.append({**mode, "batches": reranker.last_stats["batches"], "shared_pairs": reranker.last_stats["shared_pairs"]})
    backend = reranker.choice["backend"]
    # how attention ran in the image batches' decoder, where a route set it (backends.torch.ROUTE_ATTENTION)
    attention = getattr(reranker.backend, "route_attention", None)
    query = getattr(reranker.backend, "query_vision", None)
    extra = {"backend": backend, **({"route_attention": attention} if attention else {}),
             **({"query_vision": query} if query else {})}
    # Free its weights before the next variant loads its own (GMR-7B's are 15.5 GB each on a 24 GB
    # machine), even if a reference cycle holds it (gmr_fast.backends.torch._first_import_apart).
    del reranker
    gc.collect()
    return np.concatenate(out), [{**m, **extra} for m in modes]
