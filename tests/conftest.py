"""Shared fixtures and the test pyramid's markers (tests/README.md).

HuggingFace's PIL image processor is the oracle for pixels and HuggingFace transformers the
oracle for scores; both are built from classes (no hub access). With GMR_FAST_BLOCK_TORCH=1 the
import of torch and transformers fails, which is how the `unit` tests prove they need neither.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
import zlib

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# exports keep the fp32 reference's scores (export/reference_cache.py): in a directory of this
# session's own, so that no test reads or leaves anything in the user's cache, and exports of the
# same generated checkpoint within the session reuse them as any user's would
os.environ["GMR_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="gmr_fast_test_cache.")
atexit.register(shutil.rmtree, os.environ["GMR_FAST_CACHE_DIR"], True)

if os.environ.get("GMR_FAST_BLOCK_TORCH") == "1":
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "torchvision"):
                raise ImportError(f"{name} is blocked (GMR_FAST_BLOCK_TORCH=1)")

    sys.meta_path.insert(0, _Block())


@functools.lru_cache(maxsize=None)
def hf_processor(min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def hf_preprocess(pil_images, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    out = hf_processor(min_pixels, max_pixels)(images=list(pil_images), return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    if not np.array_equal(ours, ref):
        diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
        raise AssertionError(
            f"{what}: not bit-exact, max |diff| = {diff.max():.3g} at {np.unravel_index(diff.argmax(), diff.shape)}, "
            f"{int((diff > 0).sum())} of {diff.size} values differ"
        )


# Inputs are fresh on every run (the parity rule), yet any failure can be replayed: each test's
# stream comes from this session's seed and the test's id, and the seed is printed in the header.
# Replay with GMR_TEST_SEED=<seed> (str hash() is salted per process, so it cannot serve here).
SESSION_SEED = int(os.environ.get("GMR_TEST_SEED") or np.random.SeedSequence().entropy % (2**32))


def pytest_report_header(config):
    return f"GMR_TEST_SEED={SESSION_SEED} (set it to replay this run's random inputs)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # also under -q, which hides the header: what a failed CI log must show to be replayed
    terminalreporter.write_line(f"random inputs of this run: GMR_TEST_SEED={SESSION_SEED}")


@pytest.fixture
def rng(request):
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Tiny checkpoints and the converted tokenizer are generated once per test session."""
    return tmp_path_factory.mktemp("gmr_cache")


@pytest.fixture(scope="session")
def tokenizer_json(model_cache):
    """The real Qwen2 tokenizer.json (rebuilt from qwen.tiktoken; needs no torch)."""
    from export.factory import tokenizer_json as build

    path = model_cache / "tokenizer.json"
    if not path.exists():
        path.write_text(build(model_cache), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(model_cache):
    pytest.importorskip("torch")
    from export.factory import cached_checkpoint

    return {family: cached_checkpoint(family, cache_dir=model_cache) for family in ("qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="session", autouse=True)
def trace_each_graph_once():
    """The suite exports the same few graph modules some thirty times, and torch.onnx's tracing
    is about half of each tiny export (~12 s a graph on a slow 2-core CPU). Tracing is
    deterministic in the module's code, its dims and the example inputs, so within a session each
    distinct module is traced once and every export gets its own copy (``Model.clone``: an
    export fills the copy's initializers in place). The code is part of the key: every class in
    the module tree with the identity of each of its attributes, so a monkeypatched method (the
    broken graphs of test_real_width.py) is traced afresh. Exports run in subprocesses (the CLI
    tests) trace as always."""
    try:
        from export import graphs
    except ImportError:  # torch blocked: nothing here exports
        yield
        return
    real, traced = graphs.trace, {}

    def code(module) -> tuple:
        classes = sorted({type(m) for m in module.modules()}, key=lambda c: (c.__module__, c.__qualname__))
        return tuple((c.__module__, c.__qualname__, tuple(sorted((k, id(v)) for k, v in vars(c).items())))
                     for c in classes)

    def trace(module, args, input_names, output_names, dynamic_shapes):
        key = (code(module), repr(getattr(module, "dims", None)),
               tuple((tuple(a.shape), str(a.dtype)) for a in args), tuple(input_names), tuple(output_names),
               repr(dynamic_shapes))
        if key not in traced:
            traced[key] = real(module, args, input_names, output_names, dynamic_shapes)
        return traced[key].clone()

    graphs.trace = trace
    yield
    graphs.trace = real


@pytest.fixture(scope="session")
def exported_engines(tiny_checkpoints, tmp_path_factory):
    """fp32 engines of both tiny checkpoints, exported (and validated) once per session."""
    from export.engine_export import ExportOptions, export_engine

    root = tmp_path_factory.mktemp("engines")
    return {family: (export_engine(ckpt, root / family, ExportOptions(dtypes=("fp32",))), root / family)
            for family, ckpt in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def all_precisions_engine(tiny_checkpoints, tmp_path_factory):
    """The tiny Qwen2.5-VL checkpoint exported with every variant (fp32, int8, bf16)."""
    from export.engine_export import ExportOptions, export_engine

    root = tmp_path_factory.mktemp("engines_all")
    return export_engine(tiny_checkpoints["qwen2_5_vl"], root / "e", ExportOptions(dtypes=("fp32", "int8", "bf16"))), root / "e"


def pytest_ignore_collect(collection_path, config):
    """With torch blocked, files marked as a whole for the heavier levels are not even imported
    (their module-level imports need torch); every other file must import without it."""
    if os.environ.get("GMR_FAST_BLOCK_TORCH") == "1" and collection_path.suffix == ".py":
        text = collection_path.read_text(encoding="utf-8", errors="replace")
        if any(f"pytestmark = pytest.mark.{m}" in text for m in ("model", "e2e", "real_width")):
            return True
    return None


def pytest_collection_modifyitems(config, items):
    """A test is `unit` unless marked `model`, `e2e` or `real_width` (see tests/README.md)."""
    heavy = {"model", "e2e", "real_width"}
    for item in items:
        if not heavy & {m.name for m in item.iter_markers()}:
            item.add_marker(pytest.mark.unit)
