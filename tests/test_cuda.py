"""The torch backend on a CUDA GPU. Skipped where torch sees no CUDA device (CI); run on a lent
GPU machine (``pytest tests/test_cuda.py``, as benchmarks/cuda_mrb.py's run does first).

On CUDA the engine's bf16 variant runs (``device="cuda"``; fp32 is the CPU's), so scores are held
to what bf16 is accepted by everywhere: the export's ranking criterion against the fp32
reference (validate.Criterion: per-query Kendall tau >= 0.9, top-10 overlap), on fresh random
validation groups of every modality mix. cuBLAS and the GPU's attention kernels round at other
places than the CPU's bf16 path, so neither bit-equality with it nor a score tolerance tighter
than bf16's own noise is owed; what is checked numerically is that the GPU's distance from fp32
is of bf16's size: its mean |score - fp32| at most 4x that of the CPU's bf16 path on the same
pairs (both round every GEMM input to 2^-8 and accumulate in fp32; the factor leaves room for
where each rounds, not for a wrong position, mask or prefix, which moves scores by the spread)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


def test_cuda_bf16_ranks_as_fp32_for_every_layout(torch_cuda, tiny_checkpoints, tmp_path, rng):
    """Both padding sides, shared prefixes on and off, batched and one pair per call: every run
    passes the export's bf16 criterion against HF fp32, and prefix sharing (keys and values kept
    on the GPU between the prefix and its documents) gives the whole prompt's ranking."""
    from export import validate
    from export.engine_export import ExportOptions, export_engine
    from export.reference import ReferenceScorer
    from gmr_fast import Reranker

    ckpt = tiny_checkpoints["qwen2_5_vl"]
    export_engine(ckpt, tmp_path / "e", ExportOptions(dtypes=("bf16",), reference_cache=False))
    groups = validate.validation_groups(4, 12, int(rng.integers(1 << 30)))
    pairs = [(q, d) for q, docs in groups for d in docs]
    sizes = [len(docs) for _, docs in groups]
    expected = ReferenceScorer(ckpt).score(pairs)
    cpu = Reranker(tmp_path / "e", precision="bf16").score(pairs)
    cpu_err = float(np.abs(cpu - expected).mean())
    criterion = validate.Criterion()
    for side, share in (("left", True), ("right", True), ("left", False)):
        r = Reranker(tmp_path / "e", device="cuda", padding_side=side, share_prefix=share)
        assert r.precision == "bf16" and r.choice["backend"] == "torch"
        got = r.score(pairs)
        assert r.last_stats["shared_pairs"] > 0 if share else r.last_stats["shared_pairs"] == 0
        figures = validate.compare(expected, got, sizes)
        assert validate.verdict("bf16", figures, criterion) is None, (side, share, figures)
        err = float(np.abs(got - expected).mean())
        assert err <= 4 * cpu_err + 1e-6, (side, share, err, cpu_err)
    single = np.array([r.score([p])[0] for p in pairs], np.float32)
    assert validate.verdict("bf16", validate.compare(expected, single, sizes), criterion) is None
    assert float(np.abs(single - expected).mean()) <= 4 * cpu_err + 1e-6


def test_cuda_rank_and_image_cache(torch_cuda, tiny_checkpoints, tmp_path, rng):
    """rank() on the GPU orders as score() does, and image embeddings kept across calls (on the
    GPU) give the scores of a fresh encode."""
    from export import validate
    from export.engine_export import ExportOptions, export_engine
    from gmr_fast import Reranker

    ckpt = tiny_checkpoints["qwen2_5_vl"]
    export_engine(ckpt, tmp_path / "e", ExportOptions(dtypes=("bf16",), reference_cache=False))
    query, docs = validate.validation_groups(2, 10, int(rng.integers(1 << 30)))[1]  # an image query
    r = Reranker(tmp_path / "e", device="cuda", image_cache_mb=256)
    scores = r.score([(query, d) for d in docs])
    ranked = r.rank(query, docs)
    assert [x.index for x in ranked] == sorted(range(len(docs)), key=lambda i: (-scores[i], i))
    again = r.score([(query, d) for d in docs])
    assert r.last_stats["image_cache_hits"] > 0
    np.testing.assert_allclose(again, scores, atol=float(np.abs(scores).max()) * 2 ** -7)


