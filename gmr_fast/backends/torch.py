"""torch backend: the engine's graph modules run eagerly in PyTorch (sdpa attention), in fp32
or bf16, on the CPU (bf16 is fast where oneDNN has AMX or AVX512-BF16 kernels) or on CUDA.

Weights come from the engine itself, read tensor by tensor and converted to the run dtype, so
the engine directory is all it needs: the bf16 variant's own bfloat16 files where the export
wrote them (an engine without fp32), else the fp32 variant's. An fp32 variant over bfloat16 files
(exported from a bf16 checkpoint) keeps its projections and embedding table in bf16 and computes
in fp32 (``upcast``). With ``exact_images`` a bf16 backend keeps a second decoder in fp32 over the same
bf16 weights for the batches that carry images (``DecoderBatch.exact``), and its vision tower
runs fp32 the same way (Reranker: ``image_precision``); ``exact_images="bf16-gemm"`` computes
those batches' matrix products on the bf16 hardware with fp32 tensors in and out (``Bf16Gemm``);
``exact_images="bf16-vision"`` does so in the decoder only, and runs the vision tower in bf16.
Under those two the fp32 modules multiply the bf16 decoder's packed weights, each projection as
two bf16 GEMMs (graphs.common.Proj "split"), so the weights are held once. ``exact_images="bf16x3"``
runs the fp32 modules over those packed weights fp32-accurately: each projection three bf16 GEMMs
(Proj "split3"), attention fp32.
Needs torch
(``pip install gmr_fast[export]`` or a CUDA build of torch).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from .. import hardware
from ..errors import BackendError
from ..manifest import Manifest
from ..memory import bound_kernel_caches, keep_freed_memory, weights_loading
from ..schedule import DecoderBatch, VisionBatch
from . import past_tensors

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# With exact_images="fp32" the bf16 decoder's projections share their plain [out, in] weights with
# the fp32 decoder, which widens them per call, so they cannot be replaced by oneDNN's packed copies.
# (Under bf16-gemm and bf16-vision the fp32 decoder multiplies the packed weights themselves.)
# ``packed_copy`` keeps a packed copy for the bf16 decoder beside them: text pairs then multiply as
# a bf16 reranker without image routing does. Measured on an Intel Xeon with AMX (GMR-3B width,
# 6 layers, 2 lanes): rank(query, 50 text documents) 5.45 s against 6.14 s on the plain weights
# (1.13x; bf16 GEMM at 1,200 rows 976 against 790 GFLOP/s on one thread, 2,101 against 1,398 on
# two). It costs a second copy of the decoder's projections (GMR-3B: 5.5 GB, GMR-7B: 13 GB), so
# ``auto`` makes it only where all the weights with it take at most this share of the memory
# available at load (GMR-3B on a 24 GB machine: 13 GB; GMR-7B: not).
PACKED_COPY_MEMORY_SHARE = 0.7
EXACT_IMAGES = ("fp32", "bf16-gemm", "bf16-vision", "bf16x3")  # how the batches with an image compute beside bf16
FPMATH_DECODER = ("bf16-gemm", "bf16-vision")  # exact_images whose image batches' decoder runs Bf16Gemm
# exact_images whose fp32 projections multiply the bf16 decoder's packed weights on the bf16 hardware
# (graphs.common.Proj "split": two bf16 GEMMs, inputs rounded to bf16; "split3" under bf16x3: three,
# the inputs' rounding taken back too, fp32-accurate)
SPLIT_PRODUCTS = FPMATH_DECODER + ("bf16x3",)
# The dtype of attention's inputs in the image batches' decoder under bf16-gemm and bf16-vision
# (``route_attention``). "bf16": queries (roped in fp32), keys, values and the probabilities
# rounded to bf16, products accumulated in fp32 (torch's bf16 flash attention on the CPU), the
# output rounded to bf16, which the output projection rounds its input to anyway: the routes'
# definition (Bf16Gemm: every product's inputs rounded to bf16, fp32 sums). Before 5 Dec those
# products ran in fp32 (sdpa's CPU kernel does not take oneDNN's bf16 mode), and engines exported
# then recorded their routes' ranking for that arithmetic: gmr_fast.reranker.route_attention
# keeps "fp32" for them. Measured on an Intel Xeon with AMX (one thread, GMR-3B heads, 300-800
# suffix tokens against 870-1,700 keys): 3.0x fp32's speed (97 against 289 ms), the output within
# a bf16 rounding of the product of the rounded inputs.
ROUTE_ATTENTION = ("bf16", "fp32")
# How bf16-vision encodes the query's images (``query_vision``): "bf16" as documents' images (the
# route's definition, the default), or "bf16-gemm" as the bf16-gemm route does (fp32 tensors, each
# projection's products on the bf16 hardware over the bf16 tower's own packed weights: no second
# copy), on request or where the engine's figures were measured so (gmr_fast.reranker.query_vision).
# The idea: a query's image is encoded once for all of its candidates, so its tower's cost is
# shared, while its error enters every candidate's prompt. Measured on an Intel Xeon with AMX
# (GMR-3B width, 6 + 8 layers, 6 Dec; benchmarks/README.md "Query images"), it did not pay: the
# export's long group went from tau 0.909 to 1.000, but its short groups from 0.992 to 0.990, and
# on MRB i2t and it2it pairs (3 queries x 20) the per-query tau rose by 0.004-0.007 while i2t's
# distance to fp32 grew (0.0065 to 0.0072) and it2it's shrank (0.0069 to 0.0059), all within the
# noise two implementations of one arithmetic show; and it ran i2t at 0.72x, it2it at 0.78x.
QUERY_VISION = ("bf16", "bf16-gemm")
# Projections of the image batches' decoder that bf16-gemm and bf16-vision may compute fp32-accurately
# (``exact_products``; Reranker: image_precision "bf16-vision-x3-gate-up"): each such product takes one
# more bf16 GEMM, on its input's rounding residual (graphs.common.Proj "split3", as bf16x3 computes
# every product), so no tensor is rounded to bf16 on its way into it. Measured on an Intel Xeon with
# AMX (GMR-3B width, 6 + 8 layers, 256 image pairs against fp32; benchmarks/README.md "Where
# bf16-gemm's error comes from"): the routes' ranking error sits in the MLP, mostly in gate_up's input
# (the normed stream rounded to bf16): gate_up exact lifted bf16-gemm's pooled tau from 0.979 to 0.985
# at 0.76x its rate and bf16-vision's from 0.974 to 0.981 at 0.72x, while q, kv and o exact moved
# nothing (0.976) and attention on fp32 inputs nothing (0.977).
EXACT_PRODUCTS = ("q", "kv", "o", "gate_up", "down")
# Rows of gate_up's product at a time in the CPU runs' gated MLPs (``mlp_rows``; graphs.common.gated_mlp),
# decoder and vision tower alike: oneDNN's bf16 GEMM on one thread of an Intel Xeon with AMX ran
# GMR-3B's gate_up [N, 2,048] x [2,048, 22,016] at 1,050-1,190 GFLOP/s to 768 rows and 820-870 from
# 1,024 (two threads: 1,820-2,130 to 640, 1,480-1,620 at 2,048-4,096), the vision tower's at 1,300-1,400
# to 512 and 1,050-1,090 from 2,048, while ``down`` gains with rows (840-870 at 256-512, 950-1,010 at
# 1,024-4,096). So gate_up and the activation run 512 rows at a time and ``down`` once over them all.
# Measured end to end in benchmarks/README.md ("Row blocks for gate_up"). 0 turns it off.
MLP_ROWS = 512
BF16_GEMMS = ("auto", "onednn", "fp32-results", "torch")  # the backend option bf16_gemm (_bf16_gemm)
# Why ``bf16_gemm="auto"`` gives projections with bf16 results to torch's GEMM on AMX, and to
# gmr_fast._dnnl elsewhere: _dnnl is oneDNN 3.2 (Intel's last OpenMP wheel), torch 2.13's own
# oneDNN is 3.12. Both run AMX kernels (brg:avx512_core_amx), but on an Intel Xeon with AMX
# (2 threads, GMR-3B shapes, benchmarks/results/split_products_amx_onednn.json) _dnnl's bf16 GEMM
# took 0.78-0.83x torch's speed for a decoder layer's projections at 512-2,048 rows (0.66-0.75x on
# the MLP's down projection) and 0.79-0.81x for a vision block's; about level at 24 rows. Its
# fp32 results are still 1.6-2.0x torch's two GEMMs there, so products with fp32 results (the
# split products of the image routes) keep it. On the AMD EPYC Zen 4 (AVX512-BF16) _dnnl was as
# fast as torch's one bf16 GEMM (430-455 against 400-420 GFLOP/s) and bit for bit the same, so
# there every packed projection takes it and the weights stay one copy.


class _HeldProcessFlag:
    """A torch setting kept per process, not per thread, switched for runs: switched when the first
    run holds it (``_switch`` returns what to restore, None for nothing), restored when the last
    one ends, whatever thread or order. Each subclass counts its own holders."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._cond, cls._holders, cls._saved = threading.Condition(), 0, None

    @classmethod
    @contextlib.contextmanager
    def held(cls, torch):
        with cls._cond:
            if cls._holders == 0:
                cls._saved = cls._switch(torch)
            cls._holders += 1
        try:
            yield
        finally:
            with cls._cond:
                cls._holders -= 1
                if cls._holders == 0 and cls._saved is not None:
                    cls._restore(torch, cls._saved)
                    cls._saved = None


