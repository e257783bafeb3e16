"""Export: the engine directory and its manifest, the graphs' contract (fused head, I/O), the
validation through the Reranker, errors, and running an engine without torch."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.model
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from export import engine_export, validate  # noqa: E402
from export.engine_export import ExportOptions, export_engine  # noqa: E402
from gmr_fast import CheckpointError, ConfigError, ExportError, load_manifest  # noqa: E402
from gmr_fast.manifest import DECODER_INPUTS, DECODER_OUTPUTS  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_directory_and_manifest(family, exported_engines):
    manifest, engine = exported_engines[family]
    assert sorted(p.name for p in engine.iterdir()) == ["decoder.fp32.onnx", "decoder.fp32.weights", "manifest.json",
                                                        "tokenizer.json", "vision.fp32.onnx", "vision.fp32.weights"]
    loaded = load_manifest(engine)
    assert loaded.to_dict() == json.loads(json.dumps(manifest.to_dict()))
    assert loaded.family == family and loaded.precisions == ("fp32",)
    assert loaded.tokens.yes == 9693 and loaded.tokens.no == 2152 and loaded.tokens.image_pad == 151655
    assert loaded.preprocessing.window_size == (112 if family == "qwen2_5_vl" else None)
    assert loaded.preprocessing.patch_size == 14 and loaded.preprocessing.image_mean[0] == pytest.approx(0.48145466)
    assert len(loaded.source["weights_sha256"]) == 64
    fig = loaded.variants["fp32"].validation
    assert fig["max_rel_error"] <= 1e-3 and fig["kendall_tau"] > 0.99 and fig["pairs"] == 80 + 12  # + the long group
    assert fig["long"]["pairs"] == 12 and fig["long"]["max_rel_error"] <= 1e-3
    assert fig["modes"][-1]["share_prefix"] is False  # the long group runs as whole prompts
    assert loaded.validation["criterion"]["fp32_max_rel_error"] == 1e-3
    assert {m["padding_side"] for m in fig["modes"]} == {"left", "right"}  # both sides exercised
    assert {m["share_prefix"] for m in fig["modes"]} == {True, False} and any(m["shared_pairs"] for m in fig["modes"])
    dec = loaded.variants["fp32"].graphs["decoder"]
    assert dec.input_names == DECODER_INPUTS and tuple(t.name for t in dec.outputs) == DECODER_OUTPUTS


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_graph_has_no_vocabulary_projection(family, exported_engines):
    _, engine = exported_engines[family]
    model = onnx.load(str(engine / "decoder.fp32.onnx"), load_external_data=False)
    vocab_sized = {init.name for init in model.graph.initializer if 151936 in init.dims}
    assert vocab_sized == {"embed"}, "only the embedding table may have a vocabulary-sized dimension"
    consumers = [node for node in model.graph.node if vocab_sized & set(node.input)]
    assert consumers and all(node.op_type == "Gather" for node in consumers), [n.op_type for n in consumers]


def test_int8_and_bf16_variants(all_precisions_engine):
    manifest, engine = all_precisions_engine
    m = load_manifest(engine)
    assert m.precisions == ("fp32", "int8", "bf16") and m.variants["bf16"].backend == "torch"
    # the tiny model's fp32 fits in memory, so the reference is HF's whole model; validating bf16's
    # image routes once overwrote the mode this line reports with a route's name
    assert m.validation["reference"] == "transformers fp32 (HF model)", m.validation["reference"]
    graph = onnx.load(str(engine / "decoder.int8.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "DynamicQuantizeMatMul" in ops
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert any(i.name == "embed.int8" for i in int8)  # the embedding table is stored as int8 rows too
    # GEMM weights within 7 bits, which no int8 kernel saturates (export.quantize.QGEMM_WEIGHT_MAX);
    # the embedding rows are no GEMM operand and keep 8
    assert m.variants["int8"].details["int8_weight_max"] == 64
    for graph_name, wf in m.variants["int8"].weights.items():
        blob = (engine / wf.file).read_bytes()
        peaks = {name: int(np.abs(np.frombuffer(blob, np.int8, t["length"], t["offset"]).astype(np.int16)).max())
                 for name, t in wf.tensors.items() if t["dtype"] == "int8"}
        gemm = {n: v for n, v in peaks.items() if n != "embed.int8"}
        assert gemm and max(gemm.values()) == 64, (graph_name, peaks)
        if "embed.int8" in peaks:
            assert peaks["embed.int8"] == 127
    for precision in ("int8", "bf16"):
        fig = m.variants[precision].validation
        assert fig["query_kendall_tau_mean"] >= 0.9 and fig["top10_overlap_mean"] >= 0.9, (precision, fig)
        assert fig["pairs"] == 80 and fig["long"]["pairs"] == 12 and fig["long"]["kendall_tau"] >= 0.9, (precision, fig)
    size = lambda name: (engine / name).stat().st_size  # noqa: E731
    assert size("decoder.int8.weights") < 0.4 * size("decoder.fp32.weights")


def test_bf16_alone_stores_bf16_weights_of_its_own(tiny_checkpoints, all_precisions_engine, tmp_path, rng):
    """--dtype bf16 without fp32 (GMR-7B's fp32 weights would be 30 GB) writes bf16 weight files
    and no ONNX graph. Its weights are the checkpoint's values rounded to bf16 as the torch
    backend rounds an fp32 file's when loading, so on fresh pairs, batched, its scores equal
    those of the bf16 variant run over fp32 files bit for bit: same values, same kernels, no
    tolerance to argue."""
    from gmr_fast import EngineError, Reranker

    m = export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e", ExportOptions(dtypes=("bf16",)))
    engine = tmp_path / "e"
    assert m.precisions == ("bf16",) and m.variants["bf16"].backend == "torch" and not m.variants["bf16"].graphs
    assert sorted(p.name for p in engine.iterdir()) == ["decoder.bf16.weights", "manifest.json", "tokenizer.json",
                                                        "vision.bf16.weights"]
    tensors = m.variants["bf16"].weights["decoder"].tensors
    assert tensors["score_row"]["dtype"] == "float32"  # the fused head row stays fp32, as the backend keeps it
    assert {e["dtype"] for name, e in tensors.items() if name != "score_row"} == {"bfloat16"}
    _, both = all_precisions_engine
    for graph in ("decoder", "vision"):  # half of fp32's bytes, give or take the fp32 head row and alignment
        ratio = (engine / f"{graph}.bf16.weights").stat().st_size / (both / f"{graph}.fp32.weights").stat().st_size
        assert 0.49 < ratio < 0.52, (graph, ratio)
    fig = m.variants["bf16"].validation
    assert fig["query_kendall_tau_mean"] >= 0.9 and fig["long"]["kendall_tau"] >= 0.9, fig

    groups = validate.validation_groups(3, 5, int(rng.integers(1 << 30)))
    pairs = [(q, d) for q, docs in groups for d in docs]
    own = Reranker(engine)  # auto: the engine's only variant
    got = own.score(pairs, batch_size=4)
    assert own.last_stats["precision"] == "bf16"
    np.testing.assert_array_equal(got, Reranker(both, precision="bf16").score(pairs, batch_size=4))
    with pytest.raises(EngineError, match="no fp32 variant"):
        Reranker(engine, precision="fp32")


def test_fp32_over_bf16_refuses_a_checkpoint_bf16_does_not_hold(tiny_checkpoints, tmp_path):
    """--fp32-over-bf16 on a checkpoint of fp32 values (this random one) would not be the fp32
    model: a clear error naming a weight bf16 does not hold, and no engine left behind."""
    with pytest.raises(ExportError, match=r"--fp32-over-bf16 needs .* is not \(stored dtypes F32"):
        export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e",
                      ExportOptions(dtypes=("fp32",), fp32_over_bf16=True, validation_queries=1,
                                    validation_documents=2, validation_long_documents=0))
    assert not list(tmp_path.iterdir())


def test_kept_weights_as_8bit_blocks_with_fp32_arithmetic(tiny_checkpoints, tmp_path, rng):
    """Kept weights (--int8-keep) stay fp32 MatMuls by default and become MatMulNBits with 8-bit
    weights and fp32 arithmetic with --int8-kept int8-weights. The operator against numpy: its
    only error is the weights' rounding, at most half a block's scale per weight, so
    |y - x @ W| <= sum_k |x_k| * scale(k) / 2 (plus fp32 summation, ~1e-6 of sum |x_k w_k| for
    K = 1,176), checked with K not a multiple of the block (patch_embed's K is 1,176 = 36.75
    blocks: the padding path)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export import quantize

    k, n = 1176, 72
    w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.01, 1.0, (k, 1)).astype(np.float32)
    q, scale = quantize.quantize_blocks(w)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                            block_size=quantize.BLOCK, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(q, "b"), numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((16, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = x.astype(np.float64) @ w.astype(np.float64)
    per_k = np.repeat(scale.reshape(n, -1), quantize.BLOCK, axis=1)[:, :k].T  # [K, N]: each weight's block scale
    bound = np.abs(x).astype(np.float64) @ (per_k / 2) + 1e-6 * (np.abs(x) @ np.abs(w))
    assert np.all(np.abs(y - exact) <= bound)
    assert np.abs(y - exact).max() > 0  # the weights were rounded: not fp32 passing through

    def ops(path):
        return [nd.op_type for nd in onnx.load(str(path), load_external_data=False).graph.node]

    keep = ("*.down.weight", "merger.*", "patch_embed.*")
    m = export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e",
                      ExportOptions(dtypes=("fp32", "int8"), int8_keep=keep, int8_kept="int8-weights"))
    assert "int8" in m.precisions and m.variants["int8"].details["kept_as"] == "int8-weights"
    for name in ("decoder", "vision"):
        ops_e = ops(tmp_path / "e" / f"{name}.int8.onnx")
        assert "MatMulNBits" in ops_e and "DynamicQuantizeMatMul" in ops_e
    m = export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "f",
                      ExportOptions(dtypes=("fp32", "int8"), int8_keep=keep))
    ops_f = ops(tmp_path / "f" / "decoder.int8.onnx")
    assert "MatMulNBits" not in ops_f and "MatMul" in ops_f and m.variants["int8"].details["kept_as"] == "fp32"
    with pytest.raises(Exception, match="int8_kept must be one of"):
        export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "bad",
                      ExportOptions(dtypes=("int8",), int8_kept="fp16"))


