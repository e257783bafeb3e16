"""onnxruntime backend: CPUExecutionProvider by default; CUDA / TensorRT execution providers
when asked for and present in the installed onnxruntime."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import GmrError


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, engine_dir: os.PathLike, manifest: dict, providers: Sequence[str] | None, num_threads: int):
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in available]
        if missing:
            raise GmrError(f"execution provider(s) {missing} not available in this onnxruntime (available: {available})")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        graphs = manifest["graphs"]
        self.vision = ort.InferenceSession(os.path.join(engine_dir, graphs["vision"]["file"]), opts, providers=providers)
        self.decoder = ort.InferenceSession(os.path.join(engine_dir, graphs["decoder"]["file"]), opts, providers=providers)
        self._vision_inputs = [i.name for i in self.vision.get_inputs()]

    def encode_images(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.vision.run(None, {name: feeds[name] for name in self._vision_inputs})[0]

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.decoder.run(None, feeds)[0]
