"""Dynamic Hierarchical Sparse Attention for MLX language models."""

from ._version import __version__
from .cache import DHSACache
from .config import DHSAConfig
from .loading import MODEL_ALIASES, ModelNotFoundError, load
from .patching import make_prompt_cache, patch, unpatch
from .plan import Plan

__all__ = [
    "DHSACache",
    "DHSAConfig",
    "MODEL_ALIASES",
    "ModelNotFoundError",
    "Plan",
    "__version__",
    "load",
    "make_prompt_cache",
    "patch",
    "unpatch",
]