def test_int8_with_per_token_activation_scales_does_not_depend_on_the_batch(tiny_checkpoints, tmp_path, rng):
    """--int8-activations row: each token's activation gets its own scale (MatMulInteger on uint8
    activations, the U8S8 QGEMM path), so a pair scores the same whatever shares its batch; with
    one scale per tensor, a large image in the batch coarsens every row. MatMulInteger's int32
    product is exact, so two batchings differ only by fp32 summation order in the other ops
    (~1e-6 on these scores of order 1): 1e-4 as in the Reranker tests."""
    from gmr_fast import Reranker

    # the bars lowered: what is tested is the batch independence, not this tiny model's ranking
    low = validate.Criterion(min_query_tau=-1, min_mean_top10=0, min_top10=0, min_long_tau=-1)
    m = export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e",
                      ExportOptions(dtypes=("fp32", "int8"), int8_keep=(), int8_activations="row", criterion=low))
    assert m.variants["int8"].details["activations"] == "row"
    graph = onnx.load(str(tmp_path / "e" / "decoder.int8.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMulInteger" in ops and "DynamicQuantizeMatMul" not in ops
    words = "alpha beta photo of a red circle on the map".split()
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    pairs = [(text(4), text(int(rng.integers(3, 30)))) for _ in range(5)]
    big = rng.integers(0, 256, (224, 280, 3), dtype=np.uint8)
    others = [({"text": text(3), "image": big}, text(40)), (text(2), {"image": big})]
    reranker = Reranker(tmp_path / "e", precision="int8", max_batch_size=64, max_batch_tokens=100000)
    alone = reranker.score(pairs)
    together = reranker.score(others + pairs)[len(others):]
    np.testing.assert_allclose(together, alone, atol=1e-4)
    with pytest.raises(Exception, match="int8_activations must be tensor or row"):
        export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "bad", ExportOptions(dtypes=("int8",), int8_activations="x"))


def test_fp16_is_refused_with_the_reason(tiny_checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="fp16 is not offered: on CPU onnxruntime materialises fp32 copies"):
        export_engine(tiny_checkpoints["qwen2_vl"], tmp_path / "e", ExportOptions(dtypes=("fp16",)))


def test_validation_refuses_a_wrong_engine(tiny_checkpoints, tmp_path, monkeypatch):
    real = validate.run_candidate
    monkeypatch.setattr(validate, "run_candidate", lambda *a, **k: (lambda s, m: (-s, m))(*real(*a, **k)))
    with pytest.raises(ExportError, match="fp32 export failed validation: max .* of the score spread"):
        export_engine(tiny_checkpoints["qwen2_vl"], tmp_path / "e", ExportOptions(dtypes=("fp32",)))
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.partial*"))


def _reverse_long_group(monkeypatch, precision: str) -> None:
    """``precision``'s candidate ranks the long group (the last 12 pairs) backwards."""
    real = validate.run_candidate

    def candidate(engine, p, groups, *a, **k):
        scores, modes = real(engine, p, groups, *a, **k)
        if p == precision:
            scores = scores.copy()
            scores[-12:] = -scores[-12:]
        return scores, modes

    monkeypatch.setattr(validate, "run_candidate", candidate)


def test_a_reduced_precision_refused_on_the_long_group_is_left_out(tiny_checkpoints, tmp_path, monkeypatch):
    _reverse_long_group(monkeypatch, "int8")
    # int8_keep=() : one attempt, no escalation through the fp32 keep-lists (each would fail the same way)
    m = export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e", ExportOptions(dtypes=("fp32", "int8"), int8_keep=()))
    assert m.precisions == ("fp32",) and not list((tmp_path / "e").glob("*.int8.*"))
    refused = load_manifest(tmp_path / "e").validation["refused"]["int8"]
    assert "on the long group" in refused["reason"] and refused["long"]["kendall_tau"] < 0
    assert refused["query_kendall_tau_mean"] >= 0.9  # the short groups alone would have accepted it
    with pytest.raises(ExportError, match="int8 export failed validation: Kendall tau .* on the long group"):
        export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "alone", ExportOptions(dtypes=("int8",), int8_keep=()))
    assert not (tmp_path / "alone").exists()


