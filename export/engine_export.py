"""GMR checkpoint -> validated engine directory.

Steps: check the checkpoint (files, model_type, yes/no single tokens), export the vision and
decoder graphs with dynamic shapes, copy tokenizer.json, validate onnxruntime against the torch
reference on random pairs of every modality combination, write manifest.json. Everything is
written into a temporary directory beside the target and renamed into place only when it is
complete, so a failure (disk full included) never leaves a half-written engine that looks valid.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from gmr_fast.engine import MANIFEST_FORMAT, EngineScorer
from gmr_fast.gmr_config import GmrConfig
from gmr_fast.prompt import PromptBuilder

from .reference import CheckpointError, ReferenceScorer, read_model_type

log = logging.getLogger("gmr_fast.export")

FP32_TOLERANCE = 1e-4
FP16_MIN_KENDALL_TAU = 0.99
REQUIRED_FILES = ("config.json", "tokenizer.json", "preprocessor_config.json")


class ExportError(RuntimeError):
    """The export could not produce a valid engine."""


@dataclass
class ExportOptions:
    dtype: str = "fp32"  # fp32 | fp16 (fp16 weights, fp32 arithmetic)
    force: bool = False
    validation_pairs: int = 24
    seed: int = 0


def check_checkpoint(checkpoint: pathlib.Path) -> tuple[str, GmrConfig]:
    model_type = read_model_type(checkpoint)
    missing = [f for f in REQUIRED_FILES if not (checkpoint / f).exists()]
    if missing:
        raise CheckpointError(f"{checkpoint} is missing {', '.join(missing)}")
    if not list(checkpoint.glob("*.safetensors")):
        raise CheckpointError(f"{checkpoint} has no *.safetensors weights")
    gmr = GmrConfig.load(checkpoint)
    PromptBuilder(checkpoint / "tokenizer.json", gmr)  # raises unless yes/no/image tokens are single tokens
    return model_type, gmr


def weights_sha256(checkpoint: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(checkpoint.glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _io_spec(session) -> dict:
    conv = lambda args: [{"name": a.name, "dtype": a.type.replace("tensor(", "").rstrip(")"), "shape": a.shape} for a in args]  # noqa: E731
    return {"inputs": conv(session.get_inputs()), "outputs": conv(session.get_outputs())}


def validation_pairs(n: int, seed: int) -> list[tuple]:
    """Random pairs covering text->text, text->image, image->text, text+image->text+image."""
    rng = np.random.default_rng(seed)
    words = ["cat", "red", "square", "the", "a", "of", "blue", "circle", "dog", "photo", "map", "Zürich", "数据", "2024", "is", "on"]
    text = lambda lo, hi: " ".join(rng.choice(words, rng.integers(lo, hi)))  # noqa: E731
    image = lambda: rng.integers(0, 256, (int(rng.integers(28, 160)), int(rng.integers(28, 160)), 3), dtype=np.uint8)  # noqa: E731
    kinds = [lambda: (text(1, 8), text(3, 60)), lambda: (text(1, 8), {"image": image()}),
             lambda: ({"image": image()}, text(3, 40)),
             lambda: ({"text": text(1, 6), "image": image()}, {"text": text(2, 30), "image": image()})]
    return [kinds[i % len(kinds)]() for i in range(n)]


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def _export_graphs(model, out: pathlib.Path, yes_id: int, no_id: int) -> None:
    import torch

    from gmr_fast.graphs import decoder as dec_mod
    from gmr_fast.graphs import vision as vis_mod
    from gmr_fast.preprocess import preprocess_images
    from gmr_fast.vision_layout import vision_graph_inputs

    D = torch.export.Dim
    encoder = vis_mod.VisionEncoder(model).eval()
    rng = np.random.default_rng(0)
    sample = preprocess_images([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(100, 140), (300, 60)]])
    window = model.config.vision_config.window_size if encoder.windowed else None
    feeds = {"pixel_values": torch.from_numpy(sample.pixel_values),
             **{k: torch.from_numpy(v) for k, v in vision_graph_inputs(sample.image_grid_thw, window).items()}}
    n, s, lf = D("patches"), D("images"), D("image_len")
    shapes = {"pixel_values": {0: n}, "rot_pos_ids": {0: n}, "full_gather": {0: s, 1: lf}, "full_valid": {0: s, 1: lf},
              "full_inverse": {0: n}}
    if encoder.windowed:
        m, w, lw = D("merged"), D("windows"), D("window_len")
        shapes.update(window_index={0: m}, window_reverse={0: m}, window_gather={0: w, 1: lw},
                      window_valid={0: w, 1: lw}, window_inverse={0: n})
    with torch.no_grad():
        torch.onnx.export(encoder, (), str(out / "vision.onnx"), kwargs=feeds, input_names=encoder.input_names,
                          output_names=vis_mod.OUTPUT_NAMES, dynamo=True, dynamic_shapes=shapes, external_data=True,
                          verbose=False)
    decoder = dec_mod.DecoderWithScoreHead(model, yes_id, no_id).eval()
    ids = torch.tensor([[151644, 872, 198, 151655, 151655, 151645], [151643, 151644, 872, 198, 9693, 151645]])
    mask = torch.tensor([[1] * 6, [0] + [1] * 5])
    pos = torch.arange(6).expand(3, 2, 6).contiguous()
    emb = torch.zeros(2, model.config.text_config.hidden_size)
    b, length, k = D("batch"), D("length"), D("image_tokens")
    with torch.no_grad():
        torch.onnx.export(decoder, (ids, mask, pos, emb), str(out / "decoder.onnx"), input_names=dec_mod.INPUT_NAMES,
                          output_names=dec_mod.OUTPUT_NAMES, dynamo=True, external_data=True, verbose=False,
                          dynamic_shapes={"input_ids": {0: b, 1: length}, "attention_mask": {0: b, 1: length},
                                          "position_ids": {1: b, 2: length}, "image_embeds": {0: k}})


def _to_fp16_weights(path: pathlib.Path) -> None:
    """Stores float32 weights as float16 and casts them back to float32 in the graph: half the
    size, fp32 arithmetic (so the CPU execution provider runs it)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    new_inits, casts = [], []
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and np.prod(init.dims) >= 256:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "__fp16")
            new_inits.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT))
        else:
            new_inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)  # the weights are in memory now; rewrite them
    onnx.save(model, str(path), save_as_external_data=True, location=data_name)


