"""The policy's own verdict on each thought of given solutions, read at the position search reads.

A solution is rendered as the chain SFT trains on (`format.encode_chain`), and the rating of its
thought k is P(<positive_rating>) / (P(<positive_rating>) + P(<negative_rating>)) at the
<start_of_rating> after it: the quantity search gives a node (`mcts.make_lm_expand_fn`), here for
every thought of a whole solution in one forward pass. One difference in context: every earlier
thought is rendered rated positive, where search renders each ancestor with its own verdict, so
the two agree up to the first thought rated below 1/2 (after it they differ slightly; computing
each verdict before the next would take one forward per thought). The PPRM reads solutions with
these verdicts beside their thoughts (`pprm.solution_text`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from o1jax.data import longcot
from o1jax.model.gemma2 import forward, unembed
from o1jax.search.format import encode_chain, encode_prompt, special_id

WIDTH_BUCKET = 64  # rows are padded to a multiple of this: one compiled program per bucket


@functools.partial(jax.jit, static_argnames=("cfg", "rating_ids"))
def _positive_probability(params, cfg, tokens, lengths, lora, rating_ids: tuple[int, int]):
    """P(positive) against P(negative) as the next token [M, W] of right-padded `tokens`
    [M, W] (lengths [M])."""
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    hidden = forward(params, cfg, tokens, attention_mask=mask, lora=lora, return_hidden=True)
    pair = unembed(params, cfg, hidden, rating_ids)  # [M, W, 2]: no [M, W, V] logits
    return jax.nn.sigmoid(pair[..., 0] - pair[..., 1])


def thought_ratings(
    params,
    cfg,
    tokenizer,
    solutions: Sequence[tuple[str, Sequence[str]]],
    *,
    lora=None,
    batch_size: int = 32,
    progress: str | None = None,
) -> list[np.ndarray]:
    """The policy's rating [T_i] in [0, 1] of each thought of each (question, thoughts) solution.

    Rows run in fixed batches of `batch_size`, padded to a multiple of `WIDTH_BUCKET` tokens.
    progress: a progress bar's label, or None for none.
    """
    start = special_id(tokenizer, longcot.START_OF_RATING)
    rating_ids = (
        special_id(tokenizer, longcot.POSITIVE_RATING),
        special_id(tokenizer, longcot.NEGATIVE_RATING),
    )
    rows, where = [], []
    for question, thoughts in solutions:
        ids, _ = encode_chain(tokenizer, question, thoughts)
        skip = encode_prompt(tokenizer, question).count(start)  # the root's own rating slot
        at = np.flatnonzero(ids == start)[skip:]
        if len(at) != len(thoughts):
            raise ValueError(
                f"thought_ratings: {len(thoughts)} thoughts but {len(at)} rating slots; a thought "
                f"holds a long-CoT token of its own ({question[:40]!r})"
            )
        rows.append(ids)
        where.append(at)
    if not rows:
        return []
    width = -(-max(len(r) for r in rows) // WIDTH_BUCKET) * WIDTH_BUCKET
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    batches = range(0, len(rows), batch_size)
    for first in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        chunk = rows[first : first + batch_size]
        tokens = np.full((batch_size, width), pad, np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for i, ids in enumerate(chunk):
            tokens[i, : len(ids)] = ids
            lengths[i] = len(ids)
        p = np.asarray(
            _positive_probability(
                params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), lora, rating_ids
            )
        )
        out += [p[i, where[first + i]] for i in range(len(chunk))]
    return out