def test_bf16_refused_on_the_long_group_alone_is_kept_with_its_image_pairs_routed(model_cache, tmp_path, monkeypatch,
                                                                                   rng):
    """Plain bf16 that ranks the long group (a large image query: every pair has an image) below
    the bar while its short groups pass is kept where a route that runs such pairs meets the whole
    criterion (export.engine_export._accept_routed): the manifest says why and which routes, and
    the Reranker then never runs pairs with an image in plain bf16 (``image_precision="same"`` is
    refused; an explicit ``precision="bf16"`` routes them as ``auto`` does). Where no route can
    run here (no bf16 kernel: the routes are the bf16 hardware's) or none meets it, bf16 is left
    out as before."""
    from export.factory import build_checkpoint
    from gmr_fast import ConfigError, Reranker, hardware
    from gmr_fast.reranker import ROUTED_FIGURES, choose_image_precision, plain_image_refusal

    real = validate.run_candidate

    def candidate(engine, p, groups, *a, **k):  # plain bf16 (no route named) ranks the long group backwards
        scores, modes = real(engine, p, groups, *a, **k)
        if p == "bf16" and k.get("image_precision") is None:
            scores = scores.copy()
            scores[-12:] = -scores[-12:]
        return scores, modes

    monkeypatch.setattr(validate, "run_candidate", candidate)
    checkpoint = build_checkpoint(tmp_path / "ckpt", dtype="bfloat16", cache_dir=model_cache)  # as GMR is released
    m = export_engine(checkpoint, tmp_path / "e", ExportOptions(dtypes=("fp32", "bf16")))
    if hardware.bf16_kernel() is None:  # the routes do not run here: refused as any reduced precision
        assert m.precisions == ("fp32",) and "on the long group" in m.validation["refused"]["bf16"]["reason"]
        return
    assert m.precisions == ("fp32", "bf16") and "refused" not in m.validation
    validation = m.variants["bf16"].validation
    plain = validation["plain_image_pairs"]
    assert "on the long group" in plain["refused"] and validation["long"]["kendall_tau"] < 0
    assert plain["routes_accepted"] and set(plain["routes_accepted"]) <= set(ROUTED_FIGURES)
    for route in plain["routes_accepted"]:
        figures = validation[ROUTED_FIGURES[route]]
        assert figures["accepted"] and figures["long"]["kendall_tau"] >= validate.Criterion().min_long_tau
    assert plain_image_refusal(load_manifest(tmp_path / "e")) == plain["refused"]
    with pytest.raises(ConfigError, match="image_precision same would run pairs with an image in plain bf16"):
        Reranker(tmp_path / "e", precision="bf16", image_precision="same")
    # on CUDA (the routes are the CPU's) they run fp32
    assert choose_image_precision(m, "auto", "bf16", "torch", "cuda", "auto")[0] == "fp32"
    # a route the export did not accept is never taken for them, whatever its per-query figure
    import dataclasses

    only_x3 = dataclasses.replace(m.variants["bf16"], validation={
        **validation, "plain_image_pairs": {**plain, "routes_accepted": ["bf16x3"]},
        **{key: {**validation[key], "query_kendall_tau_mean": 0.99} for key in ROUTED_FIGURES.values()}})
    only_x3 = dataclasses.replace(m, variants={**m.variants, "bf16": only_x3})
    kernel = hardware.bf16_kernel
    monkeypatch.setattr(hardware, "bf16_kernel", lambda: "AMX")
    chosen, why = choose_image_precision(only_x3, "bf16", "bf16", "torch", "cpu", "auto")
    assert chosen == "bf16x3" and "bf16-vision passed over: below the export's criterion" in why
    monkeypatch.setattr(hardware, "bf16_kernel", kernel)
    image = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    for precision in ("bf16", "auto"):
        r = Reranker(tmp_path / "e", precision=precision)
        if r.precision == "bf16":
            assert r.image_precision in (*plain["routes_accepted"], "fp32"), r.choice
        r.score([("a query", {"image": image}), ("a query", "a text document")])
    # without any route meeting the criterion: left out, as before
    monkeypatch.setattr(engine_export, "_validate_bf16_gemm_images",
                        lambda *a, **k: {"accepted": False, "query_kendall_tau_mean": 0.5})
    m = export_engine(checkpoint, tmp_path / "none", ExportOptions(dtypes=("fp32", "bf16")))
    assert m.precisions == ("fp32",) and "on the long group" in m.validation["refused"]["bf16"]["reason"]


