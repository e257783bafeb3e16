"""GMR checkpoint -> validated engine directory, within bounded memory.

Steps: check the checkpoint (files, family, yes/no single tokens, gmr.json or GMR's defaults);
compute the fp32 reference scores of the validation set and free the reference model; for each
ONNX variant trace the family's graph modules with placeholder weights and stream the real
tensors from the checkpoint into the weight files one at a time (int8 variants quantize on the
way); copy the tokenizer; validate every variant through ``Reranker`` itself against the
reference (``export/validate.py``); write the manifest once, with the figures. Everything is
written into a temporary directory beside the target and renamed into place only when it is
complete and valid, so a failure (disk full included) never leaves a half-written engine.

Memory: one copy of the weights at most (the reference model, or later one onnxruntime session
during validation), never both, plus one tensor while streaming.
"""

from __future__ import annotations

import datetime
import errno
import gc
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from gmr_fast.errors import CheckpointError, ConfigError, ExportError, GmrError
from gmr_fast.gmr_config import GmrConfig
from gmr_fast.manifest import (FORMAT_VERSION, PRECISIONS, GraphSpec, Manifest, TensorSpec, TokenIds, Variant,
                               WeightFile)
from gmr_fast.prompt import PromptBuilder

from . import calibrate, graphs, quantize, validate
from .checkpoint import CheckpointReader
from .reference import ReferenceScorer, family_of, fp32_memory
from .reference_cache import ReferenceCache, checkpoint_identity, default_directory

log = logging.getLogger("gmr_fast.export")
logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # its passes log every deduplicated constant at INFO

REQUIRED_FILES = ("config.json", "tokenizer.json", "preprocessor_config.json")
# int8 weights kept in fp32 unless told otherwise (see benchmarks/README.md, "int8 export"): none by default;
# validation escalates through these when ranking agreement is not reached
INT8_FALLBACKS = ((), ("layers.0.*", "merger.*"), ("*.down.weight", "merger.*", "layers.0.*"),
                  ("*.down.weight", "merger.*", "layers.0.*", "blocks.*", "patch_embed.*"))
# SmoothQuant's alpha for each activation scheme when none is given: measured on a GMR-3B-width
# checkpoint given outlier channels (results/int8_smooth_row_epyc_zen5.json), per-tensor scales
# rank best at 0.5 (per-query tau 0.887 against 0.847 at 0.8) and per-token ones at 0.8 (0.926
# against 0.889; long group 0.848 against 0.788)
INT8_ALPHA = {"tensor": 0.5, "row": 0.8}


def int8_attempts(keep: tuple[str, ...] | None, activations: str | None,
                  alpha: float | None) -> list[tuple[tuple[str, ...], str, float]]:
    """The int8 builds validation tries in turn, as (kept patterns, activation scales, alpha),
    until one ranks within the criterion. A given keep-list or activation scheme is the only one
    tried. Otherwise per-tensor scales (the fastest kernel: DynamicQuantizeMatMul, 2.7x per-token
    MatMulInteger on AMX, 1.2x on AVX512-VNNI; benchmarks/int8_kernels.py) climb INT8_FALLBACKS,
    with one per-token attempt after the first keep-list fails: per-token scales are what lets a
    long image share a batch (one scale per tensor spans all its tokens), and keeping every
    ``down`` in fp32 (the next level) costs more than they do. Measured on the Zen 5 at GMR-3B
    width, 6 layers: per-tensor was refused at every level; per-token passed at the first keep-list
    (benchmarks/README.md, "int8 export")."""
    keeps = [tuple(keep)] if keep is not None else [tuple(k) for k in INT8_FALLBACKS]
    out = []
    for level, k in enumerate(keeps):  # level 1 is only reached when no keep-list was given
        for act in [activations] if activations else (["tensor", "row"] if level == 1 else ["tensor"]):
            out.append((k, act, INT8_ALPHA[act] if alpha is None else alpha))
    return out


