"""Activation ranges for the int8 variant's scale migration (``export --int8-smooth``).

SmoothQuant (Xiao et al., 2023): a MatMul ``x @ W`` equals ``(x / s) @ (diag(s) W)`` for any
positive per-input-channel ``s``. With ``s_j = max|x_j|^a / max|W_j|^(1 - a)`` the activation's
outlier channels are divided down and the weight rows that read them multiplied up, so both
quantize with less error (per-tensor or per-row activation scales no longer spend their range on
a few channels; the weight's scales are per output column and absorb the rows). ``a`` (alpha)
splits the difficulty: 0.5 is the paper's default.

``max|x_j|`` is measured here: the fp32 reference (HF's vision tower, the decoder streamed layer
by layer through the graph modules, one weight copy at a time as the export's reference is)
runs a calibration set disjoint from the validation set (its own seed), one pair per batch so
that no padding token counts, and every projection's input records its per-channel largest
magnitude. Keys are the graph's weight names (``layers.3.gate_up.weight``,
``blocks.0.qkv.weight``, ``merger.fc1.weight``); the vision tower's names come from the family's
source map, so a family that renames its modules needs nothing here.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from . import validate

log = logging.getLogger("gmr_fast.export")

CALIBRATION_SEED = 7919  # added to the export's seed: the validation set uses the seed itself
CALIBRATION_IMAGE = (448, 392)  # px: a 16 x 14 = 224-token query image, larger than the validation set's


def calibration_pairs(seed: int = 0, queries: int = 3, documents: int = 4) -> list[tuple]:
    """Text, image and text+image queries with mixed documents (``validate.validation_groups`` on
    another seed), plus a larger image query with a long text document."""
    groups = validate.validation_groups(queries, documents, seed + CALIBRATION_SEED)
    pairs = [(q, d) for q, docs in groups for d in docs]
    rng = np.random.default_rng(seed + CALIBRATION_SEED + 1)
    words = " ".join(rng.choice(validate.WORDS, 150))
    pairs.append(({"text": "find the matching page", "image": rng.integers(0, 256, CALIBRATION_IMAGE + (3,),
                                                                           dtype=np.uint8)}, words))
    return pairs


def _vision_modules(family, vision: dict) -> dict[str, str]:
    """HF vision module name (under ``visual.``) -> the graph's weight name, for every projection:
    the first checkpoint tensor each graph weight is made from names the module that reads the
    same input (gate_up is made from gate_proj and up_proj, which both read it)."""
    out = {}
    for name, source in family.vision_sources(vision).items():
        first = source.keys[0]
        if name.endswith(".weight") and first.startswith("visual.") and first.endswith(".weight"):
            out[first[len("visual."):-len(".weight")]] = name
    return out


def activation_ranges(checkpoint: os.PathLike, gmr, vision: dict, pairs: list[tuple],
                      instruction: str | None = None) -> dict[str, np.ndarray]:
    """{graph weight name: float32 [K] largest |input| per channel} over ``pairs``."""
    import torch

    from gmr_fast.graphs.common import Proj

    from .reference import ReferenceScorer

    started = time.perf_counter()
    scorer = ReferenceScorer(checkpoint, mode="streamed", gmr=gmr)
    ranges: dict[str, np.ndarray] = {}

    def record(name: str):
        def hook(module, args):
            x = args[0].detach()
            peak = x.abs().reshape(-1, x.shape[-1]).amax(0).float().numpy()
            ranges[name] = peak if name not in ranges else np.maximum(ranges[name], peak)
        return hook

    streamed = scorer._streamed
    handles = []
    names = _vision_modules(scorer.family, vision)
    for module_name, module in streamed.visual.named_modules():
        if module_name in names and isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(record(names[module_name])))

    def on_layer(i, layer):
        for child_name, child in layer.named_children():
            if isinstance(child, Proj):
                child.register_forward_pre_hook(record(f"layers.{i}.{child_name}.weight"))

    streamed.layer_hook = on_layer
    try:
        scorer.score(pairs, instruction=instruction or gmr.default_instruction, batch_size=1)
    finally:
        streamed.layer_hook = None
        for h in handles:
            h.remove()
    log.info("int8 calibration: %d projections' input ranges over %d pairs in %.1f s", len(ranges), len(pairs),
             time.perf_counter() - started)
    return ranges