class Bf16Gemm(_HeldProcessFlag):
    """fp32 arithmetic whose matrix products run on the bf16 hardware: oneDNN's bf16 "fpmath"
    mode (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). Tensors stay fp32 in and out
    of every product (projections, attention, in the decoder and the vision tower); each product
    rounds its two inputs to bf16 (exact for the weights, which are bf16 values here) and
    accumulates in fp32. So activations are rounded once per product and never stored in bf16,
    where the bf16 path also rounds every product's output and attention's probabilities. The
    projections compute that same arithmetic as two bf16 GEMMs on packed weights (Proj "split",
    faster than widening each weight for this mode: benchmarks/split_products.py), and the
    decoder's attention as a bf16 product itself (ROUTE_ATTENTION: sdpa's CPU kernel does not take
    this mode); the mode is held for the products that remain fp32 tensors (attention without
    sdpa, and the fp32 vision tower's under bf16-gemm where sdpa is off).

    Measured on an Intel Xeon with AMX (GMR-3B width, 6 + 8 layers, 2 threads; benchmarks/README.md
    "Precision and backends"): the image workload at 0.63-0.83 pairs/s against fp32's 0.38 and bf16's 1.61-1.90,
    ranking at Kendall tau 0.996 against fp32 where bf16 ranks at 0.968.

    torch keeps that setting per process, not per thread, so it is switched on while at least one
    such run is in flight and restored when the last ends: a run holds it from start to finish.
    While it is on, fp32 matrix products elsewhere in this process (other threads' torch code)
    run the same way; bf16 products are unaffected, so the bf16 runs of other lanes are not.

    Where oneDNN does not compute the mode as defined (``hardware.onednn_fpmath_bf16_is_exact``:
    on an AMD EPYC Zen 4 it runs an fp32 kernel whose products lie a bf16 rounding away from the
    rounded inputs' product), the setting is left alone: the products that remain fp32 tensors
    (attention) run in fp32, never less accurate than the mode and, that kernel being fp32's, no
    slower; the projections' split products do not depend on it."""

    @staticmethod
    def _switch(torch):
        if not hardware.onednn_fpmath_bf16_is_exact():
            return None
        flags = torch.backends.mkldnn.matmul
        saved, flags.fp32_precision = flags.fp32_precision, "bf16"
        return saved

    @staticmethod
    def _restore(torch, saved) -> None:
        torch.backends.mkldnn.matmul.fp32_precision = saved


