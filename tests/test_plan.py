"""python -m o1jax.plan: per-device memory from a config, checked against known model sizes."""

import os

from o1jax import plan
from o1jax.model import Gemma2Config
from o1jax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gemma2_2b_base_params_split_over_fsdp():
    config = load_config(os.path.join(ROOT, "configs", "gemma2-2b.yaml"))
    rows = plan.estimate(config, Gemma2Config.gemma2_2b(), {"data": 1, "fsdp": 4, "tensor": 1}, 4)
    # Gemma2-2B has 2.61e9 parameters (with its 256000 x 2304 embedding), bf16, 4 shards.
    assert abs(rows["base params"] - 2.614e9 * 2 / 4) / (2.614e9 * 2 / 4) < 0.01
    assert rows["optimizer (Adam, f32)"] == 2 * rows["LoRA adapter (f32)"]


def test_cli_prints_a_table_and_rejects_a_bad_mesh(capsys):
    cfg = os.path.join(ROOT, "configs", "gemma2-9b.yaml")
    assert plan.main(["--config", cfg, "--mesh", "data=1,fsdp=8,tensor=1"]) == 0
    out = capsys.readouterr().out
    assert "42 layers" in out and "total (before activations)" in out
    assert plan.main(["--config", cfg, "--mesh", "pipeline=2"]) == 2
    assert "--mesh pipeline=2: expected axis=size" in capsys.readouterr().err
