"""Loading Stable Diffusion components: local folders, single files, the Hugging Face cache,
LoRA fusing, the tiny VAE, and synthetic random-weight models for tests and benchmarks."""

from bridge.models.components import Components, family_of
from bridge.models.hub import resolve_model_path
from bridge.models.loader import load_components
from bridge.models.synthetic import ensure_synthetic

__all__ = [
    "Components",
    "ensure_synthetic",
    "family_of",
    "load_components",
    "resolve_model_path",
]
