"""Decode attention in Pallas: one query token per row against a KV cache (split-K flash decoding).

Semantics are those of `reference.decode_attention_reference`: row b's query is the token in
cache slot `lengths[b] - 1` and sees slots `j < lengths[b]` (and `j > lengths[b] - 1 - W` with a
window W) whose `mask` is set; soft-cap before the mask; empty rows give zeros. No VJP: decoding
is inference only.

A decode step is memory-bound: the work is reading the cache once. So one program serves all G
query heads of a kv head (their [G, D] rows share every K/V tile; G is zero-padded to 16 rows,
the smallest Triton matmul), and the key axis is cut into `num_splits` contiguous slices so that
B * K * num_splits programs keep the GPU busy even at batch 1:

    grid (B, K, num_splits)  -> per split: unnormalised acc [Gp, D], running max, row sum
    combine (plain JAX)      -> rescale every split to the global max and normalise

Inside a split only the key tiles in [lengths - W, lengths) are read. The cache is read in
place, never padded or copied (a ragged last tile is shifted back to end at S); only an odd head
dim or a cache shorter than 16 slots costs a padded copy.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import tiles

_MIN_ROWS = 16  # Triton's smallest matmul tile: the G query heads are padded up to this


@dataclasses.dataclass(frozen=True)
class _Static:
    kv_len: int  # S (the cache is never padded along S: no copy of the cache per step)
    window: int | None
    softcap: float | None
    scale: float
    block_k: int  # keys per inner-loop tile, a power of two <= S
    tiles_per_split: int
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2

    @property
    def num_tiles(self) -> int:
        return pl.cdiv(self.kv_len, self.block_k)


def _decode_kernel(*refs, st: _Static, has_mask: bool):
    # len_ref [] int32; q_ref [Gp, Dp]; k_ref, v_ref [S, Dp]; mask_ref [S] int32;
    # acc_ref [Gp, Dp] f32; m_ref, sum_ref [Gp] f32
    if has_mask:
        len_ref, q_ref, k_ref, v_ref, mask_ref, acc_ref, m_ref, sum_ref = refs
    else:
        len_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, sum_ref = refs
        mask_ref = None
    bk, s = st.block_k, st.kv_len
    length = jnp.minimum(len_ref[()], s)  # slots in use; the query is slot length - 1
    q = q_ref[...]

    def body(j, carry):
        # A ragged last tile is shifted back to end at S (no out-of-bounds read, no padding);
        # the keys it shares with the previous tile are masked out below.
        nominal = j * bk
        start = nominal if s % bk == 0 else jnp.minimum(nominal, s - bk)
        k_idx = (start + jnp.arange(bk, dtype=jnp.int32))[None, :]  # [1, bk]
        ok = k_idx < length
        if s % bk:
            ok &= k_idx >= nominal
        if st.window is not None:
            ok &= k_idx > length - 1 - st.window
        if mask_ref is not None:
            ok &= mask_ref[pl.ds(start, bk)][None, :] != 0
        sc, _ = tiles.capped_scores(q, k_ref[pl.ds(start, bk), :], st.scale, st.softcap)
        return tiles.softmax_step(carry, sc, ok, v_ref[pl.ds(start, bk), :])

    # This split's tiles, cut to the visible slots [length - W, length).
    first = pl.program_id(2) * st.tiles_per_split
    last = jnp.minimum(first + st.tiles_per_split, st.num_tiles)
    hi = jnp.clip(tiles.cdiv(length, bk), first, last)
    lo = first
    if st.window is not None:
        lo = jnp.clip(lax.div(jnp.maximum(length - st.window, 0), bk), first, hi)
    acc, m, row_sum = lax.fori_loop(lo, hi, body, tiles.softmax_init(q.shape[0], q.shape[1]))
    acc_ref[...] = acc
    m_ref[...] = m
    sum_ref[...] = row_sum


def default_decode_blocks(backend: str, batch_kv_heads: int, kv_len: int) -> tuple[int, int]:
    """(block_k, num_splits): about 256 programs on a GPU; few grid steps in interpret mode."""
    if backend == "gpu":
        block_k = 64
        return block_k, int(max(1, min(pl.cdiv(256, batch_kv_heads), pl.cdiv(kv_len, block_k))))
    return 128, 1


def flash_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    mask: jax.Array | None = None,
    *,
    softcap: float | None,
    window: int | None,
    scale: float,
    block_k: int,
    num_splits: int,
    interpret: bool,
) -> jax.Array:
    """q [B, H, D]; k, v [B, S, K, D]; lengths [B] int; mask [B, S] bool | None -> [B, H, D].

    Inputs are assumed validated (see `kernels.decode_attention`).
    """
    chex.assert_rank([q, k, v, lengths], [3, 4, 4, 1])
    chex.assert_equal_shape([k, v])
    chex.assert_equal_shape_prefix([q, k, lengths], 1)
    b, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    gp = max(_MIN_ROWS, pl.next_power_of_2(g))
    dp = max(16, pl.next_power_of_2(d))
    if s < 16 or dp != d:  # tiny caches and odd head dims only: these pay for a padded copy
        lengths = jnp.minimum(lengths, s)  # the real S, not the padded one, caps the query slot
        s_new = max(s, 16)
        pad = ((0, 0), (0, s_new - s), (0, 0), (0, dp - d))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        if s_new != s:
            valid = jnp.arange(s_new) < s
            mask = valid[None, :] if mask is None else jnp.pad(mask, ((0, 0), (0, s_new - s)))
            mask = jnp.broadcast_to(mask, (b, s_new))
        s = s_new
    block_k = min(block_k, 1 << (s.bit_length() - 1))  # a power of two <= S
    num_tiles = pl.cdiv(s, block_k)
    tiles_per_split = pl.cdiv(num_tiles, max(1, min(num_splits, num_tiles)))
    num_splits = pl.cdiv(num_tiles, tiles_per_split)
    st = _Static(
        kv_len=s,
        window=window,
        softcap=None if softcap is None else float(softcap),
        scale=float(scale),
        block_k=block_k,
        tiles_per_split=tiles_per_split,
        interpret=interpret,
        num_warps=4 if dp <= 128 else 8,
    )

    q4 = q.reshape(b, kv_heads, g, d)  # query head h = kh * G + g
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, gp - g), (0, dp - d)))  # [B, K, Gp, Dp]
    args = [lengths.astype(jnp.int32), q4, k, v]
    in_specs = [
        pl.BlockSpec((None,), lambda b_, kh, j: (b_,)),
        pl.BlockSpec((None, None, gp, dp), lambda b_, kh, j: (b_, kh, 0, 0)),
        pl.BlockSpec((None, s, None, dp), lambda b_, kh, j: (b_, 0, kh, 0)),
        pl.BlockSpec((None, s, None, dp), lambda b_, kh, j: (b_, 0, kh, 0)),
    ]
    if mask is not None:
        args.append(mask.astype(jnp.int32))
        in_specs.append(pl.BlockSpec((None, s), lambda b_, kh, j: (b_, 0)))
    row_spec = pl.BlockSpec((None, None, None, gp), lambda b_, kh, j: (b_, kh, j, 0))
    acc, m, row_sum = pl.pallas_call(
        functools.partial(_decode_kernel, st=st, has_mask=mask is not None),
        grid=(b, kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, gp, dp), lambda b_, kh, j: (b_, kh, j, 0, 0)),
            row_spec,
            row_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, gp, dp), jnp.float32),  # acc
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, gp), jnp.float32),  # m
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, gp), jnp.float32),  # row sum
        ],
        compiler_params=None
        if interpret
        else plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
        interpret=interpret,
        name="flash_decode",
    )(*args)

    # Combine the splits: rescale each to the global running max (empty splits have sum 0).
    m_all = jnp.max(m, axis=2, keepdims=True)  # [B, K, 1, Gp]
    w = jnp.exp(m - m_all)  # [B, K, n, Gp]
    sum_all = jnp.sum(row_sum * w, axis=2)  # [B, K, Gp]
    acc_all = jnp.sum(acc * w[..., None], axis=2)  # [B, K, Gp, Dp]
    out = acc_all / jnp.where(sum_all == 0.0, 1.0, sum_all)[..., None]
    return out[:, :, :g, :d].reshape(b, h, d).astype(q.dtype)
