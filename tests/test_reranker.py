"""gmr_fast.Reranker: parity with the torch reference, independence from batch composition,
scheduling, image de-duplication and caching, API behaviour and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch")

import gmr_fast
from gmr_fast import ImageError, PromptError, Reranker
from gmr_fast import reranker as reranker_module

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def _pairs(rng, n):
    words = ["alpha", "beta", "photo", "of", "a", "red", "circle", "über", "数据", "on", "the", "map", "7"]
    text = lambda lo, hi: " ".join(rng.choice(words, int(rng.integers(lo, hi))))  # noqa: E731
    image = lambda: rng.integers(0, 256, (int(rng.integers(20, 200)), int(rng.integers(20, 200)), 3), dtype=np.uint8)  # noqa: E731
    kinds = [lambda: (text(1, 10), text(1, 300)), lambda: (text(1, 10), {"image": image()}),
             lambda: ({"image": image()}, text(1, 120)),
             lambda: ({"text": text(0, 8), "image": image()}, {"text": text(0, 80), "image": image()})]
    return [kinds[i % 4]() for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_reference(family, exported_engines, tiny_checkpoints, rng):
    from export.reference import ReferenceScorer

    _, engine = exported_engines[family]
    pairs = _pairs(rng, 32)
    expected = ReferenceScorer(tiny_checkpoints[family]).score(pairs, batch_size=8)
    for tokens, size in [(512, 4), (4096, 16), (100000, 64)]:
        got = Reranker(engine, max_batch_tokens=tokens, max_batch_size=size).score(pairs)
        assert got.dtype == np.float32 and got.shape == (32,)
        assert np.abs(got - expected).max() <= 1e-4, (tokens, size)


def test_score_does_not_depend_on_batch_composition(exported_engines, rng):
    _, engine = exported_engines["qwen2_5_vl"]
    reranker = Reranker(engine, max_batch_tokens=100000, max_batch_size=64)
    target = ({"text": "the query", "image": rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)}, "a short document")
    alone = reranker.score([target])[0]
    shorts = reranker.score([("q", "d")] * 7 + [target])[-1]
    big = rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)
    longs = reranker.score([({"image": big}, {"text": "long " * 300, "image": big})] * 5 + [target])[-1]
    assert abs(alone - shorts) <= 1e-5 and abs(alone - longs) <= 1e-5


def test_token_budget_and_padding_efficiency(exported_engines, rng):
    _, engine = exported_engines["qwen2_5_vl"]
    pairs = [("q", "word " * int(n)) for n in rng.integers(30, 1500, 40)]
    reranker = Reranker(engine, max_batch_tokens=6000, max_batch_size=8)
    calls = []
    real_score = reranker.backend.score
    reranker.backend.score = lambda feeds: calls.append(feeds["input_ids"].shape) or real_score(feeds)
    reranker.score(pairs)
    assert all(b * l <= 6000 or b == 1 for b, l in calls) and all(b <= 8 for b, _ in calls)
    assert sum(b for b, _ in calls) == 40
    stats = reranker.last_stats
    assert stats["batches"] == len(calls) and stats["padded_tokens"] == sum(b * l for b, l in calls)
    assert stats["padding_efficiency"] > 0.9  # length-sorted batches


def test_each_distinct_image_is_decoded_and_encoded_once(exported_engines, rng, monkeypatch, tmp_path):
    from PIL import Image

    _, engine = exported_engines["qwen2_5_vl"]
    arr = rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    decoded = []
    real_decode = reranker_module.decode_image
    monkeypatch.setattr(reranker_module, "decode_image", lambda *a: decoded.append(a[1]) or real_decode(*a))
    reranker = Reranker(engine, image_cache_size=8)
    vision_images = []
    real_encode = reranker.backend.encode_images
    reranker.backend.encode_images = lambda feeds: vision_images.append(len(feeds["full_gather"])) or real_encode(feeds)
    pairs = [({"image": path}, "x"), ("y", {"image": str(path)}), ({"image": path.read_bytes()}, {"image": path})]
    first = reranker.score(pairs)
    assert len(decoded) == 1 and sum(vision_images) == 1
    second = reranker.score(pairs)  # served from the embedding cache
    assert sum(vision_images) == 1 and np.array_equal(first, second)
    assert np.abs(Reranker(engine).score(pairs) - first).max() <= 1e-6


def test_normalize_rank_and_empty(exported_engines):
    _, engine = exported_engines["qwen2_vl"]
    reranker = Reranker(engine)
    docs = ["cats are animals", "the stock market", "a cat sat", "", "cat"]
    raw = reranker.score([("cat", d) for d in docs])
    prob = reranker.score([("cat", d) for d in docs], normalize=True)
    assert np.allclose(prob, 1 / (1 + np.exp(-raw.astype(np.float64))), atol=1e-6) and ((prob > 0) & (prob < 1)).all()
    ranked = reranker.rank("cat", docs, top_k=3, return_documents=True)
    assert [r.index for r in ranked] == list(np.argsort(-raw, kind="stable")[:3])
    assert [r.document for r in ranked] == [docs[r.index] for r in ranked]
    assert all(math.isclose(r.score, float(raw[r.index]), rel_tol=1e-6) for r in ranked)
    assert reranker.rank("cat", []) == [] and len(reranker.score([])) == 0
    assert all(r.document is None for r in reranker.rank("cat", docs))


@pytest.mark.parametrize("bad,msg", [(None, "pair 1 document: is None"), ({}, "pair 1 document: needs"),
                                     ({"text": "x", "img": 1}, r"pair 1 document: unknown key\(s\) \['img'\]")])
def test_bad_pairs_are_value_errors_naming_the_pair(bad, msg, exported_engines):
    _, engine = exported_engines["qwen2_vl"]
    with pytest.raises(ValueError, match=msg):
        Reranker(engine).score([("q", "d"), ("q", bad)])


def test_image_errors_raise_or_nan(exported_engines, rng, tmp_path):
    _, engine = exported_engines["qwen2_5_vl"]
    reranker = Reranker(engine)
    good = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    missing = tmp_path / "missing.jpg"
    pairs = [("q", {"image": good}), ({"image": missing}, "d"), ("q", {"image": b"not an image"}), ("q", "d")]
    with pytest.raises(ImageError, match=r"pair 1 query image \('.*missing.jpg'\): file not found"):
        reranker.score(pairs)
    scores = reranker.score(pairs, on_error="nan")
    assert np.isnan(scores[[1, 2]]).all() and np.isfinite(scores[[0, 3]]).all()
    assert set(scores.errors) == {1, 2} and "pair 2 document image" in str(scores.errors[2])
    alone = reranker.score([pairs[0], pairs[3]])
    assert np.abs(scores[[0, 3]] - alone).max() <= 1e-5


def test_over_long_pairs_are_truncated_and_flagged(exported_engines, rng):
    _, engine = exported_engines["qwen2_5_vl"]
    reranker = Reranker(engine, max_length=300)
    big = rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)
    pairs = [("q", "long " * 1000), ("q", "short"), ({"image": big}, "too long even without text")]
    with pytest.raises(PromptError, match="pair 2: .* tokens without any document text, over max_length 300"):
        reranker.score(pairs)
    scores = reranker.score(pairs, on_error="nan")
    assert scores.truncated.tolist() == [True, False, False]
    assert np.isfinite(scores[:2]).all() and np.isnan(scores[2]) and 2 in scores.errors


def test_reranker_needs_no_torch(exported_engines):
    import subprocess
    import sys

    _, engine = exported_engines["qwen2_vl"]
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'): raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import gmr_fast\n"
        f"r = gmr_fast.Reranker({str(engine)!r})\n"
        "print(len(r.rank('q', ['a', 'b'])))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr[-2000:]


def test_unknown_backend_and_provider(exported_engines):
    _, engine = exported_engines["qwen2_vl"]
    with pytest.raises(ValueError, match="backend 'tensorrt' is not available; supported: 'onnxruntime', 'torch'"):
        Reranker(engine, backend="tensorrt")
    with pytest.raises(gmr_fast.GmrError, match="not available in this onnxruntime"):
        Reranker(engine, providers=["NoSuchExecutionProvider"])


def test_scheduler_packs_sorted_buckets_under_the_budget(rng):
    from gmr_fast import _core

    for _ in range(50):
        lengths = rng.integers(1, 2000, int(rng.integers(1, 200)))
        budget, cap, fill = int(rng.integers(500, 20000)), int(rng.integers(1, 64)), float(rng.choice([0.0, 0.5, 0.8, 1.0]))
        batches = _core.schedule_batches(lengths, budget, cap, fill)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(len(lengths)))  # every pair exactly once
        assert (np.diff(lengths[flat]) <= 0).all()  # longest first
        for b in batches:
            longest = lengths[b].max()
            assert len(b) <= cap and (len(b) * longest <= budget or len(b) == 1)
            assert (lengths[b] >= fill * longest).all()


def test_batch_builder_matches_the_readable_positions(rng):
    from gmr_fast import _core
    from gmr_fast.positions import rope_positions

    ids, spans, refs = [], [], []
    for _ in range(6):
        grids = [(int(rng.integers(1, 6)), int(rng.integers(1, 6))) for _ in range(int(rng.integers(0, 3)))]
        pieces, cursor, sp = [], 0, []
        for gh, gw in grids:
            text = int(rng.integers(0, 7))
            pieces += [7] * text + [151655] * (gh * gw)
            sp.append((cursor + text, cursor + text + gh * gw, gh, gw))
            cursor += text + gh * gw
        tail = int(rng.integers(1, 9))
        pieces += [9] * tail
        ids.append(np.array(pieces, np.int64))
        spans.append(np.array(sp, np.int64).reshape(-1, 4))
        refs.append(rope_positions(len(pieces), [(a, b) for a, b, _, _ in sp], [(h, w) for _, _, h, w in sp]))
    width = max(len(x) for x in ids) + 2
    a, m, p = (np.empty(s, np.int64) for s in [(6, width), (6, width), (3, 6, width)])
    _core.build_batch(ids, spans, width, 151643, a, m, p)
    for r in range(6):
        n = len(ids[r])
        assert a[r, width - n:].tolist() == ids[r].tolist() and (a[r, :width - n] == 151643).all()
        assert m[r].tolist() == [0] * (width - n) + [1] * n
        assert (p[:, r, width - n:] == refs[r]).all() and (p[:, r, :width - n] == 1).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_backend_matches_onnxruntime_and_reference(family, exported_engines, tiny_checkpoints, rng):
    from export.reference import ReferenceScorer

    _, engine = exported_engines[family]
    pairs = _pairs(rng, 12)
    torch_scores = Reranker(engine, backend="torch").score(pairs)
    ort_scores = Reranker(engine).score(pairs)
    expected = ReferenceScorer(tiny_checkpoints[family]).score(pairs)
    assert np.abs(torch_scores - ort_scores).max() <= 1e-4 and np.abs(torch_scores - expected).max() <= 1e-4
    with pytest.raises(gmr_fast.GmrError, match="is not one; pass checkpoint="):
        Reranker(engine, backend="torch", backend_options={"checkpoint": engine})
