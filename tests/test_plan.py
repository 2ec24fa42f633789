"""python -m o1jax.plan: per-device memory from a config, checked against known model sizes."""

import os

import pytest

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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mesh", "data=0,fsdp=8,tensor=1"], "axis sizes must be >= 1, or -1 for the rest"),
        (["--mesh", "data=-1,fsdp=0,tensor=1", "--devices", "8"], "axis sizes must be >= 1"),
        (["--mesh", "data=-1,fsdp=-1,tensor=1", "--devices", "8"], "at most one axis may be -1"),
        (["--mesh", "data=-1,fsdp=3,tensor=1", "--devices", "8"], "8 devices do not divide by 3"),
        (["--mesh", "data=2,fsdp=4,tensor=1", "--devices", "4"], "needs 8 devices, have 4"),
        (["--mesh", "data=1,fsdp=8,tensor=1", "--devices", "-4"], "--devices -4: must be >= 1"),
        (["model.preset=foo"], "model.preset"),
        (["lora.targets=[nope]"], "lora.targets"),
    ],
)
def test_cli_rejects_bad_meshes_devices_and_overrides(capsys, args, message):
    cfg = os.path.join(ROOT, "configs", "gemma2-9b.yaml")
    assert plan.main(["--config", cfg, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_fills_the_minus_one_axis_from_the_devices(capsys):
    cfg = os.path.join(ROOT, "configs", "gemma2-9b.yaml")
    assert plan.main(["--config", cfg, "--mesh", "data=-1,fsdp=4,tensor=1", "--devices", "8"]) == 0
    assert "{'data': 2, 'fsdp': 4, 'tensor': 1} (8 devices)" in capsys.readouterr().out


def test_cli_reports_a_model_config_error_in_one_line(capsys, monkeypatch):
    def preset(name, **overrides):  # what Gemma2Config raises for a value the config let through
        raise ValueError(f"unknown Gemma2 preset {name!r}")

    monkeypatch.setattr(Gemma2Config, "preset", preset)
    cfg = os.path.join(ROOT, "configs", "gemma2-9b.yaml")
    assert plan.main(["--config", cfg, "--mesh", "data=1,fsdp=8,tensor=1"]) == 2
    assert capsys.readouterr().err == f"error: {cfg}: model: unknown Gemma2 preset 'gemma2_9b'\n"
