"""Unit tests of the runtime's stages without any model: scheduling (token, memory and prefix
budgets), the batch builder (both padding sides, continuation positions), options and their CLI
flags, manifest checks, prompt prefixes at the token boundary, the error hierarchy. None of this
needs torch; `test_unit_tests_run_without_torch` proves it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gmr_fast
from gmr_fast import _core, errors
from gmr_fast.gmr_config import GmrConfig
from gmr_fast.manifest import FORMAT_VERSION, load_manifest
from gmr_fast.options import add_arguments, fingerprint, from_args, parse_key_values
from gmr_fast.positions import rope_positions
from gmr_fast.prompt import Item, PromptBuilder
from gmr_fast.reranker import RerankerOptions
from gmr_fast.schedule import Limits, Sequence, build_decoder_batch, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_error_is_a_gmr_error():
    for name in ("CoreError", "ConfigError", "ImageError", "PromptError", "EngineError", "BackendError",
                 "CheckpointError", "ExportError"):
        assert issubclass(getattr(errors, name), errors.GmrError), name
    assert _core.CoreError is errors.CoreError
    with pytest.raises(errors.GmrError, match="max_batch_tokens and max_batch_size must be positive"):
        _core.schedule_batches(np.array([3]), np.zeros(0, np.int64), 0, 1, 0.5, 0.0, 0.0, 0.0)


def test_scheduler_respects_tokens_sizes_buckets_and_memory(rng):
    for _ in range(60):
        n = int(rng.integers(1, 150))
        lengths = rng.integers(1, 2000, n)
        context = rng.integers(0, 1500, n) if rng.random() < 0.5 else None
        limits = Limits(int(rng.integers(500, 20000)), int(rng.integers(1, 48)), float(rng.choice([0.0, 0.5, 0.8, 1.0])),
                        float(rng.choice([0.0, 1e3, 2e5])), float(rng.choice([0.0, 64.0, 192.0])),
                        float(rng.choice([0.0, 5e8, 3e9])))
        batches = limits.pack(lengths, context)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(n))  # every row exactly once
        assert (np.diff(lengths[flat]) <= 0).all()  # longest first
        ctx = np.zeros(n, np.int64) if context is None else context
        for b in batches:
            longest = lengths[b].max()
            if len(b) == 1:
                continue  # a row that alone exceeds a limit still runs, alone
            assert len(b) <= limits.max_batch_size and len(b) * longest <= limits.max_batch_tokens
            assert (lengths[b] >= limits.min_fill * longest).all()
            if limits.max_batch_bytes:
                assert limits.bytes(len(b), int(longest), int(ctx[b].max())) <= limits.max_batch_bytes


def test_memory_budget_shrinks_batches_when_attention_grows():
    limits = Limits(100000, 64, 0.0, 1e3, 192.0, 1e9)
    short = limits.pack(np.full(64, 100))
    long_context = limits.pack(np.full(64, 100), np.full(64, 1300))
    assert len(short) == 1 and len(long_context) > 1  # the same rows, but the prefix keys cost attention
    assert all(limits.bytes(len(b), 100, 1300) <= 1e9 for b in long_context)


def test_plan_waves_keep_prefix_memory_bounded():
    prefix_lengths = [1300, 40, 1300, 600, 40]
    suffixes = {p: (p % 5, 50 + p) for p in range(40)}  # 8 pairs per prefix
    whole = {40: 300, 41: 20}
    decode = Limits(4096, 16, 0.5)
    kv_per_token = 1000
    schedule = plan(whole, suffixes, prefix_lengths, decode, decode, kv_per_token, max_kv_bytes=2000 * kv_per_token)
    kinds = [s.kind for s in schedule.steps]
    assert kinds.count("whole") >= 1 and set(kinds) == {"prefix", "suffix", "whole"}
    seen_pairs, alive = [], set()
    for i, step in enumerate(schedule.steps):
        if step.kind == "prefix":
            alive |= {int(k) for k in step.rows}
            assert sum(prefix_lengths[k] for k in alive) <= 2000 or len(alive) == len(step.rows)
        elif step.kind == "suffix":
            assert {suffixes[int(p)][0] for p in step.rows} <= alive  # prefixes computed before use
            seen_pairs += [int(p) for p in step.rows]
        else:
            seen_pairs += [int(p) for p in step.rows]
        for k in schedule.releases.get(i, []):
            alive.discard(k)
    assert sorted(seen_pairs) == sorted(list(suffixes) + list(whole))
    assert not alive  # every wave released


def test_plan_keeps_exact_pairs_and_their_prefixes_apart():
    """Pairs marked exact (image pairs run fp32 beside bf16) never share a batch with the others,
    nor do their prefixes; the unmarked plan is the one without the argument; a prefix whose
    pairs disagree is refused."""
    prefix_lengths = [300, 40, 300, 60]
    suffixes = {p: (p % 4, 20 + 3 * p) for p in range(40)}
    whole = {40: 300, 41: 20, 42: 64, 43: 90}
    exact = {p for p in suffixes if p % 4 in (1, 2)} | {41, 43}
    decode = Limits(4096, 32, 0.0)
    schedule = plan(whole, suffixes, prefix_lengths, decode, decode, 1000, 700 * 1000, exact)
    seen = []
    for step in schedule.steps:
        rows = [int(r) for r in step.rows]
        if step.kind == "prefix":
            assert all((k in (1, 2)) == step.exact for k in rows), step
        else:
            assert all((p in exact) == step.exact for p in rows), step
            seen += rows
    assert sorted(seen) == sorted(list(suffixes) + list(whole))
    assert {s.exact for s in schedule.steps if s.kind == "whole"} == {True, False}
    plain = plan(whole, suffixes, prefix_lengths, decode, decode, 1000, 700 * 1000)
    assert not any(s.exact for s in plain.steps)
    same = plan(whole, suffixes, prefix_lengths, decode, decode, 1000, 700 * 1000, set())
    assert [(s.kind, s.rows.tolist(), s.wave) for s in same.steps] == [(s.kind, s.rows.tolist(), s.wave)
                                                                       for s in plain.steps]
    with pytest.raises(ValueError, match="all be exact or all not"):
        plan(whole, suffixes, prefix_lengths, decode, decode, 1000, 700 * 1000, {0})
    assert all(s.products for s in schedule.steps)
    # exact pairs run without the route's exact products (plain: a route's text queries) run apart
    # again, their prefixes too
    without = {p for p in exact if p in whole or p % 4 == 2} - {43}
    split = plan(whole, suffixes, prefix_lengths, decode, decode, 1000, 700 * 1000, exact, without)
    seen = []
    for step in split.steps:
        rows = [int(r) for r in step.rows]
        if step.kind == "prefix":
            assert all((k in (1, 2), k == 2) == (step.exact, not step.products) for k in rows), step
        else:
            assert all((p in exact, p in without) == (step.exact, not step.products) for p in rows), step
            seen += rows
    assert sorted(seen) == sorted(list(suffixes) + list(whole))
    assert {(s.exact, s.products) for s in split.steps if s.kind != "prefix"} == {(False, True), (True, True),
                                                                                 (True, False)}
    with pytest.raises(ValueError, match="plain pairs are exact pairs"):
        plan(whole, suffixes, prefix_lengths, decode, decode, 1000, 700 * 1000, exact, {0})
    with pytest.raises(ValueError, match="all plain or all not"):
        plan(whole, suffixes, prefix_lengths, decode, decode, 1000, 700 * 1000, exact, {2})


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_batch_builder_positions_both_padding_sides_and_continuations(left, rng):
    seqs, refs, starts = [], [], []
    for _ in range(7):
        grids = [(int(rng.integers(1, 6)), int(rng.integers(1, 6))) for _ in range(int(rng.integers(0, 3)))]
        ids, cursor, spans = [], 0, []
        for gh, gw in grids:
            text = int(rng.integers(0, 7))
            ids += [7] * text + [151655] * (gh * gw)
            spans.append((cursor + text, cursor + text + gh * gw, gh, gw))
            cursor += text + gh * gw
        ids += [9] * int(rng.integers(1, 9))
        start = int(rng.integers(0, 50))
        seqs.append(Sequence(np.array(ids, np.int64), np.array(spans, np.int64).reshape(-1, 4), []))
        refs.append(start + rope_positions(len(ids), [(a, b) for a, b, _, _ in spans], [(h, w) for _, _, h, w in spans]))
        starts.append(start)
    batch = build_decoder_batch(np.arange(7), seqs, 151643, left, np.array(starts))
    width = batch.input_ids.shape[1]
    for r, seq in enumerate(seqs):
        n = len(seq)
        real = slice(width - n, width) if left else slice(0, n)
        pad = slice(0, width - n) if left else slice(n, width)
        assert batch.input_ids[r, real].tolist() == seq.ids.tolist() and (batch.input_ids[r, pad] == 151643).all()
        assert batch.attention_mask[r, real].all() and not batch.attention_mask[r, pad].any()
        assert (batch.position_ids[:, r, real] == refs[r]).all() and (batch.position_ids[:, r, pad] == 1).all()
        assert batch.next_position[r] == refs[r].max() + 1  # a continuation starts after the largest position
    assert batch.real_tokens == sum(len(s) for s in seqs) and batch.padded_tokens == 7 * width


def test_options_give_flags_and_fingerprints():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_arguments(parser, RerankerOptions)
    args = parser.parse_args(["--max-batch-tokens", "1000", "--no-share-prefix", "--precision", "int8", "--threads", "3",
                              "--backend-option", "arena=true", "--backend-option", "optimization=basic"])
    options = from_args(RerankerOptions, args)
    options.validate()
    assert options.max_batch_tokens == 1000 and options.share_prefix is False and options.num_threads == 3
    assert options.backend_options == {"arena": True, "optimization": "basic"}
    fp = fingerprint(options)
    assert fp["precision"] == "int8" and "image_cache_size" not in fp  # caching never changes a score
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp16"])
    with pytest.raises(gmr_fast.ConfigError, match="KEY=VALUE"):
        parse_key_values(["novalue"])
    with pytest.raises(gmr_fast.ConfigError, match="min_fill must be in"):
        dataclasses.replace(RerankerOptions(), min_fill=2.0).validate()


def _manifest(tmp_path, **changes):
    from gmr_fast.manifest import DECODER_INPUTS

    io = lambda names: [{"name": n, "dtype": "int64", "shape": [1]} for n in names]  # noqa: E731
    data = {"format_version": FORMAT_VERSION, "family": "qwen2_vl", "source": {}, "gmr": GmrConfig().to_dict(),
            "tokens": {"yes": 9693, "no": 2152, "image_pad": 151655, "vision_start": 151652, "vision_end": 151653,
                       "pad": 151643},
            "preprocessing": {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3,
                              "image_std": [0.5] * 3, "rescale_factor": 1 / 255, "min_pixels": 3136,
                              "max_pixels": 1003520, "window_size": None},
            "decoder": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                        "intermediate_size": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                        "mrope_section": [4, 2, 2], "tie_word_embeddings": False, "image_token_id": 151655},
            "vision": {}, "validation": {},
            "variants": {"fp32": {"precision": "fp32", "backend": "onnxruntime", "validation": {}, "weights": {},
                                  "graphs": {"vision": {"file": "v.onnx", "inputs": io(["pixel_values", "rot_pos_ids",
                                                                                     "full_gather", "full_valid",
                                                                                     "full_inverse"]), "outputs": []},
                                             "decoder": {"file": "d.onnx", "inputs": io(DECODER_INPUTS), "outputs": []}}}}}
    for key, value in changes.items():
        data[key] = value(data[key]) if callable(value) else value
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


def test_manifest_is_typed_and_refuses_what_the_runtime_cannot_run(tmp_path):
    m = load_manifest(_manifest(tmp_path))
    assert m.preprocessing.image_mean == (0.5, 0.5, 0.5) and m.preprocessing.visual_tokens(56, 84) == 6
    assert m.decoder.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4 and m.precisions == ("fp32",)
    with pytest.raises(gmr_fast.EngineError, match="no int8 variant.*re-export with --dtype int8"):
        m.variant("int8")
    with pytest.raises(gmr_fast.EngineError, match="engine format 1 is not the one this runtime runs.*re-export"):
        load_manifest(_manifest(tmp_path, format_version=1))

    def drop_past(variants):
        inputs = variants["fp32"]["graphs"]["decoder"]["inputs"]
        variants["fp32"]["graphs"]["decoder"]["inputs"] = [i for i in inputs if i["name"] != "past_kv"]
        return variants
    with pytest.raises(gmr_fast.EngineError, match=r"lacks input\(s\) \['past_kv'\].*re-export"):
        load_manifest(_manifest(tmp_path, variants=drop_past))
    with pytest.raises(gmr_fast.EngineError, match="model family 'llava' is not supported"):
        load_manifest(_manifest(tmp_path, family="llava"))
    with pytest.raises(gmr_fast.EngineError, match="no manifest.json"):
        load_manifest(tmp_path / "nowhere")


def test_prefix_ids_are_a_prefix_of_the_whole_prompt_unless_bpe_merges(tokenizer_json):
    builder = PromptBuilder(tokenizer_json, GmrConfig())
    query = Item("what is a cat?")
    prefix = builder.encode_prefix("Find it.", query)
    for doc, shared in [("Cats are small.", True), (" leading space", True), ("42 is a number", True),
                        ("数据 in Chinese", True), (".starts with a dot", False), ("(parenthesis)", False)]:
        whole = builder.encode("Find it.", query, Item(doc)).ids
        assert np.array_equal(whole[:len(prefix.ids)], prefix.ids) == shared, doc
    with_image = builder.encode_prefix("Find it.", Item("q", image="x.png"), 6)
    assert with_image.image_spans and with_image.image_spans[0][1] - with_image.image_spans[0][0] == 6


@pytest.mark.e2e
def test_unit_tests_run_without_torch():
    """Reruns the unit tests with torch and transformers impossible to import."""
    env = {**os.environ, "GMR_FAST_BLOCK_TORCH": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "unit", "-p", "no:cacheprovider", "-rs"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


class _Manifest:
    """The two things choose_precision reads from an engine: its variants and their figures."""

    def __init__(self, taus: dict, hidden_size: int = 2048, torch_only: tuple = ("bf16",), int8_weight_max: int = 64):
        self.taus = taus
        self.int8_weight_max = int8_weight_max  # 127: an engine exported before 7-bit weights
        self.decoder = type("D", (), {"hidden_size": hidden_size})()
        self.torch_only = torch_only  # variants with no ONNX graphs (bf16; fp32 over bf16 weight files)

    @property
    def precisions(self):
        return tuple(self.taus)

    def variant(self, precision):
        if precision not in self.taus:
            raise errors.EngineError(f"no {precision} variant")
        torch_only = precision in self.torch_only
        details = {"int8_weight_max": self.int8_weight_max} if precision == "int8" else {}
        return type("V", (), {"backend": "torch" if torch_only else "onnxruntime", "details": details,
                              "graphs": {} if torch_only else {"decoder": None, "vision": None},
                              "validation": {"query_kendall_tau_mean": self.taus[precision]}})()


@pytest.mark.parametrize("cpu, taus, expected", [
    # AMX: bf16 first, then int8, then fp32; a variant counts only at validated tau >= 0.98
    ("amx", {"fp32": 1.0, "int8": 0.99, "bf16": 0.985}, "bf16"),
    ("amx", {"fp32": 1.0, "int8": 0.99, "bf16": 0.95}, "int8"),
    ("amx", {"fp32": 1.0, "int8": 0.92, "bf16": 0.95}, "fp32"),
    # an AVX512-VNNI / AVX2 processor: int8, then fp32 (bf16 has no hardware path)
    ("vnni", {"fp32": 1.0, "int8": 0.99, "bf16": 0.995}, "int8"),
    ("vnni", {"fp32": 1.0, "int8": 0.93, "bf16": 0.995}, "fp32"),
    # AVX512-BF16 without AMX: bf16 first only where torch's bf16 GEMM measured >= 1.5x its fp32
    # one (an AMD EPYC Zen 5: 3.2-4.9x; an AMX Xeon with its tiles refused: 0.45-0.5x)
    ("bf16-fast", {"fp32": 1.0, "int8": 0.99, "bf16": 0.985}, "bf16"),
    ("bf16-fast", {"fp32": 1.0, "int8": 0.99, "bf16": 0.95}, "int8"),
    ("bf16-slow", {"fp32": 1.0, "int8": 0.99, "bf16": 0.995}, "int8"),
    ("bf16-slow", {"fp32": 1.0, "int8": 0.93, "bf16": 0.995}, "fp32"),
    # without AMX int8 goes before fp32 only where onnxruntime's int8 GEMM measured >= 1.5x its
    # fp32 one (AVX512-VNNI: 2.1-3.1x; an AVX2-only AMD EPYC of family 23: 1.1-1.3x)
    ("avx2-fast", {"fp32": 1.0, "int8": 0.99}, "int8"),
    ("avx2-slow", {"fp32": 1.0, "int8": 0.99, "bf16": 0.995}, "fp32"),
    ("avx2-slow", {"fp32": 1.0, "int8": 0.93}, "fp32"),
    # no fp32 to fall back on: the fastest variant, said so
    ("vnni", {"int8": 0.91}, "int8"),
    ("avx2-slow", {"int8": 0.91}, "int8"),
    ("amx", {"int8": 0.91, "bf16": 0.95}, "bf16"),
])
def test_auto_takes_the_fastest_variant_that_ranks_like_fp32(monkeypatch, cpu, taus, expected):
    from gmr_fast import hardware
    from gmr_fast import reranker as rr

    flags = {"amx": {"avx2", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16", "avx512_bf16"},
             "vnni": {"avx2", "avx512_vnni"}, "avx2-fast": {"avx2"}, "avx2-slow": {"avx2"}
             }.get(cpu, {"avx2", "avx512_vnni", "avx512_bf16"})
    monkeypatch.setattr(hardware, "has", lambda f: f in flags)

    def probe():  # the GEMM probe runs only where the flag alone cannot tell
        assert cpu.startswith("bf16-"), cpu
        return {"bf16-fast": 3.5, "bf16-slow": 0.5}[cpu]

    def int8_probe():  # AMX's int8 GEMM is not probed
        assert cpu != "amx", cpu
        return {"avx2-slow": 1.2}.get(cpu, 2.5)

    monkeypatch.setattr(hardware, "torch_bf16_speedup", probe)
    monkeypatch.setattr(hardware, "onnxruntime_int8_speedup", int8_probe)
    monkeypatch.setattr(hardware, "torch_fp32_gemm_is_avx2_only", lambda: False)
    monkeypatch.setattr(rr, "_torch_available", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    chosen, backend, why = rr.choose_precision(_Manifest(taus), "auto", None, "cpu")
    assert chosen == expected, why
    # fp32 runs on torch where torch imports (FP32_ON_TORCH); int8 has onnxruntime's operators only
    assert backend == ("onnxruntime" if expected == "int8" else "torch")
    if expected != "fp32" and "fp32" in taus:
        assert f"{taus[expected]:.3f} >= 0.98" in why
    if expected == "fp32":
        assert "passed over" in why
    if cpu == "avx2-slow" and "int8" in taus and "fp32" in taus:  # the measurement is the reason
        assert "int8 passed over: onnxruntime's int8 GEMM (AVX2) measured 1.2x fp32" in why, why
    if "fp32" not in taus:
        assert "fp32 is absent" in why
    # asking overrides the rule; CUDA runs bf16
    assert rr.choose_precision(_Manifest(taus), "int8", None, "cpu")[0] == "int8"
    if "bf16" in taus:
        assert rr.choose_precision(_Manifest(taus), "auto", None, "cuda")[0] == "bf16"


@pytest.mark.parametrize("flags, passed_over", [({"avx2"}, True), ({"avx2", "avx512_vnni"}, False),
                                                 ({"avx2", "avx_vnni"}, False),
                                                 ({"avx2", "amx_tile", "amx_int8"}, False)])
def test_auto_passes_over_8_bit_int8_weights_where_the_int8_kernel_saturates(monkeypatch, caplog, flags, passed_over):
    """An int8 engine exported before weights took 7 bits (int8_weight_max absent: 127) saturates
    onnxruntime's U8S8 kernel without VNNI (export.quantize.QGEMM_WEIGHT_MAX): ``auto`` runs fp32
    there even when the int8 GEMM is fast and the validated tau qualifies (the validation may have
    run on a VNNI machine), and asking for int8 runs it with a warning. VNNI and AMX accumulate in
    int32: int8 as before."""
    import logging

    from gmr_fast import hardware
    from gmr_fast import reranker as rr

    monkeypatch.setattr(hardware, "has", lambda f: f in flags)
    monkeypatch.setattr(hardware, "onnxruntime_int8_speedup", lambda: 2.5)
    monkeypatch.setattr(hardware, "torch_fp32_gemm_is_avx2_only", lambda: False)
    monkeypatch.setattr(rr, "_torch_available", lambda: True)
    old, new = _Manifest({"fp32": 1.0, "int8": 0.99}, int8_weight_max=127), _Manifest({"fp32": 1.0, "int8": 0.99})
    chosen, _, why = rr.choose_precision(old, "auto", None, "cpu")
    assert chosen == ("fp32" if passed_over else "int8"), why
    assert ("saturates" in why) == passed_over, why
    assert rr.choose_precision(new, "auto", None, "cpu")[0] == "int8"  # 7-bit weights: int8 everywhere
    with caplog.at_level(logging.WARNING, logger="gmr_fast"):
        chosen, _, why = rr.choose_precision(old, "int8", None, "cpu")
    assert chosen == "int8" and ("saturates" in why) == passed_over
    assert any("saturates" in r.getMessage() for r in caplog.records) == passed_over


def test_fp32_runs_on_torch_at_real_widths_where_torch_imports_and_nothing_asks_for_onnxruntime(monkeypatch):
    from gmr_fast import hardware
    from gmr_fast import reranker as rr

    m = _Manifest({"fp32": 1.0})
    monkeypatch.setattr(rr, "_torch_available", lambda: True)
    # an AMD processor with AVX-512 too: the torch backend multiplies with oneDNN there, not MKL's AVX2 code
    for amd_avx512 in (True, False):
        monkeypatch.setattr(hardware, "torch_fp32_gemm_is_avx2_only", lambda: amd_avx512)
        chosen, backend, why = rr.choose_precision(m, "fp32", None, "cpu")
        assert backend == "torch" and "sdpa" in why
    assert rr.choose_precision(m, "fp32", "torch", "cpu")[1] == "torch"  # named
    assert rr.choose_precision(m, "auto", None, "cpu")[1] == "torch"
    assert rr.choose_precision(m, "fp32", None, "cpu")[1] == "torch"
    assert rr.choose_precision(m, "fp32", "onnxruntime", "cpu")[1] == "onnxruntime"  # named
    assert rr.choose_precision(m, "fp32", None, "cpu", onnxruntime_options=True)[1] == "onnxruntime"  # providers given
    assert rr.choose_precision(_Manifest({"fp32": 1.0}, hidden_size=512), "auto", None, "cpu")[1] == "onnxruntime"  # toy
    monkeypatch.setattr(rr, "_torch_available", lambda: False)
    chosen, backend, why = rr.choose_precision(m, "auto", None, "cpu")
    assert (chosen, backend) == ("fp32", "onnxruntime") and "torch" not in why
    # fp32 over the bf16 weight files of a bf16 checkpoint: no graphs, torch only (named or not)
    over = _Manifest({"bf16": 0.95, "fp32": 1.0}, torch_only=("bf16", "fp32"))
    assert rr.choose_precision(over, "fp32", None, "cpu")[1] == "torch"
    assert rr.choose_precision(over, "fp32", None, "cpu", onnxruntime_options=True)[1] == "torch"
    with pytest.raises(errors.BackendError, match="no ONNX graphs"):
        rr.choose_precision(over, "fp32", "onnxruntime", "cpu")


@pytest.mark.parametrize("vendor, flags, expected", [("AuthenticAMD", "avx2 avx512f", True),
                                                     ("AuthenticAMD", "avx2", False),
                                                     ("GenuineIntel", "avx2 avx512f", False)])
def test_torch_fp32_is_taken_for_avx2_only_on_amd_processors_with_avx512(monkeypatch, vendor, flags, expected):
    from gmr_fast import hardware

    monkeypatch.setattr(hardware, "cpu_info", lambda: {"vendor": vendor, "flags": flags.split()})
    assert hardware.torch_fp32_gemm_is_avx2_only() is expected


def test_a_onednn_isa_cap_takes_bf16_kernels_away(monkeypatch):
    from gmr_fast import hardware

    monkeypatch.setattr(hardware, "has", lambda f: f in {"avx2", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"})
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert hardware.bf16_kernel() == "AMX"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert hardware.bf16_kernel() == "AVX512-BF16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")
    assert hardware.bf16_kernel() is None


def test_torch_cpu_runs_keep_freed_memory_instead_of_faulting_it_in_again():
    """gmr_fast.memory: with the torch backend's allocator setting, a large block freed and
    allocated again is reused (no new page faults); without it glibc unmaps and faults it in
    again. Counted in fresh processes (the setting is process-wide), by minor page faults."""
    from suite_helpers import child_json

    code = ("import json, resource\n"
            "import numpy as np\n"
            "from gmr_fast.memory import keep_freed_memory\n"
            "state = keep_freed_memory()\n"
            "np.ones(8 << 20).sum()\n"  # the first time is faulted in either way
            "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(8):\n"
            "    np.ones(8 << 20).sum()\n"  # 64 MiB, above glibc's mmap threshold
            "print(json.dumps({'state': state, 'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))\n")
    kept, default = child_json(code), child_json(code, {"GMR_FAST_MALLOC": "default"})
    assert kept["state"] == "kept" and default["state"].startswith("default")
    assert default["faults"] >= 8 and kept["faults"] <= default["faults"] // 4, (kept, default)


@pytest.mark.model
def test_torch_cpu_runs_keep_a_bounded_number_of_onednn_kernels(exported_engines):
    """gmr_fast.memory.bound_kernel_caches: a torch backend on the CPU keeps oneDNN's kernel caches
    (oneDNN's and ideep's) to ONEDNN_KERNELS shapes, set before its weights load: after that many
    new product shapes, the first is built again (a cache miss), where with the libraries' own
    1,024 it is still kept; a capacity the user set wins. The probes that may run before the backend
    (the precision choice's bf16 GEMM measurement on AVX512-BF16 CPUs, gmr_fast._dnnl's check) run
    first here, as they would there. Counted in fresh processes (the caches are process-wide, sized
    at the first kernel) from oneDNN's own log of each kernel it builds."""
    from gmr_fast.memory import ONEDNN_KERNELS

    _, engine = exported_engines["qwen2_5_vl"]
    shapes = ONEDNN_KERNELS + 6
    code = ("import json, torch\n"
            "from gmr_fast import Reranker, hardware\n"
            "from gmr_fast.backends import bf16_gemm\n"
            "hardware.torch_bf16_speedup(); bf16_gemm.load()\n"
            f"r = Reranker({str(engine)!r}, backend='torch', precision='fp32')\n"
            "w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(41, 37), None)\n"
            f"for rows in [*range(1, {shapes + 1}), 1]:\n"
            "    torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 37), w, None, 'none', [], '')\n"
            "print(json.dumps(r.choice['kernel_caches']), flush=True)\n")

    caches = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")

    def built(env: dict) -> tuple[int, str]:
        clean = {k: v for k, v in os.environ.items() if k not in caches}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**clean, "ONEDNN_VERBOSE": "profile_create", **env})
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        # the 37 -> 41 product's kernels built (not found in oneDNN's cache)
        ours = [ln for ln in lines if "create:cache_miss" in ln and "ic37" in ln and "oc41" in ln]
        return len(ours), json.loads(lines[-1])

    bounded, state = built({})
    assert state == f"{ONEDNN_KERNELS} kernels"
    assert bounded == shapes + 1, bounded  # every shape built once, and the first again
    users, state = built({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"})
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024" in state
    assert users == shapes, users  # the first shape's kernel still kept


@pytest.mark.parametrize("value", ["0", "off"])
def test_a_kernel_cache_capacity_torch_would_crash_on_is_replaced(value):
    """torch's ideep crashes (SIGSEGV) at its first kernel when LRU_CACHE_CAPACITY is not a whole
    number >= 1; gmr_fast.memory.bound_kernel_caches replaces such a value with its own bound and
    says so, and the process then runs oneDNN. In a fresh process (the setting is process-wide)."""
    from suite_helpers import child_json

    code = ("import json, os, torch\n"
            "from gmr_fast.memory import ONEDNN_KERNELS, bound_kernel_caches\n"
            "state = bound_kernel_caches()\n"
            "w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(41, 37), None)\n"
            "y = torch.ops.mkldnn._linear_pointwise(torch.randn(3, 37), w, None, 'none', [], '')\n"
            "print(json.dumps({'state': state, 'lru': os.environ['LRU_CACHE_CAPACITY'], 'rows': y.shape[0],\n"
            "                  'bound': ONEDNN_KERNELS}))\n")
    got = child_json(code, {"LRU_CACHE_CAPACITY": value, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"})
    assert got["rows"] == 3 and got["lru"] == str(got["bound"]), got
    assert f"LRU_CACHE_CAPACITY={value!r} replaced" in got["state"], got
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY=0" in got["state"], got  # oneDNN's own takes 0: kept


def test_weights_load_with_large_blocks_given_back():
    """gmr_fast.memory.weights_loading: while weights load, a large block freed goes back to the
    kernel even with the kept heap on (a weight's first copy, freed once packed, must not stay in
    the heap: GMR-7B held ~4 GB of such holes); after the load, freed blocks are kept again; a
    nested load does not end the outer one. Measured in a fresh process by resident memory."""
    from suite_helpers import child_json

    code = ("import json\n"
            "import numpy as np\n"
            "from gmr_fast.memory import keep_freed_memory, weights_loading\n"
            "def rss():\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) << 10\n"
            "def grown(block=512 << 20):\n"
            "    base = rss(); a = np.ones(block // 8); a.sum(); del a; return rss() - base\n"
            "state = keep_freed_memory()\n"
            "out = {'state': state}\n"
            "with weights_loading():\n"
            "    with weights_loading():\n"
            "        pass\n"
            "    out['loading'] = grown()\n"
            "out['after'] = grown()\n"
            "print(json.dumps(out))\n")
    got = child_json(code)
    assert got["state"] == "kept"
    assert got["loading"] < 64 << 20 and got["after"] > 256 << 20, got


@pytest.mark.parametrize("bf16_kernel", ["AMX", "AVX512-BF16", None])
def test_lanes_default_to_two_only_where_measured_faster(monkeypatch, bf16_kernel):
    """torch's eager CPU path on an AMX CPU: two runs side by side on half the threads each
    (DESIGN.md "Lanes"); elsewhere (an AMD Zen 5 measured one run on both threads faster),
    onnxruntime, CUDA and one-thread machines: one run; an explicit count always wins."""
    from gmr_fast import hardware
    from gmr_fast.reranker import choose_lanes

    monkeypatch.setattr(hardware, "bf16_kernel", lambda: bf16_kernel)
    two = 2 if bf16_kernel == "AMX" else 1
    assert choose_lanes(None, "torch", "cpu", 2)[0] == two
    assert choose_lanes(None, "torch", "cpu", 16)[0] == two
    assert choose_lanes(None, "torch", "cpu", 1)[0] == 1
    assert choose_lanes(None, "torch", "cuda", 16)[0] == 1
    assert choose_lanes(None, "onnxruntime", "cpu", 2)[0] == 1
    assert choose_lanes(3, "onnxruntime", "cpu", 2) == (3, "requested")
    with pytest.raises(errors.ConfigError):
        RerankerOptions(lanes=0).validate()


def test_onednn_bf16_gemm_check_says_why_where_it_cannot_run():
    """backends.bf16_gemm's check of gmr_fast._dnnl returns the reason, never raises, where the
    module refuses (a CoreError, as on an AVX2-only CPU, where oneDNN has no bf16 matmul: that
    error once escaped the check and failed every bf16 path of the torch backend there) or
    fails (RuntimeError), and refuses a module whose sums are not fp32-accurate."""
    from gmr_fast.backends import bf16_gemm

    def module(fail=None, offset=0.0):
        class Packed:
            def __init__(self, w):
                if fail is not None:
                    raise fail
                self.w = (w.view(np.uint16).astype(np.uint32) << 16).view(np.float32)

            def multiply(self, x, y):
                xf = (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                y[...] = xf.astype(np.float64) @ self.w.astype(np.float64).T + offset

        return type("FakeDnnl", (), {"PackedBf16Weight": Packed})

    refused = errors.CoreError("bf16 GEMM: oneDNN: could not create a primitive descriptor for a matmul primitive")
    why = bf16_gemm._probe(module(refused))
    assert why.startswith("oneDNN runs no bf16 GEMM on this CPU") and "primitive descriptor" in why
    assert "no AMX" in bf16_gemm._probe(module(RuntimeError("no AMX")))
    assert "fp32-accurate" in bf16_gemm._probe(module(offset=1e-3))
    assert bf16_gemm._probe(module()) is None


def test_the_ray_driver_holds_shared_embeddings_for_the_chunks_not_yet_handed_out():
    """ray_pool._SharedImages: the references to embeddings actors put in the object store, held
    within a budget for the next chunk that uses each image, the one needed furthest ahead given
    up first, and let go once the last chunk that uses it is handed out."""
    from gmr_fast.jobs import ImagePlan, Task
    from gmr_fast.ray_pool import _SharedImages

    def task(i, doc_image):
        return Task(i, Item("q", None), Item("d", doc_image), None, {}, f"pair {i}")

    # chunks 0..3 (one pair each): A B C A, then B
    tasks = [task(i, f"/{name}.png") for i, name in enumerate("ABCAB")]
    plan = ImagePlan(tasks, [(i, i + 1) for i in range(5)], list(range(5)), 0, False)
    shared = _SharedImages(plan, budget_bytes=10)
    ref = lambda name: ("", f"/{name}.png")  # noqa: E731
    # chunks 0 and 1 handed out; chunk 1's actor returns B (next used by chunk 4), chunk 0's A (chunk 3)
    shared.add({ref("B"): (("kb",), "objB", 6)}, 1)
    assert set(shared.held) == {ref("B")} and shared.bytes == 6
    shared.add({ref("A"): (("ka",), "objA", 6)}, 1)  # over the budget: A is needed sooner, B goes
    assert set(shared.held) == {ref("A")} and shared.bytes == 6
    shared.add({ref("B"): (("kb",), "objB", 6)}, 1)  # and B, needed later than A, is not taken back
    assert set(shared.held) == {ref("A")}
    shared.add({ref("C"): (("kc",), "objC", 2)}, 2)  # C's only chunk (2) is handed out: nobody needs it
    assert set(shared.held) == {ref("A")}
    part = plan.chunk(3, tasks[3:4])  # chunk 3 takes A, its last use: the reference goes with it
    assert shared.for_chunk(part) == {ref("A"): (("ka",), "objA")} and shared.held == {} and shared.bytes == 0
    shared.add({ref("B"): (("kb",), "objB", 6)}, 3)
    shared.add({ref("A"): (("ka",), "objA2", 6)}, 3)  # no later use
    assert set(shared.held) == {ref("B")}


@pytest.mark.parametrize("query_apart", [False, True])
def test_image_plan_names_each_image_by_file_and_keeps_it_for_its_next_chunk(query_apart):
    """jobs.ImagePlan from a job's tasks: per image file the chunks (in run order) that use it;
    a chunk's CachePlan keeps the keys of its images that a later chunk uses, with that chunk's
    position. Where the Reranker encodes a query's images apart (their own cache keys), a file
    used as a query and as a document is two images to the plan."""
    from gmr_fast.jobs import ImagePlan, Task

    def task(i, query_image, doc_image):
        return Task(i, Item("q", query_image), Item("d", doc_image), None, {}, f"pair {i}")

    tasks = [task(0, "/a.png", "/b.png"), task(1, "/a.png", "/c.png"),  # chunk 0
             task(2, None, "/b.png"), task(3, "bad", None),  # chunk 1 (pair 3 failed before scoring)
             task(4, None, "/a.png"), task(5, None, "/c.png")]  # chunk 2 (not pending: already written)
    tasks[3].error = "failed"
    plan = ImagePlan(tasks, [(0, 2), (2, 4), (4, 6)], [0, 1], 100, query_apart)
    assert plan.uses == ({("query", "/a.png"): [0], ("", "/b.png"): [0, 1], ("", "/c.png"): [0]} if query_apart else
                         {("", "/a.png"): [0], ("", "/b.png"): [0, 1], ("", "/c.png"): [0]})
    assert plan.recurring == 1
    keys = [[("query", "ka") if query_apart else ("ka",), ("kb",)], [("query", "ka") if query_apart else ("ka",), ("kc",)]]
    first = plan.chunk(0, tasks[:2]).cache_plan(tasks[:2], keys)
    assert (first.now, first.budget_bytes, first.next_use) == (0, 100, {("kb",): 1})
    assert plan.chunk(1, [tasks[2]]).cache_plan([tasks[2]], [[("kb",)]]).next_use == {}  # its last use: dropped after it
    # two files of the same content (one cache key): kept for the sooner of their next uses
    files = [task(0, None, "/x.png"), task(1, None, "/y.png"), task(2, None, "/y.png"), task(3, None, "/x.png")]
    same = ImagePlan(files, [(0, 2), (2, 3), (3, 4)], [0, 1, 2], 100, query_apart)
    assert same.chunk(0, files[:2]).cache_plan(files[:2], [[("k",)], [("k",)]]).next_use == {("k",): 1}
