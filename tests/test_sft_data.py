"""SFT data: flawed chains for the verifier, step checks, and rating-only loss masks."""

import numpy as np

from o1jax.data import longcot, tasks
from o1jax.data.answers import extract_answer
from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.search.format import encode_chain

TASK = tasks.ArithmeticTask(num_ops=(2, 3), max_operand=9, max_multiplier=3, max_value=30)


def test_flawed_chains_carry_one_mistake_to_a_wrong_conclusion():
    problems = tasks.generate_problems(TASK, 50, 0, "train")
    made = 0
    for i, p in enumerate(problems):
        flawed = tasks.flawed_chain(p, i)
        if flawed is None:
            continue
        made += 1
        thoughts, ratings = flawed
        assert len(thoughts) == len(p.steps) == len(ratings)
        first_bad = ratings.index(longcot.NEGATIVE_RATING)
        assert thoughts[:first_bad] == list(p.steps[:first_bad])
        assert thoughts[first_bad] != p.steps[first_bad]
        assert all(r == longcot.NEGATIVE_RATING for r in ratings[first_bad:])
        assert extract_answer(thoughts[-1]) != p.answer  # the mistake reaches the answer
        # The flaw is the one wrong result; later steps compute right from it.
        assert tasks.arithmetic_step_is_right(thoughts[first_bad]) is False
        assert all(tasks.arithmetic_step_is_right(t) for t in thoughts[first_bad + 1 : -1])
        assert all(tasks.arithmetic_step_is_right(t) for t in p.steps[:-1])
        assert tasks.arithmetic_step_is_right(thoughts[-1]) is None  # the conclusion
    assert made >= 40
    assert (
        tasks.flawed_chain(tasks.Problem("x", "q", "1", ("<expansion>odd", "<conclusion>1")), 0)
        is None
    )


def test_rating_only_chains_train_just_the_rating_tokens():
    tok = build_tiny_tokenizer()
    p = tasks.generate_problems(TASK, 1, 0, "train")[0]
    thoughts, ratings = tasks.flawed_chain(p, 3)
    ids, mask = encode_chain(tok, p.question, thoughts, ratings, train_thoughts=False)
    rating_ids = {tok.convert_tokens_to_ids(r) for r in longcot.RATINGS}
    assert mask.sum() == len(thoughts)
    assert set(ids[mask].tolist()) <= rating_ids
    full_ids, full_mask = encode_chain(tok, p.question, thoughts, ratings)
    np.testing.assert_array_equal(ids, full_ids)
    assert full_mask.sum() > mask.sum()


def test_examples_longer_than_the_sft_context_are_left_out_with_one_warning():
    """They were dropped silently: a user's long solutions vanished from SFT unnoticed."""
    import os

    import pytest

    from o1jax.train.config import load_config
    from o1jax.train.sft_stage import sft_examples

    tiny = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.yaml")
    short = tasks.Problem("s", "1 + 1?", "2", ("<expansion>1 + 1 = 2.", "<conclusion>\\boxed{2}"))
    steps = tuple(f"<expansion>{k} + 1 = {k + 1}." for k in range(40))
    long = tasks.Problem("l", "Count up.", "41", (*steps, "<conclusion>\\boxed{41}"))
    config = load_config(
        tiny, ["sft.seq_len=64", "data.task.journey_fraction=0", "data.task.flawed_fraction=0"]
    )
    message = r"sft: 1 of 2 training examples are longer than sft.seq_len 64 tokens \(the longest"
    with pytest.warns(tasks.DataWarning, match=message + r" \d{3,}\) and are left out"):
        examples = sft_examples(config, build_tiny_tokenizer(), [short, long])
    assert len(examples) == 1 and len(examples[0].tokens) <= 64


def test_encode_chain_refuses_what_render_chain_refuses():
    """An empty ratings list became all-positive, and a thought holding a token of its own
    (an EOS, an <end_of_thought>) was encoded as is, where `longcot.render_chain` refuses both."""
    import pytest

    tok = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="1 thoughts but 0 ratings"):
        encode_chain(tok, "q", ["<expansion>a"], [])
    cases = [
        ("x <eos> y", "control token '<eos>'"),
        ("<expansion>a<end_of_thought>b", "format token '<end_of_thought>'"),
    ]
    for thought, token in cases:
        with pytest.raises(ValueError, match=f"thought 1 contains the {token}"):
            encode_chain(tok, "q", [thought])
        with pytest.raises(ValueError, match=f"thought 1 contains the {token}"):
            longcot.render_chain("q", [thought])
