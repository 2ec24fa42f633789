"""Shared set-up of the probes: the default config's context, and SFT params in HF format."""

from __future__ import annotations

import argparse
import os

from o1jax.model import load_hf, save_hf
from o1jax.train import pipeline, run_context
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


def add_policy_source(parser: argparse.ArgumentParser) -> None:
    """`--params DIR` (an HF directory, e.g. from sft_curve.py) or `--workdir DIR` (a train.py
    workdir: its SFT'd policy); one of them is required."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help="an HF directory from sft_curve.py")
    source.add_argument("--workdir", help="a train.py workdir: its SFT'd policy")


def policy_params(args: argparse.Namespace):
    """The params named by `add_policy_source`'s arguments (on the run's tiny architecture)."""
    if args.params:
        return load_params(args.params)[1]
    return pipeline.restore_policy(run_context.open_run(args.workdir))[0]
