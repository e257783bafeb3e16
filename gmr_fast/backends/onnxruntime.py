"""onnxruntime backend: runs an engine's ONNX variant (fp32 or int8) on the CPU execution
provider by default, or on CUDA / TensorRT execution providers when asked for and present.

Sessions are built without onnxruntime's CPU memory arena: with dynamic shapes an arena keeps
the peak of every shape it has seen, while plain allocations are returned to the system after
each run, which is what lets the scheduler's activation budget bound the process's memory.

Its worker threads do not spin-wait between operators (``spin=false`` by default): the engine
shares the process with work that needs the same cores while it runs (the next batch prepared
and images preprocessed on a worker thread, a server's planner, HTTP and tokenizer threads), and
spinning threads take those cores away. Measured: a loopback server of the tiny engine carried
10-25% more requests at 16 concurrent clients without spinning (1,083-1,158 against 872-990
pairs/s, 3 rounds each) and was no slower with one client;
``rank`` of 8 documents on the GMR-3B-width int8 engine took the same time either way
(1.7-2.5 s both, this VM's noise). ``backend_options={"spin": True}`` turns it back on.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from ..schedule import DecoderBatch, VisionBatch
from . import past_tensors


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, engine_dir: str, manifest: Manifest, precision: str, num_threads: int,
                 providers: Sequence[str] | None = None, arena: bool = False, optimization: str = "all",
                 log_severity: int = 3, spin: bool = False):
        import onnxruntime as ort

        variant = manifest.variant(precision)
        if variant.backend != "onnxruntime":
            raise BackendError(f"the {precision} variant runs on the {variant.backend} backend, not onnxruntime")
        available = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendError(f"execution provider(s) {missing} not available in this onnxruntime (available: {available})")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = bool(arena)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.log_severity_level = int(log_severity)
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise BackendError(f"optimization must be one of {sorted(levels)}, got {optimization!r}")
        opts.graph_optimization_level = levels[optimization]
        self.precision, self.device = precision, "cpu" if providers == ["CPUExecutionProvider"] else providers[0]
        self.dims = manifest.decoder
        try:
            self.vision = ort.InferenceSession(os.path.join(engine_dir, variant.graphs["vision"].file), opts, providers=providers)
            self.decoder = ort.InferenceSession(os.path.join(engine_dir, variant.graphs["decoder"].file), opts, providers=providers)
        except RuntimeError as e:  # onnxruntime's Fail, InvalidGraph, NoSuchFile, ... derive from it
            raise BackendError(f"onnxruntime cannot load the {precision} graphs of {engine_dir}: {e}") from e
        self._vision_inputs = [i.name for i in self.vision.get_inputs()]

    def encode_images(self, batch: VisionBatch) -> list[np.ndarray]:
        feeds = {"pixel_values": batch.pixel_values, **batch.feeds}
        embeds = self.vision.run(None, {n: feeds[n] for n in self._vision_inputs})[0]
        bounds = np.concatenate([[0], np.cumsum(batch.tokens)])
        return [embeds[bounds[i]:bounds[i + 1]] for i in range(len(batch.keys))]

    def _feeds(self, batch: DecoderBatch, images: list[np.ndarray], kv_rows: np.ndarray) -> dict:
        d = self.dims

        def zeros(shape, kind):
            return np.zeros(shape, np.float32 if kind == "float" else np.int64)

        def copy(kv, k, past, n):
            kv[:, :, k, :, :n] = past

        past_kv, past_mask, past_index = past_tensors(batch, d.num_layers, d.num_kv_heads, d.head_dim, zeros, copy)
        embeds = np.concatenate(images) if images else np.zeros((0, d.hidden_size), np.float32)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids,
                "image_embeds": np.ascontiguousarray(embeds, np.float32), "past_kv": past_kv, "past_mask": past_mask,
                "past_index": np.asarray(past_index, np.int64), "kv_rows": kv_rows}

    def score(self, batch: DecoderBatch, images: list[np.ndarray]) -> np.ndarray:
        feeds = self._feeds(batch, images, np.zeros(0, np.int64))
        return np.asarray(self.decoder.run(["score"], feeds)[0], np.float32)

    def prefill(self, batch: DecoderBatch, images: list[np.ndarray]) -> list[np.ndarray]:
        b, width = batch.input_ids.shape
        feeds = self._feeds(batch, images, np.arange(b, dtype=np.int64))
        present = self.decoder.run(["present_kv"], feeds)[0]  # [layers, 2, B, kv_heads, S, d]
        out = []
        for r, n in enumerate(batch.lengths):
            first = int(np.argmax(batch.attention_mask[r] > 0))  # real tokens are contiguous (left or right padding)
            out.append(np.ascontiguousarray(present[:, :, r, :, first:first + int(n)]))
        return out
