"""The torch reference scorer: checkpoint loading rules, batched == single, left padding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")

from export.reference import CheckpointError, ReferenceScorer, read_model_type


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_batched_equals_single_and_scores_are_logit_differences(family, tiny_checkpoints, rng):
    ref = ReferenceScorer(tiny_checkpoints[family])
    img = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    pairs = [("short", "doc"), ("a longer query about cats", "cats are " * 40), ({"text": "q", "image": img}, "text doc"),
             ("q", {"image": img}), ({"image": img}, {"text": "both", "image": img[:40]})]
    batched = ref.score(pairs, batch_size=8)
    single = np.concatenate([ref.score([p]) for p in pairs])
    assert np.abs(batched - single).max() <= 1e-4
    batch = ref.encode(pairs[:2])
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][0, 0] == 0)  # left padded
    with torch.no_grad():
        logits = ref.model(**ref.encode([pairs[0]])).logits[0, -1]
    assert np.isclose(batched[0], float(logits[ref.yes_id] - logits[ref.no_id]), atol=1e-5)
    assert ref.yes_id == 9693 and ref.no_id == 2152


def test_bf16_loads_as_bf16_and_is_hf_mode_only(tiny_checkpoints):
    """The HF bf16 baseline loads its weights as bf16 (GMR-7B's would not fit in 24 GB as fp32 first)."""
    ckpt = tiny_checkpoints["qwen2_5_vl"]
    ref = ReferenceScorer(ckpt, dtype="bf16")
    assert {p.dtype for p in ref.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ReferenceScorer(ckpt).model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype"):
        ReferenceScorer(ckpt, mode="streamed", dtype="bf16")
    with pytest.raises(ValueError, match="dtype"):
        ReferenceScorer(ckpt, dtype="fp16")


def test_checkpoint_errors(tmp_path, tiny_checkpoints):
    with pytest.raises(CheckpointError, match="not a directory"):
        read_model_type(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        read_model_type(tmp_path)
    bad = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["qwen2_vl"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        read_model_type(bad)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_streamed_reference_equals_the_hf_model(family, tiny_checkpoints, rng):
    """The reference for models too large for memory (HF vision tower and positions, decoder
    streamed layer by layer through the graph module) scores as the HF model does (tiny fp32:
    summation order only, ~1e-6)."""
    img = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    pairs = [("short", "doc"), ("a longer query", "cats are " * 30), ({"text": "q", "image": img}, "text doc"),
             ("q", {"image": img}), ({"image": img}, {"text": "both", "image": img[:40]})]
    hf = ReferenceScorer(tiny_checkpoints[family]).score(pairs, batch_size=2)
    streamed = ReferenceScorer(tiny_checkpoints[family], mode="streamed").score(pairs, batch_size=2)
    assert np.abs(hf - streamed).max() <= 1e-4