class NoCudnnAttention(_HeldProcessFlag):
    """sdpa without its cuDNN kernel, for the runs of a CUDA backend. torch builds a cuDNN graph
    for every new shape of query, keys and mask, and a reranker's shapes change with every call
    (documents, images, batch fill). Measured on an NVIDIA H200 (torch 2.11, GMR-3B width, 6 + 8
    layers, bf16; benchmarks/README.md "GPU"): ``rank(query, 50 text documents)`` took 0.83-2.4 s
    of which the GPU worked 31 ms, and its 54 attention calls ran cuDNN's kernel; p50 905 ms
    against HF bf16's 237. With it off, sdpa takes the flash or memory-efficient kernel (math where
    neither applies), which need no graph: p50 182 ms against HF's 233, and one query with one
    image document 47 ms against 311 (312 against 119 before). On shapes seen before, cuDNN's
    kernel is faster: pairs/s on the same pairs timed again fell 8-13% without it. Those runs'
    decoder attention (grouped keys under a mask) fell to the math kernel, since neither flash nor
    memory-efficient attention takes that; the decoder now lays it out for the memory-efficient
    kernel on CUDA (graphs.decoder ``masked_gqa``), not yet measured on a GPU.

    Like ``Bf16Gemm``, torch keeps the switch per process: it is off while at least one such run is
    in flight and restored to what it was when the last ends (other threads' sdpa calls in this
    process meanwhile do without cuDNN too)."""

    @staticmethod
    def _switch(torch):
        saved = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        return saved

    @staticmethod
    def _restore(torch, saved) -> None:
        torch.backends.cuda.enable_cudnn_sdp(saved)


def read_tensor(directory: str, file: str, entry: dict) -> np.ndarray:
    """One tensor of a weight file; bfloat16 entries come back as their raw 16-bit words (int16),
    numpy having no bfloat16 (``_load`` views them as torch.bfloat16)."""
    buf = np.empty(entry["length"], np.uint8)
    with open(f"{directory}/{file}", "rb") as f:
        f.seek(entry["offset"])
        f.readinto(memoryview(buf))
    return buf.view(np.int16 if entry["dtype"] == "bfloat16" else entry["dtype"]).reshape(entry["shape"])


