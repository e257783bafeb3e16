"""gmr_fast.Reranker: score (query, document) pairs with an exported GMR engine.

    reranker = Reranker("engine/")
    reranker.score([("a query", "a document"), ({"text": "q", "image": "cat.jpg"}, "doc")])
    reranker.rank("a query", ["doc one", {"image": "chart.png"}], top_k=5)

A call, stage by stage: sides are normalised (errors name the pair); each distinct image is
decoded once (content hash) and its grid fixes its token count, so every prompt's length is known
before any pixel work; prompts are tokenised whole, and a pair whose query is shared with other
pairs is split into the shared *prefix* (system prompt, instruction, query with its image) and its
own *suffix* (document and closing turn) when the two tokenisations agree at the boundary;
``schedule.plan`` orders prefix, suffix and whole-prompt batches under token and memory budgets;
while the backend runs one batch, a worker thread builds the next (ids, M-RoPE positions and
image embeddings). Prefixes run once and their keys/values serve all their suffixes. Scores come
back in input order. The engine's manifest says everything about the model; the precision and
backend are chosen for the processor at hand unless given.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from . import hardware
from .backends import create_backend
from .errors import BackendError, ConfigError, ImageError, PromptError
from .families import get_family
from .images import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from .manifest import PRECISIONS, load_manifest
from .options import check_choice, check_positive, option, parse_key_values
from .preprocess import hardware_threads, patchify, smart_resize
from .progress import Progress
from .prompt import EncodedPrompt, Item, PromptBuilder, as_item, text_problem
from .schedule import Limits, Schedule, Sequence as TokenSequence, VisionBatch, build_decoder_batch, plan as plan_steps

log = logging.getLogger("gmr_fast")
MiB = 1 << 20
IMAGE_PRECISIONS = ("auto", "fp32", "bf16x3", "bf16-gemm", "bf16-vision", "bf16-vision-x3-gate-up",
                    "bf16-vision-x3-gate-up-image-queries", "same")
# image_precision modes that run a route of the torch backend with some of its image batches' decoder
# products fp32-accurate: (exact_images, exact_products) (backends.torch.EXACT_PRODUCTS)
ROUTE_PRODUCTS = {"bf16-vision-x3-gate-up": ("bf16-vision", ("gate_up",)),
                  "bf16-vision-x3-gate-up-image-queries": ("bf16-vision", ("gate_up",))}
# ... of which these take the exact products only for the pairs of queries with an image; a text
# query's routed pairs run the route without them (bf16-vision) (ROUTE_PRODUCTS_IMAGE_QUERIES_WHY)
ROUTE_PRODUCTS_IMAGE_QUERIES = ("bf16-vision-x3-gate-up-image-queries",)
TEXT_PRECISIONS = ("auto", "same", "as-images")


@dataclass
class RerankerOptions:
    """Every setting of a Reranker; the CLIs derive their flags from these fields."""

    precision: str = option("auto", "auto (the fastest variant for this processor that ranked like fp32 at "
                                    "export), fp32, int8 or bf16", determinism=True, choices=("auto",) + PRECISIONS)
    image_precision: str = option("auto", "pairs with an image under bf16: fp32 (computed over the same bf16 "
                                          "weights, which must hold the fp32 model exactly), bf16x3 (the same fp32 "
                                          "model, each product as three bf16 products on the CPU's bf16 hardware, "
                                          "fp32-accurate), bf16-gemm (the same fp32 "
                                          "tensors, matrix products on the CPU's bf16 hardware), bf16-vision (the "
                                          "same in the decoder, the vision tower in bf16), bf16-vision-x3-gate-up "
                                          "(bf16-vision with the MLP's gate_up product fp32-accurate, as bf16x3 "
                                          "computes it), bf16-vision-x3-gate-up-image-queries (that for queries "
                                          "with an image, bf16-vision for text queries), same (bf16 too) or auto "
                                          "(on a CPU with AMX, bf16-vision-x3-gate-up-image-queries, "
                                          "bf16-vision-x3-gate-up, bf16-vision, bf16-gemm or bf16x3, elsewhere "
                                          "bf16-vision or bf16-gemm where bf16 GEMMs gain, the first the "
                                          "export validated, else fp32, where auto chose bf16 on a CPU and the engine "
                                          "allows it)",
                                  determinism=True, choices=IMAGE_PRECISIONS)
    text_precision: str = option("auto", "pairs without an image under bf16: same (bf16), as-images (computed as "
                                         "image_precision computes pairs with an image, in the decoder: fp32, "
                                         "bf16x3 or bf16-gemm arithmetic over the same bf16 weights) or auto "
                                         "(as-images where auto chose bf16 for this CPU only because that route "
                                         "ranked within 0.98 of fp32 at export and bf16 alone did not, e.g. GMR-7B)",
                                 determinism=True, choices=TEXT_PRECISIONS)
    backend: str | None = option(None, "onnxruntime or torch (default: what the precision runs on)", determinism=True,
                                 choices=("onnxruntime", "torch"))
    device: str = option("cpu", "cpu, or cuda[:N] for the torch backend", determinism=True)
    max_batch_tokens: int = option(8192, "padded tokens per decoder batch", determinism=True)
    max_batch_size: int = option(32, "pairs per decoder batch", determinism=True)
    min_fill: float = option(0.8, "length buckets: a pair joins a batch only if >= min_fill x its longest",
                             determinism=True)
    activation_budget_mb: int = option(2048, "activation memory one batch may take (MiB), attention and vision "
                                             "included; batches are planned against it", determinism=True)
    kv_budget_mb: int = option(512, "memory for the keys/values of shared prefixes kept at once (MiB)", determinism=True)
    share_prefix: bool = option(True, "compute each query's prompt prefix once for all its documents", determinism=True)
    padding_side: str = option("left", "where batches are padded", determinism=True, choices=("left", "right"))
    num_threads: int | None = option(None, "threads for preprocessing and the backend (default: all cores)",
                                     determinism=True, aliases=("--threads",))
    lanes: int | None = option(None, "engine runs side by side (batches of one call, or concurrent calls), the "
                                     "threads and memory budgets split between them; on torch a call of a single "
                                     "step takes every lane's threads (default: 2 for torch on a CPU with AMX and "
                                     "2+ threads, else 1)", determinism=True)
    instruction: str | None = option(None, "default instruction (default: the engine's)", determinism=True)
    max_length: int | None = option(None, "longest prompt in tokens; longer documents are truncated (default: "
                                          "the engine's)", determinism=True)
    image_cache_size: int = option(0, "image embeddings kept across calls (LRU, 0 = no limit on the count; the "
                                      "cache is off when this and image_cache_mb are both 0)")
    image_cache_mb: int = option(0, "memory for image embeddings kept across calls (LRU, MiB; 0 = no limit on "
                                    "the bytes): a batch job whose candidate lists share images encodes each once")
    max_image_pixels: int = option(DEFAULT_MAX_IMAGE_PIXELS, "larger images are refused before decoding")
    providers: list | None = option(None, "onnxruntime execution providers", flag=False)
    backend_options: dict = option({}, "backend-specific KEY=VALUE (repeatable), e.g. arena=true", determinism=True)

    def validate(self) -> None:
        check_choice("precision", self.precision, ("auto",) + PRECISIONS)
        check_choice("image_precision", self.image_precision, IMAGE_PRECISIONS)
        check_choice("text_precision", self.text_precision, TEXT_PRECISIONS)
        if self.backend is not None:
            check_choice("backend", self.backend, ("onnxruntime", "torch"))
        check_choice("padding_side", self.padding_side, ("left", "right"))
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        for name in ("max_batch_tokens", "max_batch_size", "activation_budget_mb", "kv_budget_mb", "max_image_pixels"):
            check_positive(name, getattr(self, name))
        check_positive("num_threads", self.num_threads)
        check_positive("lanes", self.lanes)
        check_positive("max_length", self.max_length)
        check_positive("image_cache_size", self.image_cache_size, allow_zero=True)
        check_positive("image_cache_mb", self.image_cache_mb, allow_zero=True)
        if not 0.0 <= self.min_fill <= 1.0:
            raise ConfigError(f"min_fill must be in [0, 1]; got {self.min_fill}")
        self.backend_options = parse_key_values(self.backend_options)


def _nbytes(e: Any) -> int:
    """Bytes of a numpy array or torch tensor."""
    return int(e.nbytes) if hasattr(e, "nbytes") else int(e.numel() * e.element_size())


def choose_lanes(requested: int | None, backend: str, device: str, threads: int) -> tuple[int, str]:
    """How many engine runs go side by side, and why. Measured (DESIGN.md "Lanes"): on the AMX Xeon
    VM torch's eager CPU path gained nothing from a second thread inside one run (GMR-3B width,
    bf16: 2.2-2.7 pairs/s on 2 threads, 1.7-2.7 on 1) but twice as much from two 1-thread runs
    side by side (4.5-5.1); on an AMD EPYC (Zen 5) one run on both threads was as fast or faster
    (text 3.65-3.68 against 3.51 pairs/s with two lanes, images 0.87 against 0.75) and a single
    pair, which one lane runs alone on its half of the threads, 1.8x faster. So two lanes only
    where AMX is usable (the processor they were measured faster on). onnxruntime's fp32 and
    int8 runs scale with their threads (two lanes: 0.95-1.2x), so they keep one lane unless asked."""
    if requested is not None:
        return int(requested), "requested"
    if backend == "torch" and device == "cpu" and threads >= 2 and hardware.bf16_kernel() == "AMX":
        return 2, "torch on an AMX CPU: two runs side by side, each on half the threads, outrun one on all"
    return 1, "one run on every thread"


@dataclass
class RankResult:
    index: int  # position of the document in the list given to rank()
    score: float
    document: Any = None
    error: Exception | None = None  # why it could not be scored (rank(..., on_error="nan"); score NaN)


class Scores(np.ndarray):
    """float32 scores in input order (an ndarray), with ``errors`` {pair index: exception} for
    pairs that failed under ``on_error="nan"`` and ``truncated`` (bool per pair)."""

    errors: dict
    truncated: np.ndarray


# what a query image's content key starts with where the backend encodes the query's images apart
# (the torch backend's query_vision under bf16-vision): its embeddings then differ from the same
# image's as a document, and the cache and each call's store keep both
QUERY_IMAGE = ("query",)


def _content_key(image: Any) -> tuple[tuple, Any]:
    """Identity of an image's content (for decoding and encoding each distinct image once) and
    what to decode: a file is read here once and decoded from those bytes."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                data = f.read()
        except OSError:
            return ("path", os.fspath(image)), image  # decoding reports the error
        h.update(data)
        return ("bytes", h.hexdigest()), data
    if isinstance(image, (bytes, bytearray, memoryview)):
        h.update(image)
        return ("bytes", h.hexdigest()), image
    if isinstance(image, np.ndarray):
        h.update(np.ascontiguousarray(image).data)
        return ("array", image.shape, str(image.dtype), h.hexdigest()), image
    if hasattr(image, "tobytes") and hasattr(image, "mode"):
        h.update(image.tobytes())
        return ("pil", image.mode, image.size, h.hexdigest()), image
    return ("object", id(image)), image