def test_int8_attempts_ladder():
    """What validation tries, in order, for each combination of given options."""
    level1 = engine_export.INT8_FALLBACKS[1]
    plan = engine_export.int8_attempts(None, None, None)
    assert [(k, a) for k, a, _ in plan] == [((), "tensor"), (level1, "tensor"), (level1, "row"),
                                            *((tuple(k), "tensor") for k in engine_export.INT8_FALLBACKS[2:])]
    assert {a: alpha for _, a, alpha in plan} == {"tensor": 0.5, "row": 0.8}
    assert engine_export.int8_attempts(("x.*",), None, None) == [(("x.*",), "tensor", 0.5)]
    assert [a for _, a, _ in engine_export.int8_attempts(None, "row", 0.3)] == ["row"] * 4
    assert {alpha for *_, alpha in engine_export.int8_attempts(None, None, 0.0)} == {0.0}


def test_int8_escalates_to_per_token_scales(tiny_checkpoints, tmp_path, monkeypatch):
    """By default int8 tries per-tensor scales with nothing kept, then with the first layer and
    the merger kept, then per-token scales (alpha 0.8) with the same kept: a candidate that ranks
    the long group backwards unless its activations are per token is accepted at that third
    attempt, and the manifest says how it was built."""
    real, seen = validate.run_candidate, []

    def candidate(engine, p, groups, *a, **k):
        scores, modes = real(engine, p, groups, *a, **k)
        if p == "int8":
            details = load_manifest(engine).variants["int8"].details
            seen.append((tuple(details["kept_fp32_patterns"]), details["activations"], details["smooth_alpha"]))
            if details["activations"] != "row":
                scores = scores.copy()
                scores[-12:] = -scores[-12:]
        return scores, modes

    monkeypatch.setattr(validate, "run_candidate", candidate)
    # bars lowered to what a backwards long group misses (tau ~ -1) and any real int8 build meets
    # on this tiny model, so that only the activation scheme decides
    low = validate.Criterion(min_query_tau=0, min_mean_top10=0, min_top10=0, min_long_tau=0)
    m = export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e",
                      ExportOptions(dtypes=("fp32", "int8"), criterion=low))
    level1 = engine_export.INT8_FALLBACKS[1]
    assert seen == [((), "tensor", 0.5), (level1, "tensor", 0.5), (level1, "row", 0.8)]
    details = m.variants["int8"].details
    assert details["activations"] == "row" and tuple(details["kept_fp32_patterns"]) == level1
    graph = onnx.load(str(tmp_path / "e" / "decoder.int8.onnx"), load_external_data=False).graph
    assert "MatMulInteger" in {n.op_type for n in graph.node}


