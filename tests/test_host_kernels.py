"""gmr_fast._kernels (backends.host_kernels): RoPE and RMSNorm as one pass each for the bf16 vision
tower and the bf16 decoder's fp32 stream, against the torch operations they replace, and the torch
backend's use of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.model


def _kernels():
    from gmr_fast.backends import host_kernels

    kernels = host_kernels.load()
    # built wherever the compiler has OpenMP (gcc's libgomp), as in CI
    assert kernels is not None, host_kernels.unavailable()
    return kernels


def _torch_rope(qkv, cos, sin, heads):
    """VisionBlock's RoPE in torch operations (graphs.vision, the path without kernels)."""
    from gmr_fast.graphs.common import rotate_half

    n = qkv.shape[0]
    q, k, v = qkv.reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    qf, kf = q.float(), k.float()
    return (qf * c + rotate_half(qf) * s).bfloat16(), (kf * c + rotate_half(kf) * s).bfloat16(), v


def _torch_norm(x, weight, eps):
    """HF's Qwen2 RMSNorm in bf16 (graphs.common.RMSNorm without its fp32 fast path)."""
    import torch

    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(torch.bfloat16)


def test_rope_kernel_is_torchs_rope_bit_for_bit(rng):
    """The same fp32 operations in the same order (products, then their sum, each rounded to fp32;
    the kernel builds without fused multiply-adds) and the same rounding to bf16: equal bit for bit,
    values alone left untouched. Vision (head_dim 80) and decoder (128) head sizes, row counts that
    split unevenly over threads, magnitudes from 1e-3 to 1e3."""
    import torch

    kernels = _kernels()
    for n, heads, d in ((37, 16, 80), (5, 2, 128), (1, 1, 2), (300, 4, 64)):
        scale = torch.from_numpy(10.0 ** rng.uniform(-3, 3, (n, 1)).astype(np.float32))
        qkv = (torch.from_numpy(rng.standard_normal((n, 3 * heads * d), dtype=np.float32)) * scale).bfloat16()
        angles = torch.from_numpy(rng.uniform(-100, 100, (n, d)).astype(np.float32))
        cos, sin = angles.cos(), angles.sin()
        q, k, v = _torch_rope(qkv, cos, sin, heads)
        out = kernels.rope_qk_(qkv.clone(), cos, sin, heads, d)
        q2, k2, v2 = out.reshape(n, 3, heads, d).permute(1, 0, 2, 3).unbind(0)
        assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v), (n, heads, d)