@dataclass
class _Image:
    decoded: Any  # DecodedImage
    size: tuple[int, int]  # resized (h, w)


@dataclass
class CachePlan:
    """A batch job's plan for the image cache over one call (``ScorePlan.cache_plan``): the job
    knows every pair it will score, so it knows which images a later call uses again and when.
    ``next_use``: content key -> the position (in the job's order of calls) of the next call that
    uses it after this one; an image of this call that is not in it is never needed again and is
    not kept (a cached one is dropped after this call takes it). ``now``: this call's position.
    ``budget_bytes``: what the kept embeddings may take. Over it, the entry needed furthest ahead
    goes (Belady's rule, optimal for a known sequence): first entries kept without a plan or whose
    next use has passed (a resumed call skips the batches already written), and an image needed
    later than every kept one is not kept."""

    budget_bytes: int
    now: int
    next_use: dict


@dataclass
class ScorePlan:
    """Reranker.plan's result: everything known before any pixel work. Deterministic: the same
    pairs and settings give the same steps, which is what lets a batch job recompute exactly the
    batch it lost (``run(plan, skip=...)``)."""

    size: int
    prompts: list  # [EncodedPrompt | None] per pair: the whole prompt (truncation applied)
    errors: dict  # pair index -> ImageError | PromptError
    images: dict  # content key -> _Image | ImageError
    whole: dict  # pair -> TokenSequence (pairs scored on their whole prompt)
    suffixes: dict  # pair -> (prefix index, TokenSequence)
    prefixes: list  # [(TokenSequence, next position)]
    schedule: Schedule
    boundary_fallbacks: int  # pairs whose document merged with the prefix's last token
    exact: set = dataclasses.field(default_factory=set)  # pairs scored in fp32 beside bf16 (image_precision)
    # ... of which those that run without the route's exact products (ROUTE_PRODUCTS_IMAGE_QUERIES: text queries)
    plain: set = dataclasses.field(default_factory=set)
    # images run through the vision tower and images taken from the cache, as the plan runs
    image_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # per pair, the content keys of its images (the query's first; QUERY_IMAGE keys where the query's
    # images encode apart): what a batch job's CachePlan names
    image_keys: list = dataclasses.field(default_factory=list)
    # set by a batch job before ``run``: the cache follows it for this plan's images (CachePlan);
    # None: the LRU cache of image_cache_size / image_cache_mb
    cache_plan: CachePlan | None = None

    @property
    def truncated(self) -> np.ndarray:
        return np.array([bool(p is not None and p.truncated) for p in self.prompts], bool)

    @property
    def real_tokens(self) -> int:
        """Tokens of the whole prompts (what scoring pair by pair would run)."""
        return int(sum(len(p.ids) for p in self.prompts if p is not None))

    @property
    def decoder_tokens(self) -> int:
        """Tokens the decoder actually runs: each used prefix once, suffixes, whole prompts."""
        used = {k for k, _ in self.suffixes.values()}
        return (sum(len(s) for s in self.whole.values()) + sum(len(s) for _, s in self.suffixes.values())
                + sum(len(self.prefixes[k][0]) for k in used))

    @property
    def batches(self) -> list[np.ndarray]:
        """Pair indices of each scoring step, in run order."""
        return [s.rows for s in self.schedule.steps if s.kind != "prefix"]


# A reduced precision becomes the default (``auto``) only where the export measured it ranking
# this close to fp32: mean per-query Kendall tau on the validation groups (text, image and mixed
# queries, 20 documents each; manifest ``variants[p].validation``). The export's own acceptance
# bar (0.9, export/validate.py) says a variant is usable when asked for; a default must be
# faithful, and 0.98 is the precision issue's ranking target. On random-weight checkpoints, whose
# scores crowd together, int8 lands at 0.90-0.95 and bf16 at 0.98-0.99 (benchmarks/README.md "Precision and backends"), so
# the figure, not the processor alone, decides; on a trained checkpoint with well-separated scores
# the same rule takes the fast variant.
AUTO_MIN_TAU = 0.98


def ranking_figure(manifest, precision: str) -> float | None:
    return manifest.variant(precision).validation.get("query_kendall_tau_mean")


# bf16 goes first on a CPU whose bf16 kernels are not AMX's only where torch's bf16 GEMM measures
# at least this many times its fp32 one here (hardware.torch_bf16_speedup). End to end at GMR-3B
# width bf16 keeps part of its GEMM lead (attention, norms and the residual stream stay fp32):
# with AMX a 3.6x GEMM gave 2.3x on text (0.64 of it); on an AMD EPYC (Zen 5, AVX512-BF16) a
# 3.2-3.8x GEMM gave 3.2x on text and on images (benchmarks/README.md "Precision and backends").
# At 1.5, bf16 ends up level with fp32 or ahead even at AMX's ratio; the CPUs measured so far sit far from the line on both
# sides (Zen 5: 3.2-4.9x; an AMX Xeon with its tiles refused: 0.45-0.5x).
BF16_MIN_GEMM_SPEEDUP = 1.5
# bf16-vision routes pairs with an image on such a CPU only from this ratio up (why: beside IMAGES_BF16_GEMM).
BF16_VISION_MIN_GEMM_SPEEDUP = 2.0
# ... and from this one where the torch backend multiplies on gmr_fast._dnnl (backends.bf16_gemm),
# whose bf16 GEMM writes fp32 results: one bf16 GEMM per projection then, not two.
BF16_VISION_MIN_GEMM_SPEEDUP_ONE_GEMM = 1.0

# int8 goes before fp32 without AMX only where onnxruntime's int8 GEMM measures at least this
# many times its fp32 one here (hardware.onnxruntime_int8_speedup). End to end an int8 engine keeps
# 0.6-0.9 of its GEMM lead (activations quantized per call; attention, norms and the vision
# tower's small GEMMs gain less): on AVX512-VNNI a 2.1-3.1x GEMM gave 1.7-1.9x gmr fp32 at GMR-3B
# width (real_size_vnni.json), on an AMD Zen 5 a 2.1-2.3x GEMM (per-token) gave 1.6x
# (real_size_int8_row_epyc_zen5.json);
# below 1.5x the gain is gone, while the ranking cost is not. An AMD EPYC of family 23 (AVX2 only)
# measured 1.1-1.3x at the GEMM (int8_kernels_epyc_zen2.json), an AMD EPYC Zen 3 (AVX2 only too)
# 1.72x (real_size_epyc_zen3.json), so the flags do not tell. AMX (9-11x) is not probed.
INT8_MIN_GEMM_SPEEDUP = 1.5
INT8_SATURATES = ("its weights use 8 bits, which onnxruntime's int8 kernel saturates on a CPU without VNNI "
                  "(re-export: weights now use 7, export.quantize.QGEMM_WEIGHT_MAX)")


def _int8_saturates(variant) -> bool:
    """An int8 variant whose weights exceed |q| <= 64 (exported before QGEMM_WEIGHT_MAX: 127) on a
    CPU whose int8 kernel sums pairs of products in int16 (no VNNI: hardware.int8_kernel "AVX2")."""
    return hardware.int8_kernel() == "AVX2" and variant.details.get("int8_weight_max", 127) > 64


def hardware_order(device: str, have: tuple | None = None) -> list[tuple[str, str]]:
    """[(precision, why)], fastest first for this processor (measured rules, README "Precision"):
    on CUDA bf16; on CPUs with usable AMX bf16 (torch on oneDNN's AMX tiles: at GMR-3B width as
    fast as int8 end to end, benchmarks/real_size.py), and on CPUs with AVX512-BF16 where torch's
    bf16 GEMM measures at least BF16_MIN_GEMM_SPEEDUP times its fp32 one (AMD Zen 5: 3.2-3.8x,
    real_size_epyc_zen5.json), bf16 first; then int8 on AMX, and elsewhere where onnxruntime's
    int8 GEMM (AVX512-VNNI, AVX-VNNI, AVX2) measures at least INT8_MIN_GEMM_SPEEDUP times its fp32
    one (AVX512-VNNI: 1.7-1.9x fp32 end to end, real_size_vnni.json; an AVX2-only AMD EPYC: not
    faster, int8_kernels_epyc_zen2.json); fp32 last. ``have``: the engine's variants, when known
    (each probe runs only for an engine with that variant)."""
    if device.startswith("cuda"):
        return [("bf16", "CUDA device")]
    order = []
    kernel = hardware.bf16_kernel()
    if kernel == "AMX" and _torch_available():
        order.append(("bf16", "torch bf16 GEMMs use AMX on this CPU"))
    elif kernel == "AVX512-BF16" and (have is None or "bf16" in have) and _torch_available():
        speedup = hardware.torch_bf16_speedup()
        if speedup is not None and speedup >= BF16_MIN_GEMM_SPEEDUP:
            order.append(("bf16", f"torch bf16 GEMMs (AVX512-BF16) measured {speedup:.1f}x fp32 on this CPU"))
    kernel = hardware.int8_kernel()
    if kernel == "AMX":
        order.append(("int8", "onnxruntime int8 GEMMs use AMX on this CPU"))
    elif kernel and (have is None or "int8" in have):
        speedup = hardware.onnxruntime_int8_speedup()
        if speedup is None:  # no onnx package to build the probe: the flag alone
            order.append(("int8", f"onnxruntime int8 GEMMs use {kernel} on this CPU (not measured: no onnx package)"))
        elif speedup >= INT8_MIN_GEMM_SPEEDUP:
            order.append(("int8", f"onnxruntime int8 GEMMs ({kernel}) measured {speedup:.1f}x fp32 on this CPU"))
    return order + [("fp32", "fp32")]


def _int8_passed_over(manifest) -> str | None:
    """Why ``auto`` must not run this engine's int8 variant on this CPU, if so: weights over 7 bits
    (engines exported before QGEMM_WEIGHT_MAX) where onnxruntime's int8 kernel saturates (no VNNI:
    export.quantize), or an int8 GEMM measured too slow to gain (INT8_MIN_GEMM_SPEEDUP)."""
    kernel = hardware.int8_kernel()
    if "int8" not in manifest.precisions or not kernel or kernel == "AMX":
        return None
    if _int8_saturates(manifest.variant("int8")):
        return f"int8 passed over: {INT8_SATURATES}"
    speedup = hardware.onnxruntime_int8_speedup()
    if speedup is None or speedup >= INT8_MIN_GEMM_SPEEDUP:
        return None
    return (f"int8 passed over: onnxruntime's int8 GEMM ({kernel}) measured {speedup:.1f}x fp32 on this CPU "
            f"(< {INT8_MIN_GEMM_SPEEDUP})")