def test_fp32_is_judged_on_the_long_group_too(tiny_checkpoints, tmp_path, monkeypatch):
    _reverse_long_group(monkeypatch, "fp32")
    with pytest.raises(ExportError, match="fp32 export failed validation"):
        export_engine(tiny_checkpoints["qwen2_vl"], tmp_path / "e", ExportOptions(dtypes=("fp32", "bf16")))


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
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        export_engine(ckpt, existing)

    def disk_full(self, precision, keep=()):
        (self.dir / "vision.fp32.onnx").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine_export._Builder, "build", disk_full)
    with pytest.raises(ExportError, match="disk full"):
        export_engine(ckpt, tmp_path / "full", ExportOptions(dtypes=("fp32",)))
    assert not (tmp_path / "full").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".full.partial")]


def test_cli_refuses_tensorrt_and_existing_output(tiny_checkpoints, tmp_path, capsys):
    from export.__main__ import main

    assert main(["--checkpoint", str(tiny_checkpoints["qwen2_vl"]), "--out", str(tmp_path), "--tensorrt"]) == 2
    assert "not implemented yet" in capsys.readouterr().err
    # arguments the export cannot take are exit code 2 (3 is for a refused engine or the file system)
    assert main(["--checkpoint", str(tiny_checkpoints["qwen2_vl"]), "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--checkpoint", str(tiny_checkpoints["qwen2_vl"]), "--out", str(tmp_path / "y"), "--dtype", "fp64"]) == 2
    assert "--dtype takes a list of fp32, int8, bf16; got fp64" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err


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
        from gmr_fast import Reranker
        reranker = Reranker({str(engine_dir)!r})
        image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
        scores = reranker.score([("q", "d"), ({{"text": "q", "image": image}}, {{"image": image}}), ("q", "e")])
        assert scores.shape == (3,) and np.isfinite(scores).all()
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_graph_modules_equal_hf_modules(tiny_checkpoints, rng):
    """The torch graph modules (what is exported) against HF's own modules, from the same
    checkpoint: vision tower embeddings and decoder scores (tiny fp32: <= 1e-5, ~1e-6 measured)."""
    from export.checkpoint import CheckpointReader
    from export.reference import family_of, load_model
    from gmr_fast.gmr_config import GmrConfig
    from gmr_fast.graphs.decoder import ScoreDecoder
    from gmr_fast.graphs.vision import VisionDims, VisionEncoder
    from gmr_fast.preprocess import preprocess_images

    for family_name, ckpt in tiny_checkpoints.items():
        family = family_of(ckpt)
        config = family.hf_config(ckpt)
        spec = family.preprocess_spec(json.loads((ckpt / "preprocessor_config.json").read_text()),
                                      config.vision_config.to_dict(), GmrConfig.load(ckpt))
        reader = CheckpointReader(ckpt)
        dims, vdims = family.decoder_dims(config), family.vision_dims(config, spec)
        with torch.device("meta"):
            decoder, vision = ScoreDecoder(dims), VisionEncoder(VisionDims.from_dict(vdims))
        for module, sources in ((decoder, family.decoder_sources(dims, 9693, 2152, "lm_head.weight" in reader)),
                                (vision, family.vision_sources(vdims))):
            module.to_empty(device="cpu")
            for name, p in module.named_parameters():
                p.data = torch.from_numpy(reader.resolve(sources[name]))
            for name, value in module.constant_buffers().items():
                module.get_buffer(name).data = value
        hf = load_model(ckpt)
        images = [rng.integers(0, 256, (int(rng.integers(28, 200)), int(rng.integers(28, 200)), 3), dtype=np.uint8)
                  for _ in range(3)]
        batch = preprocess_images(images)
        feeds = {k: torch.from_numpy(v) for k, v in family.vision_feeds(batch.image_grid_thw, spec).items()}
        with torch.no_grad():
            ours = vision(torch.from_numpy(batch.pixel_values), **feeds)
            theirs = hf.model.visual(torch.from_numpy(batch.pixel_values),
                                     grid_thw=torch.from_numpy(batch.image_grid_thw)).pooler_output
        assert (ours - theirs).abs().max() <= 1e-5, family_name