@dataclass
class ExportOptions:
    # variants: fp32, int8, bf16 (the torch backend: over the fp32 weights when fp32 is built too,
    # else over its own bf16 weight files, half fp32's size)
    dtypes: tuple[str, ...] = ("fp32",)
    force: bool = False
    validation_queries: int = 4
    validation_documents: int = 20
    validation_long_documents: int = 12  # the long group (validate.long_group); 0 leaves it out
    seed: int = 0
    reference: str = "auto"  # hf | streamed | auto (hf when its fp32 weights fit in memory)
    criterion: validate.Criterion = field(default_factory=validate.Criterion)
    int8_keep: tuple[str, ...] | None = None  # glob patterns of weights kept fp32 (None: escalate as needed)
    # tensor (DynamicQuantizeMatMul) | row (per-token scales, MatMulInteger U8S8) | None: as
    # int8_attempts escalates (per tensor first)
    int8_activations: str | None = None
    # what the kept weights become: fp32, or int8-weights (MatMulNBits, 8-bit weights, fp32
    # activations and arithmetic: export/quantize.py; a quarter of the bytes, slower at few rows)
    int8_kept: str = "fp32"
    # SmoothQuant's alpha for the int8 MatMuls (export/calibrate.py): activation outlier channels
    # migrate into the weights from ranges measured on a calibration set; 0 turns it off. On by
    # default: never worse in what was measured, and int8 collapses without it where a checkpoint
    # has outlier channels (benchmarks/README.md "int8 export", benchmarks/int8_smooth.py). None: INT8_ALPHA's for
    # the activation scheme of each attempt
    int8_smooth: float | None = None
    num_threads: int | None = None
    # From a checkpoint whose weights bf16 holds exactly (as released; anything else is an
    # ExportError): the fp32 variant runs on the torch backend over bf16 weight files (fp32
    # arithmetic, each weight widened per call), validated by the fp32 criterion, instead of fp32
    # ONNX graphs and weights: half the disk and weight memory (GMR-7B: 15.5 GB against 30). With
    # bf16 (without fp32 listed, it is added) the two share the files; with fp32 alone no bf16
    # variant is written or validated (on CPUs without bf16 hardware its validation runs at a
    # tenth of fp32's speed). None: only where fp32 files would not fit in memory
    # (engine_export.fp32_over_bf16)
    fp32_over_bf16: bool | None = None
    # where the fp32 reference's scores are kept across exports (export/reference_cache.py):
    # None is reference_cache.default_directory(); False computes every score afresh and keeps none
    reference_cache: os.PathLike | bool | None = None


def check_checkpoint(checkpoint: pathlib.Path):
    family = family_of(checkpoint)
    missing = [f for f in REQUIRED_FILES if not (checkpoint / f).exists()]
    if missing:
        raise CheckpointError(f"{checkpoint} is missing {', '.join(missing)}")
    if not list(checkpoint.glob("*.safetensors")):
        raise CheckpointError(f"{checkpoint} has no *.safetensors weights")
    gmr = GmrConfig.load(checkpoint)
    prompts = PromptBuilder(checkpoint / "tokenizer.json", gmr)  # raises unless yes/no/image tokens are single tokens
    return family, gmr, prompts


def weights_sha256(checkpoint: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(checkpoint.glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _graph_spec(path: pathlib.Path) -> GraphSpec:
    io = graphs.io_spec(path)
    return GraphSpec(path.name, tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in io["inputs"]),
                     tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in io["outputs"]))