# fp32 runs on the torch backend at real widths when torch is importable and no backend was
# named: the same fp32 weights and graph modules, but projections and MLPs on real tokens only
# and sdpa attention instead of materialised score matrices. Measured in one run
# (benchmarks/results/fp32_backends_cpu.json): at GMR-3B width torch is 1.43x onnxruntime's
# fp32 on text and 1.36x on images (peak RSS +0.8 GB on text, the same on images), scores within
# 1e-5; on a toy engine (hidden 64) eager torch's per-operator overhead dominates and it is
# 0.7-0.8x, so narrower engines stay on onnxruntime. 1,536 is the narrowest real Qwen-VL decoder
# (Qwen2-VL-2B). Without torch, or with onnxruntime providers or backend options given, fp32
# stays on onnxruntime. On AMD processors with AVX-512, where torch's own fp32 GEMM (MKL) runs
# AVX2 code, the torch backend multiplies with oneDNN instead (backends.torch): there torch measured
# 1.21x onnxruntime's fp32 on text and 1.37x on images at GMR-3B width (fp32_backends_epyc_zen5.json;
# with MKL it was 0.57x and 0.70x).
FP32_TORCH_MIN_HIDDEN = 1536
FP32_ON_TORCH = "fp32 on torch at this width: real tokens only, sdpa attention (README \"Precision\")"


def choose_precision(manifest, precision: str, backend: str | None, device: str,
                     onnxruntime_options: bool = False, image_precision: str = "auto",
                     text_precision: str = "auto") -> tuple[str, str, str]:
    """(precision, backend, reason). ``auto`` takes, in ``hardware_order``, the first of the
    engine's variants that is fp32 or ranks within AUTO_MIN_TAU of it; bf16 also qualifies when
    the route ``auto`` would run its image pairs under ranked within AUTO_MIN_TAU (every pair then
    runs that route: ``choose_text_precision``, TEXT_AS_IMAGES), unless ``image_precision`` or
    ``text_precision`` was set. An engine with no such variant gets its fastest one (and the
    reason says so). fp32 with no backend named runs on torch at real widths where it can
    (FP32_ON_TORCH); ``onnxruntime_options`` (providers or backend options were given) keeps it
    on onnxruntime."""
    have = manifest.precisions
    if precision != "auto":
        manifest.variant(precision)  # raises if absent
        chosen, why = precision, "requested"
    elif device.startswith("cuda"):
        if "bf16" not in have:
            raise BackendError("device cuda runs the bf16 variant, which this engine lacks; re-export with --dtype bf16")
        chosen, why = "bf16", "CUDA device"
    else:
        note = _int8_passed_over(manifest)
        order = ([(p, why) for p, why in hardware_order(device, have) if p in have and not (p == "int8" and note)]
                 or [(have[0], "the engine's only variant")])
        passed = [note] if note else []
        for p, why in order:
            tau = ranking_figure(manifest, p) if p != "fp32" else None
            if p == "fp32":
                chosen, why = p, "fp32" + (f" ({'; '.join(passed)})" if passed else ": no faster variant for this CPU")
                break
            if tau is not None and tau >= AUTO_MIN_TAU:
                chosen, why = p, f"{why}; validated ranking tau {tau:.3f} >= {AUTO_MIN_TAU}"
                break
            routed = (routed_every_pair(manifest, device) if p == "bf16" and backend in (None, "torch")
                      and image_precision == "auto" and text_precision == "auto" else None)
            if routed is not None:
                chosen, why = p, (f"{why}; bf16 alone ranked tau {'not measured' if tau is None else round(tau, 3)} < "
                                  f"{AUTO_MIN_TAU}, every pair runs {routed[0]}: validated ranking tau "
                                  f"{routed[1]:.3f} >= {AUTO_MIN_TAU}")
                break
            passed.append(f"{p} passed over: validated ranking tau {tau if tau is None else round(tau, 3)} < {AUTO_MIN_TAU}")
        else:
            chosen, why = order[0][0], f"{order[0][1]}; no variant ranks within tau {AUTO_MIN_TAU} of fp32 and fp32 is absent"
    variant = manifest.variant(chosen)
    run_on = backend or variant.backend
    if (backend is None and chosen == "fp32" and run_on == "onnxruntime" and not device.startswith("cuda")
            and not onnxruntime_options and manifest.decoder.hidden_size >= FP32_TORCH_MIN_HIDDEN
            and _torch_available()):
        run_on, why = "torch", f"{why}; {FP32_ON_TORCH}"
    if chosen == "int8" and _int8_saturates(variant):
        log.warning("gmr_fast: this engine's int8 variant: %s", INT8_SATURATES)
        why = f"{why}; {INT8_SATURATES}"
    if device.startswith("cuda") and run_on != "torch":  # onnxruntime's device is its providers, not this
        raise BackendError(f"device {device!r} runs on the torch backend, and {chosen} would run on onnxruntime on the "
                           f"CPU: pass backend='torch' (fp32, bf16), or device='cpu' (onnxruntime's own CUDA provider, "
                           f"where installed, is asked for with providers=[...])")
    if chosen == "int8" and run_on != "onnxruntime":
        raise BackendError("int8 engines run on the onnxruntime backend")
    if chosen == "bf16" and run_on != "torch":
        raise BackendError("bf16 runs on the torch backend (onnxruntime has no bf16 GEMM on CPU)")
    if not variant.graphs and run_on != "torch":
        raise BackendError(f"this engine's {chosen} variant has no ONNX graphs ({variant.details.get('weights', '')}); "
                           f"it runs on the torch backend")
    return chosen, run_on, why


# Why ``auto`` runs pairs with an image in fp32 when it chose bf16 on a CPU: at GMR-3B width bf16
# ranked the image workload at Kendall tau 0.976-0.9798 against fp32 on the AMX Xeon and 0.968 on
# an AMD Zen 5, below AUTO_MIN_TAU, while text stayed at 0.988-0.992 on both; the error is bf16
# rounding of every GEMM's activations, which no cheaper placement removed (benchmarks/README.md "Open items in
# detail"). fp32 over the bf16 files ran images at 0.52 pairs/s on the
# Zen 5 (HF bf16 0.26 on that workload), so the default stays ahead of HF's fastest dtype there.
# Why on a CPU with AMX they run bf16-gemm instead, where the export validated it: there bf16's
# GEMM is 4-8x fp32's (1,300-2,750 against 290-340 GFLOP/s at GMR-3B shapes on an AMX Xeon,
# benchmarks/README.md "Precision and backends"), so fp32 images fall to HF bf16's speed (0.38 against 0.34 pairs/s on the
# image workload), while bf16-gemm ran it at 0.63-0.83 pairs/s (1.9-2.2x HF bf16) ranking at tau 0.996.
# Elsewhere (AVX512-BF16 without AMX) bf16-vision is the only routed mode auto takes, and only where
# torch's bf16 GEMM measures at least BF16_VISION_MIN_GEMM_SPEEDUP times its fp32 one: bf16-vision's
# decoder runs each projection as two bf16 GEMMs (the input's hi and lo halves), which break even
# with one fp32 GEMM at 2x, so above it the decoder loses nothing while the vision tower (plain bf16)
# gains. On an AMD EPYC Zen 4 (bf16 GEMM 2.3x fp32; oneDNN's fpmath mode is not exact there, so
# attention stays fp32) bf16-vision ran MRB t2i 1.40x and then 1.29x, it2it 1.37x and i2t 1.02x the
# fp32 route's rate (benchmarks/README.md "MRB workload", "Precision and backends"), while bf16-gemm ran t2i at 0.78x fp32, and
# bf16x3 (three bf16 GEMMs per product) cannot gain below 3x.
# Why bf16-vision goes first where the export validated it too: most of bf16's image error is the
# decoder's. On that Xeon (GMR-3B width, 6 + 8 layers, t2i and it2it, 3 queries x 16 candidates,
# images of 256-768 tokens), the mean distance to fp32 of per-query-centred scores was 0.0106 and
# 0.0111 all in bf16, 0.0069 and 0.0063 under bf16-gemm, 0.0080 and 0.0079 with only the vision
# tower in bf16 (bf16-vision), 0.0098 and 0.0124 with only the decoder in bf16; and bf16-vision ran
# 0.65 and 0.64 pairs/s against bf16-gemm's 0.45 and 0.38, all bf16 0.91 and 0.98
# (benchmarks/image_precision_split.py; on the MRB workload 1.81x and 2.26x HF bf16, benchmarks/README.md). Those
# distance differences are within the noise a re-implementation re-draws (benchmarks/README.md "Precision and backends", split
# products), so speed decides the order; both pass the same bar.
# Why without AMX bf16-gemm comes after bf16-vision where gmr_fast._dnnl runs (never bf16x3):
# bf16-gemm's projections are then one bf16 GEMM with fp32 results each, its vision tower too, so
# it gains wherever bf16-vision's floor holds. On the AMD EPYC Zen 4 (GMR-3B width, 6 + 8 layers,
# 4 Dec) it ran 1,116- and 324-token query images with short documents at 0.354 pairs/s and 8
# text queries' 300-700 px document images at 0.298, against the fp32 route's 0.192 and 0.167
# (the 0.78x above was with two torch GEMMs per product). bf16x3's two _dnnl GEMMs ran text at
# fp32's rate there (1.02 against 1.03 pairs/s), so it gains nothing without AMX.
# Why bf16x3 comes after them and before fp32: it is the fp32 model (three bf16 products per
# projection), ranking the MRB pairs at tau 1.000 at 1.14-1.26x the fp32 variant's rate on that
# Xeon, half bf16-vision's.
# Why on AMX bf16-vision-x3-gate-up comes first (6 Dec): the export's validation set (4 queries of
# 20 documents) cannot tell ranking 0.974 from 0.98, and on more pairs bf16-vision fell below the
# bar. On the AMX Xeon (GMR-3B width, 6 + 8 layers, real_size.py's image workload over 8 draws, 256
# pairs against fp32; benchmarks/README.md "Where bf16-gemm's error comes from") bf16-vision ranked
# at pooled tau 0.974, bf16-gemm 0.979; their error sits in the decoder's MLP, most of it in
# gate_up's input rounded to bf16, and computing that one product fp32-accurately (one more bf16
# GEMM on the residual, backends.torch.EXACT_PRODUCTS) ranked at 0.981 under bf16-vision, at 0.72x
# its rate (0.985 against 0.981 on a second 256). Its cost on the MRB workload beside HF in the same
# run: i2t 7.2x HF bf16 (bf16-vision 10.7x), and t2i 1.16x HF on the same 50 pairs (bf16-vision 1.39x,
# the target 1.3x), where bf16-vision ranked no worse; ranking goes first (benchmarks/README.md "The route").
# Why bf16-vision-x3-gate-up-image-queries comes before it (7 Dec): that error was counted on image
# queries with text documents; on text queries with document images (MRB t2i: 4-16-word queries,
# 256-768-token document images, benchmarks/image_tau.py --workload t2i, two draws of 8 queries x 25
# documents against fp32, GMR-3B width, 6 + 8 layers, an AMD EPYC Zen 4 with AVX512-BF16, whose bf16
# products round their inputs as AMX's do) bf16-vision ranked at per-query tau 0.981 and 0.982 (pooled
# 0.981, 0.982), within the bar on both, where on image queries it fell to 0.974 on one of two draws.
# gate_up exact ranks t2i higher still (0.986 on the first draw), but the rule is the fastest path
# within the bar, and on t2i the route cost AMX its target (above). So text queries' routed pairs run
# bf16-vision and image queries' pairs the route (benchmarks/README.md "Per query kind").
IMAGES_BF16_GEMM = ("pairs with an image run fp32 over the same bf16 weights with every matrix product on the AMX "
                    "bf16 hardware (bf16-gemm): fp32 runs at a quarter or less of bf16's GEMM speed on AMX")
