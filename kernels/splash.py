"""TPU path: JAX's splash attention (Mosaic), which has soft-cap and local masks, behind our API.

Only used by `kernels.attention(impl="pallas")` on a TPU backend without `interpret`. There is
no TPU in this project's CI: `tests/test_kernels.py` runs this path in the Pallas interpreter
against the reference (forward and gradients) and checks that it lowers for TPU (Mosaic); the
code stays small. Mapping of our semantics onto splash:

* scale: splash has none, so q is multiplied by `scale` first (soft-cap then sees scale * q.k);
* causal + window W: `LocalMask(window_size=(W - 1, 0), offset=S - T)` (j >= p - (W - 1));
  global causal: `CausalMask(offset=S - T)`; non-causal: `FullMask`;
* key mask and padding: segment ids (queries 1, keys 1 where valid, 0 elsewhere);
* rows that see no key: splash leaves them undefined, so they are zeroed here (zero gradient).

Lengths are padded to the block (a multiple of 128) and the head dim to a multiple of 128.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

_LANES = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(length: int, largest: int = 512) -> int:
    return min(largest, _round_up(length, _LANES))


def has_visible_key(valid: jax.Array, q_len: int, *, causal: bool, window: int | None) -> jax.Array:
    """Whether each query row sees at least one valid key. valid [B, S] bool -> [B, T] bool."""
    s = valid.shape[1]
    if not causal:
        return jnp.broadcast_to(jnp.any(valid, axis=1, keepdims=True), (valid.shape[0], q_len))
    counts = jnp.pad(jnp.cumsum(valid.astype(jnp.int32), axis=1), ((0, 0), (1, 0)))  # [B, S+1]
    pos = (s - q_len) + jnp.arange(q_len)  # [T] key-axis position of each query
    hi = jnp.clip(pos + 1, 0, s)
    lo = jnp.zeros_like(hi) if window is None else jnp.clip(pos - window + 1, 0, s)
    return (counts[:, hi] - counts[:, lo]) > 0


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    causal: bool,
    softcap: float | None,
    window: int | None,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as `flash.flash_attention`, through splash attention. [B, T, H, D] out.

    `interpret` runs splash in the Pallas interpreter (tests only).
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    b, t, h, d = q.shape
    s = k.shape[1]
    bq, bk = _block(t), _block(s)
    tp, sp, dp = _round_up(t, bq), _round_up(s, bk), _round_up(d, _LANES)

    if not causal:
        head_mask = sa.FullMask((tp, sp))
    elif window is None:
        head_mask = sa.CausalMask((tp, sp), offset=s - t)
    else:
        head_mask = sa.LocalMask((tp, sp), window_size=(window - 1, 0), offset=s - t)
    kernel = sa.make_splash_mha(
        sa.MultiHeadMask([head_mask] * h),
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=softcap,
        block_sizes=sa.BlockSizes(
            block_q=bq,
            block_kv=bk,
            block_q_dkv=bq,
            block_kv_dkv=bk,
            block_q_dq=bq,
            block_kv_dq=bk,
        ),
        interpret=interpret,
    )

    def heads_first(x, n):  # [B, L, N, D] -> [B, N, Lp, Dp]
        x = jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))
        return x.transpose(0, 2, 1, 3)

    qh = heads_first(q * jnp.asarray(scale, q.dtype), tp)
    kh, vh = heads_first(k, sp), heads_first(v, sp)
    valid = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
    if mask is None and sp == s:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        segments = sa.SegmentIds(
            q=jnp.ones((b, tp), jnp.int32),
            kv=jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, sp - s))),
        )
        out = jax.vmap(kernel)(qh, kh, vh, segments)
    out = out.transpose(0, 2, 1, 3)[:, :t, :, :d]  # [B, T, H, D]
    if mask is not None or t > s:
        ok = has_visible_key(valid, t, causal=causal, window=window)  # [B, T]
        out = jnp.where(ok[:, :, None, None], out, 0)
    return out.astype(q.dtype)