class _Builder:
    """Writes the ONNX variants of one checkpoint into a directory."""

    def __init__(self, checkpoint, family, dims, vision, yes_id: int, no_id: int, directory: pathlib.Path):
        self.reader = CheckpointReader(checkpoint)
        self.family, self.dims, self.vision, self.dir = family, dims, vision, directory
        has_head = "lm_head.weight" in self.reader
        self.sources = {"decoder": family.decoder_sources(dims, yes_id, no_id, has_head),
                        "vision": family.vision_sources(vision)}
        self._fp32_index: dict[str, dict] = {}
        self.activations = "tensor"  # per-tensor activations: the fast path (benchmarks/int8_kernels.py)
        self.kept = "fp32"  # what kept weights become (ExportOptions.int8_kept)
        self.smooth: dict[str, np.ndarray] = {}  # calibrated input ranges of the weights to smooth
        self.alpha = 0.0

    def _module(self, graph: str):
        import torch

        from gmr_fast.graphs.decoder import INPUT_NAMES, OUTPUT_NAMES, ScoreDecoder
        from gmr_fast.graphs.vision import OUTPUT_NAMES as VISION_OUTPUTS
        from gmr_fast.graphs.vision import VisionDims, VisionEncoder

        with torch.device("meta"):
            if graph == "decoder":
                module = ScoreDecoder(self.dims).eval()
                args, shapes = graphs.decoder_trace_args(self.dims)
                return module, args, INPUT_NAMES, OUTPUT_NAMES, shapes
            module = VisionEncoder(VisionDims.from_dict(self.vision)).eval()
        args, shapes = graphs.vision_trace_args(module.dims, module.dims.windowed)
        return module, args, module.input_names, VISION_OUTPUTS, shapes

    def build_bf16(self) -> Variant:
        """Writes ``{graph}.bf16.weights`` for the torch backend: every parameter of the graph
        modules in bfloat16 (rounded to nearest even, as the backend converts fp32 weights when it
        loads them) except the fused head row ``score_row``, which the backend keeps in fp32; no
        ONNX graph. Streamed one tensor at a time like the fp32 weights. From a bf16 checkpoint
        (as released) every value is the stored one, so the scores equal those of a bf16 variant
        loaded from fp32 weight files bit for bit, at half the disk and load time."""
        import torch

        started, weight_files, exact, inexact = time.perf_counter(), {}, True, None
        for graph in ("vision", "decoder"):
            module = self._module(graph)[0]  # on the meta device: names and shapes only
            sources = self.sources[graph]
            writer = graphs.WeightWriter(self.dir / f"{graph}.bf16.weights")
            try:
                for name, param in module.named_parameters():
                    if name not in sources:
                        raise ExportError(f"the {graph} module has a parameter {name!r} with no checkpoint source")
                    value = self.reader.resolve(sources[name])  # contiguous fp32
                    if tuple(value.shape) != tuple(param.shape):
                        raise ExportError(f"{graph} parameter {name}: checkpoint gives shape {value.shape}, "
                                          f"the module expects {tuple(param.shape)}")
                    if name == "score_row":
                        writer.add(name, value)
                    else:
                        rounded = torch.from_numpy(value).to(torch.bfloat16)
                        if exact and not torch.equal(rounded.float(), torch.from_numpy(value)):
                            exact, inexact = False, f"{graph}.{name} (from {sources[name]})"
                        writer.add(name, rounded.view(torch.int16).numpy(), dtype="bfloat16")
                    del value
            finally:
                writer.close()
            weight_files[graph] = WeightFile(writer.path.name, writer.tensors)
        details = {"build_seconds": round(time.perf_counter() - started, 1),
                   "weight_bytes": sum(os.path.getsize(self.dir / w.file) for w in weight_files.values()),
                   "weights": "bfloat16 (the fused head row fp32), written from the checkpoint",
                   "exact": exact}  # every value is the checkpoint's own (a bf16 checkpoint)
        if inexact:
            details["first_inexact"] = inexact
        return Variant("bf16", "torch", {}, weight_files, {}, details)

    def build(self, precision: str, keep: tuple[str, ...] = ()) -> Variant:
        """Writes ``{graph}.{precision}.onnx`` + ``.weights``. Each graph is traced once: an int8
        variant is rewritten from the fp32 one when that exists (and reads its transformed fp32
        weights from there), else traced and filled from the checkpoint directly."""
        import onnx_ir as ir

        started = time.perf_counter()
        graph_specs, weight_files, kept, smoothed = {}, {}, [], []
        for graph in ("vision", "decoder"):
            fp32_path, fp32_weights = self.dir / f"{graph}.fp32.onnx", self.dir / f"{graph}.fp32.weights"
            if precision == "int8" and fp32_path.exists():
                model = ir.load(str(fp32_path))
                index = self._fp32_index[graph]
                inits = model.graph.initializers

                def fp32_value(name, index=index, inits=inits):
                    if name in index:
                        return np.array(graphs.read_weight(self.dir, fp32_weights.name, index[name]))
                    return np.asarray(inits[name].const_value.numpy())
            else:
                module, args, inputs, outputs, shapes = self._module(graph)
                model = graphs.trace(module, args, inputs, outputs, shapes)
                constants = {k: v.numpy() for k, v in module.constant_buffers().items()}
                sources = self.sources[graph]

                def fp32_value(name, sources=sources, constants=constants, graph=graph):
                    if name in constants:
                        return np.ascontiguousarray(constants[name], np.float32)
                    if name not in sources:
                        raise ExportError(f"the {graph} graph has an initializer {name!r} with no checkpoint source")
                    return self.reader.resolve(sources[name])

            value_of = fp32_value
            external = lambda name: not name.startswith(quantize.CONSTANTS)  # noqa: E731
            if fp32_path.exists() and precision == "int8":
                index = self._fp32_index[graph]
                external = lambda name, index=index: name in index or name.endswith(quantize.SUFFIXES)  # noqa: E731
            if precision == "int8":
                matcher = quantize.keep_matcher(keep)
                embedding = "embed" if graph == "decoder" else None
                produced = quantize.rewrite(model, matcher, embedding=embedding, activations=self.activations,
                                            kept=self.kept, smooth=self.smooth)
                kept += [n for n in self.sources[graph] if n.endswith("weight") and matcher(n)]
                smoothed += [n for n in produced.values() if n + ".smooth" in produced]
                value_of = quantize.QuantizedValues(produced, fp32_value, embedding, self.smooth, self.alpha)
            writer = graphs.WeightWriter(self.dir / f"{graph}.{precision}.weights")
            try:
                graphs.attach_weights(model, writer, value_of, external)
            finally:
                writer.close()
            path = self.dir / f"{graph}.{precision}.onnx"
            graphs.save(model, path)
            del model
            gc.collect()
            graph_specs[graph] = _graph_spec(path)
            weight_files[graph] = WeightFile(writer.path.name, writer.tensors)
            if precision == "fp32":
                self._fp32_index[graph] = writer.tensors
        details = {"build_seconds": round(time.perf_counter() - started, 1),
                   "weight_bytes": sum(os.path.getsize(self.dir / w.file) for w in weight_files.values())}
        if precision == "int8":
            details.update(kept_fp32_patterns=list(keep), kept_fp32=sorted(kept), kept_as=self.kept,
                           int8_weight_max=quantize.QGEMM_WEIGHT_MAX,
                           activations=self.activations, smooth_alpha=self.alpha, smoothed=len(set(smoothed)),
                           int8="int8 weights per output column; activations quantized per "
                                + ("row (MatMulInteger U8S8)" if self.activations == "row" else "tensor (DynamicQuantizeMatMul)")
                                + "; int8 embedding rows")
        return Variant(precision, "onnxruntime", graph_specs, weight_files, {}, details)


