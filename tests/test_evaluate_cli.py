"""`python -m o1jax.evaluate`: bad arguments, data and workdirs: one `error:` line, exit 2."""

import json

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
        (["--trees", "t"], "--trees needs --search"),  # it was ignored
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


def test_an_output_directory_that_cannot_be_made_fails_before_evaluating(tmp_path, capsys):
    model = tmp_path / "hf_tiny"
    tokenizer = build_tiny_tokenizer(model)
    cfg, params = random_tiny_model(len(tokenizer), seed=1, sliding_window=8)
    save_hf(str(model), cfg, params)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"question": "Start with 4, add 5.", "answer": "9"}) + "\n")
    a_file = tmp_path / "file"
    a_file.write_text("")
    argv = ["--model", str(model), "--data", str(data), "--max-new-tokens", "2"]
    for flags in (["--out", str(a_file)], ["--search", "mcts", "--trees", str(a_file / "t")]):
        assert cli.main([*argv, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flags[-2]} {flags[-1]}: cannot create it")
        assert len(err.strip().splitlines()) == 1
    # A solution budget too short for a refine search fails before the greedy pass (it ran,
    # wrote its outputs, then died with a traceback).
    out = tmp_path / "out"
    assert cli.main([*argv, "--search", "mctsr", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --search mctsr: RefineConfig.solution_length must be >= 8")
    assert len(err.splitlines()) == 1 and not any(out.iterdir())


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


def _model_dir_naming_a_second_eos(tmp_path, second_eos: int):
    model = tmp_path / "hf_tiny"
    tokenizer = build_tiny_tokenizer(model)
    cfg, params = random_tiny_model(len(tokenizer), seed=1, sliding_window=8)
    save_hf(str(model), cfg, params)
    eos = {"eos_token_id": [tokenizer.eos_token_id, second_eos]}
    (model / "generation_config.json").write_text(json.dumps(eos))
    return model, tokenizer, cfg, params


def test_a_model_directory_stops_on_every_eos_id_it_names(tmp_path, monkeypatch):
    from o1jax.train import evaluate as ev

    model, tokenizer, _, _ = _model_dir_naming_a_second_eos(tmp_path, 7)
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"question": "Start with 3, add 4.", "answer": "7"}) + "\n")
    seen = []
    real = ev.generate_texts

    def recording(*args, **kwargs):
        seen.append(kwargs.get("stop_tokens"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "generate_texts", recording)
    argv = ["--model", str(model), "--data", str(data), "--out", str(tmp_path / "out")]
    assert cli.main([*argv, "--max-new-tokens", "4"]) == 0
    assert seen == [(tokenizer.eos_token_id, 7)]
    # --dtype bfloat16 loads the weights in bfloat16.
    dtypes = []
    monkeypatch.setattr(
        ev,
        "generate_texts",
        lambda params, *a, **k: (
            dtypes.append(params["final_norm"]["scale"].dtype) or real(params, *a, **k)
        ),
    )
    assert cli.main([*argv, "--max-new-tokens", "4", "--dtype", "bfloat16"]) == 0
    assert str(dtypes[0]) == "bfloat16"


def test_tree_files_of_ids_that_differ_only_in_replaced_characters_do_not_collide():
    from types import SimpleNamespace

    from o1jax.train.evaluate import _tree_name

    names = {_tree_name(SimpleNamespace(id=i)) for i in ("a/b", "a_b", "a b", "arith-0038fe22")}
    assert len(names) == 4 and "a_b" in names and "arith-0038fe22" in names


def test_generate_texts_ends_each_completion_at_a_given_stop_token(tmp_path):
    import jax

    from o1jax.model.sampler import generate
    from o1jax.search.format import encode_prompts
    from o1jax.train import evaluate as ev

    _, tokenizer, cfg, params = _model_dir_naming_a_second_eos(tmp_path, 7)
    question = ["Start with 3, add 4."]
    prompts, lengths = encode_prompts(tokenizer, question)
    greedy = generate(
        params, cfg, prompts, lengths, key=jax.random.key(0), max_new_tokens=6, temperature=0.0
    )
    ids = [int(t) for t in greedy.tokens[0]]
    kwargs = dict(key=jax.random.key(0), max_new_tokens=6, batch_size=2)
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=False)
    free = ev.generate_texts(params, cfg, tokenizer, question, stop_tokens=(), **kwargs)
    assert free == [[decode(ids)]]  # no stop: the whole budget
    stopped = ev.generate_texts(params, cfg, tokenizer, question, stop_tokens=(ids[1],), **kwargs)
    # Greedy decoding is the same up to the stop token, which ends the completion.
    assert stopped == [[decode(ids[: ids.index(ids[1]) + 1])]]
