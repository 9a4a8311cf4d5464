"""lmforge: one PyTorch-native codebase for the whole life of a language model."""

from lmforge.core.errors import ConfigError, LmforgeError

__version__ = "0.1.0"
__all__ = ["ConfigError", "LmforgeError", "__version__"]
