"""The run config: values checked when it loads, overrides read as typed, workdirs left usable."""

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import pytest
import yaml

from o1jax.data.tasks import DataError
from o1jax.train import config as config_module
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


@pytest.mark.parametrize(
    "override,message",
    [
        ("seed=-1", "seed: must be in [0, 2**63)"),  # numpy's default_rng refused it after SFT
        ("seed=9223372036854775808", "seed: must be in [0, 2**63)"),  # jax.random.key's limit
        ("max_nonfinite=0", "max_nonfinite: must be >= 1"),  # RL stopped with nothing skipped
        ("data.test_path=/x.jsonl", "data.test_path: needs data.path"),  # was silently unused
        ("sft.learning_rate=1" + "0" * 400, "sft.learning_rate: 1000"),  # OverflowError
        ("search.discount=0", "search.discount: must be in (0, 1]"),  # MCTSConfig, after SFT
        ("search.discount=1.5", "search.discount: must be in (0, 1]"),
        ("search.discount=.nan", "search.discount: must be in (0, 1]"),
        ("search.c_puct=-1", "search.c_puct: must be >= 0 and finite"),
        ("search.c_puct=.inf", "search.c_puct: must be >= 0 and finite"),
        ("search.patience=-1", "search.patience: must be >= 0"),
        ("search.temperature=.inf", "search.temperature: must be >= 0 and finite"),
        ("search.meta_action_weights=[1, .inf, 1, 1]", "search.meta_action_weights: must be 4"),
        ("sft.max_grad_norm=0", "sft.max_grad_norm: must be > 0"),  # no step at all
        ("sft.max_grad_norm=-1", "sft.max_grad_norm: must be > 0"),  # gradient ascent
        ("sft.weight_decay=-0.01", "sft.weight_decay: must be >= 0 and finite"),
        ("sft.learning_rate=.inf", "sft.learning_rate: must be > 0 and finite"),
        ("lora.alpha=0", "lora.alpha: must be > 0 and finite"),
        ("lora.alpha=-8", "lora.alpha: must be > 0 and finite"),
        ("model.attn_logit_softcapping=.inf", "model.attn_logit_softcapping: must be > 0 and"),
        ("rl.max_grad_norm=0", "rl.max_grad_norm: must be > 0"),
        ("rl.max_grad_norm=-1", "rl.max_grad_norm: must be > 0"),
        ("rl.gamma=1.01", "rl.gamma: must be in [0, 1]"),
        ("rl.gamma=-0.5", "rl.gamma: must be in [0, 1]"),
        ("rl.lam=2", "rl.lam: must be in [0, 1]"),
        ("rl.lam=.nan", "rl.lam: must be in [0, 1]"),
        ("rl.clip_eps=0", "rl.clip_eps: must be > 0"),
        ("rl.clip_eps=-0.2", "rl.clip_eps: must be > 0"),
        ("rl.beta0=1.5", "rl.beta0: must be in [0, 1]"),
        ("rl.beta0=-0.1", "rl.beta0: must be in [0, 1]"),
        ("rl.beta_steps=-1", "rl.beta_steps: must be >= 0"),
        ("rl.kl_coef=-0.05", "rl.kl_coef: must be >= 0 and finite"),
        ("rl.value_coef=-1", "rl.value_coef: must be >= 0 and finite"),
        ("rl.entropy_coef=-0.01", "rl.entropy_coef: must be >= 0 and finite"),
        ("rl.alpha=.inf", "rl.alpha: must be >= 0 and finite"),
        ("rl.learning_rate=.inf", "rl.learning_rate: must be > 0 and finite"),
        ("pprm.learning_rate=.inf", "pprm.learning_rate: must be > 0 and finite"),
        ("pprm.weight_decay=.inf", "pprm.weight_decay: must be >= 0 and finite"),
        # smoke.yaml's task has 256 training problems; self-play draws them without replacement
        ("rl.problems_per_iteration=257", "rl.problems_per_iteration: must be <= the number of "
                                          "training problems (256)"),
    ],
)  # fmt: skip
def test_numeric_ranges_are_checked_when_the_config_loads(override, message):
    """Each of these loaded, then crashed after SFT, or trained the wrong way without a word."""
    with pytest.raises(ConfigError, match=re.escape(f"smoke.yaml: {message}")) as caught:
        load_config(SMOKE, [override])
    assert "\n" not in str(caught.value)