class TorchBackend:
    name = "torch"

    def __init__(self, engine_dir: str, manifest: Manifest, precision: str, num_threads: int, device: str = "cpu",
                 attention: str = "sdpa", gemm: str = "auto", exact_images: bool | str = False,
                 packed_copy: bool | str = "auto", bf16_gemm: str = "auto", host_kernels: str = "auto",
                 route_attention: str = "bf16", query_vision: str = "bf16", mlp_rows: int | str = "auto",
                 exact_products: tuple | list = ()):
        _first_import_apart()
        try:
            import torch
        except ImportError:
            raise BackendError("the torch backend needs torch: pip install 'gmr_fast[export]'") from None
        from ..graphs.common import Proj
        from ..graphs.decoder import ScoreDecoder
        from ..graphs.vision import VisionDims, VisionEncoder

        if precision not in DTYPES:
            raise BackendError(f"the torch backend runs fp32 or bf16, not {precision}")
        own = manifest.variants.get(precision)
        source = own if own is not None and own.weights else manifest.variants.get("fp32")
        if source is None:
            raise BackendError(f"the torch backend runs {precision} over that variant's weights or the fp32 "
                               f"variant's, and this engine has neither; re-export with --dtype {precision}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device!r} requested but torch sees no CUDA device")
        if num_threads and device == "cpu":
            torch.set_num_threads(int(num_threads))
        # eager torch allocates every intermediate anew: keep freed memory instead of faulting it
        # in again (gmr_fast.memory; on CUDA torch's caching allocator already does this)
        self.malloc = keep_freed_memory() if device == "cpu" else "cuda caching allocator"
        # oneDNN's kernels for the shapes met, kept to a bound (gmr_fast.memory); before any weight is packed
        self.kernel_caches = bound_kernel_caches() if device == "cpu" else None
        self.torch, self.device, self.precision = torch, torch.device(device), precision
        self.dtype = getattr(torch, DTYPES[precision])
        self.dims = manifest.decoder
        if exact_images and precision != "bf16":
            raise BackendError("exact_images: image batches run fp32 beside a bf16 decoder; the precision is "
                               f"{precision}")
        exact_images = "fp32" if exact_images is True else exact_images or None
        if exact_images is not None and exact_images not in EXACT_IMAGES:
            raise BackendError(f"exact_images={exact_images!r}: expected one of {', '.join(EXACT_IMAGES)}")
        if exact_images in SPLIT_PRODUCTS and (device != "cpu" or not _onednn_linear_runs(torch, torch.bfloat16)):
            raise BackendError(f"exact_images={exact_images}: fp32 products on the bf16 hardware need a CPU where "
                               "this torch build's oneDNN runs bf16 (AMX or AVX512-BF16)")
        self.exact_images = exact_images
        if route_attention not in ROUTE_ATTENTION:
            raise BackendError(f"route_attention={route_attention!r}: expected one of {', '.join(ROUTE_ATTENTION)}")
        if query_vision not in QUERY_VISION:
            raise BackendError(f"query_vision={query_vision!r}: expected one of {', '.join(QUERY_VISION)}")
        exact_products = tuple(exact_products.split(",") if isinstance(exact_products, str) else exact_products or ())
        if exact_products and exact_images not in FPMATH_DECODER:
            raise BackendError(f"exact_products={list(exact_products)}: computes products of bf16-gemm's or "
                               f"bf16-vision's image batches fp32-accurately; exact_images is {exact_images}")
        unknown = [n for n in exact_products if n not in EXACT_PRODUCTS]
        if unknown:
            raise BackendError(f"exact_products: {', '.join(map(repr, unknown))} is not a decoder projection "
                               f"({', '.join(EXACT_PRODUCTS)})")
        # the image batches' decoder projections computed fp32-accurately (EXACT_PRODUCTS)
        self.exact_products = tuple(n for n in EXACT_PRODUCTS if n in exact_products)
        if mlp_rows == "auto":
            mlp_rows = MLP_ROWS if device == "cpu" else 0
        if isinstance(mlp_rows, bool) or not isinstance(mlp_rows, int) or mlp_rows < 0:
            raise BackendError(f"mlp_rows={mlp_rows!r}: expected auto or a row count (0: off)")
        self.mlp_rows = mlp_rows  # gate_up's rows at a time in the gated MLPs (MLP_ROWS); 0: all at once
        # how bf16-vision encodes the query's images (QUERY_VISION); None: as every image
        self.query_vision = query_vision if exact_images == "bf16-vision" else None
        # the dtype of attention's inputs in the image batches' decoder (ROUTE_ATTENTION)
        self.route_attention = (route_attention if exact_images in FPMATH_DECODER
                                else "fp32" if exact_images is not None else None)
        # Shared weights cannot be oneDNN's packed ones: with exact_images the bf16 projections keep
        # their plain [out, in] bf16 weights, which the fp32 decoder widens per call, and run a
        # packed copy beside them where memory allows (PACKED_COPY_MEMORY_SHARE), else F.linear on
        # the plain ones (measured on a Zen 5, GMR-3B MLP shapes: packing is 1.02-1.08x faster at
        # 300-3,000 rows and 1.5-1.6x at 8, the last layer's few rows; 1.2-1.5x on the AMX Xeon).
        # gemm then names the fp32 GEMM.
        # Under bf16-gemm, bf16-vision and bf16x3 the fp32 decoder multiplies the bf16 decoder's
        # packed weights (Proj "split"), so there is one copy, packed, and packed_copy has nothing to decide.
        split = exact_images in SPLIT_PRODUCTS
        # the bf16 projections' GEMM on a CPU: oneDNN's own (gmr_fast._dnnl), which also gives fp32
        # results (the split products: one bf16 GEMM where torch needs two; backends.bf16_gemm), or torch's
        self.dnnl = self._bf16_gemm(bf16_gemm) if device == "cpu" and precision == "bf16" else None
        # ... and whether the projections with bf16 results take it too
        self.dnnl_bf16 = self.dnnl is not None and (bf16_gemm == "onednn" or (
            bf16_gemm == "auto" and hardware.bf16_kernel() != "AMX"))  # why: beside BF16_GEMMS
        # Under a split route where bf16 results take torch's GEMM, the bf16 decoder keeps torch's
        # packed copy and the fp32 one _dnnl's beside it, where packed_copy allows (memory); else
        # one _dnnl copy serves both, and text pairs multiply on it (bf16 results).
        self.split_copy = (split and self.dnnl is not None and not self.dnnl_bf16
                           and self._packed_copy(packed_copy, source.weights))
        self.onednn = (True if split else self._packed_copy(packed_copy, source.weights) if exact_images
                       else self._use_onednn(gemm, precision))
        weights = source.weights
        # fp32 over bfloat16 weight files (export: the fp32 variant of a bf16 checkpoint, validated
        # by the fp32 criterion): the projections and the embedding table stay bf16 in memory and
        # each projection widens its weight per call (graphs.common.Proj.upcast). Measured on an
        # AMD EPYC (Zen 5), 2 threads, GMR-3B's gate_up: 1.05-1.19x the packed fp32 GEMM's time at
        # 1,300-4,000 rows (3 ms to widen, the rest oneDNN reordering a plain weight), half its memory.
        self.upcast = precision == "fp32" and any(e["dtype"] == "bfloat16" for w in weights.values()
                                                  for e in w.tensors.values())
        if exact_images:
            upcast = ("split3" if exact_images == "bf16x3" else "split" if split
                      else "onednn" if self._use_onednn(gemm, "fp32") else "linear")
        else:
            upcast = ("onednn" if self.onednn else "linear") if self.upcast else None
        with torch.device("meta"):
            self.decoder = ScoreDecoder(manifest.decoder)
            self.vision = VisionEncoder(VisionDims.from_dict(manifest.vision))
            self.exact_decoder = ScoreDecoder(manifest.decoder) if exact_images else None
            # bf16-vision's tower for the query's images under query_vision="bf16-gemm"
            self.query_tower = (VisionEncoder(VisionDims.from_dict(manifest.vision))
                                if self.query_vision == "bf16-gemm" else None)
        # with exact_images the vision tower only ever serves image batches: fp32 over bf16 weights,
        # except under bf16-vision, where it is the bf16 tower of a plain bf16 reranker, on its own
        # (packed) weights, its outputs widened for the fp32 decoder (encode_images)
        if exact_images == "bf16-vision":
            self._load(self.vision, engine_dir, weights["vision"], self.dtype, None,
                       onednn=self._use_onednn(gemm, precision))
            if self.query_tower is not None:  # fp32 tensors, split products on the bf16 tower's packed weights
                packs = {n: m.packed if m.dnnl is None else m.dnnl
                         for n, m in self.vision.named_modules() if isinstance(m, Proj)}
                if any(p is None for p in packs.values()):
                    raise BackendError("query_vision=bf16-gemm needs the bf16 vision tower's packed weights "
                                       "(oneDNN's bf16 GEMM on this CPU)")
                self._load(self.query_tower, engine_dir, weights["vision"], torch.float32, "split", packs=packs)
        else:
            self._load(self.vision, engine_dir, weights["vision"], torch.float32 if exact_images else self.dtype,
                       upcast, exact=exact_images)
        split_packs = {} if self.split_copy else None
        self._load(self.decoder, engine_dir, weights["decoder"], self.dtype, upcast if self.upcast else None,
                   exact=exact_images, keep_plain=exact_images == "fp32",
                   dnnl=self.dnnl_bf16 or (split and not self.split_copy), split_packs=split_packs)
        if exact_images:  # the same bf16 projection weights and embedding table, fp32 arithmetic
            projs = {n: m for n, m in self.decoder.named_modules() if isinstance(m, Proj)}
            shared = {n: p.data for n, p in self.decoder.named_parameters() if p.dtype == torch.bfloat16
                      and (n == "embed" or n.endswith(".weight") and n[:-len(".weight")] in projs)}
            packs = split_packs if self.split_copy else {n: m.packed if m.dnnl is None else m.dnnl
                                                         for n, m in projs.items()}
            self._load(self.exact_decoder, engine_dir, weights["decoder"], torch.float32, upcast, shared=shared,
                       packs=packs if split else None)
            for name, module in self.exact_decoder.named_modules():  # "split" -> "split3" (EXACT_PRODUCTS)
                if isinstance(module, Proj) and name.rsplit(".", 1)[-1] in self.exact_products:
                    module.upcast = "split3"
        for module in (self.decoder, self.vision, self.exact_decoder, self.query_tower):
            if module is not None:
                module.sdpa = attention == "sdpa"
                module.eval()
        # a bf16 vision tower's and the bf16 decoder's RoPE and norms as one pass each
        # (backends.host_kernels; fp32 towers and decoders keep torch's operations: the kernels write bf16)
        self.kernels = self._host_kernels(host_kernels) if device == "cpu" else None
        for block in self.vision.blocks:
            block.kernels = self.kernels
        for layer in self.decoder.layers:  # the bf16 decoder's fp32 stream (an fp32 decoder never takes them)
            layer.kernels = self.kernels
        for module in (self.decoder, self.vision, self.exact_decoder, self.query_tower):
            for block in () if module is None else getattr(module, "layers", None) or module.blocks:
                block.mlp_rows = self.mlp_rows or None
        route_attention = torch.bfloat16 if self.route_attention == "bf16" else torch.float32
        for decoder, dtype in ((self.decoder, self.dtype), (self.exact_decoder, route_attention)):
            if decoder is None:
                continue
            decoder.unpad = True  # projections and MLPs on real tokens only (graphs.decoder)
            # bf16: the residual stream, the norms and RoPE in fp32; projections and attention in
            # bf16 (graphs.decoder, fp32_stream)
            decoder.fp32_stream = decoder is self.decoder and dtype == torch.bfloat16
            for layer in decoder.layers:
                layer.attn_dtype = dtype
                # no masked grouped-query sdpa on CUDA: it would take the math kernel (graphs.decoder)
                layer.masked_gqa = self.device.type != "cuda"
        # batches marked without the route's exact products (DecoderBatch.products: Reranker
        # ROUTE_PRODUCTS_IMAGE_QUERIES) run the route itself: a view of the set-up exact decoder, every
        # tensor and packed weight shared (_shared_view), its exact products back to "split"
        self.plain_decoder = _shared_view(self.exact_decoder) if self.exact_products else None
        for module in () if self.plain_decoder is None else self.plain_decoder.modules():
            if isinstance(module, Proj) and module.upcast == "split3":
                module.upcast = "split"

    @property
    def gemm(self) -> str:
        """Which GEMM the projections run (reported in Reranker.choice)."""
        gemm = "onednn" if self.onednn else "torch default"
        if self.dnnl is not None and self.exact_images in SPLIT_PRODUCTS:
            what = ("each projection two bf16 GEMMs with fp32 results (inputs split in two bf16 halves), attention fp32"
                    if self.exact_images == "bf16x3" else
                    f"one bf16 GEMM with fp32 results per projection, {self._route_attention_words}")
            where = ("in the decoder (vision tower bf16 on torch's oneDNN)" if self.exact_images == "bf16-vision"
                     and not self.dnnl_bf16 else "in the decoder (vision tower bf16)"
                     if self.exact_images == "bf16-vision" else "throughout")
            where = where.replace("vision tower bf16", self._vision_words)
            if self.split_copy:
                return (f"onednn on packed bf16 weights for bf16 results; image batches fp32 tensors {where}, {what} "
                        f"on oneDNN's own bf16 GEMM (gmr_fast._dnnl) over its packed copy beside them")
            return (f"oneDNN's own bf16 GEMM (gmr_fast._dnnl) on packed bf16 weights; image batches fp32 tensors "
                    f"{where}, {what}")
        if self.dnnl_bf16 and self.onednn:
            gemm = "oneDNN's own bf16 GEMM (gmr_fast._dnnl)"
        if self.exact_images == "bf16x3":
            return ("onednn on packed bf16 weights; image batches fp32 throughout, each projection three bf16 GEMMs "
                    "on the same packed weights (inputs split in two bf16 halves, fp32 sums), attention fp32")
        if self.exact_images in FPMATH_DECODER:
            where = f"in the decoder ({self._vision_words})" if self.exact_images == "bf16-vision" else "throughout"
            return (f"onednn on packed bf16 weights; image batches fp32 tensors {where}, products on the bf16 "
                    "hardware (two bf16 GEMMs per projection on the same packed weights, fp32 sums), "
                    f"{self._route_attention_words}")
        if self.exact_decoder is not None:
            gemm = f"{gemm} on a packed copy of the bf16 weights" if self.onednn else gemm
            return f"{gemm}; image batches fp32 tensors throughout, fp32, bf16 weights widened per call"
        return f"{gemm}, bf16 weights widened per call" if self.upcast else gemm

    @property
    def _vision_words(self) -> str:
        return ("vision tower bf16 for document images, the query's images fp32 tensors with split products on "
                "its packed weights" if self.query_tower is not None else "vision tower bf16")

    @property
    def _route_attention_words(self) -> str:
        words = ("attention on bf16 inputs with fp32 sums" if self.route_attention == "bf16"
                 else "attention fp32 (as the engine's route figures were measured)")
        if self.exact_products:
            words += (f"; {', '.join(self.exact_products)} fp32-accurate (one more bf16 GEMM on the input's rounding "
                      "residual)")
        return words

    def _use_onednn(self, gemm: str, precision: str) -> bool:
        """Whether the projections run oneDNN's GEMM on weights packed once into its own layout
        (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what inductor uses)
        instead of F.linear. ``gemm``: auto, onednn or blas (F.linear). auto takes oneDNN on a CPU
        in bf16, where F.linear runs the same oneDNN kernel but reorders the plain weight on every
        call (the same results, bit for bit; measured on an AMD EPYC (Zen 5), 2 threads, GMR-3B MLP
        shapes: 1.02-1.08x at 300-3,000 rows, 1.5-1.6x at 8 rows), and in fp32 where torch's fp32
        GEMM is MKL's AVX2 code on an AVX-512 CPU (hardware.torch_fp32_gemm_is_avx2_only; oneDNN
        431-500 GFLOP/s against MKL's 209-213 there, results within fp32 rounding of each other).
        Off on CUDA and wherever this torch build's oneDNN cannot run the dtype."""
        if gemm not in ("auto", "onednn", "blas"):
            raise BackendError(f"torch backend option gemm={gemm!r}: expected auto, onednn or blas")
        wanted = gemm == "onednn" or (gemm == "auto" and (precision == "bf16"
                                                          or hardware.torch_fp32_gemm_is_avx2_only()))
        if self.device.type != "cpu" or not wanted:
            return False
        if _onednn_linear_runs(self.torch, getattr(self.torch, DTYPES[precision])):
            return True
        if gemm == "onednn":
            raise BackendError(f"gemm=onednn: this torch build's oneDNN does not run {precision} here")
        return False

    def _bf16_gemm(self, setting: str):
        """gmr_fast._dnnl for the packed bf16 projections ("auto": where it loads and runs here;
        "onednn" and "fp32-results": required), or None ("torch": torch's oneDNN, two bf16 GEMMs
        per fp32 product). Which products take it (``dnnl_bf16``): under "onednn" all, under
        "fp32-results" those with fp32 results only (the split products; bf16 results take
        torch's packed GEMM), under "auto" the latter on AMX and the former elsewhere
        (why: beside BF16_GEMMS). Where one packed copy serves the bf16 and the fp32 decoder it is
        _dnnl's (``split_copy``)."""
        if setting not in BF16_GEMMS:
            raise BackendError(f"torch backend option bf16_gemm={setting!r}: expected {', '.join(BF16_GEMMS)}")
        if setting == "torch":
            return None
        from . import bf16_gemm

        module = bf16_gemm.load()
        if module is None and setting != "auto":
            raise BackendError(f"bf16_gemm={setting}: {bf16_gemm.unavailable()}")
        return module

    @staticmethod
    def _host_kernels(setting: str):
        """backends.host_kernels' passes ("auto": where gmr_fast._kernels loads; "on": required), or
        None ("off": torch's operations, the same values but for the norm's last-bit rounding)."""
        if setting not in ("auto", "on", "off"):
            raise BackendError(f"torch backend option host_kernels={setting!r}: expected auto, on or off")
        if setting == "off":
            return None
        from . import host_kernels

        kernels = host_kernels.load()
        if kernels is None and setting == "on":
            raise BackendError(f"host_kernels=on: {host_kernels.unavailable()}")
        return kernels

    @property
    def host_kernels(self) -> str:
        """What runs the bf16 vision tower's and decoder's RoPE and norms (reported in Reranker.choice)."""
        if self.kernels is not None:
            return "gmr_fast._kernels (bf16 RoPE and RMSNorm one pass each)"
        return "torch operations"

    def _packed_copy(self, setting: bool | str, weights: dict) -> bool:
        """Whether the bf16 decoder keeps a packed copy beside the plain weights the fp32 decoder
        shares (exact_images; PACKED_COPY_MEMORY_SHARE): True/"on", False/"off" or "auto"."""
        from ..memory import available_memory

        if setting not in (True, False, "on", "off", "auto"):
            raise BackendError(f"torch backend option packed_copy={setting!r}: expected auto, on or off")
        if setting in (False, "off") or not self._use_onednn("auto", "bf16"):
            if setting in (True, "on"):
                raise BackendError("packed_copy=on: this torch build's oneDNN does not run bf16 here")
            return False
        if setting in (True, "on"):
            return True
        size = {n: 2 * int(np.prod(e["shape"])) for w in weights.values() for n, e in w.tensors.items()}
        copy = sum(size[n] for n, e in weights["decoder"].tensors.items()
                   if n.endswith(".weight") and len(e["shape"]) == 2)
        return sum(size.values()) + copy <= PACKED_COPY_MEMORY_SHARE * available_memory()

    def _load(self, *args, **kwargs) -> None:
        """``_load_weights`` with large blocks mapped while it runs: its transients (a weight as
        read, before it is packed or converted) go back to the kernel instead of staying in a heap
        that keeps freed memory (gmr_fast.memory.weights_loading)."""
        with weights_loading():
            self._load_weights(*args, **kwargs)

    def _load_weights(self, module, engine_dir: str, weight_file, dtype, upcast: str | None, exact: bool | str = False,
                      shared: dict | None = None, onednn: bool | None = None, keep_plain: bool = False,
                      packs: dict | None = None, dnnl: bool | None = None, split_packs: dict | None = None) -> None:
        """Fills ``module``'s parameters from ``weight_file``, computing in ``dtype``. ``upcast``
        ("onednn", "linear", "split" or "split3"): fp32 arithmetic over bf16 projection weights and
        embedding table (Proj.upcast; the splits pack them). ``exact``: a bf16 copy made of fp32 values must hold
        them exactly (fp32 over bf16 weights is then the fp32 model), else BackendError. ``shared``:
        tensors of another module over the same file, taken as they are (no second copy); ``packs``:
        that module's packed weights, by projection, for the splits. With ``self.dnnl`` (gmr_fast._dnnl)
        the splits run its packed weights (Proj.dnnl), and so do the packed bf16 projections where
        ``dnnl`` (default ``self.dnnl_bf16``), else they run torch's; ``split_packs``: filled with
        _dnnl's packed copy of each packed bf16 projection, by name, for the fp32 decoder's splits
        (``split_copy``). ``onednn``: whether the
        projections run packed weights (default ``self.onednn``); ``keep_plain``: the plain ones
        stay beside them (exact_images=fp32 widens them)."""
        from ..graphs.common import Proj, RMSNorm

        torch = self.torch
        onednn = self.onednn if onednn is None else onednn
        dnnl = self.dnnl_bf16 if dnnl is None else dnnl
        module.to_empty(device=self.device)
        params = dict(module.named_parameters())
        buffers = module.constant_buffers()
        missing = [n for n in params if n not in weight_file.tensors]
        if missing:
            raise BackendError(f"the engine's weights lack {missing[:3]}...; re-export the engine")
        projs = {name: m for name, m in module.named_modules() if isinstance(m, Proj)}
        # oneDNN's bf16 GEMM is faster with a weight stored [out, in], as nn.Linear keeps it:
        # measured on a Zen 5 at GMR-3B shapes, 2 threads, 1.05-1.1x at 256-3,072 rows and 1.5-2.8x
        # at 8 rows (the last layer's few tokens); MKL's fp32 GEMM measured the same either way.
        # Proj still computes x @ weight: the weight is a transposed view of [out, in] storage.
        # Packed for oneDNN (``self.onednn``) no layout matters: the packing reads the strided view.
        # Widened per call (upcast), a weight is kept [out, in] too: its fp32 copy is then the
        # contiguous [out, in] operand both GEMMs take.
        bf16_plain = upcast or exact or (dtype == torch.bfloat16 and self.device.type == "cpu" and not onednn)
        big = {f"{name}.weight" for name in projs} | {"embed"}  # what fp32 over bf16 keeps in bf16
        out_in = {f"{name}.weight" for name in projs} if bf16_plain else set()
        kept_bf16 = out_in | {"embed"} if upcast else set()  # everything else is small: fp32
        with torch.no_grad():
            for name, p in params.items():
                if shared is not None and name in shared:
                    p.data = shared[name]
                    continue
                entry = weight_file.tensors[name]
                raw = read_tensor(engine_dir, weight_file.file, entry)
                value = torch.from_numpy(raw)
                if entry["dtype"] == "bfloat16":
                    value = value.view(torch.bfloat16)
                target = (torch.float32 if name == "score_row"  # the head stays fp32
                          else torch.bfloat16 if name in kept_bf16 else dtype)
                if exact and name in big and entry["dtype"] != "bfloat16" and not _bf16_exact(raw):
                    raise BackendError(f"{name}: the engine's fp32 weights are not bf16 values, so fp32 over bf16 "
                                       f"weights would not be the fp32 model (export from a bf16 checkpoint)")
                if name in out_in:  # one copy: converted and laid out [out, in] together
                    stored = torch.empty(value.shape[::-1], dtype=target, device=self.device)
                    p.data = stored.copy_(value.t()).t()
                else:
                    p.data = value.to(device=self.device, dtype=target)
            for name, value in buffers.items():
                module.get_buffer(name).data = value.to(self.device)
        for norm in module.modules():
            if isinstance(norm, RMSNorm):  # one F.rms_norm over fp32 inputs (graphs.common.RMSNorm)
                norm.fused = norm.weight.detach().float()
        for name, proj in projs.items():
            proj.fused = True  # F.linear: the bias inside the GEMM (graphs.common.Proj)
            split = upcast in ("split", "split3")
            bf16_packed = onednn and not upcast and proj.weight.dtype == torch.bfloat16
            if split_packs is not None and bf16_packed:  # _dnnl's copy for the fp32 decoder's splits
                split_packs[name] = self.dnnl.PackedBf16Weight(proj.weight.t().contiguous().view(torch.int16).numpy())
            # packs of torch's packed weights (bf16-vision's query tower over a tower on torch's GEMM)
            torch_packs = split and packs is not None and isinstance(packs[name], torch.Tensor)
            if self.dnnl is not None and not torch_packs and (split or (bf16_packed and dnnl)):
                # _dnnl's packed copy; under a split route without split_copy, one shared by the bf16 decoder
                # (bf16 results) and the fp32 one (fp32 results)
                proj.upcast = upcast if split else None
                proj.dnnl = (packs[name] if split and packs is not None
                             else self.dnnl.PackedBf16Weight(proj.weight.t().contiguous().view(torch.int16).numpy()))
                if proj.bias is not None:
                    proj.dnnl_bias = np.ascontiguousarray(proj.bias.detach().float().numpy())
                if not keep_plain:  # exact_images=fp32: the fp32 decoder shares the plain one (packed_copy)
                    proj.weight.data = proj.weight.new_empty(0)
            elif split:  # two or three bf16 GEMMs on the packed weight, fp32 in and out
                proj.upcast = upcast
                proj.packed = (packs[name] if packs is not None
                               else torch.ops.mkldnn._reorder_linear_weight(proj.weight.t(), None))
                proj.weight.data = proj.weight.new_empty(0)
            elif upcast and proj.weight.dtype == torch.bfloat16:
                proj.upcast = upcast
            elif onednn:  # the packed copy replaces the plain one (which keeps its dtype for Proj)
                proj.packed = torch.ops.mkldnn._reorder_linear_weight(proj.weight.t(), None)
                if not keep_plain:  # exact_images=fp32: the fp32 decoder shares the plain one (packed_copy)
                    proj.weight.data = proj.weight.new_empty(0)

    def set_threads(self, n: int) -> None:
        """The threads this thread's next runs use: torch's count is OpenMP's, held per thread
        (a thread that never sets it takes the process's last ``torch.set_num_threads``)."""
        if self.device.type == "cpu" and self.torch.get_num_threads() != n:
            self.torch.set_num_threads(int(n))

    def _t(self, a):
        """``a`` on this backend's device: arrays are copied there, tensors (made on it by
        ``past_tensors``' zeros) are taken as they are (a CUDA tensor has no numpy view)."""
        if isinstance(a, self.torch.Tensor):
            return a.to(self.device)
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _math(self, exact: bool):
        """The context a run computes in: on CUDA without sdpa's cuDNN kernel (``NoCudnnAttention``);
        for an exact (image) run Bf16Gemm held under exact_images=bf16-gemm, and for the decoder's
        runs under bf16-vision (its bf16 tower asks with ``exact=False``, its query tower with True)."""
        stack = contextlib.ExitStack()
        if self.device.type == "cuda":
            stack.enter_context(NoCudnnAttention.held(self.torch))
        if exact and self.exact_images in FPMATH_DECODER:
            stack.enter_context(Bf16Gemm.held(self.torch))
        return stack

    def encode_images(self, batch: VisionBatch) -> list:
        # with exact_images the vision tower serves image batches only, which are all exact; under
        # bf16-vision it runs bf16 and its outputs reach the fp32 decoder widened (exactly)
        # (the query's images there in fp32 tensors as bf16-gemm's, where query_vision says so)
        query = batch.query and self.query_tower is not None
        vision_bf16 = self.exact_images == "bf16-vision" and not query
        with self.torch.inference_mode(), self._math(self.exact_images is not None and not vision_bf16):
            feeds = {k: self._t(v) for k, v in batch.feeds.items()}
            embeds = (self.query_tower if query else self.vision)(self._t(batch.pixel_values), **feeds)
            if vision_bf16:
                embeds = embeds.float()
        return list(embeds.split([int(t) for t in batch.tokens]))

    def _run(self, batch: DecoderBatch, images: list, kv_rows: np.ndarray):
        torch, d = self.torch, self.dims
        decoder, dtype, exact = self.decoder, self.dtype, False
        if batch.exact and self.exact_decoder is not None:
            exact = True
            decoder, dtype = self.exact_decoder, torch.float32
            if not batch.products and self.plain_decoder is not None:  # the route without its exact products
                decoder = self.plain_decoder
        elif images and self.exact_decoder is not None:
            raise BackendError("an image batch not marked exact reached the bf16 decoder (exact_images)")

        # the prefixes' keys and values as attention takes them (bf16 under route_attention="bf16")
        past_dtype = decoder.layers[0].attn_dtype if decoder.layers else dtype

        def zeros(shape, kind):
            return torch.zeros(shape, dtype=past_dtype if kind == "float" else torch.int64, device=self.device)

        def copy(kv, k, past, n):
            kv[:, :, k, :, :n] = past

        past_kv, past_mask, past_index = past_tensors(batch, d.num_layers, d.num_kv_heads, d.head_dim, zeros, copy)
        embeds = torch.cat(images) if images else torch.zeros(0, d.hidden_size, dtype=dtype, device=self.device)
        with torch.inference_mode(), self._math(exact):
            return decoder(self._t(batch.input_ids), self._t(batch.attention_mask), self._t(batch.position_ids),
                                embeds, past_kv, self._t(past_mask), self._t(past_index),
                                self._t(kv_rows))

    def score(self, batch: DecoderBatch, images: list) -> np.ndarray:
        score, _ = self._run(batch, images, np.zeros(0, np.int64))
        return score.float().cpu().numpy()

    def prefill(self, batch: DecoderBatch, images: list) -> list:
        _, present = self._run(batch, images, np.arange(batch.input_ids.shape[0], dtype=np.int64))
        out = []
        for r, n in enumerate(batch.lengths):
            first = int(np.argmax(batch.attention_mask[r] > 0))
            out.append(present[:, :, r, :, first:first + int(n)].clone())
        return out


