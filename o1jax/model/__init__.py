"""Gemma2 as pure functions over explicit param pytrees, LoRA adapters, and HF checkpoint I/O."""

from o1jax.model import lora
from o1jax.model.config import Gemma2Config
from o1jax.model.gemma2 import PositionWarning, forward, init_cache, init_params, unembed
from o1jax.model.hf_io import CheckpointError, load_hf, save_hf

__all__ = [
    "CheckpointError",
    "Gemma2Config",
    "PositionWarning",
    "forward",
    "init_cache",
    "init_params",
    "load_hf",
    "lora",
    "save_hf",
    "unembed",
]