def test_cuda_score_cli_plans_images_within_the_gpus_memory(torch_cuda, tiny_checkpoints, tmp_path):
    """The score CLI on CUDA: the image plan's budget is a quarter of the GPU's free memory (the
    embeddings stay there), at most 4 GiB, and images shared across chunks are encoded once."""
    import json

    import torch
    from export.engine_export import ExportOptions, export_engine
    from gmr_fast.score import main
    from suite_helpers import save_image

    export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e", ExportOptions(dtypes=("bf16",),
                                                                               reference_cache=False))
    for d in range(2):
        save_image(str(tmp_path / "img" / f"{d}.png"), 30 + d)
    rows = [{"id": f"q{q}d{d}", "query": f"query {q}", "document": {"image": f"img/{d}.png"}}
            for q in range(3) for d in range(2)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "scores.jsonl"
    assert main(["--engine", str(tmp_path / "e"), "--device", "cuda", "--input", str(tmp_path / "pairs.jsonl"),
                 "--output", str(out), "--chunk-pairs", "2", "--quiet"]) == 0
    stats = json.load(open(tmp_path / "out" / "scores.run.json"))["sessions"][-1]["datasets"]["pairs"]
    total = torch.cuda.mem_get_info()[1]
    assert 0 < stats["image_cache_budget_mb"] <= min(4096, total / 4 / 2**20)
    assert (stats["images_encoded"], stats["image_cache_hits"]) == (2, 4)


def test_the_torch_backend_never_reads_its_tensors_through_numpy(exported_engines, rng, monkeypatch):
    """Runs on every machine: what broke the first CUDA run (an H200, 4 Dec) was the backend
    passing a tensor it had made on its device to ``np.asarray``, which works for a CPU tensor
    (a view) and raises for a CUDA one. With ``Tensor.__array__`` refusing, as it does for CUDA
    tensors, the CPU run of the same code (prefix prefills and whole prompts, both padding sides,
    images) must not notice, and its scores are unchanged."""
    import torch

    from export import validate
    from gmr_fast import Reranker

    _, engine = exported_engines["qwen2_5_vl"]
    groups = validate.validation_groups(3, 5, int(rng.integers(1 << 30)))
    pairs = [(q, d) for q, docs in groups for d in docs]
    runs = [Reranker(engine, backend="torch", padding_side=side, share_prefix=share, backend_options={"gemm": "blas"})
            for side, share in (("left", True), ("right", False))]
    expected = [r.score(pairs) for r in runs]

    def refuse(self, *args, **kwargs):
        raise TypeError(f"implicit numpy read of a {self.device} tensor (a CUDA tensor has none)")

    monkeypatch.setattr(torch.Tensor, "__array__", refuse)
    for r, want in zip(runs, expected):
        np.testing.assert_array_equal(r.score(pairs), want)


def test_cuda_attention_runs_without_cudnn_graphs(torch_cuda, tiny_checkpoints, tmp_path, rng, monkeypatch):
    """Every sdpa call of a CUDA run (vision tower and decoder) finds cuDNN's kernel off (it builds
    a graph per new shape: backends.torch.NoCudnnAttention), and the process's setting is back
    afterwards."""
    import torch.nn.functional as F

    from export import validate
    from export.engine_export import ExportOptions, export_engine
    from gmr_fast import Reranker

    export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e", ExportOptions(dtypes=("bf16",), reference_cache=False))
    pairs = [(q, d) for q, docs in validate.validation_groups(2, 6, int(rng.integers(1 << 30))) for d in docs]
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch_cuda.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch_cuda.backends.cuda.enable_cudnn_sdp(True)
    r = Reranker(tmp_path / "e", device="cuda")
    r.score(pairs)
    assert r.last_stats["images_encoded"] > 0 and seen and not any(seen), seen
    assert torch_cuda.backends.cuda.cudnn_sdp_enabled()


def _decoder_sdpa_calls(monkeypatch):
    """Records (query heads, key heads, enable_gqa) of every sdpa call the decoder graph makes."""
    import gmr_fast.graphs.decoder as decoder_graph

    calls, sdpa = [], decoder_graph.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[1], k.shape[1], bool(kwargs.get("enable_gqa", False))))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(decoder_graph.F, "scaled_dot_product_attention", spy)
    return calls


