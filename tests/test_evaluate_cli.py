"""`python -m o1jax.evaluate`: bad arguments, data and workdirs: one `error:` line, exit 2."""

import pytest
from tiny_models import random_tiny_model

from o1jax import evaluate as cli
from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.model import save_hf
from o1jax.train.config import RunConfig, dump_config


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--samples", "0"], "--samples must be >= 1, got 0"),
        (["--limit", "-1"], "--limit must be >= 0, got -1"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 0, got -5"),
        (["--search", "mcts", "--simulations", "0"], "--simulations must be >= 1, got 0"),
        (["--search", "mctsr", "--rollouts", "0"], "--rollouts must be >= 1, got 0"),
    ],
)
def test_bad_numbers_are_usage_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--workdir", str(tmp_path / "run"), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_empty_problem_file_names_the_file(tmp_path, capsys):
    model = tmp_path / "hf_tiny"
    tokenizer = build_tiny_tokenizer(model)
    cfg, params = random_tiny_model(len(tokenizer), seed=1, sliding_window=8)
    save_hf(str(model), cfg, params)
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    out = tmp_path / "out"
    assert cli.main(["--model", str(model), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {data}: no problems to evaluate"
    assert not out.exists() or not any(out.iterdir())


def test_a_model_the_saved_config_cannot_build_names_the_workdir(tmp_path, capsys, monkeypatch):
    import o1jax.train.run_context as run_context

    message = "Gemma2Config: attention_impl must be 'xla' or 'pallas', got 'foo'"

    def open_run(workdir):  # what building the model raises for a value the config let through
        raise ValueError(message)

    monkeypatch.setattr(run_context, "open_run", open_run)
    workdir = tmp_path / "run"
    assert cli.main(["--workdir", str(workdir)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {workdir}: {message}"


def test_a_bad_value_in_a_saved_config_is_one_error_line(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    dump_config(RunConfig(), str(workdir / "config.yaml"))
    text = (workdir / "config.yaml").read_text()
    assert "attention_impl: xla" in text
    (workdir / "config.yaml").write_text(text.replace("attention_impl: xla", "attention_impl: foo"))
    assert cli.main(["--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(workdir) in err and "attention_impl" in err
    assert len(err.strip().splitlines()) == 1


def test_maj_at_k_counts_equal_answers_written_differently_together():
    from o1jax.data.answers import vote as majority_answer

    assert majority_answer(["14", "15", "14.0", "x = 14", "15", None]) == "14"
    assert majority_answer(["15", "14", "15.0", "14"]) == "15"  # a tie: the earliest group
    assert majority_answer([None, None]) is None