IMAGES_BF16_VISION = ("pairs with an image run the vision tower in bf16 and the decoder fp32 over the same bf16 "
                      "weights with every matrix product on the AMX bf16 hardware (bf16-vision): most of bf16's "
                      "image error is the decoder's, most of bf16-gemm's extra time the vision tower's")
IMAGES_BF16_VISION_X3_GATE_UP = ("pairs with an image run the vision tower in bf16 and the decoder fp32 over the same "
                                 "bf16 weights with every matrix product on the AMX bf16 hardware, the MLP's gate_up "
                                 "fp32-accurate (bf16-vision-x3-gate-up): bf16-vision's ranking error sits mostly in "
                                 "gate_up's input rounded to bf16")
IMAGES_BF16_VISION_X3_GATE_UP_IMAGE_QUERIES = (
    "pairs with an image run the vision tower in bf16 and the decoder fp32 over the same bf16 weights with every "
    "matrix product on the AMX bf16 hardware, the MLP's gate_up fp32-accurate for queries with an image "
    "(bf16-vision-x3-gate-up-image-queries): bf16-vision's ranking error sits mostly in gate_up's input rounded to "
    "bf16 under an image query's prefix, while text queries' image documents ranked as well without it")
IMAGES_BF16X3 = ("pairs with an image run fp32 over the same bf16 weights with each matrix product as three bf16 "
                 "products on the AMX hardware (bf16x3: the fp32 model within ~2^-15 per product, no tensor rounded "
                 "to bf16): fp32's own GEMM runs at a quarter or less of bf16's on AMX")
IMAGES_BF16_VISION_NO_AMX = ("pairs with an image run the vision tower in bf16 and the decoder fp32 over the same bf16 "
                             "weights, each projection as two bf16 GEMMs (bf16-vision): torch's bf16 GEMM measured "
                             "{speedup:.1f}x fp32 on this CPU (>= {floor}), where two of them cost no more than one "
                             "fp32 GEMM while the vision tower gains")
IMAGES_BF16_GEMM_ONE_GEMM = ("pairs with an image run fp32 over the same bf16 weights, each projection as one bf16 "
                             "GEMM with fp32 results (gmr_fast._dnnl; bf16-gemm): torch's bf16 GEMM measured "
                             "{speedup:.1f}x fp32 on this CPU")
IMAGES_IN_FP32 = ("pairs with an image run fp32 over the same bf16 weights: bf16 ranked images at tau 0.968-0.9798 "
                  f"< {AUTO_MIN_TAU} against fp32 at GMR-3B width on the CPUs measured (README \"Precision\")")


IMAGES_IN_FP32_REFUSED = ("pairs with an image run fp32 over the same bf16 weights: this engine's export refused plain "
                          "bf16 for them ({reason})")


def plain_image_refusal(manifest) -> str | None:
    """Why the export refused plain bf16 for pairs with an image, where it accepted the bf16
    variant with those pairs routed instead (export.engine_export._accept_routed: its long group, a
    large image query, ranked below the criterion in plain bf16 and a route met it); else None.
    Such pairs then never run plain bf16: ``auto`` routes them (or runs them fp32),
    ``image_precision="same"`` is refused."""
    bf16 = manifest.variants.get("bf16")
    plain = (bf16.validation or {}).get("plain_image_pairs") if bf16 is not None else None
    return str(plain.get("refused")) if isinstance(plain, dict) else None


def plain_image_routes(manifest) -> list[str]:
    """The routes the export accepted where it refused plain bf16 for pairs with an image."""
    plain = (manifest.variant("bf16").validation or {}).get("plain_image_pairs") or {}
    return list(plain.get("routes_accepted", ()))


def bf16_holds_fp32(manifest) -> bool:
    """Whether fp32 arithmetic over this engine's bf16 weights is its validated fp32 model: an
    fp32 variant over the bf16 variant's own files (``--fp32-over-bf16``), or fp32 files of a
    checkpoint stored entirely in bf16 (as GMR is released), which bf16 then holds exactly (the
    torch backend checks every value it keeps in bf16 as it loads)."""
    have = manifest.precisions
    if "bf16" not in have or "fp32" not in have:
        return False
    fp32, bf16 = manifest.variant("fp32"), manifest.variant("bf16")
    if fp32.weights and fp32.weights == bf16.weights and all(
            e["dtype"] == "bfloat16" for w in fp32.weights.values() for n, e in w.tensors.items()
            if n != "score_row" and len(e["shape"]) == 2):
        return True
    return set(manifest.source.get("stored_dtypes") or ()) == {"BF16"}


ROUTED_FIGURES = {"bf16-gemm": "bf16_gemm_images", "bf16-vision": "bf16_vision_images", "bf16x3": "bf16x3_images",
                  "bf16-vision-x3-gate-up": "bf16_vision_x3_gate_up_images",
                  "bf16-vision-x3-gate-up-image-queries": "bf16_vision_x3_gate_up_image_queries_images"}


def bf16_gemm_images_figures(manifest, mode: str = "bf16-gemm") -> dict | None:
    """The export's validation of image pairs under ``mode`` (bf16-gemm, bf16-vision or bf16x3)
    beside bf16 text pairs (the bf16 variant's ``validation.bf16_gemm_images``,
    ``validation.bf16_vision_images`` or ``validation.bf16x3_images``), if it ran."""
    bf16 = manifest.variants.get("bf16")
    figures = (bf16.validation or {}).get(ROUTED_FIGURES[mode]) if bf16 is not None else None
    return figures if isinstance(figures, dict) else None


def route_tau(manifest, mode: str) -> float | None:
    """The mean per-query Kendall tau the export measured for image pairs under ``mode`` (a key
    of ROUTED_FIGURES), or None where it did not measure it."""
    figures = bf16_gemm_images_figures(manifest, mode) if mode in ROUTED_FIGURES else None
    return figures.get("query_kendall_tau_mean") if figures else None


def route_attention(manifest, mode: str | None) -> str | None:
    """The dtype of attention's inputs in the image batches' decoder under ``mode``
    (backends.torch.ROUTE_ATTENTION), as the export measured the route's ranking: "bf16" (the
    routes' definition) where the figures say so or none were recorded, "fp32" for figures an
    export recorded before attention ran that way (no "attention" field); None for modes other
    than bf16-gemm, bf16-vision and the routes built on them (ROUTE_PRODUCTS)."""
    if ROUTE_PRODUCTS.get(mode, (mode,))[0] not in ("bf16-gemm", "bf16-vision"):
        return None
    figures = bf16_gemm_images_figures(manifest, mode)
    return "bf16" if figures is None else str(figures.get("attention", "fp32"))


def query_vision(manifest, mode: str | None) -> str | None:
    """How bf16-vision encodes the query's images (backends.torch.QUERY_VISION), as the export
    measured the route's ranking: the figures' "query_vision", else "bf16" (the route's
    definition; exports before 6 Dec recorded no field); None for modes not built on bf16-vision."""
    if ROUTE_PRODUCTS.get(mode, (mode,))[0] != "bf16-vision":
        return None
    figures = bf16_gemm_images_figures(manifest, mode) or {}
    return str(figures.get("query_vision", "bf16"))