def test_the_edges_of_the_numeric_ranges_load_and_just_past_them_do_not():
    edges = ["seed=0", "max_nonfinite=1", "search.discount=1", "search.c_puct=0"]
    edges += ["rl.gamma=0", "rl.lam=1", "rl.beta0=0", "rl.kl_coef=0", "sft.weight_decay=0"]
    edges += ["rl.max_grad_norm=1e-6", "sft.max_grad_norm=.inf", "rl.problems_per_iteration=256"]
    c = load_config(SMOKE, edges)
    assert (c.search.discount, c.rl.gamma, c.rl.problems_per_iteration) == (1, 0, 256)
    # Without RL iterations nothing is drawn: any problems_per_iteration will do.
    load_config(SMOKE, ["rl.iterations=0", "rl.problems_per_iteration=1000"])
    with pytest.raises(ConfigError, match=re.escape("rl.problems_per_iteration: must be <=")):
        load_config(SMOKE, ["data.task.num_train=4"])  # smoke.yaml draws 8 an iteration


def test_duplicate_yaml_keys_are_refused_with_the_key_and_file(tmp_path):
    """yaml.safe_load keeps the last of two equal keys and drops the first without a word."""
    for text, key, lines in [
        ("sft: {steps: 10}\nrl: {iterations: 2}\nsft: {seq_len: 64}\n", "sft", (3, 1)),
        ("sft:\n  steps: 10\n  steps: 20\n", "steps", (3, 2)),
        ("rl: {iterations: 2, iterations: 3}\n", "iterations", (1, 1)),
    ]:  # fmt: skip
        path = tmp_path / "dup.yaml"
        path.write_text(text)
        message = f"{path}: duplicate key {key} (line {lines[0]}; first at line {lines[1]})"
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(str(path))
    with pytest.raises(ConfigError, match=re.escape("sft: cannot parse '{steps: 1, steps: 2}'")):
        load_config(SMOKE, ["sft={steps: 1, steps: 2}"])
    # A `<<` merge's keys may still be overridden: that is what a merge is for.
    merged = tmp_path / "merged.yaml"
    merged.write_text("x: &b {steps: 3, batch_size: 2}\nsft: {<<: *b, steps: 5}\n")
    raw = yaml.load(merged.read_text(), Loader=config_module._UniqueKeyLoader)
    assert raw["sft"] == {"steps": 5, "batch_size": 2}


def test_string_fields_take_the_override_text_as_typed():
    config = load_config(
        SMOKE, ["data.path=/data/set #1.jsonl", "model_dir=yes", "tokenizer_dir=2024"]
    )
    assert config.data.path == "/data/set #1.jsonl"
    assert (config.model_dir, config.tokenizer_dir) == ("yes", "2024")
    config = load_config(SMOKE, ["sft={steps: 3}", "sft.batch_size=2", "lora.targets=[q_proj]"])
    assert (config.sft.steps, config.sft.batch_size, config.sft.seq_len) == (3, 2, 144)
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
    # A workdir that cannot be made (under a file) is one line too, not a traceback.
    with pytest.raises(ConfigError, match=r"--workdir .*file/run: cannot create it \(Not a dir"):
        pipeline.run(config, str(a_file / "run"))


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


def test_more_problems_per_iteration_than_the_file_holds_stop_the_run_before_training(tmp_path):
    """A problem file's size is known only once it is read: the run stops there, before SFT and
    before the workdir's config.yaml is written (numpy's "Cannot take a larger sample" came
    after SFT)."""
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}
            for i in range(5)]  # fmt: skip
    held = [{"question": f"What is {i} plus 2?", "answer": f"#### {i + 2}"} for i in range(2)]
    for name, part in (("train.jsonl", rows), ("test.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    data = [f"data.path={tmp_path / 'train.jsonl'}", f"data.test_path={tmp_path / 'test.jsonl'}"]
    config = load_config(SMOKE, data)  # smoke.yaml draws 8 problems an iteration
    message = "rl.problems_per_iteration: must be <= the number of training problems (5), got 8"
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "config.yaml").exists()


def test_data_without_worked_solutions_or_a_missing_pairs_file_leave_the_workdir_free(tmp_path):
    """Both are found when the run reads its data, before SFT: one line naming the file or key,
    and no config.yaml, so the corrected command may use the same workdir."""
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i + 1}"} for i in range(12)]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path, held = tmp_path / "answers.jsonl", tmp_path / "held.jsonl"
    held.write_text(json.dumps({"question": "What is 1 plus 2?", "answer": "3"}) + "\n")
    data = [f"data.path={path}", f"data.test_path={held}", "rl.problems_per_iteration=4"]
    message = "none of the 12 train problems of data.path .*answers.jsonl has a worked solution"
    with pytest.raises(ConfigError, match=message):
        pipeline.run(load_config(SMOKE, data), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "config.yaml").exists()
    missing = tmp_path / "nope.jsonl"
    config = load_config(SMOKE, [f"pprm.pairs_path={missing}", "pprm.steps=1"])
    with pytest.raises(DataError, match=re.escape(f"pprm.pairs_path: {missing}: no such file")):
        pipeline.run(config, str(tmp_path / "w2"))
    assert not (tmp_path / "w2" / "config.yaml").exists()


