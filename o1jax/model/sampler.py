"""A jitted batched sampler: one prefill, then a `while_loop` of one-token decode steps.

    out = generate(params, cfg, prompt_tokens, prompt_lengths, key=key, max_new_tokens=64,
                   temperature=1.0, stop_tokens=(end_of_thought_id,), num_samples=2)
    out.tokens    # [B * num_samples, max_new_tokens]  pad after each row's stop token
    out.lengths   # [B * num_samples]                  stop token included
    out.logprobs  # [B * num_samples, max_new_tokens]  log p(token) under the raw model (T = 1)

Prompts are right-padded `[B, P]` with per-row lengths; each prompt is prefilled once and its KV
cache shared by its `num_samples` continuations (rows `b * num_samples + j`), so search can draw
K candidate thoughts per leaf without prefilling the shared prefix K times or storing it K times
(`o1jax.model.gemma2.with_shared_prefix`). Everything from the prefill to the last decode step
is one compiled program per distinct set of static arguments.
"""

from __future__ import annotations

import functools
import math
import operator

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from o1jax.model.config import Gemma2Config
from o1jax.model.gemma2 import (
    check_token_ids,
    forward,
    init_cache,
    unembed,
    with_shared_prefix,
)


@struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [R, N] int32, pad after the stop token
    lengths: jax.Array  # [R] int32, number of generated tokens, stop token included
    logprobs: (
        jax.Array
    )  # [R, N] float32, log-prob of each token under the untempered model; 0 on pad
    stopped: jax.Array  # [R] bool, whether the row ended on a stop token (not on the budget)
    # [R, len(score_tokens)] log-probs of `score_tokens` after the row's tokens + `score_suffix`
    # (empty when no suffix was asked for). Search reads a thought's rating from it.
    scores: jax.Array
    # [R, N] entropy and varentropy (nats, nats^2) of the untempered next-token distribution at
    # each generated token, 0 on pad; [R, 0] unless `return_entropy` (LLaMA-O1's selection).
    entropy: jax.Array
    varentropy: jax.Array


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    """Tempered, top-k- and nucleus-filtered logits [R, V] (filtered entries are -inf).

    Each row is shifted by its max before tempering (the softmax is unchanged), so a tiny
    temperature gives a max of 0 and -inf elsewhere rather than overflowing to inf. Tokens tied
    with the k-th largest logit (top-k) or with the smallest kept one (top-p) are all kept, so
    a row may keep more than k tokens; transformers' warpers break such ties by sort order.
    """
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [R, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [R, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p  # the first token is always kept
        # The smallest kept logit is the threshold; ties at the threshold are kept.
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


# Random bits come from one counter-based threefry stream per call (`lax.rng_bit_generator`,
# one op per step), seeded once from the caller's key. `jax.random.split` + `categorical` each
# step costs two small XLA while loops per token; on a CPU this op is also 1.5x faster than
# `jax.random.bits` and 4x faster than the Philox variant for [64, 512] draws.
_RNG = jax.lax.RandomAlgorithm.RNG_THREE_FRY


def gumbel_from_bits(bits):
    """Standard Gumbel noise from uint32 bits (same shape): -log(-log(u)), u in (0, 1).

    u = (k + 1/2) / 2^24 for the top 24 bits k, but float32 rounds 2^24 - 1/2 up to 2^24: the
    top k gave u = 1 and noise +inf, which picked its token whatever its probability (or, on a
    filtered -inf logit, made the row's max NaN and its token 0), once per 2^24 draws, ~1.5% of
    steps at Gemma2's 256k vocabulary. u is clamped to the largest float32 below 1.
    """
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
    return -jnp.log(-jnp.log(jnp.minimum(u, 1.0 - 2.0**-24)))


def first_argmax(x):
    """Index [R] of the first maximum of each row of x [R, V], as `jnp.argmax` (without NaNs).

    Written as a max, then the first position equal to it: on a CPU, XLA fuses the Gumbel
    noise into `argmax`'s (value, index) reduction, which then runs ~3x slower than these two
    plain reductions (a [16, 512] draw: 170 us against 50 us). Same tokens, bit for bit.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.argmax(x == top, axis=-1).astype(jnp.int32)


def _choose(logits, bits, temperature, top_k, top_p):
    """Next tokens [R] from logits [R, V]: argmax if temperature == 0, else a filtered sample
    by the Gumbel-max trick with uint32 `bits` [R, V]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return first_argmax(filtered + gumbel_from_bits(bits))


def generate(
    params,
    cfg: Gemma2Config,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: tuple[int, ...] = (),
    num_samples: int = 1,
    score_suffix: tuple[int, ...] = (),
    score_tokens: tuple[int, ...] = (),
    first_tokens=None,
    return_entropy: bool = False,
    lora=None,
) -> SampleOutput:
    """Samples `num_samples` continuations of each right-padded prompt.

    prompt_tokens: [B, P] int, right-padded; prompt_lengths: [B] int in [1, P] (checked when
      concrete; traced lengths outside it give garbage rows). Concrete prompt ids outside
      [0, vocab_size) raise a ValueError.
    max_new_tokens, num_samples, top_k: ints (a float raises a TypeError).
    temperature 0 (or one below float32's smallest normal number) is greedy; top_k 0 and top_p 1
      disable those filters.
    score_suffix / score_tokens: after sampling, feed `score_suffix` behind each row's tokens and
      return the log-probs of `score_tokens` at its last position (from the same KV cache).
    first_tokens: None, or [R] ints: a row's first new token where >= 0 (not drawn; its
      log-prob is still the model's), a draw where -1 (search's meta-action tags).
    return_entropy: also return each step's entropy and varentropy (`SampleOutput`).
    stop_tokens may hold `cfg.pad_token_id` (checkpoints whose pad is their eos): pad fills a
    row only after its first stop, which gives its length.
    Returns a `SampleOutput` with R = B * num_samples rows.
    """
    # Lists (and scalars) become host arrays; jax arrays and tracers stay where they are.
    as_array = lambda x: x if isinstance(x, jax.Array) else np.asarray(x)
    prompt_tokens, prompt_lengths = as_array(prompt_tokens), as_array(prompt_lengths)
    if (
        prompt_tokens.ndim != 2
        or prompt_lengths.shape != prompt_tokens.shape[:1]
        or 0 in prompt_tokens.shape
    ):
        raise ValueError(
            f"generate: prompt_tokens must be [B, P] with B, P >= 1 and prompt_lengths [B], "
            f"got shapes {prompt_tokens.shape} and {prompt_lengths.shape}"
        )
    for name, x in (("prompt_tokens", prompt_tokens), ("prompt_lengths", prompt_lengths)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"generate: {name} must be integers, got {x.dtype}")
    counts = {"max_new_tokens": max_new_tokens, "num_samples": num_samples, "top_k": top_k}
    for name, value in counts.items():
        try:
            counts[name] = operator.index(value)
        except TypeError:
            raise TypeError(f"generate: {name} must be an int, got {value!r}") from None
    max_new_tokens, num_samples, top_k = counts.values()
    width = prompt_tokens.shape[1]
    if not isinstance(prompt_lengths, jax.core.Tracer):
        lengths = np.asarray(prompt_lengths)
        bad = np.flatnonzero((lengths < 1) | (lengths > width))
        if bad.size:
            raise ValueError(
                f"generate: prompt_lengths[{bad[0]}] = {lengths[bad[0]]} is outside [1, {width}] "
                f"(the prompts' width)"
            )
        if not isinstance(prompt_tokens, jax.core.Tracer):  # only the real tokens, not the pad
            real = np.arange(width)[None, :] < lengths[:, None]
            check_token_ids(np.asarray(prompt_tokens)[real], cfg.vocab_size, "generate: prompt")
    if (
        not math.isfinite(temperature)
        or temperature < 0
        or not 0 < top_p <= 1
        or top_k < 0
        or max_new_tokens < 1
        or num_samples < 1
    ):
        raise ValueError(
            f"generate: bad sampling settings temperature={temperature} top_k={top_k} "
            f"top_p={top_p} max_new_tokens={max_new_tokens} num_samples={num_samples}"
        )
    if bool(score_suffix) != bool(score_tokens):
        raise ValueError(
            f"generate: score_suffix {tuple(score_suffix)} and score_tokens "
            f"{tuple(score_tokens)} must be given together"
        )
    for name, ids in (
        ("stop_tokens", stop_tokens),
        ("score_suffix", score_suffix),
        ("score_tokens", score_tokens),
    ):
        if isinstance(ids, (int, np.integer)):
            raise TypeError(f"generate: {name} must be a tuple of token ids, got {ids!r}")
        if any(not 0 <= t < cfg.vocab_size for t in ids):
            raise ValueError(
                f"generate: {name} {tuple(ids)} are not all in [0, {cfg.vocab_size}) "
                "(the vocabulary)"
            )
    if first_tokens is not None:
        first_tokens = as_array(first_tokens)
        chex.assert_shape(first_tokens, (prompt_tokens.shape[0] * num_samples,))
        if not isinstance(first_tokens, jax.core.Tracer):
            forced = np.asarray(first_tokens)
            bad = np.flatnonzero((forced < -1) | (forced >= cfg.vocab_size))
            if bad.size:
                raise ValueError(
                    f"generate: first_tokens[{bad[0]}] = {forced[bad[0]]} is neither -1 nor in "
                    f"[0, {cfg.vocab_size}) (the vocabulary)"
                )
        first_tokens = jnp.asarray(first_tokens, jnp.int32)
    if temperature < np.finfo(np.float32).tiny:
        temperature = 0.0  # subnormal in float32 (flushed to zero); its limit is greedy
    return _generate(
        params,
        prompt_tokens,
        prompt_lengths,
        key,
        lora,
        first_tokens,
        cfg=cfg,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        stop_tokens=tuple(int(s) for s in stop_tokens),
        num_samples=int(num_samples),
        score_suffix=tuple(int(t) for t in score_suffix),
        score_tokens=tuple(int(t) for t in score_tokens),
        return_entropy=bool(return_entropy),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "stop_tokens",
        "num_samples",
        "score_suffix",
        "score_tokens",
        "return_entropy",
    ),
)
def _generate(
    params,
    prompt_tokens,
    prompt_lengths,
    key,
    lora,
    first_tokens=None,  # [R] int32: a row's first token where >= 0 (`generate`)
    *,
    cfg,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    stop_tokens,
    num_samples,
    score_suffix,
    score_tokens,
    return_entropy=False,
):
    b, p = prompt_tokens.shape
    rows = b * num_samples
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    dtype = jax.tree.leaves(params)[0].dtype

    # Prefill every prompt once. With one sample per prompt the cache holds prompt and new
    # tokens; with several, the prompt's keys and values are stored once and shared by its
    # samples, each of which has a cache of its own for its new tokens only.
    prompt_mask = jnp.arange(p)[None, :] < prompt_lengths[:, None]  # [B, P]
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    new_slots = max_new_tokens + len(score_suffix)
    cache = init_cache(cfg, b, p + (new_slots if num_samples == 1 else 0), dtype)
    hidden, cache = forward(
        params,
        cfg,
        prompt_tokens,
        positions=positions,
        attention_mask=prompt_mask,
        lora=lora,
        cache=cache,
        return_hidden=True,
    )  # [B, P, D]: only each prompt's last position is unembedded, never [B, P, V] logits
    last_hidden = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)
    last = unembed(params, cfg, last_hidden[:, 0])  # [B, V]
    if num_samples > 1:
        cache = with_shared_prefix(init_cache(cfg, rows, new_slots, dtype), cache)
        last = jnp.repeat(last, num_samples, axis=0)  # [R, V]
        prompt_lengths = jnp.repeat(prompt_lengths, num_samples)  # [R]
    stop_ids = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def cond(state):
        step, _, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, logits, tokens, logprobs, done, rng, spread = state
        bits = None
        if temperature > 0.0:
            rng, bits = jax.lax.rng_bit_generator(rng, logits.shape, jnp.uint32, algorithm=_RNG)
        token = _choose(logits, bits, temperature, top_k, top_p)  # [R]
        if first_tokens is not None:  # given first tokens replace the draw
            token = jnp.where((step == 0) & (first_tokens >= 0), first_tokens, token)
        log_dist = jax.nn.log_softmax(logits)  # [R, V], untempered
        logp = jnp.take_along_axis(log_dist, token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, cfg.pad_token_id, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logp))
        if return_entropy:
            prob = jnp.exp(log_dist)
            entropy = -jnp.sum(prob * log_dist, axis=-1)  # [R]
            varentropy = jnp.sum(prob * (log_dist + entropy[:, None]) ** 2, axis=-1)  # [R]
            both = jnp.where(done[:, None], 0.0, jnp.stack([entropy, varentropy], axis=1))
            spread = spread.at[:, :, step].set(both)
        new_done = done | jnp.isin(token, stop_ids)
        pos = (prompt_lengths + step)[:, None]  # [R, 1]
        logits, cache = forward(
            params,
            cfg,
            token[:, None],
            positions=pos,
            attention_mask=~done[:, None],
            lora=lora,
            cache=cache,
        )
        return step + 1, cache, logits[:, 0], tokens, logprobs, new_done, rng, spread

    init = (
        jnp.zeros((), jnp.int32),
        cache,
        last,
        jnp.full((rows, max_new_tokens), cfg.pad_token_id, jnp.int32),
        jnp.zeros((rows, max_new_tokens), jnp.float32),
        jnp.zeros((rows,), bool),
        jax.random.bits(key, (4,), jnp.uint32),  # the stream's state
        # [R, 2, N] entropy and varentropy per step, [R, 2, 0] unless asked for
        jnp.zeros((rows, 2, max_new_tokens if return_entropy else 0), jnp.float32),
    )
    _, cache, _, tokens, logprobs, _, _, spread = jax.lax.while_loop(cond, body, init)
    is_stop = jnp.isin(tokens, stop_ids) if stop_tokens else jnp.zeros_like(tokens, bool)
    stopped = jnp.any(is_stop, axis=1)
    first_stop = jnp.argmax(is_stop, axis=1)
    lengths = jnp.where(stopped, first_stop + 1, max_new_tokens).astype(jnp.int32)
    scores = jnp.zeros((rows, 0), jnp.float32)
    if score_suffix:
        # Every generated token is in the cache (slots of finished rows are masked out), so the
        # suffix continues each row right after its own last token.
        n = len(score_suffix)
        suffix = jnp.broadcast_to(jnp.asarray(score_suffix, jnp.int32), (rows, n))
        pos = (prompt_lengths + lengths)[:, None] + jnp.arange(n, dtype=jnp.int32)
        logits, _ = forward(params, cfg, suffix, positions=pos, lora=lora, cache=cache)
        logp = jax.nn.log_softmax(logits[:, -1])  # [R, V]
        scores = logp[:, jnp.asarray(score_tokens, jnp.int32)]
    return SampleOutput(
        tokens=tokens,
        lengths=lengths,
        logprobs=logprobs,
        stopped=stopped,
        scores=scores,
        entropy=spread[:, 0],
        varentropy=spread[:, 1],
    )


def prefill_token_count(prompt_lengths: jax.Array, num_samples: int) -> dict[str, int]:
    """Prompt tokens prefilled with shared prefixes, against prefilling every sample's prefix."""
    total = int(jnp.sum(prompt_lengths))
    return {"prefilled": total, "without_sharing": total * num_samples}
