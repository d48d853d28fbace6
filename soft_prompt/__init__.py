"""Soft-prompt tuning (Lester et al. 2021) for Hugging Face causal LMs, in plain PyTorch."""

__version__ = "0.1.0"

from .checkpoint import CheckpointError  # noqa: E402
from .embedding import SoftPromptEmbedding  # noqa: E402
from .model import SoftPromptModel  # noqa: E402

__all__ = ["CheckpointError", "SoftPromptEmbedding", "SoftPromptModel", "__version__"]
