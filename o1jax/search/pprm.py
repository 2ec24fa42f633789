"""Pairwise Preference Reward Model (LLaMA-Berry): P(solution a is better than b) from one forward.

The PPRM is the policy's own Gemma2 with its own LoRA adapter, prompted with a problem and two
solutions and read at the last position, where it predicts one of two answer tokens:

    {question}
    Solution A: {a}
    Solution B: {b}
    Better:          -> " A" or " B"  (or "A" / "B" after a space, see `answer_format`)

P(a > b) = softmax over just those two tokens. Models prefer one slot over the other, so
`preferences` averages both orders: p[i, j] = (P(i > j | i first) + 1 - P(j > i | j first)) / 2
(`symmetrise`), which makes p[i, j] + p[j, i] = 1 exactly, and 1/2 exactly for two copies of one
solution. All n (n - 1) ordered pairs of a tree's solutions go through the model in one batched
forward.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.data.longcot import NEGATIVE_RATING, POSITIVE_RATING
from o1jax.model.gemma2 import forward, unembed

# The answer tokens: " A" / " B" where the tokenizer has them as single tokens (SentencePiece
# vocabularies such as Gemma's), else "A" / "B" after a space that ends the prompt.
_ANSWERS = ((" A", " B", ""), ("A", "B", " "))


def _single(tokenizer, text: str) -> int | None:
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return int(tokens[0]) if len(tokens) == 1 else None


def answer_format(tokenizer) -> tuple[tuple[int, int], str]:
    """((first id, second id), prompt tail): the two answer tokens and what ends the prompt."""
    for first, second, tail in _ANSWERS:
        a, b = _single(tokenizer, first), _single(tokenizer, second)
        if a is not None and b is not None:
            return (a, b), tail
    raise ValueError("pprm: the tokenizer has neither ' A'/' B' nor 'A'/'B' as single tokens")


def solution_text(thoughts, ratings=None) -> str:
    """A whole solution as the PPRM reads it: its thoughts joined by '; ' (action tags kept).

    ratings: the policy's rating in [0, 1] of each thought (`ratings.thought_ratings`), or None.
    With them each thought is followed by the policy's verdict on it, `<positive_rating>` at
    1/2 or above, else `<negative_rating>`, so that the PPRM compares solutions knowing which
    steps the policy itself doubts.
    """
    if ratings is None:
        return "; ".join(thoughts)
    if len(ratings) != len(thoughts):
        raise ValueError(f"solution_text: {len(thoughts)} thoughts but {len(ratings)} ratings")
    verdicts = [POSITIVE_RATING if r >= 0.5 else NEGATIVE_RATING for r in ratings]
    return "; ".join(t + v for t, v in zip(thoughts, verdicts, strict=True))


def encode_pair(tokenizer, question: str, first: str, second: str) -> list[int]:
    """Token ids of the comparison prompt, ending right before the answer; `tokenizer.encode`
    adds BOS where the tokenizer does (Gemma's; the tiny one adds none), in training and search
    alike."""
    _, tail = answer_format(tokenizer)
    text = f"{question}\nSolution A: {first}\nSolution B: {second}\nBetter:{tail}"
    return tokenizer.encode(text)


@functools.partial(jax.jit, static_argnames=("cfg", "answer_tokens"))
def first_better_logit(params, cfg, tokens, lengths, lora, answer_tokens: tuple[int, int]):
    """log P(first) - log P(second) [M] at each right-padded prompt's last token.

    tokens: [M, W] int32; lengths: [M] int32 in [1, W].
    """
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    hidden = forward(params, cfg, tokens, attention_mask=mask, lora=lora, return_hidden=True)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [M, D]
    pair = unembed(params, cfg, last, answer_tokens)  # [M, 2]: no [M, W, V] logits
    return pair[:, 0] - pair[:, 1]


def symmetrise(first_ab, first_ba) -> tuple[np.ndarray, np.ndarray]:
    """(P(a > b), P(b > a)) float32 from P(first better) with a first [...] and with b first [...]:
    (P(a > b | a first) + 1 - P(b > a | b first)) / 2 and its complement.

    Written as 1/2 + |d| / 2 for the preferred one and 1 - that for the other (d = the
    difference of the two P's), so the two sum to 1 exactly in float32, swapping a and b swaps
    them exactly, and both orders alike (two copies of one solution: the same prompt twice) give
    exactly 1/2, no preference. `(x + 1 - y) / 2` rounds: a copy got P 0.49999997 against its
    twin, which then came out preferred (`ebc.preference_matrix`) to an identical solution.
    """
    d = np.asarray(first_ab, np.float32) - np.asarray(first_ba, np.float32)  # fl(-d) = -fl(d)
    hi = np.float32(0.5) + np.float32(0.5) * np.abs(d)  # [0.5, 1]
    lo = np.float32(1.0) - hi  # exact (hi >= 1/2), so hi + lo == 1
    return np.where(d >= 0, hi, lo), np.where(d >= 0, lo, hi)


def preferences(params, cfg, tokenizer, question: str, solutions: list[str], lora=None):
    """[n, n] float32: symmetrised P(solution i is better than solution j); NaN on the diagonal."""
    n = len(solutions)
    p = np.full((n, n), np.nan, np.float32)
    if n < 2:
        return p
    pairs = list(itertools.permutations(range(n), 2))
    rows = [encode_pair(tokenizer, question, solutions[i], solutions[j]) for i, j in pairs]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(rows), width), pad, np.int32)
    for r, ids in enumerate(rows):
        tokens[r, : len(ids)] = ids
    lengths = np.asarray([len(r) for r in rows], np.int32)
    logit = first_better_logit(
        params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), lora, answer_format(tokenizer)[0]
    )
    ordered = np.asarray(jax.nn.sigmoid(logit))  # P(first better), one per ordered pair
    first = dict(zip(pairs, ordered, strict=True))
    for i, j in itertools.combinations(range(n), 2):
        p[i, j], p[j, i] = symmetrise(first[(i, j)], first[(j, i)])
    return p
