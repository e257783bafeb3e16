"""torch backend: the engine's two graphs run eagerly in PyTorch from the source checkpoint
(fp32 by default), for checks against onnxruntime and for machines where torch is the better
engine. Needs torch and transformers (`pip install gmr_fast[export]`)."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from ..errors import GmrError


class TorchBackend:
    name = "torch"

    def __init__(self, engine_dir: os.PathLike, manifest: dict, checkpoint: os.PathLike | None = None,
                 device: str = "cpu", num_threads: int | None = None):
        try:
            import torch
            from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
        except ImportError:
            raise GmrError("the torch backend needs torch and transformers: pip install 'gmr_fast[export]'") from None
        from ..graphs.decoder import INPUT_NAMES, DecoderWithScoreHead
        from ..graphs.vision import VisionEncoder

        checkpoint = pathlib.Path(checkpoint or manifest["source"]["checkpoint"])
        if not (checkpoint / "config.json").exists():
            raise GmrError(f"the torch backend loads the engine's source checkpoint, and {checkpoint} is not one; "
                           "pass checkpoint=... to Reranker(backend='torch')")
        if num_threads:
            torch.set_num_threads(num_threads)
        cls = Qwen2_5_VLForConditionalGeneration if manifest["model_family"] == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
        model = cls.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager",
                                    local_files_only=True, use_safetensors=True).eval().to(device)
        ids = manifest["token_ids"]
        self.torch, self.device, self.decoder_inputs = torch, device, INPUT_NAMES
        self.vision = VisionEncoder(model).eval()
        self.decoder = DecoderWithScoreHead(model, ids["yes"], ids["no"]).eval()

    def _tensors(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict:
        return {n: self.torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in names}

    def encode_images(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self.torch.inference_mode():
            return self.vision(**self._tensors(feeds, self.vision.input_names)).float().cpu().numpy()

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self.torch.inference_mode():
            return self.decoder(**self._tensors(feeds, self.decoder_inputs)).float().cpu().numpy()
