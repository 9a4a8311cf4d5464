"""Model core: one Transformer configured by `ModelConfig`."""

from lmforge.model.attention import KVCache
from lmforge.model.config import ModelConfig
from lmforge.model.io import load_model, save_model
from lmforge.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer", "load_model", "save_model"]