def export_engine(checkpoint: os.PathLike, out: os.PathLike, options: ExportOptions | None = None) -> dict:
    """Writes the engine directory `out` and returns its manifest."""
    options = options or ExportOptions()
    if options.dtype not in ("fp32", "fp16"):
        raise ExportError(f"--dtype must be fp32 or fp16, got {options.dtype!r}")
    checkpoint, out = pathlib.Path(checkpoint), pathlib.Path(out)
    if out.exists() and not options.force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    model_type, gmr = check_checkpoint(checkpoint)

    reference = ReferenceScorer(checkpoint)
    model = reference.model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _export_graphs(model, tmp, reference.yes_id, reference.no_id)
        if options.dtype == "fp16":
            for name in ("vision.onnx", "decoder.onnx"):
                _to_fp16_weights(tmp / name)
        shutil.copyfile(checkpoint / "tokenizer.json", tmp / "tokenizer.json")
        vcfg, tcfg = model.config.vision_config, model.config.text_config
        manifest = {
            "format_version": MANIFEST_FORMAT,
            "model_family": model_type,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"checkpoint": str(checkpoint.resolve()), "weights_sha256": weights_sha256(checkpoint)},
            "precision": {"fp32": "fp32", "fp16": "fp16 weights, fp32 arithmetic"}[options.dtype],
            "score": "logit(yes) - logit(no) at the last real token; sigmoid gives P(yes)",
            "token_ids": {"yes": reference.yes_id, "no": reference.no_id, "image_pad": model.config.image_token_id,
                          "vision_start": model.config.vision_start_token_id,
                          "vision_end": model.config.vision_end_token_id, "pad": 151643},
            "gmr": gmr.to_dict(),
            "model": {"hidden_size": tcfg.hidden_size, "num_hidden_layers": tcfg.num_hidden_layers,
                      "vocab_size": tcfg.vocab_size, "vision_depth": vcfg.depth},
            "preprocessing": {"min_pixels": gmr.min_pixels, "max_pixels": gmr.max_pixels, "patch_size": vcfg.patch_size,
                              "merge_size": vcfg.spatial_merge_size, "temporal_patch_size": vcfg.temporal_patch_size,
                              "window_size": getattr(vcfg, "window_size", None) if model_type == "qwen2_5_vl" else None,
                              "image_mean": [0.48145466, 0.4578275, 0.40821073],
                              "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 1 / 255},
            "graphs": {"vision": {"file": "vision.onnx"}, "decoder": {"file": "decoder.onnx"}},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        engine = EngineScorer(tmp)
        manifest["graphs"]["vision"].update(_io_spec(engine.vision))
        manifest["graphs"]["decoder"].update(_io_spec(engine.decoder))

        pairs = validation_pairs(options.validation_pairs, options.seed)
        expected = reference.score(pairs, batch_size=8)
        got = np.concatenate([engine.score(pairs[i:i + 8]) for i in range(0, len(pairs), 8)])
        max_diff = float(np.abs(got - expected).max())
        tau = kendall_tau(got, expected)
        manifest["parity"] = {"reference": "transformers fp32 eager, CPU", "pairs": len(pairs),
                              "modalities": ["t2t", "t2i", "i2t", "it2it"], "max_abs_diff": max_diff,
                              "kendall_tau": tau, "fp32_tolerance": FP32_TOLERANCE,
                              "fp16_min_kendall_tau": FP16_MIN_KENDALL_TAU}
        if options.dtype == "fp32" and not max_diff <= FP32_TOLERANCE:
            raise ExportError(f"fp32 export failed validation: max |onnxruntime - reference| = {max_diff:.3g} "
                              f"> {FP32_TOLERANCE} on {len(pairs)} pairs (Kendall tau {tau:.4f})")
        if options.dtype == "fp16" and not tau >= FP16_MIN_KENDALL_TAU:
            raise ExportError(f"fp16 export failed validation: Kendall tau {tau:.4f} < {FP16_MIN_KENDALL_TAU} "
                              f"against the fp32 reference (max |diff| {max_diff:.3g})")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        del engine
        os.chmod(tmp, 0o755)  # mkdtemp (and onnx's data files) are private; an engine is an ordinary directory
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        log.info("wrote %s: max |diff| %.3g, Kendall tau %.4f over %d pairs", out, max_diff, tau, len(pairs))
        return manifest
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExportError(f"disk full while writing the engine for {out}; nothing was left behind") from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