def test_rope_kernel_on_decoder_heads_is_eager_rope_bit_for_bit(rng):
    """The decoder's layouts: queries [T, heads, d] and the keys of its [T, 2, kv_heads, d]
    key/value product (values untouched), with sin's first half negated as the eager run passes it
    (graphs.decoder.eager_rope): the same values as the rotation with a negation, bit for bit."""
    import torch

    from gmr_fast.graphs.decoder import eager_rope

    kernels = _kernels()
    for t, heads, kv_heads, d in ((29, 16, 2, 128), (3, 4, 4, 64), (1, 2, 1, 128)):
        angles = torch.from_numpy(rng.uniform(-1000, 1000, (t, d)).astype(np.float32))
        cos, sin = angles.cos(), angles.sin()
        signed = torch.cat((-sin[:, :d // 2], sin[:, d // 2:]), -1)
        q = torch.from_numpy(rng.standard_normal((t, heads, d), dtype=np.float32) * 5).bfloat16()
        kv = torch.from_numpy(rng.standard_normal((t, 2, kv_heads, d), dtype=np.float32) * 5).bfloat16()
        want_q = eager_rope(q, cos.unsqueeze(-2), signed.unsqueeze(-2)).bfloat16()
        want_kv = kv.clone()
        want_kv[:, 0] = eager_rope(kv[:, 0], cos.unsqueeze(-2), signed.unsqueeze(-2))
        assert torch.equal(kernels.rope_(q.clone(), cos, signed, heads, d, signed_sin=True), want_q)
        assert torch.equal(kernels.rope_(kv.clone(), cos, signed, kv_heads, d, signed_sin=True), want_kv)
        # the last layer's rows: [B, 1, ...] with cos [B, 1, d]
        got = kernels.rope_(q[:, None].clone(), cos[:, None], signed[:, None], heads, d, signed_sin=True)
        assert torch.equal(got[:, 0], want_q)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.rope_(torch.zeros(4, 6, dtype=torch.bfloat16)[:, :4], torch.ones(4, 4), torch.zeros(4, 4), 1, 4)


def test_fp32_norm_kernel_is_torchs_rms_norm_rounded_to_bf16(rng):
    """The bf16 decoder's fp32 stream: F.rms_norm (x * (1 / sqrt(mean(x^2) + eps))) * weight in
    fp32, rounded to bf16 for the projections. Where the sums are exact in fp32 (see the bf16 norm's
    test) equal bit for bit; otherwise the scale differs by at most ~C 2^-24 relative (the sum's
    order), which moves an output only across a bf16 rounding boundary, by one bf16 unit (2^-7 of
    it at most): under 2% of outputs (the same count as the bf16 norm's). x + residual (bf16) is
    torch's fp32 addition bit for bit."""
    import torch
    import torch.nn.functional as F

    kernels = _kernels()
    eps = 1e-6
    x = torch.from_numpy(rng.integers(-31, 32, (20, 64)).astype(np.float32) / 8)
    w = torch.from_numpy(rng.standard_normal(64, dtype=np.float32))
    assert torch.equal(kernels.norm_to_bf16(x, w, eps), F.rms_norm(x, (64,), w, eps).bfloat16())
    for shape in ((41, 2048), (3, 1, 2048), (5, 100)):
        c = shape[-1]
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 4)
        a = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).bfloat16()
        w = torch.from_numpy(rng.standard_normal(c, dtype=np.float32))
        total, out = kernels.norm_to_bf16(x, w, eps, residual=a)
        assert total.dtype == torch.float32 and torch.equal(total, x + a), shape
        for got, ref in ((out, F.rms_norm(x + a, (c,), w, eps).bfloat16()),
                         (kernels.norm_to_bf16(x, w, eps), F.rms_norm(x, (c,), w, eps).bfloat16())):
            assert got.shape == ref.shape and got.dtype == torch.bfloat16
            assert ((got.float() - ref.float()).abs() <= 2 ** -6 * ref.float().abs()).all(), shape
            assert (got != ref).float().mean() < 0.02, shape


def test_rms_norm_kernel_is_torchs_norm_within_its_sum_order(rng):
    """x + residual rounded to bf16 equals torch's bf16 addition bit for bit. The norm: where every
    square and partial sum is exact in fp32 (values multiples of 2^-3 below 4 in magnitude, 64 of
    them: sums below 2^10 on a 2^-6 grid, 16 bits), the order of the sum cannot matter and the
    result equals torch's bit for bit. Otherwise the kernel sums the squares in another order than
    torch: each order's sum is within (C - 1) 2^-24 of the exact one (relative; C the row length),
    so the scale 1 / sqrt(mean + eps) of the two differ by at most ~C 2^-24 relative, and an output
    differs only where h * scale lies that close to a bf16 rounding boundary; it then moves by one
    bf16 unit of h * scale (at most 2^-7 of it) before the weight's product and its rounding (2^-9
    each): within 2^-6 of the reference, relative. How many move: at most ~C 2^-24 / 2^-8 of
    them (2% for C = 1,280 at the worst-case bound; the typical error is sqrt(C) 2^-24, ~0.05%):
    asserted under 2%."""
    import torch

    kernels = _kernels()
    eps = 1e-6
    # exact sums: bit for bit
    x = torch.from_numpy(rng.integers(-31, 32, (40, 64)).astype(np.float32) / 8).bfloat16()
    w = torch.from_numpy(rng.standard_normal(64, dtype=np.float32)).bfloat16()
    assert torch.equal(kernels.rms_norm(x, w, eps), _torch_norm(x, w, eps))
    for n, c in ((33, 1280), (7, 70), (1, 2048)):
        x = torch.from_numpy(rng.standard_normal((n, c), dtype=np.float32) * 3).bfloat16()
        a = torch.from_numpy(rng.standard_normal((n, c), dtype=np.float32)).bfloat16()
        w = torch.from_numpy(rng.standard_normal(c, dtype=np.float32)).bfloat16()
        total, out = kernels.rms_norm(x, w, eps, residual=a)
        assert torch.equal(total, x + a), (n, c)
        for got, ref in ((out, _torch_norm(x + a, w, eps)), (kernels.rms_norm(x, w, eps), _torch_norm(x, w, eps))):
            diff = (got.float() - ref.float()).abs()
            assert (diff <= 2 ** -6 * ref.float().abs()).all(), (n, c)
            assert (got != ref).float().mean() < 0.02, (n, c)


def test_kernels_refuse_bad_shapes_clearly():
    import torch

    from gmr_fast.errors import CoreError

    kernels = _kernels()
    qkv = torch.zeros(4, 3 * 2 * 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cos and sin"):
        kernels.rope_qk_(qkv, torch.zeros(3, 8), torch.zeros(3, 8), 2, 8)
    with pytest.raises(CoreError, match="cos and sin"):  # the module checks too
        kernels._m.rope(qkv.view(torch.int16).numpy(), torch.zeros(3, 8).numpy(), torch.zeros(3, 8).numpy(), 2, 8)
    with pytest.raises(CoreError, match="even head_dim"):
        kernels.rope_qk_(qkv, torch.zeros(4, 7), torch.zeros(4, 7), 2, 7)
    with pytest.raises(CoreError, match="fewer than"):
        kernels.rope_qk_(qkv, torch.zeros(4, 16), torch.zeros(4, 16), 2, 16)
    with pytest.raises(CoreError, match="disagree in shape"):
        kernels.rms_norm(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(6, dtype=torch.bfloat16), 1e-6)


def _tiny_tower(tiny_checkpoints, rng):
    """The tiny Qwen2.5-VL checkpoint's vision tower in bf16 as the torch backend loads it (its
    RMSNorms and windowed blocks), and the feeds of a few fresh images."""
    import torch

    from export.checkpoint import CheckpointReader
    from export.reference import family_of
    from gmr_fast.gmr_config import GmrConfig
    from gmr_fast.graphs.vision import VisionDims, VisionEncoder
    from gmr_fast.preprocess import preprocess_images

    ckpt = tiny_checkpoints["qwen2_5_vl"]
    family = family_of(ckpt)
    config = family.hf_config(ckpt)
    spec = family.preprocess_spec(json.loads((ckpt / "preprocessor_config.json").read_text()),
                                  config.vision_config.to_dict(), GmrConfig.load(ckpt))
    reader, vdims = CheckpointReader(ckpt), family.vision_dims(config, spec)
    with torch.device("meta"):
        tower = VisionEncoder(VisionDims.from_dict(vdims))
    tower.to_empty(device="cpu")
    sources = family.vision_sources(vdims)
    for name, p in tower.named_parameters():
        p.data = torch.from_numpy(reader.resolve(sources[name]))
    for name, value in tower.constant_buffers().items():
        tower.get_buffer(name).data = value
    images = [rng.integers(0, 256, (int(rng.integers(28, 300)), int(rng.integers(28, 300)), 3), dtype=np.uint8)
              for _ in range(3)]
    batch = preprocess_images(images)
    feeds = {k: torch.from_numpy(v) for k, v in family.vision_feeds(batch.image_grid_thw, spec).items()}
    return tower, torch.from_numpy(batch.pixel_values), feeds


def test_vision_tower_with_kernels_is_the_tower_without_them(tiny_checkpoints, rng):
    """Wiring: with the kernels' RoPE and their fused residual + norm structure, but the norm
    itself computed by torch's operations (the one place the kernels may round differently), a
    bf16 tower's output equals the tower without kernels bit for bit. With the real kernels it
    differs only by the norm's bf16 re-roundings: within bf16's own distance to the fp32 tower
    (each path at most 1.5x the other's, plus bf16's rounding of the output, 2^-8)."""
    import torch

    from gmr_fast.backends.host_kernels import Kernels

    kernels = _kernels()

    class TorchNorm(Kernels):
        def rms_norm(self, x, weight, eps, residual=None):
            if residual is None:
                return _torch_norm(x, weight, eps)
            total = x + residual
            return total, _torch_norm(total, weight, eps)

    tower, pixels, feeds = _tiny_tower(tiny_checkpoints, rng)
    with torch.inference_mode():
        fp32 = tower(pixels, **feeds)
        tower.to(torch.bfloat16)
        tower.inv_freq = tower.constant_buffers()["inv_freq"]  # buffers stay fp32, as the backend loads them
        for block in tower.blocks:
            block.kernels = None
        plain = tower(pixels, **feeds)
        for block in tower.blocks:
            block.kernels = TorchNorm(kernels._m)
        wired = tower(pixels, **feeds)
        for block in tower.blocks:
            block.kernels = kernels
        fused = tower(pixels, **feeds)
    assert plain.dtype == torch.bfloat16 and torch.equal(wired, plain)

    def dist(t):
        return float((t.float() - fp32).norm() / fp32.norm())

    assert dist(fused) <= 1.5 * dist(plain) + 2 ** -8 and dist(plain) <= 1.5 * dist(fused) + 2 ** -8, \
        (dist(fused), dist(plain))


def test_bf16_decoder_with_kernels_is_the_decoder_without_them(all_precisions_engine, rng):
    """Wiring in the bf16 decoder: with the kernels' RoPE and fused residual + norm, but each norm
    computed by F.rms_norm (torch's order of sums), text pairs score as with torch's operations bit
    for bit, on whole prompts and shared prefixes, padded on either side. With the real kernels
    they differ only by the norms' bf16 re-roundings: within bf16's own distance to fp32 (either
    path at most 1.5x the other's, plus 1e-3 for scores near zero)."""
    import torch.nn.functional as F

    from gmr_fast import Reranker
    from gmr_fast.backends.host_kernels import Kernels

    kernels = _kernels()

    class TorchNorm(Kernels):
        def norm_to_bf16(self, x, weight, eps, residual=None):
            if residual is None:
                return F.rms_norm(x, (x.shape[-1],), weight, eps).bfloat16()
            total = x + residual
            return total, F.rms_norm(total, (x.shape[-1],), weight, eps).bfloat16()

    engine = all_precisions_engine[1]
    words = "river bank money loan water fish boat city tree school".split()
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    queries = [text(int(rng.integers(2, 8))) for _ in range(3)]
    pairs = [(q, text(int(rng.integers(3, 60)))) for q in queries for _ in range(5)]
    fp32 = Reranker(engine, precision="fp32", backend="torch").score(pairs)
    for side in ("left", "right"):
        for share in (True, False):
            kw = dict(precision="bf16", backend="torch", padding_side=side, share_prefix=share, lanes=1)
            off = Reranker(engine, backend_options={"host_kernels": "off"}, **kw).score(pairs)
            r = Reranker(engine, **kw)
            assert all(layer.kernels is kernels for layer in r.backend.decoder.layers)
            fused = r.score(pairs)
            for layer in r.backend.decoder.layers:
                layer.kernels = TorchNorm(kernels._m)
            wired = r.score(pairs)
            assert np.array_equal(wired, off), (side, share)
            d_fused, d_off = np.abs(fused - fp32).max(), np.abs(off - fp32).max()
            assert d_fused <= 1.5 * d_off + 1e-3 and d_off <= 1.5 * d_fused + 1e-3, (side, share, d_fused, d_off)


def test_torch_backend_runs_the_kernels_on_a_cpu_unless_told_not_to(all_precisions_engine, rng):
    """A bf16 reranker's vision tower takes the kernels by default (backend option host_kernels=auto),
    says so in ``choice``, and scores image pairs as with torch's operations within bf16's noise;
    host_kernels=off keeps torch's operations; a bad setting is refused."""
    from gmr_fast import Reranker
    from gmr_fast.errors import GmrError

    engine = all_precisions_engine[1]
    images = [rng.integers(0, 256, (int(rng.integers(56, 200)), int(rng.integers(56, 200)), 3), dtype=np.uint8)
              for _ in range(4)]
    pairs = [("a photo of a dog", {"image": im}) for im in images] + [({"image": images[0]}, "a cat")]
    on = Reranker(engine, precision="bf16", backend="torch", image_precision="same")
    off = Reranker(engine, precision="bf16", backend="torch", image_precision="same",
                   backend_options={"host_kernels": "off"})
    assert on.choice["host_kernels"].startswith("gmr_fast._kernels")
    assert off.choice["host_kernels"] == "torch operations"
    assert all(b.kernels is on.backend.kernels is not None for b in on.backend.vision.blocks)
    fp32 = Reranker(engine, precision="fp32", backend="torch").score(pairs)
    a, b = on.score(pairs), off.score(pairs)
    # bf16's error against fp32 on these scores, either way; the two within twice of it of each other
    spread = max(np.abs(a - fp32).max(), np.abs(b - fp32).max(), 1e-3)
    assert np.abs(a - b).max() <= 2 * spread
    with pytest.raises(GmrError, match="host_kernels"):
        Reranker(engine, precision="bf16", backend="torch", backend_options={"host_kernels": "sometimes"})


def test_gated_mlp_in_row_blocks_is_the_whole_product_row_for_row(rng):
    """graphs.common.gated_mlp with ``rows``: gate_up and the activation a block of rows at a time
    into one activation, ``down`` once over it. In fp32 every row is the same dot products as the
    whole product's: equal within fp32 reductions of 16-40 terms (GEMM kernels may order a row's
    sums by the row count: a few ulp, 1e-5 relative with margin); the [N, 2 x intermediate]
    product is never made whole; 2-D input only (a 3-D one runs whole, as exports do)."""
    import torch

    from gmr_fast.graphs.common import Proj, gated_mlp

    torch.manual_seed(int(rng.integers(1 << 30)))
    gate_up, down = Proj(16, 2 * 40, bias=False), Proj(40, 16, bias=True)
    for p in (gate_up.weight, down.weight, down.bias):
        p.data.normal_()
    made = []
    original = gate_up.forward
    gate_up.forward = lambda x: made.append(x.shape[0]) or original(x)
    x = torch.randn(53, 16)
    with torch.inference_mode():
        whole = gated_mlp(gate_up, down, x)
        assert made == [53]
        made.clear()
        blocks = gated_mlp(gate_up, down, x, rows=8)
        assert made == [8] * 6 + [5]
        made.clear()
        lead = gated_mlp(gate_up, down, x.reshape(1, 53, 16), rows=8)
        assert made == [1]
    assert blocks.shape == whole.shape == (53, 16) and lead.shape == (1, 53, 16)
    scale = float(whole.abs().max())
    assert float((blocks - whole).abs().max()) <= 1e-5 * scale
    assert float((lead[0] - whole).abs().max()) <= 1e-5 * scale


def test_torch_backend_takes_gate_up_in_row_blocks_on_a_cpu(all_precisions_engine, rng):
    """The backend option mlp_rows (auto: 512 on a CPU; 0: off) reaches every decoder layer and
    vision block. fp32 scores with blocks of 8 rows equal those without within fp32 rounding
    (1e-4 of the score scale, the export's fp32 criterion); bf16 ones differ only by where oneDNN
    rounds: within bf16's own distance to fp32 (either at most 1.5x the other's, plus 1e-3 for
    scores near zero). A bad setting is refused."""
    from gmr_fast import Reranker
    from gmr_fast.backends.torch import MLP_ROWS
    from gmr_fast.errors import GmrError

    engine = all_precisions_engine[1]
    words = "river bank money loan water fish boat city tree school".split()
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    images = [rng.integers(0, 256, (int(rng.integers(56, 200)), int(rng.integers(56, 200)), 3), dtype=np.uint8)
              for _ in range(3)]
    pairs = ([(text(4), text(int(rng.integers(3, 60)))) for _ in range(8)]
             + [(text(3), {"image": im, "text": text(5)}) for im in images])
    default = Reranker(engine, precision="bf16", backend="torch", image_precision="same")
    assert default.backend.mlp_rows == MLP_ROWS
    blocks = [*default.backend.decoder.layers, *default.backend.vision.blocks]
    assert all(b.mlp_rows == MLP_ROWS for b in blocks)
    got = {}
    for precision in ("fp32", "bf16"):
        for rows in (8, 0):
            r = Reranker(engine, precision=precision, backend="torch", image_precision="same",
                         backend_options={"mlp_rows": rows})
            assert all(b.mlp_rows == (rows or None) for b in [*r.backend.decoder.layers, *r.backend.vision.blocks])
            got[precision, rows] = r.score(pairs)
    scale = float(np.abs(got["fp32", 0]).max())
    assert np.abs(got["fp32", 8] - got["fp32", 0]).max() <= 1e-4 * scale
    d_blocks = np.abs(got["bf16", 8] - got["fp32", 0]).max()
    d_whole = np.abs(got["bf16", 0] - got["fp32", 0]).max()
    assert d_blocks <= 1.5 * d_whole + 1e-3 and d_whole <= 1.5 * d_blocks + 1e-3, (d_blocks, d_whole)
    for bad in (-1, "some", True):
        with pytest.raises(GmrError, match="mlp_rows"):
            Reranker(engine, precision="bf16", backend="torch", backend_options={"mlp_rows": bad})
