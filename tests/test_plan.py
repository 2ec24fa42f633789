"""python -m o1jax.plan: per-device memory from a config, checked against known model sizes."""

import os

import pytest

from o1jax import plan
from o1jax.model import Gemma2Config
from o1jax.model.lora import target_shapes
from o1jax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gemma2_2b_base_params_split_over_fsdp():
    config = load_config(os.path.join(ROOT, "configs", "gemma2-2b.yaml"))
    rows = plan.estimate(config, Gemma2Config.gemma2_2b(), {"data": 1, "fsdp": 4, "tensor": 1}, 4)
    # Gemma2-2B has 2.61e9 parameters (with its 256000 x 2304 embedding), bf16, 4 shards.
    assert abs(rows["base params"] - 2.614e9 * 2 / 4) / (2.614e9 * 2 / 4) < 0.01
    # Two f32 moments per adapter weight (and a few scalar counters).
    assert rows["optimizer (Adam, f32)"] == pytest.approx(2 * rows["LoRA adapter (f32)"], rel=1e-6)


def test_the_self_play_kv_cache_grows_with_the_leaves_per_tree():
    path = os.path.join(ROOT, "configs", "gemma2-2b.yaml")
    mesh, cfg = {"data": 1, "fsdp": 4, "tensor": 1}, Gemma2Config.gemma2_2b()
    one = plan.estimate(load_config(path), cfg, mesh, 4)["KV cache (self-play)"]
    four = plan.estimate(load_config(path, ["search.leaves_per_tree=4"]), cfg, mesh, 4)
    assert four["KV cache (self-play)"] == pytest.approx(4 * one)


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
        (["--mesh", "data=0,fsdp=8,tensor=1"], "axis sizes must be ints >= 1, or -1 for the rest"),
        (["--mesh", "data=-1,fsdp=0,tensor=1", "--devices", "8"], "axis sizes must be ints >= 1"),
        (["--mesh", "data=-1,fsdp=-1,tensor=1", "--devices", "8"], "at most one axis may be -1"),
        (["--mesh", "data=-1,fsdp=3,tensor=1", "--devices", "8"], "8 devices do not divide by 3"),
        (["--mesh", "data=2,fsdp=4,tensor=1", "--devices", "4"], "needs 8 devices, have 4"),
        (["--mesh", "data=1,fsdp=8,tensor=1", "--devices", "-4"], "--devices -4: must be >= 1"),
        (["model.preset=foo"], "model.preset"),
        (["lora.targets=[nope]"], "lora.targets"),
        (["--mesh", "data=--2"], "--mesh data=--2: expected axis=size"),
        (["--mesh", "fsdp=\u00b2"], "expected axis=size"),  # superscript two: isdigit() is True
        (["--mesh", "fsdp=\u0668"], "expected axis=size"),  # Arabic-Indic eight: int() takes it
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


def test_lora_rows_follow_the_fsdp_partition_rules():
    # The rules shard LoRA A [D, r] of q/k/v/gate/up and B [r, D] of o/down over fsdp; the other
    # factor is split over tensor (here 1). Gemma2-9B: D = 3584 divides by 8.
    config = load_config(os.path.join(ROOT, "configs", "gemma2-9b.yaml"))
    cfg = Gemma2Config.gemma2_9b()
    rows = plan.estimate(config, cfg, {"data": 1, "fsdp": 8, "tensor": 1}, 8)
    r = config.lora.rank
    per_layer = 0.0
    for t in config.lora.targets:
        d_in, d_out = target_shapes(cfg, t)
        a_shards, b_shards = (1, 8) if t in ("o_proj", "down_proj") else (8, 1)
        per_layer += 4 * r * (d_in / a_shards + d_out / b_shards)
    assert rows["LoRA adapter (f32)"] == pytest.approx(cfg.num_layers * per_layer)
    assert rows["optimizer (Adam, f32)"] == pytest.approx(2 * rows["LoRA adapter (f32)"], rel=1e-6)
    assert "trained copy of the params" not in rows  # LoRA: the base is only read


def test_an_axis_that_divides_no_dimension_leaves_the_params_replicated():
    # d_model 2304 does not divide by 7: every kernel and the embedding stay whole on each device.
    config = load_config(os.path.join(ROOT, "configs", "gemma2-2b.yaml"))
    cfg = Gemma2Config.gemma2_2b()
    one = plan.estimate(config, cfg, {"data": 1, "fsdp": 1, "tensor": 1}, 1)
    seven = plan.estimate(config, cfg, {"data": 1, "fsdp": 7, "tensor": 1}, 7)
    assert seven["base params"] == one["base params"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_full_finetune_counts_a_float32_trained_copy_and_moments(dtype):
    # SFTTrainer trains a float32 master copy of the params (the run keeps the base), and optax
    # keeps Adam's two moments in the copy's dtype.
    config = load_config(
        os.path.join(ROOT, "configs", "gemma2-9b.yaml"),
        ["sft.full_finetune=true", f"model.dtype={dtype}"],
    )
    rows = plan.estimate(config, Gemma2Config.gemma2_9b(), {"data": 1, "fsdp": 8, "tensor": 1}, 8)
    base = rows["base params"]
    assert base == pytest.approx(9.2417e9 * (2 if dtype == "bfloat16" else 4) / 8, rel=0.01)
    f32_copy = base * (2 if dtype == "bfloat16" else 1)
    assert rows["trained copy of the params (f32)"] == pytest.approx(f32_copy, rel=1e-6)
    assert rows["optimizer (Adam, f32)"] == pytest.approx(2 * f32_copy, rel=1e-6)


def test_cli_shows_the_full_finetune_rows(capsys):
    cfg = os.path.join(ROOT, "configs", "gemma2-9b.yaml")
    argv = ["--config", cfg, "--mesh", "data=1,fsdp=8,tensor=1", "sft.full_finetune=true"]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "trained copy of the params (f32)" in out and "optimizer (Adam, f32)" in out


def test_the_memory_commands_it_prints_carry_the_overrides_and_the_mesh(capsys):
    """The bench/memory.py commands measure the run planned: its overrides and its mesh (they
    named only the config file)."""
    import importlib.util
    import shlex

    cfg = os.path.join(ROOT, "configs", "gemma2-2b.yaml")
    argv = ["--config", cfg, "--mesh", "data=2,fsdp=4,tensor=1", "sft.micro_batch_size=16"]
    assert plan.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "bench/memory.py" in line]
    spec = importlib.util.spec_from_file_location("memory", os.path.join(ROOT, "bench/memory.py"))
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    for line, step in zip(lines, ("sft", "ppo"), strict=True):
        args = memory._parse(shlex.split(line.split("python bench/memory.py ", 1)[1]))
        assert (args.config, args.devices, args.step) == (cfg, 8, step)
        assert args.overrides == [
            "sft.micro_batch_size=16", "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"
        ]  # fmt: skip
