"""The run config: values checked when it loads, overrides read as typed, workdirs left usable."""

import os
import re

import pytest
import yaml

from o1jax.data.tasks import DataError
from o1jax.train import pipeline, run_context
from o1jax.train.config import ConfigError, load_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.task.min_ops=5", "data.task.min_ops: must be >= 1 and <= data.task.max_ops"),
        ("model.attention_impl=foo", "model.attention_impl: must be 'xla' or 'pallas'"),
        ("model.preset=foo", "model.preset: must be one of"),
        ("model.num_kv_heads=3", "model.num_heads: must be a multiple of model.num_kv_heads"),
        ("mesh.data=0", "mesh.data: must be >= 1, or -1"),
        ("mesh.fsdp=-1", "mesh: may have at most one axis of -1"),
        ("sft.batch_size=0", "sft.batch_size: must be >= 1"),
        ("sft.loss_chunk=-1", "sft.loss_chunk: must be >= 0"),
        ("sft.micro_batch_size=-4", "sft.micro_batch_size: must be >= 0"),
        ("sft.micro_batch_size=3", "sft.micro_batch_size: must divide sft.batch_size (8)"),
        ("model.remat=2", "model.remat: expected true or false"),
        ("checkpoint.every=0", "checkpoint.every: must be >= 1"),
        ("checkpoint.keep=0", "checkpoint.keep: must be >= 1"),
        ("eval.num_problems=0", "eval.num_problems: must be >= 1"),
        ("search.backup=foo", "search.backup: must be 'max' or 'mean'"),
        ("search.max_children=1", "search.max_children: must be 0 or >= search.num_children (2)"),
        ("search.leaves_per_tree=0", "search.leaves_per_tree: must be >= 1"),
        ("search.varentropy_bonus=-1", "search.varentropy_bonus: must be >= 0"),
        ("search.entropy_prior=2", "search.entropy_prior: expected true or false"),
        ("search.meta_action_prob=1.5", "search.meta_action_prob: must be in [0, 1]"),
        ("search.meta_action_weights=[1, 0]", "search.meta_action_weights: must be 4 weights"),
        ("lora.targets=[nope]", "lora.targets: must be a non-empty subset"),
        ("data.test_fraction=2", "data.test_fraction: must be in (0, 1)"),
        ("rl.buffer_capacity=0", "rl.buffer_capacity: must be >= 1"),
        ("rl.loss_chunk=-1", "rl.loss_chunk: must be >= 0"),
        ("rl.micro_batch_size=-2", "rl.micro_batch_size: must be >= 0"),
        ("rl.micro_batch_size=5", "rl.micro_batch_size: must divide rl.batch_size (16)"),
    ],
)
def test_bad_values_are_caught_when_the_config_loads(override, message):
    """Each of these once passed the loader and failed later, some after minutes of training,
    with a traceback instead of a line naming the key."""
    with pytest.raises(ConfigError, match=re.escape(f"smoke.yaml: {message}")):
        load_config(SMOKE, [override])


def test_string_fields_take_the_override_text_as_typed():
    config = load_config(
        SMOKE, ["data.path=/data/set #1.jsonl", "model_dir=yes", "tokenizer_dir=2024"]
    )
    assert config.data.path == "/data/set #1.jsonl"
    assert (config.model_dir, config.tokenizer_dir) == ("yes", "2024")
    config = load_config(SMOKE, ["sft={steps: 3}", "sft.batch_size=2", "lora.targets=[q_proj]"])
    assert (config.sft.steps, config.sft.batch_size, config.sft.seq_len) == (3, 2, 128)
    assert config.lora.targets == ("q_proj",)
    with pytest.raises(ConfigError, match=re.escape("sft.steps: cannot parse")):
        load_config(SMOKE, ["sft.steps=[1"])


def test_unreadable_config_files_are_config_errors(tmp_path):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"seed: \xff\xfe\n")
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("1: 2\nnull: 3\n")
    for path, message in [
        (tmp_path, "cannot read the config"),
        (binary, "cannot read the config"),
        (mixed, "unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(str(path))


def test_a_start_that_fails_leaves_the_workdir_free(tmp_path):
    """The first command's bad data path must not make its config the workdir's: the corrected
    command is refused only when a run really started there."""
    workdir = str(tmp_path / "w")
    for missing in ("one.jsonl", "two.jsonl"):
        config = load_config(SMOKE, [f"data.path={tmp_path / missing}"])
        with pytest.raises(DataError, match=re.escape(f"{missing}: no such file")):
            pipeline.run(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "config.yaml"))


def test_workdirs_that_cannot_hold_a_run_are_config_errors(tmp_path):
    config = load_config(SMOKE)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run_context.check_workdir(config, str(a_file))
    for text, message in [("seed: [1\n", "unreadable"), ("- 1\n", "not a config")]:
        workdir = tmp_path / f"w{len(text)}"
        workdir.mkdir()
        (workdir / "config.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            run_context.check_workdir(config, str(workdir))


def test_a_tokenizer_source_that_holds_no_tokenizer_is_a_config_error(tmp_path):
    for override, message in [
        (f"tokenizer_dir={tmp_path / 'nope'}", "tokenizer_dir .*nope: no such directory"),
        (f"model_dir={tmp_path}", "model_dir .*: could not load a tokenizer"),
    ]:
        with pytest.raises(ConfigError, match=message):
            run_context.build_tokenizer(load_config(SMOKE, [override]), str(tmp_path / "w"))


def test_a_batch_that_does_not_split_over_the_mesh_stops_the_run_before_training(tmp_path):
    """On the tests' 8 devices: refused before SFT, not after it (the PPRM stage once crashed
    there, and on every resume)."""
    config = load_config(SMOKE, ["pprm.steps=2", "pprm.batch_size=12"])
    with pytest.raises(ConfigError, match=re.escape("pprm.batch_size: must be a multiple")):
        pipeline.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "config.yaml").exists()


def test_the_memory_knobs_reach_the_model_and_the_trainer_and_keep_old_workdirs(tmp_path):
    """`model.remat` builds a remat Gemma2Config; `sft.loss_chunk` and `sft.micro_batch_size`
    load. A workdir whose config.yaml predates these keys is still the same run's."""
    config = load_config(SMOKE, ["model.remat=true", "sft.loss_chunk=32", "sft.micro_batch_size=8"])
    assert run_context.tiny_model_config(config, 64).remat
    assert not run_context.tiny_model_config(load_config(SMOKE), 64).remat
    assert (config.sft.loss_chunk, config.sft.micro_batch_size) == (32, 8)

    default = load_config(SMOKE)
    old = to_dict(default)
    del old["model"]["remat"], old["sft"]["loss_chunk"], old["sft"]["micro_batch_size"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    run_context.check_workdir(default, str(tmp_path))  # no error: the same config
    changed = load_config(SMOKE, ["sft.micro_batch_size=8"])
    with pytest.raises(ConfigError, match=re.escape("sft.micro_batch_size: 0 in the workdir, 8")):
        run_context.check_workdir(changed, str(tmp_path))
