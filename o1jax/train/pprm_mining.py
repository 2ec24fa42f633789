"""Preference pairs mined from the policy's own solutions, for training the PPRM.

LLaMA-Berry trains its pairwise reward model on solutions of the policy it will judge. On a task
with checkable answers this needs no labels: sample K whole solutions per training problem, check
each final answer against the ground truth, and pair right solutions against wrong ones. The
PPRM then learns to tell apart the mistakes this policy makes (rather than only the planted flaws
of `o1jax.train.pprm.task_pairs`), which is what SR-MCTS asks of it.

    triples = policy_triples(params, cfg, tokenizer, problems, key=key, samples=8)
    pairs = encode_pairs(tokenizer, triples)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from o1jax.data import answers
from o1jax.search import refine
from o1jax.search.pprm import solution_text


def solution_verdicts(
    texts: Sequence[str], truth: str, as_thoughts: bool = False
) -> tuple[list, list]:
    """(right, wrong): the distinct PPRM texts of decoded solutions, split by their answers
    (with `as_thoughts`, each solution's effective thoughts as a tuple instead of its text).

    Solutions are read as SR-MCTS reads its nodes (`refine.solution_steps`, then the effective
    steps: critiqued steps and their critics dropped, every other step kept whatever its rating).
    A solution without a final answer is skipped, as SR-MCTS never asks the PPRM about one: its
    effective steps do not end in a `<conclusion>` with an answer (no conclusion, a chain that
    breaks or is cut before it, a conclusion critiqued and not rewritten). So is one with no
    effective steps left, and one whose chain breaks before a rated step (`refine.chain_is_whole`:
    SR-MCTS, whose device reads every rated step, gives such a node no answer either).
    """
    right, wrong = [], []
    for text in texts:
        steps = refine.solution_steps(text)
        answer = refine.solution_answer(steps)
        thoughts = tuple(refine.effective_thoughts(steps))
        if answer is None or not thoughts or not refine.chain_is_whole(text):
            continue
        bucket = right if answers.is_equivalent(answer, truth) else wrong
        solution = thoughts if as_thoughts else solution_text(thoughts)
        if solution not in right and solution not in wrong:
            bucket.append(solution)
    return right, wrong


def policy_triples(
    params,
    cfg,
    tokenizer,
    problems,
    *,
    key,
    samples: int = 8,
    pairs_per_problem: int = 2,
    max_new_tokens: int = 160,
    batch_size: int = 32,
    lora=None,
    seed: int | Sequence[int] = 0,
    progress: str | None = "pprm pairs",
    rate=None,
) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected) triples from `samples` solutions per problem at T = 1.

    Each problem with both right and wrong solutions gives up to `pairs_per_problem` pairs,
    drawn without repeats by a generator seeded with `seed`. rate: None, or a function from
    [(question, thoughts)] to the policy's rating of each thought, whose verdicts then go into
    the texts (`pprm.solution_text`).
    """
    from o1jax.train.evaluate import generate_texts

    texts = generate_texts(
        params,
        cfg,
        tokenizer,
        [p.question for p in problems],
        key=key,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        num_samples=samples,
        batch_size=max(batch_size // samples, 1),
        lora=lora,
        progress=progress,
    )
    rng = np.random.default_rng(seed)
    triples = []
    for problem, solutions in zip(problems, texts, strict=True):
        right, wrong = solution_verdicts(solutions, problem.answer, as_thoughts=True)
        combos = [(r, w) for r in right for w in wrong]
        if not combos:
            continue
        for k in rng.permutation(len(combos))[:pairs_per_problem]:
            triples.append((problem.question, *combos[k]))
    if rate is None:
        return [(q, solution_text(a), solution_text(b)) for q, a, b in triples]
    rated = rate([(q, list(t)) for q, a, b in triples for t in (a, b)])
    return [
        (q, solution_text(a, rated[2 * i]), solution_text(b, rated[2 * i + 1]))
        for i, (q, a, b) in enumerate(triples)
    ]
