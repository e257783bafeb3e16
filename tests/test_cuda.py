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