def _shared_view(module):
    """A copy of ``module``'s tree of modules over the very same tensors (parameters, buffers, packed
    weights and every other attribute shared, nothing copied), whose modules' own attributes
    (a projection's ``upcast``) can then differ from the original's."""
    import copy

    view = copy.copy(module)
    view._parameters = dict(module._parameters)
    view._buffers = dict(module._buffers)
    view._modules = {name: None if child is None else _shared_view(child) for name, child in module._modules.items()}
    return view


def _first_import_apart() -> None:
    """Imports torch and the graph modules on a thread of their own the first time. torch's first
    import leaves some of its module frames in a reference cycle, and a finished frame keeps its
    caller's: run under ``Reranker(...)``, that cycle held the Reranker, weights and all, after
    ``del`` until Python's cyclic collector ran (found with gc's DEBUG_SAVEALL). A fresh thread's
    frames have no caller of ours. An ImportError is left to the import that follows."""
    import sys
    import threading

    if "gmr_fast.graphs.vision" in sys.modules:
        return

    def run():
        try:
            from ..graphs import decoder, vision  # noqa: F401  (imports torch)
        except ImportError:
            pass

    thread = threading.Thread(target=run, name="gmr_fast-import-torch")
    thread.start()
    thread.join()


def _bf16_exact(values: np.ndarray, chunk: int = 1 << 22) -> bool:
    """Whether every fp32 value is a bf16 value (its low 16 bits zero), read in chunks so that a
    1.2 GB embedding table needs no second full-size array."""
    words = values.reshape(-1).view(np.uint32)
    return not any(np.any(words[i:i + chunk] & 0xFFFF) for i in range(0, words.size, chunk))


def _onednn_linear_runs(torch, dtype) -> bool:
    """Whether oneDNN's linear runs ``dtype`` here (its bf16 needs AVX-512 or AMX): a tiny GEMM on a
    packed weight against F.linear (fixed values: torch's random generator is the caller's)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w, x = torch.linspace(-1, 1, 512).reshape(16, 32).to(dtype), torch.linspace(1, -2, 128).reshape(4, 32).to(dtype)
        with torch.inference_mode():
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None,
                                                   "none", [], "")
            return bool(torch.allclose(y.float(), torch.nn.functional.linear(x, w).float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