def choose_image_precision(manifest, requested: str, precision: str, backend: str, device: str,
                           image_precision: str) -> tuple[str | None, str]:
    """(how pairs with an image compute, why): "fp32" routes them to fp32 over the same bf16
    weights (the torch backend's ``exact_images``), "bf16-gemm" to the same fp32 tensors with
    every matrix product on the bf16 hardware (backends.torch.Bf16Gemm), "bf16-vision" to that in
    the decoder with the vision tower in bf16, "bf16x3" to the fp32 model with each product as three
    bf16 products (graphs.common.Proj "split3"), "bf16-vision-x3-gate-up" to bf16-vision with the
    decoder's gate_up products so (ROUTE_PRODUCTS), "bf16-vision-x3-gate-up-image-queries" to that
    for the queries with an image and bf16-vision for text queries (ROUTE_PRODUCTS_IMAGE_QUERIES),
    None leaves every pair in ``precision``. ``image_precision`` naming one of these asks for it (an
    error where it cannot hold), "same" refuses it, "auto" takes one where ``auto`` chose bf16 on a
    CPU and the engine allows it: on a CPU with usable AMX, bf16-vision-x3-gate-up-image-queries
    (IMAGES_BF16_VISION_X3_GATE_UP_IMAGE_QUERIES), else bf16-vision-x3-gate-up (IMAGES_BF16_VISION_X3_GATE_UP), else
    bf16-vision (IMAGES_BF16_VISION), else bf16-gemm (IMAGES_BF16_GEMM), else bf16x3
    (IMAGES_BF16X3), the first the export measured ranking within
    AUTO_MIN_TAU of fp32; without AMX, where torch's bf16 GEMM measures at least
    BF16_VISION_MIN_GEMM_SPEEDUP times fp32 here, bf16-vision (IMAGES_BF16_VISION_NO_AMX), then,
    where gmr_fast._dnnl runs (BF16_VISION_MIN_GEMM_SPEEDUP_ONE_GEMM), bf16-gemm
    (IMAGES_BF16_GEMM_ONE_GEMM), the first the export validated; else fp32 (IMAGES_IN_FP32)."""
    routed = ("fp32", "bf16x3", "bf16-gemm", "bf16-vision", "bf16-vision-x3-gate-up",
              "bf16-vision-x3-gate-up-image-queries")
    refused = plain_image_refusal(manifest) if precision == "bf16" else None
    if refused and image_precision == "same":
        raise ConfigError(f"image_precision same would run pairs with an image in plain bf16, which this engine's "
                          f"export refused for them ({refused}); leave image_precision at auto or name fp32 or a "
                          f"route it accepted ({', '.join(plain_image_routes(manifest))})")
    if image_precision == "same" or precision != "bf16":
        if image_precision in routed:
            raise ConfigError(f"image_precision {image_precision} runs beside bf16; the precision here is {precision}")
        return None, "the same as every pair"
    possible = backend == "torch" and bf16_holds_fp32(manifest)
    if image_precision in routed:
        if not possible:
            raise ConfigError(f"image_precision {image_precision} needs the torch backend and an engine whose bf16 "
                              "weights hold its fp32 model (a bf16 checkpoint exported with --dtype bf16 "
                              "--fp32-over-bf16, or with fp32 and bf16)")
        if image_precision != "fp32" and (device != "cpu" or hardware.bf16_kernel() is None):
            raise ConfigError(f"image_precision {image_precision} runs on a CPU with bf16 matrix hardware "
                              "(AMX or AVX512-BF16)")
        how = {"fp32": "fp32", "bf16x3": "fp32 with each matrix product as three bf16 products (fp32-accurate)",
               "bf16-gemm": "fp32 with matrix products on the bf16 hardware",
               "bf16-vision": "fp32 in the decoder with matrix products on the bf16 hardware, the vision tower "
                              "bf16,",
               "bf16-vision-x3-gate-up": "fp32 in the decoder with matrix products on the bf16 hardware, gate_up's "
                                         "fp32-accurate, the vision tower bf16,",
               "bf16-vision-x3-gate-up-image-queries": "fp32 in the decoder with matrix products on the bf16 "
                                                       "hardware, gate_up's fp32-accurate for queries with an "
                                                       "image, the vision tower bf16,"}[image_precision]
        return image_precision, f"pairs with an image run {how} over the same bf16 weights (requested)"
    if refused and possible and device.startswith("cuda"):  # the routes run on CPUs
        return "fp32", f"{IMAGES_IN_FP32_REFUSED.format(reason=refused)}; the bf16 routes run on CPUs only"
    if (requested == "auto" or refused) and possible and not device.startswith("cuda"):
        passed = []
        modes = (("bf16-vision-x3-gate-up-image-queries", IMAGES_BF16_VISION_X3_GATE_UP_IMAGE_QUERIES),
                 ("bf16-vision-x3-gate-up", IMAGES_BF16_VISION_X3_GATE_UP), ("bf16-vision", IMAGES_BF16_VISION),
                 ("bf16-gemm", IMAGES_BF16_GEMM), ("bf16x3", IMAGES_BF16X3))
        if hardware.bf16_kernel() != "AMX":
            from .backends import bf16_gemm

            speedup = hardware.torch_bf16_speedup()
            one_gemm = bf16_gemm.load() is not None
            floor = BF16_VISION_MIN_GEMM_SPEEDUP_ONE_GEMM if one_gemm else BF16_VISION_MIN_GEMM_SPEEDUP
            if speedup is None or speedup < floor:
                measured = "not measured" if speedup is None else f"measured {speedup:.1f}x fp32"
                return "fp32", (f"{IMAGES_IN_FP32}; bf16-vision passed over: torch's bf16 GEMM {measured} on this "
                                f"CPU (< {floor})")
            why = IMAGES_BF16_VISION_NO_AMX.format(speedup=speedup, floor=floor)
            if one_gemm:
                why = why.replace("each projection as two bf16 GEMMs", "each projection as one bf16 GEMM with fp32 "
                                  "results (gmr_fast._dnnl)").replace("two of them cost", "it costs")
            modes = (("bf16-vision", why),) + ((("bf16-gemm", IMAGES_BF16_GEMM_ONE_GEMM.format(speedup=speedup)),)
                                               if one_gemm else ())
        accepted = plain_image_routes(manifest) if refused else None  # then only a route that met the whole criterion
        for mode, why in modes:
            tau = route_tau(manifest, mode)
            if tau is not None and tau >= AUTO_MIN_TAU and (accepted is None or mode in accepted):
                return mode, "; ".join([f"{why}; validated ranking tau {tau:.3f} >= {AUTO_MIN_TAU}"] + passed)
            if tau is not None and tau >= AUTO_MIN_TAU:
                passed.append(f"{mode} passed over: below the export's criterion (its long group)")
                continue
            passed.append(f"{mode} passed over: validated ranking tau "
                          f"{'not measured by this export' if tau is None else round(tau, 3)}")
        return "fp32", "; ".join([IMAGES_IN_FP32_REFUSED.format(reason=refused) if refused else IMAGES_IN_FP32]
                                 + passed)
    if refused:
        raise ConfigError(f"this engine's bf16 runs pairs with an image only under a route (plain bf16 was refused for "
                          f"them at export: {refused}), which needs the torch backend")
    return None, "the same as every pair"


# Why ``auto`` may run every pair, text pairs too, under the route it takes for pairs with an
# image: where bf16 alone ranks below AUTO_MIN_TAU but that route ranks within it, the route is
# the fastest faithful path. Measured on GMR-7B at full depth (random weights, the export's 92
# pairs, an AMD EPYC Zen 4): bf16 ranked at per-query tau 0.947, bf16-gemm at 0.982 (bf16x3 at
# 1.0, bf16-vision 0.968). The route's figure covers text pairs: every validation group mixes text,
# image and text+image documents, so every pair of the set, its text-only ones included, ran under
# the route. A text pair has no vision tower, so under bf16-vision it computes as under bf16-gemm
# (TEXT_DECODER). Speed: at GMR-3B width on that CPU (6 layers, the text workload of
# benchmarks/real_size.py) bf16-gemm ran 2.00 pairs/s, bf16 2.08 and fp32 1.03: its products are
# bf16 GEMMs with fp32 results (gmr_fast._dnnl), so it keeps nearly all of bf16's speed, while
# bf16x3 (1.02) does not gain over fp32 there.
TEXT_AS_IMAGES = ("pairs without an image run as pairs with one do ({decoder} in the decoder): bf16 alone ranked "
                  "tau {tau} < {bar} at export, the route tau {route_tau:.3f} >= {bar}, text documents included")
TEXT_DECODER = {"fp32": "fp32", "bf16x3": "bf16x3", "bf16-gemm": "bf16-gemm", "bf16-vision": "bf16-gemm",
                "bf16-vision-x3-gate-up": "bf16-gemm-x3-gate-up",
                "bf16-vision-x3-gate-up-image-queries": "bf16-gemm-x3-gate-up-image-queries"}


def routed_every_pair(manifest, device: str) -> tuple[str, float] | None:
    """(mode, its validated tau) where ``auto`` would route pairs with an image to a mode of
    ROUTED_FIGURES ranked within AUTO_MIN_TAU on this CPU (``choose_image_precision``), else None."""
    validation = manifest.variant("bf16").validation or {}
    if (device.startswith("cuda") or not any(isinstance(validation.get(k), dict) for k in ROUTED_FIGURES.values())
            or not bf16_holds_fp32(manifest)):  # no route measured at export: nothing to probe
        return None
    mode, _ = choose_image_precision(manifest, "auto", "bf16", "torch", device, "auto")
    tau = route_tau(manifest, mode)
    return (mode, tau) if tau is not None and tau >= AUTO_MIN_TAU else None


def choose_text_precision(manifest, requested: str, precision: str, image_mode: str | None,
                          text_precision: str) -> tuple[bool, str]:
    """(whether pairs without an image run as ``image_mode`` runs pairs with one, why).
    "as-images" asks for it (an error where image pairs are not routed), "same" refuses it,
    "auto" takes it where ``auto`` chose bf16 only because the image route ranked within
    AUTO_MIN_TAU and bf16 alone did not (TEXT_AS_IMAGES)."""
    if image_mode is None:
        if text_precision == "as-images":
            raise ConfigError(f"text_precision as-images computes text pairs as image_precision routes pairs with an "
                              f"image; here every pair runs {precision} (image_precision applies beside bf16)")
        return False, "the same as every pair"
    if text_precision == "as-images":
        return True, f"pairs without an image run as pairs with one do ({TEXT_DECODER[image_mode]} in the decoder; requested)"
    if text_precision == "auto" and requested == "auto" and precision == "bf16" and image_mode in ROUTED_FIGURES:
        tau, routed = ranking_figure(manifest, "bf16"), route_tau(manifest, image_mode)
        if (tau is None or tau < AUTO_MIN_TAU) and routed is not None and routed >= AUTO_MIN_TAU:
            return True, TEXT_AS_IMAGES.format(decoder=TEXT_DECODER[image_mode], bar=AUTO_MIN_TAU, route_tau=routed,
                                               tau="not measured" if tau is None else round(tau, 3))
    return False, f"pairs without an image run {precision}"


def _torch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # an import hook that refuses torch
        return False


