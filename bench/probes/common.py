"""Shared set-up of the probes: the default config's context, and SFT params in HF format."""

from __future__ import annotations

import os

from o1jax.model import load_hf, save_hf
from o1jax.train import run_context
from o1jax.train.checkpoint import PreemptionFlag
from o1jax.train.config import load_config
from o1jax.train.metrics import MetricsWriter


def context(workdir: str, overrides: list[str], metrics: bool = False):
    """A RunContext for configs/tiny.yaml with `overrides`, writing into `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    config = load_config("configs/tiny.yaml", overrides=overrides)
    writer = MetricsWriter(workdir, enabled=metrics)
    return run_context.build_context(config, workdir, writer, PreemptionFlag())


def save_params(path: str, cfg, params) -> None:
    save_hf(path, cfg, params)  # safetensors, readable by transformers too


def load_params(path: str):
    """(cfg, params) saved by `save_params`."""
    return load_hf(path)