def test_data_test_fraction_splits_the_built_in_task_too():
    """The built-in task's held-out problems come from the data.test_fraction hash split (it
    was the task's own 0.1 whatever the config said)."""
    from o1jax.data.tasks import question_split

    config = load_config(SMOKE, ["data.test_fraction=0.5"])
    train, test = run_context.load_problems(config)
    assert all(question_split(p.question, 0.5) == "test" for p in test)
    assert all(question_split(p.question, 0.5) == "train" for p in train)
    assert not {p.question for p in train} & {p.question for p in test}


def test_a_question_of_data_test_path_never_trains(tmp_path):
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}
            for i in range(6)]  # fmt: skip
    # The held-out file's copy of question 5 differs in spacing only: still the same question.
    spaced = {**rows[5], "question": "What  is 5 plus\t1? "}
    for name, part in (("train.jsonl", rows), ("test.jsonl", [rows[4], spaced])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    data = [f"data.path={tmp_path / 'train.jsonl'}", f"data.test_path={tmp_path / 'test.jsonl'}"]
    train, test = run_context.load_problems(
        load_config(SMOKE, [*data, "rl.problems_per_iteration=4"])
    )
    assert [p.question for p in train] == [r["question"] for r in rows[:4]]
    assert len(test) == 2
    same = [f"data.path={tmp_path / 'test.jsonl'}", f"data.test_path={tmp_path / 'test.jsonl'}"]
    with pytest.raises(
        ConfigError, match=r"every one of its 2 questions is also in data\.test_path"
    ):
        run_context.load_problems(load_config(SMOKE, [*same, "rl.problems_per_iteration=1"]))


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
    # They change no number, so a resume may change them (tests/test_reproducibility.py).
    run_context.check_workdir(load_config(SMOKE, ["sft.micro_batch_size=8"]), str(tmp_path))
    changed = load_config(SMOKE, ["sft.micro_batch_size=8", "sft.steps=30"])
    with pytest.raises(ConfigError, match=re.escape("sft.steps: 24 in the workdir, 30")):
        run_context.check_workdir(changed, str(tmp_path))


def test_a_checkpoint_of_another_config_is_refused_without_config_yaml(tmp_path, monkeypatch):
    """Each checkpoint records its run's config: a workdir whose config.yaml is gone (or whose
    checkpoints were copied from another run) must not resume a run of another seed."""
    from o1jax.train.checkpoint import PreemptionFlag
    from o1jax.train.metrics import MetricsWriter

    workdir = tmp_path / "w"
    first = load_config(SMOKE, ["sft.steps=2"])
    ctx = run_context.build_context(
        first, str(workdir), MetricsWriter(str(workdir), enabled=False), PreemptionFlag()
    )
    like = pipeline._checkpoint_like(ctx, "sft")  # shapes only: it holds no device memory
    assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(like))
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), like)
    run_context.save_checkpoint(ctx, 1, state, {"stage": "sft", "step": 1})
    ctx.checkpointer.close()
    (workdir / "metrics.jsonl").write_text('{"step": 1, "sft/loss": 2.0}\n')

    def resumed(*args, **kwargs):
        raise AssertionError("resumed the checkpoint of another config")

    monkeypatch.setattr(pipeline, "run_sft", resumed)
    other = load_config(SMOKE, ["sft.steps=2", "seed=7"])
    message = "checkpoints/1: a checkpoint of a different config (seed: 0 in the workdir, 7 now)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.run(other, str(workdir))
    assert not (workdir / "config.yaml").exists()
    assert (workdir / "metrics.jsonl").read_text() == '{"step": 1, "sft/loss": 2.0}\n'
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]


