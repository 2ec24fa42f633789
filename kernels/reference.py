"""Pure-JAX attention references: they materialise the scores and run the softmax in float32.

These are the ground truth for the Pallas kernels (`flash.py`, `decode.py`) and the `impl="xla"`
path of `kernels.attention`. They define the semantics every other path must reproduce:

* scores `s = scale * q.k`, then the soft-cap `c * tanh(s / c)`, then the mask (Gemma2 order);
* a query at key-axis position `p` sees key `j` iff `j <= p` (causal) and `j > p - W` (window W)
  and the key is valid; with `T` queries and `S` keys, query `t` sits at `p = S - T + t`;
* grouped-query attention: query head `h` reads kv head `h // (H // K)`;
* segment ids (packed rows, self-attention T == S): a query sees a key only when their ids are
  equal, on top of the above;
* a query that sees no key at all returns zeros (never NaN), with zero gradients.

Shapes: B batch, T queries, S keys, H query heads, K kv heads, G = H // K, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# A finite "minus infinity" for masked scores: exp(_MASKED - m) underflows to 0 without ever
# producing inf - inf = NaN.
MASKED_SCORE = -0.7 * float(np.finfo(np.float32).max)


def visibility(
    q_pos: jax.Array, k_pos: jax.Array, *, causal: bool, window: int | None
) -> jax.Array:
    """Whether a query at position `q_pos` may see a key at `k_pos` (broadcasting, bool)."""
    allowed = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=bool)
    if causal:
        allowed &= k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: jax.Array,
    *,
    scale: float,
    softcap: float | None,
) -> jax.Array:
    """Soft-capped grouped-query attention over an explicit visibility mask.

    q: [B, T, H, D]; k, v: [B, S, K, D]; allowed: [B, T, S] bool. Returns [B, T, H, D] in q's
    dtype. Scores and softmax in float32; rows with no allowed key give zeros.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [B, T, K, G, D]
    s = jnp.einsum(
        "btkgd,bskd->bkgts",
        qg,
        k,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )  # [B, K, G, T, S]
    s = s * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    ok = allowed[:, None, None, :, :]  # [B, 1, 1, T, S]
    s = jnp.where(ok, s, MASKED_SCORE)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))  # [B, K, G, T, 1]
    p = jnp.where(ok, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum(
        "bkgts,bskd->btkgd",
        p.astype(v.dtype),
        v,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )  # [B, T, K, G, D]
    return out.reshape(b, t, h, d).astype(q.dtype)


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    softcap: float | None = None,
    window: int | None = None,
    scale: float | None = None,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Reference for `kernels.attention`. q [B, T, H, D], k/v [B, S, K, D], mask [B, S] bool,
    segment_ids [B, T] int (T == S): document ids of packed rows."""
    t, s = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_pos = (s - t) + jnp.arange(t)[:, None]  # [T, 1] queries aligned to the end of the keys
    allowed = visibility(q_pos, jnp.arange(s)[None, :], causal=causal, window=window)  # [T, S]
    allowed = jnp.broadcast_to(allowed, (q.shape[0], t, s))  # [B, T, S]
    if mask is not None:
        allowed = allowed & mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, T, S]
    return masked_attention(q, k, v, allowed, scale=scale, softcap=softcap)


def decode_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    softcap: float | None = None,
    window: int | None = None,
    scale: float | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Reference for `kernels.decode_attention`: one query token per row against a KV cache.

    q: [B, H, D]; k, v: [B, S, K, D]; lengths: [B] int, cache slots in use (the query is the
    token in slot `lengths - 1`); mask: optional [B, S] bool key validity. Returns [B, H, D].
    """
    s = k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_pos = jnp.minimum(lengths.astype(jnp.int32), s)[:, None, None] - 1  # [B, 1, 1]
    allowed = visibility(q_pos, jnp.arange(s)[None, None, :], causal=True, window=window)
    if mask is not None:
        allowed = allowed & mask.astype(bool)[:, None, :]  # [B, 1, S]
    return masked_attention(q[:, None], k, v, allowed, scale=scale, softcap=softcap)[:, 0]