def test_attention_without_masked_gqa_scores_as_with_it(exported_engines, rng, monkeypatch):
    """Runs on every machine: the decoder's sdpa attention laid out as it is on CUDA (no grouped
    keys under a mask: ``masked_gqa`` off, see graphs.decoder) gives the CPU layout's scores, for
    whole prompts and shared prefixes (prefix runs, suffix runs, the last layer's one query a
    row), both padding sides, images included; and in that layout no call passes sdpa a mask
    with fewer key heads than query heads. Tolerance: the same fp32 arithmetic in another order
    (a softmax over at most a few hundred keys, head dim 16), so differences are a few ulps of
    the scores (observed <= 6e-7 on scores spanning 2.3); 1e-5 x the largest |score| + 1e-5 leaves
    room for other CPUs' kernels and none for a wrong head, mask or position, which moves scores
    by a sizeable share of their spread."""
    from export import validate
    from gmr_fast import Reranker

    _, engine = exported_engines["qwen2_5_vl"]
    groups = validate.validation_groups(3, 5, int(rng.integers(1 << 30)))
    pairs = [(q, d) for q, docs in groups for d in docs]
    calls = _decoder_sdpa_calls(monkeypatch)
    for side, share in (("left", True), ("right", True), ("left", False)):
        r = Reranker(engine, backend="torch", padding_side=side, share_prefix=share)
        layers = r.backend.decoder.layers
        assert all(layer.masked_gqa for layer in layers)  # on the CPU, sdpa's flash kernel takes them
        assert layers[0].heads > layers[0].kv_heads  # the tiny model has grouped heads: the case under test
        want = r.score(pairs)
        for layer in layers:
            layer.masked_gqa = False
        calls.clear()
        got = r.score(pairs)
        assert calls and not any(gqa or q != k for q, k, gqa in calls), calls
        assert any(q == layers[0].kv_heads for q, _, _ in calls)  # the last layer's folded queries ran
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()) + 1e-5,
                                   err_msg=f"padding {side}, share_prefix={share}")


