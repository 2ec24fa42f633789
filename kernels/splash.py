"""TPU path: JAX's splash attention (Mosaic), which has soft-cap and local masks, behind our API.

Only used by `kernels.attention(impl="pallas")` on a TPU backend without `interpret`. There is
no TPU in this project's CI: `tests/test_kernels.py` runs this path in the Pallas interpreter
against the reference (forward and gradients) and checks that it lowers for TPU (Mosaic); the
code stays small. Mapping of our semantics onto splash:

* scale: splash has none, so q is multiplied by `scale` first (soft-cap then sees scale * q.k);
* causal + window W: `LocalMask(window_size=(W - 1, 0), offset=S - T)` (j >= p - (W - 1));
  global causal: `CausalMask(offset=S - T)`; non-causal: `FullMask`;
* key mask and padding: segment ids (queries 1, keys 1 where valid, 0 elsewhere); with the
  caller's `segment_ids` (packed rows) queries keep their ids and masked / padding keys get an id
  below the row's smallest (see `_splash_segments`);
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


def _splash_segments(valid: jax.Array, segment_ids: jax.Array | None, tp: int, sp: int):
    """splash `SegmentIds` that encode the key mask and the packed rows' documents at once.

    valid [B, S] bool, segment_ids [B, T] int or None (T == S). splash lets query t see key j
    only when q_ids[t] == kv_ids[j]. Without documents: queries 1, valid keys 1, others 0. With
    them: queries keep their ids, valid keys too, and a masked or padding key gets the row's
    smallest id minus 1, which no query of the row has, so it never matches (ids + 1 / 0 would
    collide with a caller's id -1). Only a row holding int32's minimum would wrap around.
    """
    b, s = valid.shape
    if segment_ids is None:
        q_ids = jnp.ones((b, tp), jnp.int32)
        kv_ids = valid.astype(jnp.int32)
        fill = 0
    else:
        q_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - s)))
        never = jnp.min(segment_ids, axis=1, keepdims=True).astype(jnp.int32) - 1  # [B, 1]
        kv_ids = jnp.where(valid, segment_ids.astype(jnp.int32), never)
        fill = never
    kv_ids = jnp.concatenate([kv_ids, jnp.broadcast_to(fill, (b, sp - s)).astype(jnp.int32)], 1)
    return sa.SegmentIds(q=q_ids, kv=kv_ids)


def _has_visible_key_packed(valid, segment_ids, *, causal: bool, window: int | None):
    """`has_visible_key` with documents: [B, T] bool. A fused compare-and-reduce over [T, S]
    (XLA does not materialise it), small next to attention's T * S * H * D."""
    pos = jnp.arange(valid.shape[1])
    allowed = jnp.ones((valid.shape[1],) * 2, bool)
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
        if window is not None:
            allowed &= pos[None, :] > pos[:, None] - window
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return jnp.any(same & valid[:, None, :] & allowed[None], axis=2)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    causal: bool,
    softcap: float | None,
    window: int | None,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as `flash.flash_attention` (segment_ids [B, T] need T == S), through
    splash attention. [B, T, H, D] out.

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

    # Scaled in float32, rounded once: a bf16 scale would be off by 0.2% for Gemma2-27B's
    # 144**-0.5 (bf16(1/12) = 0.0835), a fixed temperature on every logit.
    qh = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype), tp)
    kh, vh = heads_first(k, sp), heads_first(v, sp)
    valid = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
    if mask is None and segment_ids is None and sp == s:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        out = jax.vmap(kernel)(qh, kh, vh, _splash_segments(valid, segment_ids, tp, sp))
    out = out.transpose(0, 2, 1, 3)[:, :t, :, :d]  # [B, T, H, D]
    if segment_ids is not None:
        ok = _has_visible_key_packed(valid, segment_ids, causal=causal, window=window)  # [B, T]
        out = jnp.where(ok[:, :, None, None], out, 0)
    elif mask is not None or t > s:
        ok = has_visible_key(valid, t, causal=causal, window=window)  # [B, T]
        out = jnp.where(ok[:, :, None, None], out, 0)
    return out.astype(q.dtype)