def test_rows_of_a_run_killed_before_its_first_checkpoint_are_logged_once(tmp_path):
    """With sft.steps 0 the first checkpoint is the post-SFT evaluation's, whose scalars are
    logged at step 0 just before it: a run killed between the two left that row, and the
    resumed run, starting afresh, logged it a second time."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    left = {"step": 0, "eval/sft_pass1": 0.5, "eval/search_accuracy": 0.5}
    (workdir / "metrics.jsonl").write_text(json.dumps(left) + "\n")
    overrides = ["sft.steps=0", "rl.iterations=0", "eval.num_problems=2"]
    overrides += ["eval.search_simulations=1", "eval.max_new_tokens=4"]
    pipeline.run(load_config(SMOKE, overrides), str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/sft_pass1" in r] == [0]
    assert left not in rows


def test_rl_straight_from_the_base_needs_no_sft_data_and_no_sft_batch(tmp_path):
    """sft.steps 0 (self-play from a pretrained model) refused answer-only problems ("sft: no
    training example") and, after claiming the workdir, an SFT batch that the mesh's 8 devices
    do not split, although no SFT step runs."""
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(60)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = ["sft.steps=0", "sft.batch_size=3", f"data.path={path}", "rl.iterations=0"]
    overrides += ["rl.problems_per_iteration=2", "eval.num_problems=2"]
    overrides += ["eval.search_simulations=1", "eval.max_new_tokens=4"]
    report = pipeline.run(load_config(SMOKE, overrides), str(tmp_path / "w"))
    assert report["test_problems"] == 2 and 0.0 <= report["sft_pass1"] <= 1.0


def test_only_process_0_writes_the_run_files(tmp_path, monkeypatch):
    """Every process of a multi-host run runs the pipeline on the same shared workdir: only
    process 0 may write config.yaml, the report, the tokenizer, the metrics and curves, and the
    evaluation records and trees (the others raced it, truncating one another's files);
    orbax writes the checkpoints of all."""
    from o1jax.train import metrics

    monkeypatch.setattr(metrics, "is_primary", lambda: False, raising=False)
    overrides = ["sft.steps=1", "rl.iterations=0", "eval.num_problems=2"]
    overrides += ["eval.search_simulations=1", "eval.max_new_tokens=4"]
    report = pipeline.run(load_config(SMOKE, overrides), str(tmp_path / "w"))
    assert "sft_pass1" in report
    assert os.listdir(tmp_path / "w") == ["checkpoints"]


def test_an_override_below_a_value_names_it_as_no_section():
    with pytest.raises(ConfigError, match=re.escape("override sft.steps.x: sft.steps is not a")):
        load_config(SMOKE, ["sft.steps.x=5"])
    with pytest.raises(ConfigError, match=re.escape("override model.dtype.a.b: model.dtype is")):
        load_config(SMOKE, ["model.dtype.a.b=float32"])


def test_a_kill_while_config_yaml_is_written_leaves_no_partial_file(tmp_path, monkeypatch):
    """The next start reads a workdir's config.yaml as the run's: a partial one refused it."""

    from o1jax.train import files

    def killed(fd):  # the text is written, not yet synced or renamed into place
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(files.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        config_module.dump_config(load_config(SMOKE), str(tmp_path / "config.yaml"))
    assert not (tmp_path / "config.yaml").exists()
    monkeypatch.undo()
    config_module.dump_config(load_config(SMOKE), str(tmp_path / "config.yaml"))
    run_context.check_workdir(load_config(SMOKE), str(tmp_path))  # the same run's


def test_a_resumed_runs_wall_seconds_count_its_earlier_segments(tmp_path, monkeypatch):
    """report.json's wall_seconds of a run killed and resumed: the segment before the kill
    (here made to read 1000 s) up to its last checkpoint, plus the resumed one; it counted only
    the last segment."""

    class Killed(Exception):
        pass

    real_save, real_elapsed = run_context.save_checkpoint, run_context.RunContext.elapsed

    def save_then_die(ctx, step, state, meta):
        real_save(ctx, step, state, meta)
        raise Killed  # SIGKILL right after the first checkpoint

    overrides = ["sft.steps=2", "checkpoint.every=1", "rl.iterations=0", "eval.num_problems=2"]
    overrides += ["eval.search_simulations=1", "eval.max_new_tokens=4"]
    config, workdir = load_config(SMOKE, overrides), str(tmp_path / "w")
    monkeypatch.setattr(run_context.RunContext, "elapsed", lambda ctx: 1000.0 + real_elapsed(ctx))
    import o1jax.train.sft_stage as sft_stage

    monkeypatch.setattr(sft_stage, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        pipeline.run(config, workdir)
    monkeypatch.undo()
    started = time.perf_counter()
    report = pipeline.run(config, workdir)
    assert 1000.0 < report["wall_seconds"] < 1000.0 + (time.perf_counter() - started) + 60
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f)["wall_seconds"] == report["wall_seconds"]


def test_train_py_names_only_the_files_it_wrote(tmp_path, monkeypatch, capsys):
    """A process other than 0 of a multi-host run writes no report, curves or TensorBoard
    files; train.py printed their paths anyway."""
    from o1jax.train import metrics

    monkeypatch.syspath_prepend(ROOT)
    import train

    monkeypatch.setattr(metrics, "is_primary", lambda: False, raising=False)
    overrides = ["sft.steps=0", "rl.iterations=0", "eval.num_problems=2"]
    overrides += ["eval.search_simulations=1", "eval.max_new_tokens=4"]
    assert train.main(["--config", SMOKE, "--workdir", str(tmp_path / "w"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "sft_pass1" in out
    assert "report:" not in out and "curves:" not in out and "tensorboard" not in out
