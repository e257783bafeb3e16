"""Export: engine directory contents, the fused head, onnxruntime == torch reference, errors."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from export import engine_export
from export.engine_export import ExportError, ExportOptions, export_engine
from export.reference import CheckpointError, ReferenceScorer
from gmr_fast.engine import EngineScorer
from gmr_fast.positions import rope_positions
from gmr_fast.prompt import as_item

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_directory_and_manifest(family, exported_engines, tiny_checkpoints):
    manifest, engine = exported_engines[family]
    assert sorted(p.name for p in engine.iterdir()) == ["decoder.onnx", "decoder.onnx.data", "manifest.json",
                                                        "tokenizer.json", "vision.onnx", "vision.onnx.data"]
    on_disk = json.loads((engine / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["model_family"] == family and manifest["precision"] == "fp32"
    assert manifest["token_ids"]["yes"] == 9693 and manifest["token_ids"]["no"] == 2152
    assert manifest["token_ids"]["image_pad"] == 151655
    assert len(manifest["source"]["weights_sha256"]) == 64
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["kendall_tau"] > 0.99
    dec = {i["name"]: i for i in manifest["graphs"]["decoder"]["inputs"]}
    assert dec["position_ids"]["shape"][0] == 3 and dec["input_ids"]["dtype"] == "int64"
    assert [o["name"] for o in manifest["graphs"]["decoder"]["outputs"]] == ["score"]
    vis_inputs = [i["name"] for i in manifest["graphs"]["vision"]["inputs"]]
    assert ("window_gather" in vis_inputs) == (family == "qwen2_5_vl")
    assert manifest["preprocessing"]["window_size"] == (112 if family == "qwen2_5_vl" else None)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_graph_has_no_vocabulary_projection(family, exported_engines):
    _, engine = exported_engines[family]
    model = onnx.load(str(engine / "decoder.onnx"))
    vocab_sized = {init.name for init in model.graph.initializer if 151936 in init.dims}
    assert len(vocab_sized) == 1, "only the embedding table may have a vocabulary-sized dimension"
    consumers = [node for node in model.graph.node if vocab_sized & set(node.input)]
    assert consumers and all(node.op_type == "Gather" for node in consumers), [n.op_type for n in consumers]
    assert not any(node.op_type in ("MatMul", "Gemm") and vocab_sized & set(node.input) for node in model.graph.node)


def _random_pairs(rng, n):
    words = ["alpha", "beta", "gamma", "photo", "of", "a", "red", "circle", "über", "数据", "on", "the", "map", "7"]
    text = lambda lo, hi: " ".join(rng.choice(words, int(rng.integers(lo, hi))))  # noqa: E731
    image = lambda: rng.integers(0, 256, (int(rng.integers(20, 220)), int(rng.integers(20, 220)), 3), dtype=np.uint8)  # noqa: E731
    kinds = [lambda: (text(1, 10), text(1, 200)), lambda: (text(1, 10), {"image": image()}),
             lambda: ({"image": image()}, text(1, 120)),
             lambda: ({"text": text(0, 8), "image": image()}, {"text": text(0, 80), "image": image()})]
    return [kinds[int(rng.integers(0, 4))]() for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_matches_reference_batched_and_single(family, exported_engines, tiny_checkpoints, rng):
    _, engine_dir = exported_engines[family]
    engine = EngineScorer(engine_dir)
    reference = ReferenceScorer(tiny_checkpoints[family])
    pairs = _random_pairs(rng, 56)
    expected = reference.score(pairs, batch_size=4)
    single = np.concatenate([engine.score([p]) for p in pairs])
    assert np.abs(single - expected).max() <= 1e-4
    start = 0
    for size in [1, 2, 3, 5, 8, 16, 7, 9, 5]:  # batch sizes 1..16 with mixed lengths and modalities
        chunk = pairs[start:start + size]
        got = engine.score(chunk)
        assert np.abs(got - expected[start:start + size]).max() <= 1e-4, f"batch of {size}"
        assert np.abs(got - single[start:start + size]).max() <= 1e-4
        start += size
    assert start == len(pairs)


def test_right_padding_gives_the_same_scores(exported_engines, rng):
    _, engine_dir = exported_engines["qwen2_5_vl"]
    engine = EngineScorer(engine_dir)
    pairs = [("short query", "a document"), ("q", "much longer document " * 20)]
    left = engine.score(pairs)
    prompts = [engine.prompts.encode(engine.gmr.default_instruction, as_item(q, "q"), as_item(d, "d")) for q, d in pairs]
    length = max(len(p.ids) for p in prompts)
    ids = np.full((2, length), 151643, np.int64)
    mask = np.zeros((2, length), np.int64)
    pos = np.ones((3, 2, length), np.int64)
    for r, p in enumerate(prompts):
        ids[r, :len(p.ids)] = p.ids
        mask[r, :len(p.ids)] = 1
        pos[:, r, :len(p.ids)] = rope_positions(len(p.ids), [], [])
    right = engine.decoder.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                      "image_embeds": np.zeros((0, engine.hidden_size), np.float32)})[0]
    assert np.abs(left - right).max() <= 1e-5


def test_fp16_export_is_judged_by_ranking(tiny_checkpoints, tmp_path):
    manifest = export_engine(tiny_checkpoints["qwen2_vl"], tmp_path / "fp16", ExportOptions(dtype="fp16"))
    assert manifest["precision"] == "fp16 weights, fp32 arithmetic"
    assert manifest["parity"]["kendall_tau"] >= 0.99 and manifest["parity"]["max_abs_diff"] > 0
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(tmp_path / "fp16") < 0.75 * 2 * (tmp_path / "fp16" / "decoder.onnx.data").stat().st_size


def test_export_errors(tiny_checkpoints, tmp_path, monkeypatch):
    ckpt = tiny_checkpoints["qwen2_vl"]
    with pytest.raises(CheckpointError, match="not a directory"):
        export_engine(tmp_path / "nowhere", tmp_path / "e")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        export_engine(broken, tmp_path / "e")
    shutil.copy(ckpt / "tokenizer.json", broken / "tokenizer.json")
    (broken / "model.safetensors").rename(broken / "model.bin")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors"):
        export_engine(broken, tmp_path / "e")
    (broken / "model.bin").rename(broken / "model.safetensors")
    cfg = json.loads((broken / "gmr.json").read_text())
    cfg["no_token"] = "no way"
    (broken / "gmr.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no_token.*must be exactly one"):
        export_engine(broken, tmp_path / "e")
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_engine(ckpt, existing)

    def disk_full(*args, **kwargs):
        (args[1] / "vision.onnx").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine_export, "_export_graphs", disk_full)
    with pytest.raises(ExportError, match="disk full"):
        export_engine(ckpt, tmp_path / "full")
    assert not (tmp_path / "full").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".full.partial")]


def test_cli_refuses_tensorrt_and_existing_output(tiny_checkpoints, tmp_path, capsys):
    from export.__main__ import main

    assert main(["--checkpoint", str(tiny_checkpoints["qwen2_vl"]), "--out", str(tmp_path), "--tensorrt"]) == 2
    assert "not implemented yet" in capsys.readouterr().err
    assert main(["--checkpoint", str(tiny_checkpoints["qwen2_vl"]), "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_engine_runs_without_torch_or_transformers(exported_engines):
    """Scoring with an engine directory never imports torch or transformers."""
    import subprocess
    import sys
    import textwrap

    _, engine_dir = exported_engines["qwen2_5_vl"]
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from gmr_fast.engine import EngineScorer
        engine = EngineScorer({str(engine_dir)!r})
        image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
        scores = engine.score([("q", "d"), ({{"text": "q", "image": image}}, {{"image": image}})])
        assert scores.shape == (2,) and np.isfinite(scores).all()
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
