"""The StreamDiffusion algorithm: tensors and frames in, frames out; no I/O, no threads."""

from .config import CFG_TYPES, MODES, StreamConfig
from .frames import PIXEL_FORMATS
from .pipeline import StreamDiffusion, unet_batch_size
from .prompts import PromptEncoder
from .similarity import SimilarityFilter, skip_probability

__all__ = [
    "CFG_TYPES",
    "MODES",
    "PIXEL_FORMATS",
    "PromptEncoder",
    "SimilarityFilter",
    "StreamConfig",
    "StreamDiffusion",
    "skip_probability",
    "unet_batch_size",
]