def validation_set(queries: int, documents: int, long_documents: int, seed: int = 0) -> list[tuple]:
    """The export's validation groups: ``queries`` mixed-modality groups of ``documents``, then
    the long group of ``long_documents`` (left out at 0), as ``export_engine`` validates them."""
    groups = validate.validation_groups(queries, documents, seed)
    if long_documents > 0:
        groups.append(validate.long_group(long_documents, seed))
    return groups


def reference_scores(checkpoint: pathlib.Path, gmr: GmrConfig, pairs: list, weights_digest: str,
                     mode: str = "auto", cache_where: os.PathLike | bool | None = None,
                     memory: tuple | None = None) -> tuple:
    """The fp32 reference's scores of ``pairs`` (default instruction), from the reference cache
    where it has them (``cache_where`` as ``ExportOptions.reference_cache``; False computes all
    and keeps none). ``mode`` "auto" is HF's whole model where its fp32 weights fit in memory,
    else the decoder streamed layer by layer. Returns (scores, pairs from the cache, the mode,
    the cache file or None)."""
    if mode == "auto":
        need, have = memory or fp32_memory(checkpoint)
        mode = "hf" if need < have else "streamed"

    def compute(todo):
        log.info("computing the fp32 reference (%s) on %d pairs", mode, len(todo))
        reference = ReferenceScorer(checkpoint, mode=mode, gmr=gmr, attn_implementation="sdpa")
        scores = reference.score(todo, instruction=gmr.default_instruction, batch_size=4)
        del reference
        gc.collect()
        return scores

    if cache_where is False:
        return compute(pairs), 0, mode, None
    cache = ReferenceCache(default_directory() if cache_where in (None, True) else cache_where,
                           checkpoint_identity(checkpoint, weights_digest))
    scores, cached = cache.score(pairs, gmr.default_instruction, compute)
    log.info("fp32 reference: %d of %d pairs from %s", cached, len(pairs), cache.path)
    return scores, cached, mode, cache.path