def test_reference_scores_are_reused_across_exports(tiny_checkpoints, tmp_path, monkeypatch):
    """A second export of the same checkpoint takes the fp32 reference's scores from the cache
    (the reference model is never built), a larger validation set computes only its new pairs,
    and the variants are still validated against those scores."""
    ckpt, cache = tiny_checkpoints["qwen2_vl"], tmp_path / "cache"
    small = dict(validation_queries=2, validation_documents=4, validation_long_documents=0, reference_cache=cache)
    first = export_engine(ckpt, tmp_path / "a", ExportOptions(dtypes=("fp32",), **small))
    assert first.validation["reference_pairs_cached"] == 0 and len(list(cache.glob("*.json"))) == 1

    real, computed = engine_export.ReferenceScorer, []

    class Counting(real):
        def score(self, pairs, *a, **k):
            computed.append(len(pairs))
            return super().score(pairs, *a, **k)

    monkeypatch.setattr(engine_export, "ReferenceScorer", Counting)
    again = export_engine(ckpt, tmp_path / "b", ExportOptions(dtypes=("fp32", "bf16"), **small))
    assert computed == [] and again.validation["reference_pairs_cached"] == 8
    fig, fig2 = first.variants["fp32"].validation, again.variants["fp32"].validation
    assert fig2["reference_range"] == fig["reference_range"]  # the very scores the first export computed
    assert fig2["max_rel_error"] <= 1e-3 and again.variants["bf16"].validation["query_kendall_tau_mean"] >= 0.9
    # validation_groups draws its groups in order from one seed: with 3 queries the first two
    # groups are the same pairs, and only the third group's 4 are new
    more = export_engine(ckpt, tmp_path / "c", ExportOptions(dtypes=("fp32",), **{**small, "validation_queries": 3}))
    assert computed == [4] and more.validation["reference_pairs_cached"] == 8


