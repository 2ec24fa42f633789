"""The policy's verdicts on given solutions, and the PPRM texts and pairs that carry them."""

import jax
import numpy as np
import pytest
from tiny_models import full_forward_logits, random_tiny_model

from o1jax.data import longcot, tasks
from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.search import pprm, ratings
from o1jax.search.format import encode_chain, special_id
from o1jax.train import pprm as train_pprm
from o1jax.train import pprm_mining

QUESTION = "Start with 4, add 5, multiply by 2."
RIGHT = ["<expansion>4 + 5 = 9", "<expansion>9 * 2 = 18", "<conclusion>\\boxed{18}"]
WRONG = ["<expansion>4 + 5 = 9", "<expansion>9 * 2 = 19", "<conclusion>\\boxed{19}"]
POS, NEG = longcot.POSITIVE_RATING, longcot.NEGATIVE_RATING


@pytest.fixture(scope="module")
def model():
    tok = build_tiny_tokenizer()
    cfg, params = random_tiny_model(len(tok), seed=3)
    return tok, cfg, params


def test_ratings_are_read_at_each_thoughts_rating_slot_whatever_the_batch(model):
    tok, cfg, params = model
    solutions = [(QUESTION, RIGHT), ("Start with 7, subtract 3.", ["<expansion>7 - 3 = 4"])]
    batched = ratings.thought_ratings(params, cfg, tok, solutions, batch_size=4)
    assert [len(r) for r in batched] == [3, 1]
    start = special_id(tok, longcot.START_OF_RATING)
    pos, neg = special_id(tok, POS), special_id(tok, NEG)
    for (question, thoughts), got in zip(solutions, batched, strict=True):
        ids, _ = encode_chain(tok, question, thoughts)
        logits = np.asarray(full_forward_logits(params, cfg, ids))
        slots = np.flatnonzero(ids == start)[1:]  # the root's own slot comes first
        expected = 1.0 / (1.0 + np.exp(logits[slots, neg] - logits[slots, pos]))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        alone = ratings.thought_ratings(params, cfg, tok, [(question, thoughts)], batch_size=4)
        np.testing.assert_allclose(alone[0], got, atol=1e-6)
    assert ((batched[0] > 0) & (batched[0] < 1)).all()


def test_solution_text_writes_a_verdict_after_each_thought():
    assert pprm.solution_text(RIGHT) == "; ".join(RIGHT)
    text = pprm.solution_text(RIGHT, [0.9, 0.2, 0.5])
    assert text == f"{RIGHT[0]}{POS}; {RIGHT[1]}{NEG}; {RIGHT[2]}{POS}"
    with pytest.raises(ValueError, match="3 thoughts but 2 ratings"):
        pprm.solution_text(RIGHT, [0.9, 0.2])


def test_task_pairs_carry_the_verdicts_of_the_rater(model):
    tok = model[0]
    task = tasks.ArithmeticTask(num_ops=(2, 2), max_operand=9, max_value=30)
    problems = tasks.generate_problems(task, 4, 0, "train")
    seen = []

    def rate(solutions):  # the worked steps are trusted, any other thought doubted
        seen.extend(solutions)
        owners = [p for p in problems for _ in (0, 1)]
        return [
            np.asarray([0.9 if t in p.steps else 0.2 for t in thoughts])
            for (_, thoughts), p in zip(solutions, owners, strict=True)
        ]

    plain = train_pprm.task_pairs(tok, problems, np.random.default_rng(0))
    rated = train_pprm.task_pairs(tok, problems, np.random.default_rng(0), rate)
    assert [q for q, _ in seen] == [p.question for p in problems for _ in (0, 1)]
    assert [list(t) for _, t in seen[0::2]] == [list(p.steps) for p in problems]
    assert rated.first_better.tolist() == plain.first_better.tolist() == [1, 0] * 4
    neg = special_id(tok, NEG)
    for row in range(8):  # each prompt holds the flawed solution's negative verdict
        assert neg in rated.tokens[row, : rated.lengths[row]]
        assert neg not in plain.tokens[row, : plain.lengths[row]]


def test_policy_triples_rate_the_effective_thoughts(monkeypatch):
    from o1jax.train import evaluate

    def chain_text(thoughts):
        return longcot.render_chain(QUESTION, thoughts)[len(longcot.render_prompt(QUESTION)) :]

    samples = [chain_text(RIGHT), chain_text(WRONG)]
    monkeypatch.setattr(evaluate, "generate_texts", lambda *a, **k: [samples])
    problem = tasks.Problem(id="a", question=QUESTION, answer="18")
    got = []

    def rate(solutions):
        got.extend(solutions)
        return [np.linspace(0.0, 1.0, len(t)) for _, t in solutions]

    triples = pprm_mining.policy_triples(
        None, None, None, [problem], key=jax.random.key(0), samples=2, rate=rate
    )
    assert got == [(QUESTION, RIGHT), (QUESTION, WRONG)]
    assert triples == [
        (
            QUESTION,
            pprm.solution_text(RIGHT, [0.0, 0.5, 1.0]),
            pprm.solution_text(WRONG, [0, 0.5, 1]),
        )
    ]
