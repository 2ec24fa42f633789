"""Token-level form of the long-CoT chain format, shared by SFT, search, PPO and evaluation.

Text (see `o1jax.data.longcot.render_chain`):

    render_prompt(question)                       # the <problem> root node, then "\\n"
    step_header(k - 1, k) + thought + step_suffix(rating)     # for each step k = 1, 2, ...

In tokens, a step is `header[k]` + the thought's tokens (ending with <end_of_thought>) +
`suffix[rating]` (<start_of_rating> R <end_of_rating> "\\n"). Every consumer builds sequences
from these same pieces, so what SFT teaches is exactly what search prompts with and what PPO
scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from o1jax.data import longcot
from o1jax.search.mcts import StepFormat


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def special_id(tokenizer, token: str) -> int:
    ids = _ids(tokenizer, token)
    if len(ids) != 1:
        raise ValueError(
            f"tokenizer: {token!r} is not a single token (got ids {ids}); "
            "add the long-CoT special tokens first"
        )
    return ids[0]


def encode_prompt(tokenizer, question: str) -> list[int]:
    """BOS (if the tokenizer has one) + the rendered root node."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _ids(tokenizer, longcot.render_prompt(question))


def encode_thought(tokenizer, thought: str) -> list[int]:
    """A thought's tokens as the sampler produces them: text, then <end_of_thought>."""
    return [*_ids(tokenizer, thought), special_id(tokenizer, longcot.END_OF_THOUGHT)]


def rating_suffix(tokenizer, rating: str) -> list[int]:
    """<start_of_rating> R <end_of_rating> "\\n" (step_suffix without its <end_of_thought>)."""
    text = longcot.step_suffix(rating)
    assert text.startswith(longcot.END_OF_THOUGHT)
    return _ids(tokenizer, text[len(longcot.END_OF_THOUGHT) :])


def encode_chain(
    tokenizer,
    question: str,
    thoughts: Sequence[str],
    ratings: Sequence[str] | None = None,
    train_thoughts: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of a whole chain, then EOS. The problem is never trained on.

    train_thoughts=False trains only the rating token of every step (a chain that teaches the
    model to judge, e.g. a wrong solution, without teaching it to write one). Raises ValueError
    for a thought holding a format or control token, or a ratings list of another length.
    """
    if ratings is None:
        ratings = [longcot.POSITIVE_RATING] * len(thoughts)
    if len(ratings) != len(thoughts):
        raise ValueError(f"encode_chain: {len(thoughts)} thoughts but {len(ratings)} ratings")
    ids = encode_prompt(tokenizer, question)
    mask = [False] * len(ids)
    for k, (thought, rating) in enumerate(zip(thoughts, ratings, strict=True), start=1):
        longcot.check_thought(thought, f"thought {k}")  # as render_chain: no token of its own
        head = _ids(tokenizer, longcot.step_header(k - 1, k)) + encode_thought(tokenizer, thought)
        suffix = rating_suffix(tokenizer, rating)  # <start_of_rating> R <end_of_rating> "\n"
        ids += head + suffix
        if train_thoughts:
            mask += [True] * (len(head) + len(suffix))
        else:
            mask += [False] * len(head) + [i == 1 for i in range(len(suffix))]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(train_thoughts)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def make_step_format(tokenizer, max_depth: int) -> StepFormat:
    """The StepFormat for search: headers for depths 0..max_depth + 1 and the two suffixes."""
    headers = [[]] + [
        _ids(tokenizer, longcot.step_header(s - 1, s)) for s in range(1, max_depth + 2)
    ]
    suffixes = [
        rating_suffix(tokenizer, longcot.NEGATIVE_RATING),
        rating_suffix(tokenizer, longcot.POSITIVE_RATING),
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return StepFormat(
        headers=jnp.asarray(_pad_rows(headers, pad)),
        header_lengths=jnp.asarray([len(h) for h in headers], jnp.int32),
        suffixes=jnp.asarray(_pad_rows(suffixes, pad)),
        suffix_lengths=jnp.asarray([len(s) for s in suffixes], jnp.int32),
        end_of_thought=special_id(tokenizer, longcot.END_OF_THOUGHT),
        start_of_rating=special_id(tokenizer, longcot.START_OF_RATING),
        positive_rating=special_id(tokenizer, longcot.POSITIVE_RATING),
        negative_rating=special_id(tokenizer, longcot.NEGATIVE_RATING),
        conclusion=special_id(tokenizer, longcot.CONCLUSION),
        pad=pad,
        meta_actions=tuple(
            special_id(tokenizer, tag)
            for tag in (longcot.EXPANSION, longcot.CRITIC, longcot.REFINE, longcot.CONCLUSION)
        ),
    )


def encode_prompts(tokenizer, questions: Sequence[str], width: int | None = None):
    """Right-padded prompt ids [B, P] and lengths [B] (P = the longest, or `width`)."""
    rows = [encode_prompt(tokenizer, q) for q in questions]
    width = width or max(len(r) for r in rows)
    too_long = [i for i, r in enumerate(rows) if len(r) > width]
    if too_long:
        raise ValueError(f"prompt {too_long[0]} has {len(rows[too_long[0]])} tokens > {width}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return (
        jnp.asarray(_pad_rows(rows, pad, width)),
        jnp.asarray([len(r) for r in rows], jnp.int32),
    )


def _pad_rows(rows, pad: int, width: int | None = None) -> np.ndarray:
    width = width or max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