def test_reference_cache_is_keyed_by_content_and_never_trusts_a_bad_file(tmp_path, caplog):
    import logging

    from export.reference_cache import ReferenceCache, pair_key

    image = np.zeros((28, 28, 3), np.uint8)
    keys = [pair_key("i", "q", "d"), pair_key("j", "q", "d"), pair_key("i", "q", {"text": "d"}),
            pair_key("i", {"image": image}, "d"), pair_key("i", {"image": image.reshape(28, 84, 1)}, "d"),
            pair_key("i", {"image": image.astype(np.int16)}, "d"), pair_key("i", {"text": "q", "image": image}, "d")]
    assert len(set(keys)) == len(keys) and pair_key("i", "q", "d") == keys[0]
    assert pair_key("i", "q", tmp_path / "x.png") is None  # a path's content may change under its name

    calls = []

    def compute(pairs):
        calls.append(list(pairs))
        return np.arange(len(pairs), dtype=np.float32) + 0.5

    pairs = [("q", "a"), ("q", "b"), ("q", tmp_path / "x.png")]
    cache = ReferenceCache(tmp_path, {"weights_sha256": "1"})
    scores, hits = cache.score(pairs, "i", compute)
    assert hits == 0 and scores.tolist() == [0.5, 1.5, 2.5]
    scores, hits = ReferenceCache(tmp_path, {"weights_sha256": "1"}).score(pairs, "i", compute)
    assert hits == 2 and calls[-1] == [pairs[2]] and scores.tolist() == [0.5, 1.5, 0.5]  # the path: always computed
    _, hits = ReferenceCache(tmp_path, {"weights_sha256": "2"}).score(pairs[:2], "i", compute)
    assert hits == 0  # another checkpoint identity: another file
    # a file that does not parse, or that claims another identity, is reported and recomputed
    path = ReferenceCache(tmp_path, {"weights_sha256": "1"}).path
    for text in ("{not json", json.dumps({"identity": {"weights_sha256": "3"}, "scores": {keys[0]: 9.0}})):
        path.write_text(text)
        with caplog.at_level(logging.WARNING, logger="gmr_fast"):
            scores, hits = ReferenceCache(tmp_path, {"weights_sha256": "1"}).score(pairs[:2], "i", compute)
        assert hits == 0 and scores.tolist() == [0.5, 1.5] and "unreadable" in caplog.text
        caplog.clear()
    assert json.loads(path.read_text())["identity"] == {"weights_sha256": "1"}  # rewritten whole


def test_no_reference_cache_keeps_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("GMR_FAST_CACHE_DIR", str(tmp_path / "cache"))
    m = export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e",
                      ExportOptions(dtypes=("fp32",), validation_queries=1, validation_documents=3,
                                    validation_long_documents=0, reference_cache=False))
    assert m.validation["reference_pairs_cached"] == 0 and not (tmp_path / "cache").exists()
