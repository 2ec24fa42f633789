"""Exact metrics of `evaluate.evaluate` on planted completions: greedy pass@1, sampled pass@k and
maj@k, and each record's extracted answer and verdicts.

Generation is stubbed (`evaluate.generate_texts` returns hand-written long-CoT continuations), so
these tests guard the scoring itself: an answer counts only when it equals the truth (not merely
when one was extracted), equal values written differently count ("x = 18", `\\frac{24}{2}`),
an answer is read from the `<conclusion>` only, pass@k asks for any right sample and maj@k for
a right majority (not the first sample), and the three rates are fractions of all problems.
"""

import jax
import pytest

from o1jax.data import longcot, tasks
from o1jax.train import evaluate


def _chain(question: str, *thoughts: str) -> str:
    """A decoded continuation: the chain after the prompt, as the sampler writes it."""
    text = longcot.render_chain(question, list(thoughts))
    return text[len(longcot.render_prompt(question)) :]


def _answered(question: str, answer: str) -> str:
    return _chain(question, "<expansion>working it out", f"<conclusion>\\boxed{{{answer}}}")


def _unanswered(question: str) -> str:
    return _chain(question, "<expansion>1 / 2 = 0.5")  # a number, but no conclusion


PROBLEMS = [
    tasks.Problem(id="p0", question="Start with 4, add 5, multiply by 2.", answer="18"),
    tasks.Problem(id="p1", question="Start with 3, add 4.", answer="7"),
    tasks.Problem(id="p2", question="Halve 1.", answer="1/2"),
    tasks.Problem(id="p3", question="Start with 3, multiply by 4.", answer="12"),
    tasks.Problem(id="p4", question="Start with 1, add 2.", answer="3"),
]
Q = {p.id: p.question for p in PROBLEMS}

# Greedy: right (written "x = 18"), wrong, no answer, right (bare `\frac{24}{2}`), no answer.
GREEDY = {
    "p0": _answered(Q["p0"], "x = 18"),
    "p1": _answered(Q["p1"], "8"),
    "p2": _unanswered(Q["p2"]),
    "p3": _chain(Q["p3"], "<expansion>3 * 4 = 12", "<conclusion>\\frac{24}{2}"),
    "p4": _chain(Q["p4"], "<expansion>1 + 2 = 3"),
}
GREEDY_ANSWERS = ["x = 18", "8", None, "\\frac{24}{2}", None]
GREEDY_CORRECT = [True, False, False, True, False]

# Sampled (k = 4), answers per problem; None: a sample without a conclusion.
SAMPLE_ANSWERS = {
    "p0": ["19", "18", "19", None],  # right once, majority wrong
    "p1": ["8", "7", "7", "9"],  # the first sample wrong, the majority right
    "p2": [None, "0.5", "\\frac{1}{2}", "3"],  # 0.5 and 1/2 vote together and win
    "p3": ["12", "12", "5", None],  # majority right
    "p4": [None, "4", None, "4"],  # answers, all wrong
}
MAJ_ANSWERS = ["19", "7", "0.5", "12", "4"]
PASS_K = [True, True, True, True, False]
MAJ_K = [False, True, True, True, False]
K = 4


def _sample_text(question: str, answer: str | None) -> str:
    return _unanswered(question) if answer is None else _answered(question, answer)


@pytest.fixture
def calls(monkeypatch):
    """Stubs `generate_texts` with the planted completions (answered per question, in the order
    asked); records each call's temperature and number of samples."""
    seen = []
    by_question = {p.question: p.id for p in PROBLEMS}

    def fake_generate_texts(params, cfg, tokenizer, questions, *, temperature=0.0, **kw):
        num_samples = kw.get("num_samples", 1)
        seen.append((temperature, num_samples))
        ids = [by_question[q] for q in questions]
        if num_samples == 1:
            return [[GREEDY[i]] for i in ids]
        assert num_samples == K
        return [[_sample_text(Q[i], a) for a in SAMPLE_ANSWERS[i]] for i in ids]

    monkeypatch.setattr(evaluate, "generate_texts", fake_generate_texts)
    return seen


def _run(samples: int) -> evaluate.EvalResult:
    return evaluate.evaluate(
        None,
        None,
        None,
        PROBLEMS,
        key=jax.random.key(0),
        max_new_tokens=8,
        samples=samples,
        batch_size=8,
        progress=None,
    )


def test_greedy_pass1_counts_only_answers_equal_to_the_truth(calls):
    result = _run(samples=1)
    assert calls == [(0.0, 1)]
    assert result.pass1 == pytest.approx(2 / 5)
    assert result.num_problems == 5 and result.k == 1
    assert result.pass_k is None and result.maj_k is None
    assert result.summary() == {"pass1": pytest.approx(0.4), "num_problems": 5}
    assert [r["id"] for r in result.records] == [p.id for p in PROBLEMS]
    assert [r["answer"] for r in result.records] == GREEDY_ANSWERS
    assert [r["correct"] for r in result.records] == GREEDY_CORRECT
    assert [r["truth"] for r in result.records] == [p.answer for p in PROBLEMS]
    assert [r["output"] for r in result.records] == [GREEDY[p.id] for p in PROBLEMS]
    assert all("samples" not in r for r in result.records)


def test_sampled_pass_k_and_maj_k_differ_from_pass1_and_from_the_first_sample(calls):
    result = _run(samples=K)
    assert calls == [(0.0, 1), (1.0, K)]
    # 2 of 5 greedy answers right, 4 of 5 problems with a right sample, 3 with a right majority.
    assert result.pass1 == pytest.approx(2 / 5)
    assert result.pass_k == pytest.approx(4 / 5)
    assert result.maj_k == pytest.approx(3 / 5)
    assert result.k == K
    assert result.summary() == {
        "pass1": pytest.approx(0.4),
        "num_problems": 5,
        f"pass@{K}": pytest.approx(0.8),
        f"maj@{K}": pytest.approx(0.6),
    }
    records = result.records
    assert [r["answer"] for r in records] == GREEDY_ANSWERS
    assert [r["correct"] for r in records] == GREEDY_CORRECT
    assert [r["samples"] for r in records] == [SAMPLE_ANSWERS[p.id] for p in PROBLEMS]
    assert [r["maj_answer"] for r in records] == MAJ_ANSWERS
    assert [r["pass_k"] for r in records] == PASS_K
    assert [r["maj_k"] for r in records] == MAJ_K
