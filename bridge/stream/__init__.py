"""The StreamDiffusion algorithm: tensors and frames in, frames out; no I/O, no threads."""

from .config import CFG_TYPES, MODES, NOISE_MODES, StreamConfig
from .control import CONTROL_SOURCES, ControlNet
from .frames import FORMAT_CHANNELS
from .pipeline import StreamDiffusion, unet_batch_size
from .prompts import PromptEncoder
from .similarity import SimilarityFilter, skip_probability

__all__ = [
    "CFG_TYPES",
    "CONTROL_SOURCES",
    "ControlNet",
    "MODES",
    "NOISE_MODES",
    "FORMAT_CHANNELS",
    "PromptEncoder",
    "SimilarityFilter",
    "StreamConfig",
    "StreamDiffusion",
    "skip_probability",
    "unet_batch_size",
]