def export_engine(checkpoint: os.PathLike, out: os.PathLike, options: ExportOptions | None = None) -> Manifest:
    """Writes the engine directory ``out`` and returns its manifest."""
    options = options or ExportOptions()
    dtypes = tuple(dict.fromkeys(options.dtypes))
    bad = [d for d in dtypes if d not in PRECISIONS]
    if bad or not dtypes:
        raise ConfigError(f"--dtype takes a list of {', '.join(PRECISIONS)}; got {', '.join(options.dtypes) or 'nothing'}"
                          + ("" if "fp16" not in bad else " (fp16 is not offered: on CPU onnxruntime materialises fp32 "
                                                          "copies of fp16 weights, so it costs memory instead of saving "
                                                          "it; int8 halves memory again and is faster)"))
    checkpoint, out = pathlib.Path(checkpoint), pathlib.Path(out)
    if out.exists() and not options.force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    family, gmr, prompts = check_checkpoint(checkpoint)
    config = family.hf_config(checkpoint)
    dims = family.decoder_dims(config)
    preprocessor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    spec = family.preprocess_spec(preprocessor, config.vision_config.to_dict(), gmr)
    vision = family.vision_dims(config, spec)
    if prompts.image_pad_id != dims.image_token_id:
        raise CheckpointError(f"config.json's image_token_id {dims.image_token_id} is not the tokenizer's "
                              f"<|image_pad|> ({prompts.image_pad_id})")
    for name, tid in (("yes", prompts.yes_id), ("no", prompts.no_id)):
        if tid >= dims.vocab_size:
            raise CheckpointError(f"the {name} token id {tid} is outside the model's vocabulary ({dims.vocab_size})")
    if options.int8_smooth is not None and not 0 <= options.int8_smooth < 1:
        raise ConfigError(f"int8_smooth (SmoothQuant's alpha) must be in [0, 1), not {options.int8_smooth}")
    started = time.perf_counter()

    # 1. the fp32 reference, alone in memory
    groups = validation_set(options.validation_queries, options.validation_documents,
                            options.validation_long_documents, options.seed)
    long = 1 if options.validation_long_documents > 0 else 0
    pairs = [(q, d) for q, docs in groups for d in docs]
    memory = fp32_memory(checkpoint)  # (need, have), read once for both choices below
    over_bf16, over_why = fp32_over_bf16(checkpoint, dtypes, options.fp32_over_bf16, memory)
    if over_bf16:
        log.info("the fp32 variant runs on torch over bf16 weight files: %s", over_why)
    weights_digest = weights_sha256(checkpoint)  # the manifest's, and the reference cache's identity
    ref_started = time.perf_counter()
    expected, cached, ref_mode, _ = reference_scores(checkpoint, gmr, pairs, weights_digest, options.reference,
                                                 options.reference_cache, memory)
    reference_seconds = time.perf_counter() - ref_started
    ranges, calibration = {}, {}
    if "int8" in dtypes and options.int8_smooth != 0:
        cal_started = time.perf_counter()
        cal_pairs = calibrate.calibration_pairs(options.seed)
        ranges = calibrate.activation_ranges(checkpoint, gmr, vision, cal_pairs, gmr.default_instruction)
        gc.collect()
        calibration = {"calibration_pairs": len(cal_pairs),
                       "calibration_seconds": round(time.perf_counter() - cal_started, 1)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        builder = _Builder(checkpoint, family, dims, vision, prompts.yes_id, prompts.no_id, tmp)
        if options.int8_activations not in (None, "tensor", "row"):
            raise ConfigError(f"int8_activations must be tensor or row, not {options.int8_activations!r}")
        int8_plan = int8_attempts(options.int8_keep, options.int8_activations, options.int8_smooth)
        if options.int8_kept not in quantize.KEPT:
            raise ConfigError(f"int8_kept must be one of {', '.join(quantize.KEPT)}, not {options.int8_kept!r}")
        builder.kept = options.int8_kept
        builder.smooth = ranges

        def plan_int8(plan) -> tuple[str, ...]:
            """The builder set for one int8 attempt; returns its kept patterns."""
            keep, builder.activations, alpha = plan
            builder.alpha = alpha if ranges else 0.0
            return keep

        keep = plan_int8(int8_plan[0])
        variants: dict[str, Variant] = {}
        for precision in ("fp32", "int8"):
            if precision in dtypes and not (precision == "fp32" and over_bf16):
                log.info("writing the %s graphs", precision)
                variants[precision] = builder.build(precision, keep if precision == "int8" else ())
        if "bf16" in dtypes and "fp32" in variants:  # no extra disk: the fp32 files, converted when loaded
            variants["bf16"] = Variant("bf16", "torch", {}, dict(variants["fp32"].weights), {},
                                       {"weights": "the fp32 variant's, converted to bfloat16 when loaded"})
        elif "bf16" in dtypes or over_bf16:  # bf16 files (GMR-7B: 15.5 GB against fp32's 30)
            log.info("writing the bf16 weights")
            files = builder.build_bf16()
            if "bf16" in dtypes:
                variants["bf16"] = files
            if over_bf16:  # fp32 arithmetic over them, validated below like any fp32
                if not files.details["exact"]:
                    raise ExportError(f"--fp32-over-bf16 needs a checkpoint whose weights are all bfloat16 values "
                                      f"(as GMR is released); {files.details['first_inexact']} is not (stored "
                                      f"dtypes {reader_dtypes(builder)}): export fp32 without the option")
                variants["fp32"] = Variant("fp32", "torch", {}, dict(files.weights), {}, {
                    "weights": "bf16 files, which hold every weight of this checkpoint exactly; fp32 arithmetic, "
                               "each weight widened per call", "weight_bytes": files.details["weight_bytes"],
                    "over_bf16": over_why})
        shutil.copyfile(checkpoint / "tokenizer.json", tmp / "tokenizer.json")
        reader = builder.reader
        manifest = Manifest(
            format_version=FORMAT_VERSION, family=family.name,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source={"checkpoint": str(checkpoint.resolve()), "weights_sha256": weights_digest,
                    "stored_dtypes": reader.stored_dtypes, "bytes": reader.nbytes},
            gmr=gmr, tokens=TokenIds(prompts.yes_id, prompts.no_id, prompts.image_pad_id, prompts.vision_start_id,
                                     prompts.vision_end_id, int(prompts.tokenizer.token_to_id("<|endoftext|>"))),
            preprocessing=spec, decoder=dims, vision=vision, variants=variants, validation={})
        manifest.save(tmp)

        # 2. every variant through the Reranker, against the reference
        sizes = [len(docs) for _, docs in groups]
        validated, refused = {}, {}
        for precision in list(variants):
            attempts = int8_plan if precision == "int8" else [None]
            for attempt, plan in enumerate(attempts):
                if precision == "int8" and attempt > 0:
                    keep = plan_int8(plan)
                    log.info("int8 below the ranking criterion; rebuilding it with %s kept out (as %s), activation "
                             "scales per %s, alpha %s", list(keep), options.int8_kept,
                             "token" if builder.activations == "row" else "tensor", builder.alpha)
                    for f in list(variants["int8"].weights.values()) + list(variants["int8"].graphs.values()):
                        (tmp / f.file).unlink(missing_ok=True)
                    variants["int8"] = builder.build("int8", keep)
                    manifest = _with_variants(manifest, variants)
                    manifest.save(tmp)
                t = time.perf_counter()
                got, modes = validate.run_candidate(tmp, precision, groups, gmr.default_instruction, options.num_threads,
                                                    long=long)
                figures = _figures(precision, expected, got, sizes, long)
                figures.update(seconds=round(time.perf_counter() - t, 1), modes=modes)
                reason = validate.verdict(precision, figures, options.criterion)
                log.info("%s: %s", precision, "accepted" if reason is None else reason)
                if reason is None:
                    break
            if reason is not None and precision == "bf16":
                reason = _accept_routed(tmp, manifest, groups, gmr, options, long, expected, sizes, figures, reason)
            if reason is not None:
                message = (f"{precision} export failed validation: {reason} on {len(pairs)} pairs "
                           f"(Kendall tau {figures['kendall_tau']:.4f}, max |diff| {figures['max_abs_diff']:.3g})")
                if precision in dtypes and (precision == "fp32" or len(dtypes) == 1):  # not fp32 over bf16
                    raise ExportError(message + "; override the criterion with --accept-* only if you know why")
                # one reduced precision among several: the engine is written without it, and says why
                log.warning("%s; the engine is written without it", message)
                refused[precision] = {"reason": reason, **{k: figures[k] for k in ("query_kendall_tau_mean", "kendall_tau",
                                                                                    "top10_overlap_mean")},
                                      **({"long": figures["long"]} if "long" in figures else {})}
                for f in list(variants[precision].weights.values()) + list(variants[precision].graphs.values()):
                    if not any(f.file == g.file for q, v in variants.items() if q != precision
                               for g in list(v.weights.values()) + list(v.graphs.values())):
                        (tmp / f.file).unlink(missing_ok=True)
                continue
            if precision == "bf16" and "plain_image_pairs" not in figures:  # (routed: measured above)
                from gmr_fast.reranker import ROUTED_FIGURES

                for route, key in ROUTED_FIGURES.items():
                    extra = _validate_bf16_gemm_images(tmp, manifest, groups, gmr, options, long, expected, sizes,
                                                       route)
                    if extra is not None:
                        figures[key] = extra
            validated[precision] = figures
        variants = {p: Variant(v.precision, v.backend, v.graphs, v.weights, validated[p], v.details)
                    for p, v in variants.items() if p in validated}
        manifest = _with_variants(manifest, variants, {
            "reference": f"transformers fp32 ({'HF model' if ref_mode == 'hf' else 'HF vision and positions, decoder streamed layer by layer'})",
            "reference_seconds": round(reference_seconds, 1), "reference_pairs_cached": cached,
            "queries": len(groups), "pairs": len(pairs),
            "modalities": "queries: text, image, text+image; documents: text, image, text+image",
            "criterion": options.criterion.to_dict(), **calibration,
            "export_seconds": round(time.perf_counter() - started, 1),
            **({"long_group": f"a {validate.LONG_IMAGE[0]}x{validate.LONG_IMAGE[1]} px image query with "
                              f"{sizes[-1]} documents of 60-250 words, whole prompts"} if long else {}),
            **({"refused": refused} if refused else {})})
        manifest.save(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp is private; an engine is an ordinary directory
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        log.info("wrote %s (%s)", out, ", ".join(variants))
        return manifest
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExportError(f"disk full while writing the engine for {out}; nothing was left behind") from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fp32_over_bf16(checkpoint: pathlib.Path, dtypes: tuple[str, ...], requested: bool | None,
                   memory: tuple[int, int] | None = None) -> tuple[bool, str]:
    """(whether the fp32 variant runs on torch over bf16 weight files, why). True or False when
    asked; None (the default) chooses it where fp32 is exported from a checkpoint stored in bf16
    (as released: bf16 holds every weight, so this is the fp32 model) whose fp32 weights would
    not fit in this machine's available memory with 3 GB for activations, the rule that streams
    the reference too. GMR-7B's fp32 files are 30 GB, and their onnxruntime validation cannot
    load on a 24 GB machine; fp32 over its 15.5 GB of bf16 files was accepted there at a 19.5 GB
    peak (benchmarks/README.md "Real widths"). GMR-3B's fp32 (15 GB) fits and keeps its ONNX graphs.
    ``memory`` is ``reference.fp32_memory(checkpoint)`` where the caller has it already."""
    if requested is not None:
        if requested and "fp32" not in dtypes and "bf16" not in dtypes:
            raise ConfigError("--fp32-over-bf16 is about the fp32 variant: --dtype must list fp32 or bf16")
        return bool(requested), "requested" if requested else ""
    if "fp32" not in dtypes:
        return False, ""
    stored = CheckpointReader(checkpoint).stored_dtypes
    need, have = memory or fp32_memory(checkpoint)
    if set(stored) != {"BF16"} or need < have:  # fits: the same comparison that loads the reference whole
        return False, ""
    return True, (f"auto: the checkpoint is stored in bf16 and its fp32 weights with 3 GB for activations "
                  f"({need / 1e9:.1f} GB) exceed this machine's available memory ({have / 1e9:.1f} GB)")


def reader_dtypes(builder) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(builder.reader.stored_dtypes.items()))


def _figures(precision: str, expected, got, sizes: list[int], long: int) -> dict:
    """The validation figures of ``got`` against the reference: fp32 is judged on every pair
    pooled; reduced precisions per query on the short groups, and on the long group apart (see
    export/validate.py)."""
    short = len(expected) - (sizes[-1] if long and precision != "fp32" else 0)
    figures = validate.compare(expected[:short], got[:short], sizes if short == len(expected) else sizes[:-1])
    if long:
        figures["long"] = {k: v for k, v in validate.compare(expected[-sizes[-1]:], got[-sizes[-1]:],
                                                             sizes[-1:]).items()
                           if k in ("pairs", "kendall_tau", "max_rel_error", "top10_overlap_mean")}
    return figures


def _validate_bf16_gemm_images(tmp, manifest, groups, gmr, options, long: int, expected, sizes,
                               mode: str = "bf16-gemm") -> dict | None:
    """The accepted bf16 variant again with its image pairs under ``mode``: bf16-gemm (fp32
    tensors, matrix products on the bf16 hardware; gmr_fast.backends.torch.Bf16Gemm),
    bf16-vision (that in the decoder, the vision tower bf16), bf16-vision-x3-gate-up (bf16-vision with
    the MLP's gate_up products fp32-accurate), bf16-vision-x3-gate-up-image-queries (that for the
    queries with an image, bf16-vision for text queries) or bf16x3 (the fp32 model, each product as three bf16
    products), and its text pairs in bf16, as
    ``auto`` runs them on an AMX CPU, judged like a reduced precision. Recorded, not a condition of
    the variant: ``auto`` takes a mode for images only where its figure reaches its own bar
    (gmr_fast.reranker.choose_image_precision). Runs where it can: torch's oneDNN has bf16 kernels
    on this CPU and the bf16 weights hold the fp32 model."""
    from gmr_fast import hardware
    from gmr_fast.reranker import bf16_holds_fp32

    if hardware.bf16_kernel() is None or not bf16_holds_fp32(manifest):
        return None
    t = time.perf_counter()
    got, modes = validate.run_candidate(tmp, "bf16", groups, gmr.default_instruction, options.num_threads, long=long,
                                        image_precision=mode)
    figures = {k: v for k, v in _figures("bf16", expected, got, sizes, long).items()
               if k in ("pairs", "kendall_tau", "query_kendall_tau_mean", "top10_overlap_mean", "top10_overlap_min",
                        "max_rel_error", "long")}
    reason = validate.verdict("bf16", figures, options.criterion)
    # the arithmetic these figures hold for: Reranker runs a route's attention as recorded here
    # (gmr_fast.reranker.route_attention; absent: fp32, as exports before 5 Dec ran it)
    attention = {m.get("route_attention") for m in modes} - {None}
    # ... and how bf16-vision encoded the query's images (gmr_fast.reranker.query_vision)
    query = {m.get("query_vision") for m in modes} - {None}
    figures.update(seconds=round(time.perf_counter() - t, 1), accepted=reason is None,
                   kernel=hardware.bf16_kernel(), **({"attention": attention.pop()} if len(attention) == 1 else {}),
                   **({"query_vision": query.pop()} if len(query) == 1 else {}),
                   **({"reason": reason} if reason else {}))
    log.info("bf16 with image pairs under %s: per-query tau %.4f (%s)", mode, figures["query_kendall_tau_mean"],
             "meets the criterion" if reason is None else reason)
    return figures


def _accept_routed(tmp, manifest, groups, gmr, options, long: int, expected, sizes, figures: dict,
                   reason: str) -> str | None:
    """bf16 refused on the long group alone (a ~900-token image query: every pair of it has an
    image) is accepted with its pairs with an image routed, where one of the routes that run them
    (``_validate_bf16_gemm_images``) meets the whole criterion, long group included: the Reranker
    then never runs such pairs in plain bf16 (``gmr_fast.reranker.plain_image_refusal``). Returns
    None when so accepted (``figures`` then carry every route's figures and ``plain_image_pairs``),
    else ``reason``. Why: plain bf16's long-group figure moves with its summation order on random
    weights, whose scores crowd (tau 0.879-0.939 on 66 document pairs at GMR-3B width on an AMX
    Xeon, the bar 0.9), while ``auto`` runs those pairs under a route on every CPU with a bf16
    kernel; so a criterion on how plain bf16 ranks them refused a variant whose pairs never run
    that way, and a fresh export of that checkpoint kept only fp32 and int8."""
    from gmr_fast.reranker import ROUTED_FIGURES

    short = {k: v for k, v in figures.items() if k != "long"}
    if "long" not in figures or validate.verdict("bf16", short, options.criterion) is not None:
        return reason  # the short groups mix text and image pairs: no route can answer for them
    routes = {key: _validate_bf16_gemm_images(tmp, manifest, groups, gmr, options, long, expected, sizes, route)
              for route, key in ROUTED_FIGURES.items()}
    accepted = [route for route, key in ROUTED_FIGURES.items() if routes[key] is not None and routes[key]["accepted"]]
    if not accepted:
        return reason
    figures.update({key: f for key, f in routes.items() if f is not None})
    figures["plain_image_pairs"] = {"refused": reason, "routes_accepted": accepted}
    log.warning("bf16: %s as plain bf16; accepted with pairs with an image routed (%s meet the criterion)",
                reason, ", ".join(accepted))
    return None


def _with_variants(manifest: Manifest, variants: dict, validation: dict | None = None) -> Manifest:
    import dataclasses

    return dataclasses.replace(manifest, variants=dict(variants),
                               validation=manifest.validation if validation is None else validation)


__all__ = ["ExportError", "ExportOptions", "GmrError", "export_engine"]
