"""gmr_fast: fast inference, export and training for GMR multimodal rerankers."""

from .errors import GmrError, ImageError
from .preprocess import ImageBatch, preprocess_images, smart_resize, vision_indices
from .prompt import PromptError
from .reranker import RankResult, Reranker

__all__ = ["GmrError", "ImageError", "ImageBatch", "PromptError", "RankResult", "Reranker", "preprocess_images",
           "smart_resize", "vision_indices"]
__version__ = "0.1.0"
