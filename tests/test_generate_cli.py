"""`python -m o1jax.generate`: a model directory in, greedy text that matches full forwards out."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import greedy_by_full_forwards, random_tiny_model

from o1jax import generate as cli
from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.model import save_hf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny")
    tokenizer = build_tiny_tokenizer(path)
    cfg, params = random_tiny_model(len(tokenizer), seed=1, sliding_window=8)
    save_hf(str(path), cfg, params)
    return path, tokenizer, cfg, params


def _records(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_greedy_output_equals_repeated_full_forwards(model_dir, capsys):
    path, tokenizer, cfg, params = model_dir
    prompt = "Start with 4, add 5."
    rc = cli.main(["--model", str(path), "--prompt", prompt, "--max-new-tokens", "10", "--json"])
    assert rc == 0
    (record,) = _records(capsys)
    expected = greedy_by_full_forwards(
        params, cfg, tokenizer.encode(prompt), 10, stop=tokenizer.eos_token_id
    )
    assert record["tokens"] == expected
    assert record["text"] == tokenizer.decode(expected, skip_special_tokens=False)
    assert len(record["logprobs"]) == len(expected) and all(lp <= 0 for lp in record["logprobs"])


def test_batched_sampling_gives_every_prompt_its_samples(model_dir, capsys):
    path, tokenizer, _, _ = model_dir
    argv = ["--model", str(path), "--prompt", "Start with 3.", "--prompt", "Start with 12,"]
    argv += ["--samples", "3", "--temperature", "1.0", "--top-k", "20", "--max-new-tokens", "6"]
    argv += ["--stop", "<end_of_thought>", "--json", "--longcot", "--seed", "5"]
    assert cli.main(argv) == 0
    records = _records(capsys)
    assert [(r["prompt"], r["sample"]) for r in records] == [
        (p, s) for p in ("Start with 3.", "Start with 12,") for s in range(3)
    ]
    stop = tokenizer.convert_tokens_to_ids("<end_of_thought>")
    for r in records:
        assert 1 <= len(r["tokens"]) <= 6
        assert r["stopped"] == (r["tokens"][-1] == stop)
    # Sampling with a seed is reproducible; the plain-text mode prints one header per sample.
    assert cli.main(argv) == 0
    assert _records(capsys) == records
    assert cli.main([a for a in argv if a != "--json"]) == 0
    assert capsys.readouterr().out.count("--- prompt") == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stop", "Start with"], "a stop must be one token"),
        (["--top-p", "0"], "bad sampling settings"),
    ],
)
def test_bad_settings_exit_2_with_one_line(model_dir, capsys, extra, message):
    path = model_dir[0]
    assert cli.main(["--model", str(path), "--prompt", "Start", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_model_directory_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["--model", str(missing), "--prompt", "hi"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_embedding_is_rejected(model_dir, tmp_path, capsys):
    _, _, cfg, params = model_dir
    small = cfg.replace(vocab_size=100)
    trimmed = dict(params, embedder={"embedding": params["embedder"]["embedding"][:100]})
    save_hf(str(tmp_path), small, trimmed)
    build_tiny_tokenizer(tmp_path)
    assert cli.main(["--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "embedding has 100 rows" in capsys.readouterr().err


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory):
    """A model directory whose tokenizer lacks the long-CoT tokens and whose generation config
    names two EOS ids, as Gemma2-it's does (`<eos>` and `<end_of_turn>`)."""
    from test_tokenizer import _foreign_tokenizer

    path = tmp_path_factory.mktemp("hf_plain")
    tokenizer = _foreign_tokenizer()
    tokenizer.save_pretrained(str(path))
    cfg, params = random_tiny_model(len(tokenizer), seed=2)
    save_hf(str(path), cfg, params)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5, 1]}))
    return path, len(tokenizer)


def test_longcot_adds_the_format_tokens_to_a_plain_tokenizer(plain_model_dir, capsys):
    path, vocab = plain_model_dir
    args = cli._parse(["--model", str(path), "--prompt", "abc", "--longcot"])
    params, cfg, tokenizer, _, _ = cli._load(args)
    # Each tag is one token (it was spelled out character by character), the embedding grew.
    assert len(tokenizer.encode("<start_of_thought>", add_special_tokens=False)) == 1
    assert cfg.vocab_size == len(tokenizer) > vocab
    # ... with a row of its own for every new token (from its name's pieces, not one mean row).
    rows = np.asarray(params["embedder"]["embedding"][vocab:], np.float32)
    assert len({r.tobytes() for r in rows}) == len(rows)
    argv = ["--model", str(path), "--prompt", "abc", "--longcot", "--json", "--max-new-tokens", "3"]
    assert cli.main(argv) == 0 and len(_records(capsys)) == 1


def test_default_stops_are_every_eos_id_the_model_directory_names(plain_model_dir):
    path, _ = plain_model_dir
    args = cli._parse(["--model", str(path), "--prompt", "abc"])
    _, _, tokenizer, _, model_eos = cli._load(args)
    assert model_eos == (1, 5)
    assert cli._stop_ids(tokenizer, [], model_eos) == (1, 5)  # the tokenizer's <eos> is 1
    assert cli._stop_ids(tokenizer, ["a"], model_eos) == (tokenizer.convert_tokens_to_ids("a"),)


def test_longcot_tokens_on_a_padded_table_get_rows_of_their_own(plain_model_dir, tmp_path):
    """A checkpoint whose embedding is padded past its tokenizer (spare zero rows): the added
    tags land on those rows, which must start from the tags' names like grown ones (all zero,
    <positive_rating> and <negative_rating> had one logit)."""
    path, vocab = plain_model_dir
    for name in os.listdir(path):
        if not name.startswith(("model", "config")):
            shutil.copy(path / name, tmp_path / name)  # the tokenizer and generation config
    cfg, params = random_tiny_model(vocab, seed=2)
    spare = jnp.zeros((32, cfg.d_model), params["embedder"]["embedding"].dtype)
    padded = jnp.concatenate([params["embedder"]["embedding"], spare])
    save_hf(
        str(tmp_path),
        cfg.replace(vocab_size=vocab + 32),
        {**params, "embedder": {"embedding": padded}},
    )
    args = cli._parse(["--model", str(tmp_path), "--prompt", "abc", "--longcot"])
    params, cfg, tokenizer, _, _ = cli._load(args)
    assert len(tokenizer) <= vocab + 32 == cfg.vocab_size  # the table did not grow
    rows = np.asarray(params["embedder"]["embedding"][vocab : len(tokenizer)], np.float32)
    assert len({r.tobytes() for r in rows}) == len(rows) and not (rows == 0).all(axis=1).any()


def test_a_workdir_of_a_model_directory_run_stops_on_its_eos_ids(plain_model_dir, monkeypatch):
    """--workdir of a run on an HF checkpoint: the default stops include that directory's eos
    ids, as --help says (only the tokenizer's EOS was used)."""
    from types import SimpleNamespace

    from o1jax.train import pipeline, run_context

    path, _ = plain_model_dir
    for model_dir, eos in ((str(path), (1, 5)), ("", ())):
        ctx = SimpleNamespace(
            config=SimpleNamespace(model_dir=model_dir), cfg=None, tokenizer=None,
            checkpointer=SimpleNamespace(close=lambda: None),
        )  # fmt: skip
        monkeypatch.setattr(run_context, "open_run", lambda workdir, ctx=ctx: ctx)
        monkeypatch.setattr(pipeline, "restore_policy", lambda ctx: (None, None))
        assert cli._load(cli._parse(["--workdir", "w", "--prompt", "x"]))[4] == eos