class Reranker:
    def __init__(self, engine_dir: str | os.PathLike, options: RerankerOptions | None = None, **overrides):
        """``options`` and/or keyword overrides of its fields (``Reranker(engine, precision="fp32")``)."""
        options = dataclasses.replace(options or RerankerOptions(), **overrides) if overrides else (options or RerankerOptions())
        options.validate()
        self.options = options
        self.engine_dir = os.fspath(engine_dir)
        self.manifest = load_manifest(engine_dir)
        m = self.manifest
        self.family = get_family(m.family)
        self.spec = m.preprocessing
        self.gmr = dataclasses.replace(m.gmr, max_length=int(options.max_length)) if options.max_length else m.gmr
        self.prompts = PromptBuilder(os.path.join(self.engine_dir, "tokenizer.json"), self.gmr, m.tokens)
        self.instruction = options.instruction or self.gmr.default_instruction
        self.num_threads = int(options.num_threads or hardware_threads())
        self.precision, backend, why = choose_precision(m, options.precision, options.backend, options.device,
                                                         bool(options.providers or options.backend_options),
                                                         options.image_precision, options.text_precision)
        self.image_precision, image_why = choose_image_precision(m, options.precision, self.precision, backend,
                                                                 options.device, options.image_precision)
        self.route_text, text_why = choose_text_precision(m, options.precision, self.precision, self.image_precision,
                                                          options.text_precision)
        if self.image_precision:
            why = f"{why}; {image_why}"
        if self.route_text:
            why = f"{why}; {text_why}"
        self.lanes, lanes_why = choose_lanes(options.lanes, backend, options.device, self.num_threads)
        self.backend_threads = max(1, self.num_threads // self.lanes)
        log.info("gmr_fast: %s on %s (%s); %d lane(s) of %d thread(s) (%s)", self.precision, backend, why, self.lanes,
                 self.backend_threads, lanes_why)
        exact_images, products = ROUTE_PRODUCTS.get(self.image_precision, (self.image_precision, ()))
        backend_options = dict(options.backend_options, **({"exact_images": exact_images} if exact_images else {}),
                               **({"exact_products": products} if products else {}))
        attention = route_attention(m, self.image_precision)
        if attention is not None:
            backend_options.setdefault("route_attention", attention)
        query = query_vision(m, self.image_precision)
        if query is not None:
            backend_options.setdefault("query_vision", query)
        self.backend = create_backend(backend, self.engine_dir, m, self.precision, self.backend_threads, options.providers,
                                      options.device, **backend_options)
        # whether the backend encodes the query's images apart from documents' (plan: QUERY_IMAGE keys)
        self._query_tower = getattr(self.backend, "query_tower", None) is not None
        self.choice = {"precision": self.precision, "image_precision": self.image_precision or self.precision,
                       "text_precision": TEXT_DECODER[self.image_precision] if self.route_text else self.precision,
                       "backend": backend, "device": options.device, "reason": why,
                       "lanes": self.lanes, "threads_per_lane": self.backend_threads, "lanes_reason": lanes_why,
                       "cpu": hardware.cpu_info()["model"], "cpu_features": hardware.cpu_info()["features"]}
        for key in ("malloc", "kernel_caches", "gemm", "host_kernels"):  # torch backend
            if hasattr(self.backend, key):
                self.choice[key] = getattr(self.backend, key)
        if getattr(self.backend, "query_vision", None) is not None:  # torch, images under bf16-vision
            self.choice["query_vision"] = self.backend.query_vision
        self._limits = self._memory_limits()
        self._cache: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_next: dict[tuple, int] = {}  # key -> its next use, for entries a batch job's CachePlan kept
        self._cache_lock = threading.Lock()
        # at most ``lanes`` engine runs at once, vision and decoder counted together: the
        # activation budget is per lane, and the next step's vision run (prepared on a worker
        # thread) beside this step's decoder run would hold both budgets' activations at once
        self._run_lock = threading.BoundedSemaphore(self.lanes)
        self._wide_lock = threading.Lock()  # orders the callers that take every lane at once (_slot)
        self._stats_lock = threading.Lock()
        self.last_stats: dict[str, Any] = {}
        self.totals = collections.Counter()

    # ------------------------------------------------------------------ memory model
    def _memory_limits(self) -> dict[str, Limits]:
        """Batch limits from the model's shape and the budgets. Activation bytes per token cover
        the residual stream, norms and the MLP's intermediate tensors (fp32); per attention score
        (query x key) the scores, their masked form and the softmax, for every query head;
        prefix batches also return their keys/values. (Vision runs one image at a time: _encode.)
        The counts follow the graphs' largest live tensors; benchmarks/real_size.py checks the
        resulting peak memory."""
        o, d = self.options, self.manifest.decoder
        budget = o.activation_budget_mb * MiB // self.lanes  # lanes run at once within the one budget
        per_token = 4.0 * (4 * d.hidden_size + 4 * d.intermediate_size)
        per_score = 4.0 * 3 * d.num_heads
        decode = Limits(o.max_batch_tokens, o.max_batch_size, o.min_fill, per_token, per_score, budget)
        prefix = Limits(o.max_batch_tokens, o.max_batch_size, o.min_fill, per_token + 2.0 * d.kv_bytes_per_token,
                        per_score, budget)
        return {"decode": decode, "prefix": prefix}

    # ------------------------------------------------------------------ images
    def _decode_images(self, sources: dict[tuple, tuple[Any, Any]]) -> dict[tuple, _Image | ImageError]:
        """sources: content key -> (what the user gave, what to decode)."""
        keys = list(sources)

        def one(i: int):
            given, data = sources[keys[i]]
            path = os.fspath(given) if isinstance(given, (str, os.PathLike)) else None
            try:
                decoded = decode_image(data, i, self.options.max_image_pixels, path)
                size = smart_resize(decoded.height, decoded.width, self.spec.min_pixels, self.spec.max_pixels,
                                    factor=self.spec.factor)
                return _Image(decoded, size)
            except ImageError as e:
                return e
            except ValueError as e:  # aspect ratio
                return ImageError(i, str(e), path)

        if len(keys) > 1 and self.num_threads > 1:
            with ThreadPoolExecutor(min(self.num_threads, len(keys))) as pool:
                results = list(pool.map(one, range(len(keys))))
        else:
            results = [one(i) for i in range(len(keys))]
        return dict(zip(keys, results))

    @contextlib.contextmanager
    def _slot(self, wide: bool = False):
        """One engine run's turn: a lane (``_run_lock``), or with ``wide`` every lane, the run
        then taking all of ``num_threads`` on the calling thread (a call of a single step, which
        lanes cannot split). torch sets its thread count per thread (OpenMP's), so a lane's run
        sets its own share first and a wide run restores it after."""
        set_threads = getattr(self.backend, "set_threads", None)
        if not wide or self.lanes == 1 or set_threads is None:
            with self._run_lock:
                if set_threads is not None:
                    set_threads(self.backend_threads)
                yield
            return
        with self._wide_lock:  # one wide caller gathers lanes at a time: no two hold some each
            for _ in range(self.lanes):
                self._run_lock.acquire()
        try:
            set_threads(self.num_threads)
            yield
        finally:
            set_threads(self.backend_threads)
            for _ in range(self.lanes):
                self._run_lock.release()

    def _encode(self, keys: list[tuple], images: dict[tuple, _Image], store: dict, counts: collections.Counter,
                wide: bool = False, cache_plan: CachePlan | None = None) -> None:
        """Embeddings of the distinct images ``keys`` into ``store``: the cache first, then one
        vision run per image; ``wide`` as ``_slot``; ``cache_plan`` as ``ScorePlan.cache_plan``.
        ``counts`` gets ``image_cache_hits`` and ``images_encoded`` added."""
        todo = []
        with self._cache_lock:
            for key in keys:
                if key in store:
                    continue
                if key in self._cache:
                    self._cache.move_to_end(key)
                    store[key] = self._cache[key]
                    counts["image_cache_hits"] += 1
                    if cache_plan is not None:  # this call has it now: kept until its next use, or dropped
                        if key in cache_plan.next_use:
                            self._cache_next[key] = cache_plan.next_use[key]
                        else:
                            self._cache_drop(key)
                else:
                    todo.append(key)
            counts["images_encoded"] += len(todo)
        if not todo:
            return
        spec = self.spec
        # One vision run per image. An image's embeddings must not depend on which images share its
        # run: the row count of the tower's GEMMs and the full-attention blocks' padding to the
        # longest image change their last bits, and with lanes which images a step finds still to
        # encode depends on timing (found on an AMX Xeon: one image's scores moved by 5e-7 between
        # two calls of the same pairs). Alone, an image is computed the same way whichever step, lane
        # or call encodes it. The tower's rows are patches (an image of 256 visual tokens is 1,024),
        # so one image fills its GEMMs, and no run pads a small image to a large one's length.
        for key in todo:
            run_keys = [key]
            sizes = np.array([images[k].size for k in run_keys], np.int64)
            pixels, grid = patchify([images[k].decoded for k in run_keys], sizes, spec, self.num_threads)
            batch = VisionBatch(pixels, grid, self.family.vision_feeds(grid, spec), run_keys,
                                np.array([spec.visual_tokens(*images[k].size) for k in run_keys], np.int64),
                                query=key[:1] == QUERY_IMAGE)
            with self._slot(wide):
                embeds = self.backend.encode_images(batch)
            for key, e in zip(run_keys, embeds):
                store[key] = e
                if cache_plan is None:
                    self._cache_put(key, e)
                else:
                    self._cache_keep(key, e, cache_plan)

    def _cache_drop(self, key: tuple) -> None:
        """Removes ``key`` from the cache (``_cache_lock`` held)."""
        self._cache_bytes -= _nbytes(self._cache.pop(key))
        self._cache_next.pop(key, None)

    def _cache_put(self, key: tuple, e: Any) -> None:
        """Keeps ``e`` (one image's embeddings) in the LRU cache, evicting the oldest entries past
        ``image_cache_size`` entries or ``image_cache_mb`` MiB. ``e`` is a view of its vision
        run's output: it is copied, so that the cache holds (and counts) only its own rows."""
        count, mb = self.options.image_cache_size, self.options.image_cache_mb
        if count <= 0 and mb <= 0:
            return
        e = e.clone() if hasattr(e, "clone") else np.array(e, copy=True)
        size = _nbytes(e)
        with self._cache_lock:
            if key in self._cache:  # encoded twice by concurrent calls: keep one
                self._cache_drop(key)
            self._cache[key] = e
            self._cache_bytes += size
            while self._cache and ((count > 0 and len(self._cache) > count)
                                   or (mb > 0 and self._cache_bytes > mb * 2**20)):
                self._cache_drop(next(iter(self._cache)))

    def _cache_keep(self, key: tuple, e: Any, plan: CachePlan) -> None:
        """Keeps ``e`` as a batch job's ``plan`` says (CachePlan): only an image a later call
        uses, and within the budget the ones needed soonest. Copied as in ``_cache_put``."""
        nxt = plan.next_use.get(key)
        size = _nbytes(e)
        if nxt is None or size > plan.budget_bytes:
            return

        def ahead(k):  # how far ahead an entry is needed: unplanned or passed ones first
            n = self._cache_next.get(k)
            return math.inf if n is None or n < plan.now else n

        with self._cache_lock:
            if key in self._cache:  # encoded twice by concurrent calls: keep one
                self._cache_drop(key)
            while self._cache_bytes + size > plan.budget_bytes:
                victim = max(self._cache, key=ahead)
                if ahead(victim) <= nxt:  # every kept image is needed sooner than this one
                    return
                self._cache_drop(victim)
            self._cache[key] = e.clone() if hasattr(e, "clone") else np.array(e, copy=True)
            self._cache_next[key] = nxt
            self._cache_bytes += size

    def cached_images(self, keys: Iterable[tuple]) -> dict:
        """The embeddings the image cache holds for those of ``keys`` it has, on the CPU: what a
        batch job on Ray hands from one actor's Reranker to another's (gmr_fast.ray_pool)."""
        with self._cache_lock:
            held = {k: self._cache[k] for k in keys if k in self._cache}
        return {k: e.cpu() if hasattr(e, "cpu") else e for k, e in held.items()}

    def cache_holds(self, keys: Iterable[tuple]) -> set:
        """Those of ``keys`` the image cache holds now."""
        with self._cache_lock:
            return {k for k in keys if k in self._cache}

    def add_cached_images(self, entries: dict, plan: CachePlan) -> int:
        """Puts embeddings that a Reranker of the same engine and settings computed
        (``cached_images``) into this one's image cache, each kept as ``plan`` keeps an image it
        encoded (CachePlan); returns how many were kept. The same bits as a vision run here would
        give, where both run on the same kind of processor (one image per run, ``_encode``)."""
        kept = 0
        for key, e in entries.items():
            device = getattr(self.backend, "device", None)
            if device is not None and hasattr(e, "to"):
                e = e.to(device)
            self._cache_keep(tuple(key), e, plan)
            with self._cache_lock:
                kept += tuple(key) in self._cache
        return kept

    def clear_image_cache(self) -> None:
        """Empties the image-embedding cache."""
        with self._cache_lock:
            self._cache.clear()
            self._cache_next.clear()
            self._cache_bytes = 0

    @property
    def query_images_apart(self) -> bool:
        """Whether a query's image is encoded apart from the same image as a document (its own
        cache key: ScorePlan.image_keys)."""
        return self._query_tower

    @property
    def image_cache(self) -> dict[str, int]:
        """The image-embedding cache now: entries and bytes."""
        with self._cache_lock:
            return {"entries": len(self._cache), "bytes": self._cache_bytes}

    def _span(self, start: int, end: int, key: tuple, images: dict) -> list[int]:
        gh, gw = self.spec.merged_grid(*images[key].size)
        return [start, end, gh, gw]

    # ------------------------------------------------------------------ public API
    def plan(self, pairs: Sequence[tuple[Any, Any]], *, instruction: str | Sequence[str] | None = None,
             batch_size: int | None = None, labels: Sequence[str] | None = None,
             max_length: int | Sequence[int | None] | None = None) -> ScorePlan:
        """Everything about scoring ``pairs`` that is known before any pixel work: prompts (each
        distinct image decoded once to learn its grid), per-pair failures, the prefix split and
        the steps the scheduler orders. ``instruction`` is one string for all pairs or one per
        pair; ``labels`` name the pairs in error messages (default ``"pair <index>"``);
        ``max_length`` (one for all pairs or one per pair, None for the engine's) caps a pair's
        prompt below the reranker's max_length, its document text cut to fit as always (a
        server's per-request limit: vLLM's truncate_prompt_tokens)."""
        pairs = list(pairs)
        if max_length is None or isinstance(max_length, (int, np.integer)):
            max_lengths = [max_length] * len(pairs)
        else:
            max_lengths = list(max_length)
            if len(max_lengths) != len(pairs):
                raise ConfigError(f"got {len(max_lengths)} max_length values for {len(pairs)} pairs")
        for n in set(max_lengths) - {None}:
            if not 1 <= int(n) <= self.gmr.max_length:
                raise ConfigError(f"max_length {n}: expected 1 to this reranker's max_length {self.gmr.max_length}")
        if instruction is None or isinstance(instruction, str):
            instructions = [instruction or self.instruction] * len(pairs)
        else:
            instructions = [x or self.instruction for x in instruction]
            if len(instructions) != len(pairs):
                raise ConfigError(f"got {len(instructions)} instructions for {len(pairs)} pairs")
        if labels is None:
            labels = [f"pair {i}" for i in range(len(pairs))]
        items: list[tuple[Item, Item]] = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise PromptError(f"pair {i}: expected a (query, document) pair, got {type(pair).__name__}")
            items.append((as_item(pair[0], f"pair {i} query"), as_item(pair[1], f"pair {i} document")))

        keys_per_pair, sources = [], {}
        for q, d in items:
            keys = []
            for side in (q, d):
                if side.has_image:
                    key, data = _content_key(side.image)
                    sources.setdefault(key, (side.image, data))
                    keys.append(key)
            keys_per_pair.append(keys)
        images = self._decode_images(sources)
        if self._query_tower:  # the query's images encode apart (backends.torch QUERY_VISION): keys of their own
            for (q, _), keys in zip(items, keys_per_pair):
                if q.has_image:
                    images[QUERY_IMAGE + keys[0]] = images[keys[0]]
                    keys[0] = QUERY_IMAGE + keys[0]

        errors: dict[int, Exception] = {}
        prompts: list[EncodedPrompt | None] = []
        whole: dict[int, TokenSequence] = {}
        split: dict[int, tuple[int, TokenSequence]] = {}
        prefix_ids: dict[tuple, int] = {}
        prefixes: list[tuple[TokenSequence, int] | None] = []
        fallbacks = 0
        share = self.options.share_prefix and self.prompts.prefix_has_query
        route, exact, plain = self.image_precision is not None, set(), set()
        # routed pairs of text queries run without the route's exact products (ROUTE_PRODUCTS_IMAGE_QUERIES)
        by_query_kind = self.image_precision in ROUTE_PRODUCTS_IMAGE_QUERIES
        # One precision per query (image_precision): a pair is routed when its query has an image
        # or any pair of the same query (instruction, text, image) in this call has a document
        # image. Mixed within one query's candidates, the text documents would share bf16's error
        # of the query prefix and the image documents would not: an offset between the two that
        # reorders them where scores are close (benchmarks/README.md "Precision and backends").
        # With route_text (choose_text_precision) every pair is routed.
        routed_queries = {(instructions[i], q.text, keys[0] if q.has_image else None)
                          for i, ((q, d), keys) in enumerate(zip(items, keys_per_pair))
                          if route and (self.route_text or q.has_image or d.has_image)}
        # text the tokenizer cannot take fails its own pair (the tokenizer would refuse the batch)
        unreadable: dict[int, PromptError] = {}
        for i, (q, d) in enumerate(items):
            for what, text in (("instruction", instructions[i]), ("query text", q.text), ("document text", d.text)):
                problem = text_problem(text)
                if problem is not None:
                    unreadable[i] = PromptError(f"{labels[i]} {what}: {problem}; the tokenizer takes text that "
                                                "UTF-8 can encode")
                    break
        # every prompt tokenized in native batch calls (GIL released), each query's part once;
        # encode() expands and truncates
        tokenized = self.prompts.tokenize_prompts(
            [self.instruction if i in unreadable else x for i, x in enumerate(instructions)],
            [(Item(), Item()) if i in unreadable else pair for i, pair in enumerate(items)])
        for i, ((q, d), keys) in enumerate(zip(items, keys_per_pair)):
            sides = (["query"] if q.has_image else []) + (["document"] if d.has_image else [])
            bad = next(((side, images[k]) for side, k in zip(sides, keys) if isinstance(images[k], ImageError)), None)
            try:
                if i in unreadable:
                    raise unreadable[i]
                if bad is not None:
                    raise ImageError(i, bad[1].cause, bad[1].source, label=f"{labels[i]} {bad[0]} image")
                tokens = iter(self.spec.visual_tokens(*images[k].size) for k in keys)
                qn = next(tokens) if q.has_image else 0
                dn = next(tokens) if d.has_image else 0
                prompt = self.prompts.encode(instructions[i], q, d, qn, dn, max_length=max_lengths[i], where=labels[i],
                                             tokenized=tokenized[i])
            except (ImageError, PromptError) as e:
                errors[i] = e
                prompts.append(None)
                continue
            prompts.append(prompt)
            spans = [self._span(a, b, k, images) for (a, b), k in zip(prompt.image_spans, keys)]
            qkey = keys[0] if q.has_image else None
            if (instructions[i], q.text, qkey) in routed_queries:  # its batches run as image pairs do
                exact.add(i)
                if by_query_kind and not q.has_image:
                    plain.add(i)
            if share:
                pkey = (instructions[i], q.text, qkey, i in exact)
                if pkey not in prefix_ids:
                    prefix_ids[pkey] = len(prefixes)
                    enc = self.prompts.encode_prefix(instructions[i], q, qn)
                    pspans = [self._span(a, b, qkey, images) for a, b in enc.image_spans]
                    seq = TokenSequence(enc.ids, np.array(pspans, np.int64).reshape(-1, 4), [qkey] if pspans else [])
                    nxt = len(enc.ids) - sum(s[1] - s[0] for s in pspans) + sum(max(s[2], s[3]) for s in pspans)
                    prefixes.append((seq, int(nxt)))
                k = prefix_ids[pkey]
                pre = prefixes[k][0]
                n = len(pre)
                if len(prompt.ids) > n and np.array_equal(prompt.ids[:n], pre.ids):
                    rest = [(a - n, b - n, gh, gw) for a, b, gh, gw in spans if a >= n]
                    dkeys = [kk for (a, _, _, _), kk in zip(spans, keys) if a >= n]
                    split[i] = (k, TokenSequence(prompt.ids[n:], np.array(rest, np.int64).reshape(-1, 4), dkeys))
                    continue
                fallbacks += 1
            whole[i] = TokenSequence(prompt.ids, np.array(spans, np.int64).reshape(-1, 4), keys)

        # a prefix shared by a single pair gains nothing: score that pair whole
        counts = collections.Counter(k for k, _ in split.values())
        for i in [i for i, (k, _) in split.items() if counts[k] < 2]:
            k, _ = split.pop(i)
            p = prompts[i]
            keys = keys_per_pair[i]
            whole[i] = TokenSequence(p.ids, np.array([self._span(a, b, kk, images) for (a, b), kk in
                                                      zip(p.image_spans, keys)], np.int64).reshape(-1, 4), keys)
        limits = self._limits
        decode = limits["decode"] if batch_size is None else dataclasses.replace(limits["decode"], max_batch_size=int(batch_size))
        schedule = plan_steps({i: len(s) for i, s in whole.items()}, {i: (k, len(s)) for i, (k, s) in split.items()},
                              [len(p[0]) if p else 0 for p in prefixes], decode, limits["prefix"],
                              self.manifest.decoder.kv_bytes_per_token,
                              self.options.kv_budget_mb * MiB / self.lanes,  # lanes: two waves may be alive
                              exact, plain)
        return ScorePlan(len(pairs), prompts, errors, images, whole, split, prefixes, schedule, fallbacks, exact,
                         plain, image_keys=keys_per_pair)

    def _prepare(self, plan: ScorePlan, index: int, store: dict, wide: bool = False):
        """The decoder batch of step ``index`` and the embeddings of its images (worker thread;
        ``wide`` as ``_slot``)."""
        step = plan.schedule.steps[index]
        left = self.options.padding_side == "left"
        pad = self.manifest.tokens.pad
        if step.kind == "prefix":
            seqs = [plan.prefixes[int(k)][0] for k in step.rows]
            batch = build_decoder_batch(step.rows, seqs, pad, left, kind="prefix")
        elif step.kind == "suffix":
            seqs = [plan.suffixes[int(p)][1] for p in step.rows]
            owners = [plan.suffixes[int(p)][0] for p in step.rows]
            starts = np.array([plan.prefixes[k][1] for k in owners], np.int64)
            batch = build_decoder_batch(step.rows, seqs, pad, left, starts, kind="suffix")
            distinct = list(dict.fromkeys(owners))
            batch.past_index = np.array([distinct.index(k) for k in owners], np.int64)
            batch.past_lengths = np.array([len(plan.prefixes[k][0]) for k in distinct], np.int64)
            batch.past = distinct  # prefix indices; replaced by their keys/values when the step runs
        else:
            seqs = [plan.whole[int(p)] for p in step.rows]
            batch = build_decoder_batch(step.rows, seqs, pad, left, kind="whole")
        batch.exact, batch.products = step.exact, step.products
        keys = list(dict.fromkeys(batch.image_keys))
        if keys:
            self._encode(keys, plan.images, store, plan.image_counts, wide, plan.cache_plan)
        return batch, [store[k] for k in batch.image_keys]

    def run(self, plan: ScorePlan, *, skip: Callable[[np.ndarray], bool] | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Runs ``plan``'s steps in order, yielding ``(rows, scores, padded_tokens)`` per scoring
        batch (rows index the planned pairs). A scoring batch for which ``skip(rows)`` is true is
        not computed, nor are the prefixes only it needed. While the backend runs one step, a
        worker thread prepares the next; its vision runs wait for the run in flight (``_run_lock``)."""
        steps = plan.schedule.steps
        needed_waves = {s.wave for s in steps if s.kind == "suffix" and (skip is None or not skip(s.rows))}
        active = [i for i, s in enumerate(steps)
                  if (s.kind == "prefix" and s.wave in needed_waves) or (s.kind != "prefix" and (skip is None or not skip(s.rows)))]
        uses = collections.Counter(k for i in active for k in self._step_image_keys(plan, steps[i]))
        store: dict[tuple, Any] = {}
        if self.lanes > 1 and len(active) > 1:
            yield from self._run_lanes(plan, active, uses, store)
            return
        if self.lanes > 1 and active:  # one step: lanes cannot split it, so it takes every lane's threads
            batch, embeds = self._prepare(plan, active[0], store, wide=True)
            out = self._run_step(steps[active[0]], batch, embeds, {}, threading.Lock(), wide=True)
            if out is not None:
                yield out
            return
        kv: dict[int, Any] = {}
        lock = threading.Lock()
        releases = sorted(plan.schedule.releases.items())
        with ThreadPoolExecutor(max_workers=1) as worker:
            pending = worker.submit(self._prepare, plan, active[0], store) if active else None
            for n, index in enumerate(active):
                batch, embeds = pending.result()
                if n + 1 < len(active):  # prepare the next step while this one runs
                    pending = worker.submit(self._prepare, plan, active[n + 1], store)
                while releases and releases[0][0] < index:  # waves whose last step has passed
                    for k in releases.pop(0)[1]:
                        kv.pop(k, None)
                out = self._run_step(steps[index], batch, embeds, kv, lock)
                if out is not None:
                    yield out
                self._release_images(plan, steps[index], uses, store, lock)

    def _run_step(self, step, batch, embeds, kv: dict, lock: threading.Lock, wide: bool = False):
        """One step on the backend: a prefix step stores its rows' keys/values in ``kv`` (None
        returned); a scoring step (suffix steps read ``kv``) returns (rows, scores, padded);
        ``wide`` as ``_slot``."""
        if step.kind == "prefix":
            with self._slot(wide):
                values = self.backend.prefill(batch, embeds)
            with lock:
                kv.update(zip((int(k) for k in step.rows), values))
            return None
        if step.kind == "suffix":
            with lock:
                batch.past = [kv[k] for k in batch.past]
        with self._slot(wide):
            scores = np.asarray(self.backend.score(batch, embeds), np.float32)
        return batch.rows, scores, batch.padded_tokens

    def _release_images(self, plan: ScorePlan, step, uses: collections.Counter, store: dict,
                        lock: threading.Lock) -> None:
        """Drops the embeddings no later step of the run needs."""
        with lock:
            for k in self._step_image_keys(plan, step):
                uses[k] -= 1
                if uses[k] == 0:
                    store.pop(k, None)

    def _run_lanes(self, plan: ScorePlan, active: list[int], uses: collections.Counter, store: dict
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """``run`` on ``lanes`` workers: each prepares and runs whole steps, taken in plan order,
        so that batches run side by side (each on its share of the threads). A suffix step
        encodes its images, then waits for its wave's prefix steps; a wave's keys/values are
        dropped when its last step is done; results come in the order the steps finish. A first
        prefix step that every other lane would only wait for (the next steps are its own
        suffixes, with no images to encode) runs, with its query's images, on every lane's threads,
        and so does the suffix step of a plan that has only one after its prefix steps."""
        steps = plan.schedule.steps
        lock = threading.Lock()
        kv: dict[int, Any] = {}
        wave_keys = {steps[i].wave: keys for i, keys in plan.schedule.releases.items()}
        wave_left = collections.Counter(steps[i].wave for i in active if steps[i].kind != "whole")
        prefix_runs: dict[int, list] = collections.defaultdict(list)  # wave -> futures of its prefix steps
        lead = steps[active[0]]
        following = [steps[i] for i in active[1:self.lanes]]
        wide_lead = (lead.kind == "prefix" and len(following) == self.lanes - 1
                     and all(s.kind == "suffix" and s.wave == lead.wave and not self._step_image_keys(plan, s)
                             for s in following))
        # a plan of prefix steps and one suffix step (a rank of a few documents): that suffix step
        # runs alone once they are done, so it runs wide too (its images encoded first on its lane)
        last = steps[active[-1]]
        wide_last = last.kind == "suffix" and all(steps[i].kind == "prefix" and steps[i].wave == last.wave
                                                  for i in active[:-1])

        def task(index: int):
            step = steps[index]
            # decided by the plan alone: the same bits every call
            wide = (wide_lead and index == active[0]) or (wide_last and index == active[-1])
            batch, embeds = self._prepare(plan, index, store, wide and step.kind == "prefix")
            if step.kind == "suffix":
                for f in prefix_runs[step.wave]:
                    f.result()  # submitted earlier, so already taken by a worker: no deadlock
            out = self._run_step(step, batch, embeds, kv, lock, wide)
            self._release_images(plan, step, uses, store, lock)
            if step.kind != "whole":
                with lock:
                    wave_left[step.wave] -= 1
                    if wave_left[step.wave] == 0:
                        for k in wave_keys.get(step.wave, ()):
                            kv.pop(k, None)
            return out

        pool = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="gmr-lane")
        try:
            futures = []
            for index in active:
                f = pool.submit(task, index)
                if steps[index].kind == "prefix":
                    prefix_runs[steps[index].wave].append(f)
                futures.append(f)
            for f in as_completed(futures):
                out = f.result()
                if out is not None:
                    yield out
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _step_image_keys(plan: ScorePlan, step) -> list:
        if step.kind == "prefix":
            return [k for p in step.rows for k in plan.prefixes[int(p)][0].image_keys]
        source = plan.suffixes if step.kind == "suffix" else plan.whole
        return [k for p in step.rows for k in (source[int(p)][1] if step.kind == "suffix" else source[int(p)]).image_keys]

    def score(self, pairs: Sequence[tuple[Any, Any]], *, instruction: str | Sequence[str] | None = None,
              normalize: bool = False, batch_size: int | None = None, show_progress_bar: bool | None = None,
              on_error: Literal["raise", "nan"] = "raise", max_length: int | None = None) -> Scores:
        """Relevance of each (query, document) pair, in input order: logit(yes) - logit(no), or
        with ``normalize=True`` its sigmoid, P(yes). ``on_error="nan"`` scores a pair whose image
        or length fails as NaN and records the error in ``result.errors``. ``max_length`` caps
        this call's prompts below the reranker's own (FlagEmbedding's ``compute_score(...,
        max_length=)``); only document text is ever cut."""
        if on_error not in ("raise", "nan"):
            raise ConfigError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
        start_time = time.perf_counter()
        plan = self.plan(pairs, instruction=instruction, batch_size=batch_size, max_length=max_length)
        if plan.errors and on_error == "raise":
            raise plan.errors[min(plan.errors)]
        result = np.full(plan.size, np.nan, np.float32)
        scored = sum(len(rows) for rows in plan.batches)
        progress = Progress(scored, sys.stderr.isatty() if show_progress_bar is None else show_progress_bar, "gmr_fast: ")
        padded, batches = 0, 0
        for rows, scores, padded_tokens in self.run(plan):
            result[rows] = scores
            padded += padded_tokens
            batches += 1
            progress.update(len(rows))
        progress.close()
        seconds = time.perf_counter() - start_time
        stats = {"pairs": plan.size, "scored": scored, "failed": len(plan.errors), "batches": batches,
                 "steps": len(plan.schedule.steps), "prompt_tokens": plan.real_tokens,
                 "decoder_tokens": plan.decoder_tokens, "padded_tokens": int(padded),
                 "padding_efficiency": self._padding_efficiency(plan, padded),
                 "prefixes": len({k for k, _ in plan.suffixes.values()}), "shared_pairs": len(plan.suffixes),
                 "boundary_fallbacks": plan.boundary_fallbacks, "exact_pairs": len(plan.exact),
                 **({"exact_products_pairs": len(plan.exact) - len(plan.plain)}
                    if self.image_precision in ROUTE_PRODUCTS else {}),
                 "images_encoded": plan.image_counts["images_encoded"],
                 "image_cache_hits": plan.image_counts["image_cache_hits"], "seconds": seconds,
                 **self.choice}
        with self._stats_lock:
            self.last_stats = stats
            self.totals.update({"calls": 1, "pairs": plan.size, "scored": scored, "decoder_tokens": plan.decoder_tokens})
        if normalize:
            with np.errstate(over="ignore"):
                result = (1.0 / (1.0 + np.exp(-result.astype(np.float64)))).astype(np.float32)
        out = result.view(Scores)
        out.errors = plan.errors
        out.truncated = plan.truncated
        return out

    @staticmethod
    def _padding_efficiency(plan: ScorePlan, padded: int) -> float:
        scored_tokens = sum(len(s) for s in plan.whole.values()) + sum(len(s) for _, s in plan.suffixes.values())
        return scored_tokens / padded if padded else 1.0

    def rank(self, query: Any, documents: Sequence[Any], *, instruction: str | None = None, top_k: int | None = None,
             return_documents: bool = False, normalize: bool = False, max_length: int | None = None,
             on_error: Literal["raise", "nan"] = "raise") -> list[RankResult]:
        """Documents sorted by score, best first (ties keep input order); ``max_length`` as in ``score``.
        ``top_k`` keeps the best k (None: all; 0: none, nothing is scored). ``on_error="nan"``: a
        document that cannot be scored (a corrupt image, a prompt too long) does not fail the call;
        it ranks after every scored one, score NaN, its exception in ``error`` (and ``top_k`` counts
        it, so it is returned only when fewer than k documents were scored)."""
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0):
            raise ConfigError(f"top_k must be None or a whole number >= 0, got {top_k!r}")
        if on_error not in ("raise", "nan"):
            raise ConfigError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
        documents = list(documents)
        if not documents or top_k == 0:
            return []
        scores = self.score([(query, d) for d in documents], instruction=instruction, normalize=normalize,
                            max_length=max_length, on_error=on_error)
        order = sorted(range(len(documents)), key=lambda i: (-scores[i] if not math.isnan(scores[i]) else math.inf, i))
        if top_k is not None:
            order = order[:int(top_k)]
        return [RankResult(i, float(scores[i]), documents[i] if return_documents else None, scores.errors.get(i))
                for i in order]
