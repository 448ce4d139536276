"""Draft heads on a frozen base model: configuration, heads, wrapper and loading."""

from hydra.model.base_model import DEFAULT_BASE_MODEL, load_base_model, load_tokenizer
from hydra.model.config import HEAD_ARCHS, HydraConfig
from hydra.model.hydra_model import HydraModel

__all__ = ["DEFAULT_BASE_MODEL", "HEAD_ARCHS", "HydraConfig", "HydraModel", "load_base_model",
           "load_tokenizer"]