def test_cuda_attention_takes_fused_kernels_only(torch_cuda, tiny_checkpoints, tmp_path, rng, monkeypatch):
    """On CUDA every sdpa call of a run, the vision tower's and the decoder's, is one the flash or
    memory-efficient kernel takes: with only those two allowed, sdpa raises where it would need
    the math kernel (masked grouped-query attention did, cuDNN's kernel being off). The scores
    are the default run's, which takes the same kernels; the tolerance (2^-7 of the largest
    |score|, as for the image cache above) only spares the check GPU libraries' run-to-run
    freedom, far below what a wrong mask or head mapping would move."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from export import validate
    from export.engine_export import ExportOptions, export_engine
    from gmr_fast import Reranker

    export_engine(tiny_checkpoints["qwen2_5_vl"], tmp_path / "e", ExportOptions(dtypes=("bf16",), reference_cache=False))
    pairs = [(q, d) for q, docs in validate.validation_groups(3, 6, int(rng.integers(1 << 30))) for d in docs]
    for side, share in (("left", True), ("right", False)):
        r = Reranker(tmp_path / "e", device="cuda", padding_side=side, share_prefix=share)
        assert not any(layer.masked_gqa for layer in r.backend.decoder.layers)
        want = r.score(pairs)
        calls = _decoder_sdpa_calls(monkeypatch)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            got = r.score(pairs)
        monkeypatch.undo()
        assert calls and not any(gqa or q != k for q, k, gqa in calls), calls
        assert r.last_stats["images_encoded"] > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=float(np.abs(want).max()) * 2 ** -7)


def test_eager_rope_and_fused_norm_keep_every_bit(rng):
    """graphs.decoder EAGER: the torch backend's RoPE without its negation (sin's first half
    negated once per run) and its norms as one F.rms_norm call give the exported graphs' floats
    bit for bit: -(a * b) is a * (-b) in IEEE arithmetic, and on a CPU F.rms_norm runs the same
    operations in the same order. (On CUDA it is one fused kernel, whose sums may differ in the
    last bits: test_cuda_bf16_ranks_as_fp32_for_every_layout holds the GPU's scores.)"""
    torch = pytest.importorskip("torch")
    from gmr_fast.graphs.common import RMSNorm, rotate_half
    from gmr_fast.graphs.decoder import eager_rope

    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    d = 128
    cos, sin = (torch.randn(37, 1, d, generator=g) for _ in range(2))
    signed = torch.cat((-sin[..., :d // 2], sin[..., d // 2:]), -1)  # as ScoreDecoder.forward makes it
    for dtype in (torch.float32, torch.bfloat16):
        t = (torch.randn(37, 4, d, generator=g) * 3).to(dtype)
        assert torch.equal(eager_rope(t, cos, signed), t * cos + rotate_half(t) * sin), dtype
    for weight_dtype in (torch.float32, torch.bfloat16):
        norm = RMSNorm(2048, 1e-6)
        norm.weight.data = (torch.randn(2048, generator=g) * 0.2 + 1).to(weight_dtype)
        for x in (torch.randn(19, 2048, generator=g) * 5, torch.randn(3, 7, 2048, generator=g).bfloat16()):
            norm.fused = None
            plain = norm(x)
            norm.fused = norm.weight.detach().float()
            assert torch.equal(norm(x), plain), (weight_dtype, x.dtype)  # a bf16 input keeps the plain path


def test_eager_decoder_shortcuts_keep_every_bit(exported_engines, rng):
    """graphs.decoder EAGER at the decoder's level, on the torch backend's own module (fp32 and
    bf16, both attention layouts, both padding sides): a run with one prefix (broadcast to its
    rows) scores bit for bit as the same run given a second, unused prefix (gathered per row), and
    a run asked for no keys and values as one asked for every row's, whose keys and values keep
    their shape."""
    torch = pytest.importorskip("torch")
    from gmr_fast.backends.torch import TorchBackend
    from gmr_fast.manifest import load_manifest

    _, engine = exported_engines["qwen2_5_vl"]
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    b, s, p = 3, 9, 5
    for precision in ("fp32", "bf16"):  # bf16 over the fp32 variant's weights
        dec = TorchBackend(str(engine), load_manifest(engine), precision, 2).decoder
        d, dtype = dec.dims, dec.layers[0].attn_dtype
        assert dec.unpad
        ids = torch.randint(10, 1000, (b, s), generator=g)
        past = torch.randn(d.num_layers, 2, 1, d.num_kv_heads, p, d.head_dim, generator=g).to(dtype)
        past_mask = torch.tensor([[0, 1, 1, 1, 1]])  # a left-padded prefix
        two_past, two_mask = torch.cat([past, torch.randn_like(past)], 2), torch.cat([past_mask, past_mask * 0 + 1])
        index, none, every = torch.zeros(b, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.arange(b)
        embeds = torch.zeros(0, d.hidden_size, dtype=dtype)
        for side in ("left", "right"):
            mask = torch.zeros(b, s, dtype=torch.int64)
            for row, n in enumerate((9, 6, 4)):
                mask[row, s - n:] = 1 if side == "left" else 0
                mask[row, :n] = 0 if side == "left" else 1
            positions = (p - 1 + torch.cumsum(mask, 1)).clamp(min=p)[None].expand(3, b, s).contiguous()
            for masked_gqa in (True, False):
                for layer in dec.layers:
                    layer.masked_gqa = masked_gqa
                with torch.inference_mode():
                    one, kept_none = dec(ids, mask, positions, embeds, past, past_mask, index, none)
                    kept, present = dec(ids, mask, positions, embeds, past, past_mask, index, every)
                    gathered, _ = dec(ids, mask, positions, embeds, two_past, two_mask, index, none)
                assert torch.equal(one, kept) and torch.equal(one, gathered), (precision, side, masked_gqa)
                assert present.shape == (d.num_layers, 2, b, d.num_kv_heads, s, d.head_dim)
                assert kept_none.shape == (d.num_layers, 2, 0, d.num_kv_heads, s, d.head_dim)
