"""gmr_fast: fast inference, export and training for GMR multimodal rerankers."""

from .errors import (BackendError, CheckpointError, ConfigError, CoreError, EngineError, ExportError, GmrError, ImageError,
                     PromptError)
from .manifest import Manifest, load_manifest
from .preprocess import ImageBatch, preprocess_images, smart_resize, vision_indices
from .reranker import RankResult, Reranker, RerankerOptions

__all__ = ["BackendError", "CheckpointError", "ConfigError", "CoreError", "EngineError", "ExportError", "GmrError",
           "ImageError", "ImageBatch", "Manifest", "PromptError", "RankResult", "Reranker", "RerankerOptions",
           "load_manifest", "preprocess_images", "smart_resize", "vision_indices"]
__version__ = "0.2.0"
