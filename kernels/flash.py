"""Flash attention for Gemma2 in Pallas: forward and backward (custom_vjp), GPU (Triton) style.

Semantics are those of `reference.attention_reference` (soft-cap before the mask, causal queries
aligned to the end of the keys, sliding window, GQA, key mask, segment ids of packed rows, empty
rows give zeros).

Layout stays `[B, T, H, D]` / `[B, S, K, D]`: no transposes and no repeated K/V. Query head `h`
reads kv head `h // G` through the BlockSpec index map. Three kernels, each with its own grid:

    forward  (B, H, T/bq)   online softmax over the visible key blocks -> o, lse [B, H, T]
    dq       (B, H, T/bq)   recompute p from lse, accumulate dq over the visible key blocks
    dkv      (B, K, S/bk)   loop over the G query heads of this kv head x visible query blocks,
                            so dk and dv are written once per kv head, with no atomics

Blocks that causality or the window mask completely are never visited (the loops run over a
per-block [lo, hi) range). With segment ids (packed rows) that range is cut further to the blocks
whose ids can match: a query block's id interval [min, max] against each key block's
(`segment_block_ranges`, computed outside the kernels and read as two scalars per program), so
a row packed with short documents skips most off-diagonal blocks. The cut is exact for any id
layout (a skipped block holds no pair of equal ids) and tight for documents back to back. All
accumulation is float32; inputs may be float32 or bfloat16.
Lengths that are not multiples of the blocks are padded here and masked in the kernel; the head
dim is zero-padded to a power of two (>= 16), which changes no dot product.

On a GPU the kernels lower through Triton (block shapes are powers of two >= 16, matmul operands
are 2-D). On the CPU they run only with `interpret=True` (the tests).
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


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16). `num_warps`/`num_stages` only matter on a GPU."""

    block_q: int = 64  # forward: query rows per program
    block_k: int = 64  # forward: keys per inner-loop step
    block_q_bwd: int = 32  # backward (dq and dkv kernels): query rows per tile
    block_k_bwd: int = 32  # backward: keys per tile
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"BlockSizes.{name}={size}: must be a power of two >= 16")


def default_block_sizes(backend: str, head_dim: int) -> BlockSizes:
    """Block sizes for `backend` ("gpu" or "cpu" = interpret mode) and a head dim.

    GPU values follow the register budget of an SM (the [bq, D] float32 accumulator and the
    [bq, bk] scores live in registers): smaller tiles as D grows. D > 128 (Gemma2's 256) is the
    winner of `bench/attention.py --sweep` on an H200 (T=8192, forward+backward 10.0 ms against
    18.8 ms for the previous 8-warp guess; bench/RESULTS_attention.md); D <= 128 are untuned
    starting points. Interpret mode only wants few grid steps.
    """
    if backend == "gpu":
        if head_dim <= 64:
            return BlockSizes(128, 64, 64, 64, num_warps=4, num_stages=3)
        if head_dim <= 128:
            return BlockSizes(128, 64, 64, 32, num_warps=8, num_stages=2)
        return BlockSizes(64, 32, 32, 32, num_warps=4, num_stages=3)
    return BlockSizes(128, 128, 128, 128)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: the custom_vjp's non-differentiable arg)."""

    q_len: int  # T before padding
    kv_len: int  # S before padding
    kv_padded: int  # Sp: S rounded up to the key blocks
    groups: int  # G = H // K
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    blocks: BlockSizes
    interpret: bool

    @property
    def offset(self) -> int:
        """Key-axis position of query 0 (queries are aligned to the end of the keys)."""
        return self.kv_len - self.q_len


# ----------------------------------------------------------------------------- shared pieces
def _kv_block_range(q_start, bq: int, bk: int, st: _Static):
    """Key blocks [lo, hi) that query rows [q_start, q_start + bq) can see at all."""
    num_blocks = pl.cdiv(st.kv_len, bk)  # blocks made only of key padding are never visited
    if not st.causal:
        return 0, num_blocks
    last = q_start + (bq - 1) + st.offset  # position of the last query row
    hi = jnp.minimum(tiles.cdiv(jnp.maximum(last + 1, 0), bk), num_blocks)
    lo = 0
    if st.window is not None:
        first = q_start + st.offset
        lo = lax.div(jnp.maximum(first - st.window + 1, 0), bk)
    return lo, hi


def _q_block_range(k_start, bk: int, bq: int, st: _Static):
    """Query blocks [lo, hi) whose rows can see some key in [k_start, k_start + bk)."""
    num_blocks = pl.cdiv(st.q_len, bq)  # blocks made only of query padding are never visited
    if not st.causal:
        return 0, num_blocks
    # Key j is seen by positions [j, j + W - 1]; query t sits at position t + offset.
    lo = lax.div(jnp.maximum(k_start - st.offset, 0), bq)
    hi = num_blocks
    if st.window is not None:
        end = k_start + bk + st.window - 1 - st.offset  # one past the last row that sees a key
        hi = jnp.minimum(tiles.cdiv(jnp.maximum(end, 0), bq), num_blocks)
    return lo, hi


def segment_block_ranges(q_ids, kv_ids, bq: int, bk: int):
    """Block ranges that packed rows' segment ids leave, as two [B, 2, n] int32 arrays.

    q_ids [B, Tp], kv_ids [B, Sp] (Tp, Sp multiples of bq, bk). Returns (kv_ranges [B, 2, nq'],
    q_ranges [B, 2, nk']): for query block i, key blocks [kv_ranges[:, 0, i], kv_ranges[:, 1, i])
    are the first to the last whose id interval overlaps block i's; for key block j, q_ranges
    likewise. Blocks outside hold no query and key of equal ids. The last axis is padded to a
    power of two (Triton block shapes) with empty ranges; a block with no overlap gets [0, 0).
    """
    b = q_ids.shape[0]
    q_blocks = q_ids.reshape(b, -1, bq)
    k_blocks = kv_ids.reshape(b, -1, bk)
    q_min, q_max = q_blocks.min(-1), q_blocks.max(-1)  # [B, nq]
    k_min, k_max = k_blocks.min(-1), k_blocks.max(-1)  # [B, nk]
    overlap = (q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None])

    def first_last(hits):  # hits [B, m, n] -> [B, 2, m']: [first, last + 1) along n
        n = hits.shape[-1]
        any_hit = hits.any(-1)
        lo = jnp.argmax(hits, -1)
        hi = n - jnp.argmax(hits[..., ::-1], -1)
        ranges = jnp.stack([jnp.where(any_hit, lo, 0), jnp.where(any_hit, hi, 0)], 1)
        m = hits.shape[1]
        return jnp.pad(ranges, ((0, 0), (0, 0), (0, pl.next_power_of_2(m) - m))).astype(jnp.int32)

    return first_last(overlap), first_last(overlap.transpose(0, 2, 1))


def _visible(q_pos, k_idx, key_ok, st: _Static):
    """Bool visibility for broadcastable query positions and key indices (either orientation)."""
    ok = None
    if st.causal:
        ok = k_idx <= q_pos
        if st.window is not None:
            ok &= k_idx > q_pos - st.window
    if key_ok is not None:
        ok = key_ok if ok is None else ok & key_ok
    return ok


def _key_ok(k_idx, mask_block, st: _Static):
    """Validity of keys `k_idx` from the padding and the user's mask block (None if all valid)."""
    ok = None
    if st.kv_padded != st.kv_len:
        ok = k_idx < st.kv_len
    if mask_block is not None:
        ok = mask_block != 0 if ok is None else ok & (mask_block != 0)
    return ok


def _split_refs(refs, num_main: int, has_mask: bool, has_seg: bool):
    """Kernel refs laid out as (main inputs, [mask], [q ids, kv ids, block ranges], outputs) ->
    (main inputs, mask ref or None, (q ids ref, kv ids ref, ranges ref) or None, outputs)."""
    ins, i = list(refs[:num_main]), num_main
    mask_ref = refs[i] if has_mask else None
    i += has_mask
    seg_refs = (refs[i], refs[i + 1], refs[i + 2]) if has_seg else None
    return ins, mask_ref, seg_refs, refs[i + 3 * has_seg :]


def _cut(lo, hi, seg_refs, block):
    """[lo, hi) intersected with the segment ids' range of this program's `block` (a no-op
    without segment ids)."""
    if seg_refs is None:
        return lo, hi
    ranges = seg_refs[2]
    return jnp.maximum(lo, ranges[0, block]), jnp.minimum(hi, ranges[1, block])


def _and(a, b):
    """a & b where either may be None (= all True)."""
    return b if a is None else a if b is None else a & b


def _extra_specs(mask, seg, mask_spec, q_seg_spec, kv_seg_spec, ranges=None):
    """(specs, args) of the optional key mask, segment ids and their block ranges [B, 2, n]
    (`segment_block_ranges`), in `_split_refs`'s order."""
    specs, args = [], []
    if mask is not None:
        specs.append(mask_spec)
        args.append(mask)
    if seg is not None:
        n = ranges.shape[-1]
        specs += [q_seg_spec, kv_seg_spec, pl.BlockSpec((None, 2, n), lambda b_, h_, i: (b_, 0, 0))]
        args += [*seg, ranges]
    return specs, args


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, st: _Static, has_mask: bool, has_seg: bool):
    # q_ref [bq, Dp]; k_ref, v_ref [Sp, Dp]; mask_ref [Sp] int32; segment ids: q [bq], kv [Sp];
    # o_ref [bq, Dp]; lse_ref [bq]
    (q_ref, k_ref, v_ref), mask_ref, seg_refs, (o_ref, lse_ref) = _split_refs(
        refs, 3, has_mask, has_seg
    )
    bq, bk = st.blocks.block_q, st.blocks.block_k
    q_start = pl.program_id(2) * bq
    q = q_ref[...]
    q_seg = None if seg_refs is None else seg_refs[0][...][:, None]  # [bq, 1]
    q_pos = (q_start + st.offset + jnp.arange(bq, dtype=jnp.int32))[:, None]  # [bq, 1]

    def body(j, carry):
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]  # [bk, Dp]
        s, _ = tiles.capped_scores(q, k, st.scale, st.softcap)  # [bq, bk]
        k_idx = (k_start + jnp.arange(bk, dtype=jnp.int32))[None, :]  # [1, bk]
        mask_block = None if mask_ref is None else mask_ref[pl.ds(k_start, bk)][None, :]
        key_ok = _key_ok(k_idx, mask_block, st)
        if q_seg is not None:  # [bq, bk]: same document
            key_ok = _and(key_ok, q_seg == seg_refs[1][pl.ds(k_start, bk)][None, :])
        ok = _visible(q_pos, k_idx, key_ok, st)
        return tiles.softmax_step(carry, s, ok, v_ref[pl.ds(k_start, bk), :])

    lo, hi = _cut(*_kv_block_range(q_start, bq, bk, st), seg_refs, pl.program_id(2))
    acc, m, row_sum = lax.fori_loop(lo, hi, body, tiles.softmax_init(bq, q_ref.shape[-1]))
    empty = row_sum == 0.0  # the row saw no key: output zeros, and p = 0 in the backward
    denom = jnp.where(empty, 1.0, row_sum)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, tiles.EMPTY_LSE, m + jnp.log(denom))


def _compiler_params(st: _Static):
    if st.interpret:
        return None
    return plgpu.CompilerParams(num_warps=st.blocks.num_warps, num_stages=st.blocks.num_stages)


def _forward(q, k, v, mask, seg, st: _Static):
    """q [B, Tp, H, Dp], k/v [B, Sp, K, Dp], mask [B, Sp] int32 or None, seg (q ids [B, Tp],
    kv ids [B, Sp]) int32 or None -> o, lse [B, H, Tp]."""
    b, tp, h, dp = q.shape
    sp = k.shape[1]
    bq = st.blocks.block_q
    g = st.groups
    in_specs = [
        pl.BlockSpec((None, bq, None, dp), lambda b_, h_, i: (b_, i, h_, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda b_, h_, i: (b_, 0, h_ // g, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda b_, h_, i: (b_, 0, h_ // g, 0)),
    ]
    ranges = None if seg is None else segment_block_ranges(*seg, bq, st.blocks.block_k)[0]
    specs, args = _extra_specs(
        mask,
        seg,
        pl.BlockSpec((None, sp), lambda b_, h_, i: (b_, 0)),  # mask
        pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),  # q ids
        pl.BlockSpec((None, sp), lambda b_, h_, i: (b_, 0)),  # kv ids
        ranges,  # [B, 2, nq']: key blocks per query block
    )
    in_specs += specs
    args = [q, k, v, *args]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, has_mask=mask is not None, has_seg=seg is not None),
        grid=(b, h, tp // bq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, dp), lambda b_, h_, i: (b_, i, h_, 0)),
            pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
        ],
        compiler_params=_compiler_params(st),
        interpret=st.interpret,
        name="flash_attention_fwd",
    )(*args)


# ----------------------------------------------------------------------------- backward
def _dq_kernel(*refs, st: _Static, has_mask: bool, has_seg: bool):
    # q_ref, do_ref [bq, Dp]; k_ref, v_ref [Sp, Dp]; lse_ref, delta_ref [bq]; mask_ref [Sp];
    # segment ids: q [bq], kv [Sp]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), mask_ref, seg_refs, (dq_ref,) = _split_refs(
        refs, 6, has_mask, has_seg
    )
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    q_start = pl.program_id(2) * bq
    q, do = q_ref[...], do_ref[...]
    q_seg = None if seg_refs is None else seg_refs[0][...][:, None]  # [bq, 1]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1]
    q_pos = (q_start + st.offset + jnp.arange(bq, dtype=jnp.int32))[:, None]

    def body(j, dq):
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s, t = tiles.capped_scores(q, k, st.scale, st.softcap)  # [bq, bk]
        k_idx = (k_start + jnp.arange(bk, dtype=jnp.int32))[None, :]
        mask_block = None if mask_ref is None else mask_ref[pl.ds(k_start, bk)][None, :]
        key_ok = _key_ok(k_idx, mask_block, st)
        if q_seg is not None:
            key_ok = _and(key_ok, q_seg == seg_refs[1][pl.ds(k_start, bk)][None, :])
        ok = _visible(q_pos, k_idx, key_ok, st)
        p = jnp.exp(s - lse)
        if ok is not None:
            p = jnp.where(ok, p, 0.0)
        dp = tiles.dot_nt(do, v)
        ds = p * (dp - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + tiles.dot_nn(ds.astype(k.dtype), k)

    lo, hi = _cut(*_kv_block_range(q_start, bq, bk, st), seg_refs, pl.program_id(2))
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: _Static, has_mask: bool, has_seg: bool):
    # q_ref, do_ref [Tp, G, Dp]; k_ref, v_ref [bk, Dp]; lse_ref, delta_ref [G, Tp]; mask_ref [bk];
    # segment ids: q [Tp], kv [bk]
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), mask_ref, seg_refs, (dk_ref, dv_ref) = (
        _split_refs(refs, 6, has_mask, has_seg)
    )
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    k_start = pl.program_id(2) * bk
    k, v = k_ref[...], v_ref[...]  # [bk, Dp]
    k_idx = (k_start + jnp.arange(bk, dtype=jnp.int32))[:, None]  # [bk, 1]
    mask_block = None if mask_ref is None else mask_ref[...][:, None]
    key_ok = _key_ok(k_idx, mask_block, st)
    kv_seg = None if seg_refs is None else seg_refs[1][...][:, None]  # [bk, 1]
    lo, hi = _cut(*_q_block_range(k_start, bk, bq, st), seg_refs, pl.program_id(2))
    num_q_blocks = jnp.maximum(hi - lo, 0)

    def body(n, carry):  # n enumerates (query head in group, query block)
        dk, dv = carry  # [bk, Dp] float32
        g = lax.div(n, num_q_blocks)
        q_start = (lo + lax.rem(n, num_q_blocks)) * bq
        q = q_ref[pl.ds(q_start, bq), g, :]  # [bq, Dp]
        do = do_ref[pl.ds(q_start, bq), g, :]
        lse = lse_ref[g, pl.ds(q_start, bq)][None, :]  # [1, bq]
        delta = delta_ref[g, pl.ds(q_start, bq)][None, :]
        # Transposed orientation, keys along rows: s_t [bk, bq].
        s_t, t_t = tiles.capped_scores(k, q, st.scale, st.softcap)
        q_pos = (q_start + st.offset + jnp.arange(bq, dtype=jnp.int32))[None, :]  # [1, bq]
        pair_ok = key_ok
        if kv_seg is not None:  # [bk, bq]: same document
            pair_ok = _and(key_ok, kv_seg == seg_refs[0][pl.ds(q_start, bq)][None, :])
        ok = _visible(q_pos, k_idx, pair_ok, st)
        p_t = jnp.exp(s_t - lse)
        if ok is not None:
            p_t = jnp.where(ok, p_t, 0.0)
        dv = dv + tiles.dot_nn(p_t.astype(do.dtype), do)
        dp_t = tiles.dot_nt(v, do)
        ds_t = p_t * (dp_t - delta)
        if t_t is not None:
            ds_t = ds_t * (1.0 - t_t * t_t)
        return dk + tiles.dot_nn(ds_t.astype(q.dtype), q), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, st.groups * num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, mask, seg, o, lse, do, st: _Static):
    """Gradients (dq, dk, dv) of the padded problem; shapes as in `_forward`."""
    b, tp, h, dp = q.shape
    sp, kv_heads = k.shape[1], k.shape[2]
    g = st.groups
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))  # [B,H,Tp]
    params = dict(compiler_params=_compiler_params(st), interpret=st.interpret)
    flags = dict(has_mask=mask is not None, has_seg=seg is not None)
    kv_ranges = q_ranges = None
    if seg is not None:  # key blocks per query block (dq), query blocks per key block (dkv)
        kv_ranges, q_ranges = segment_block_ranges(*seg, bq, bk)

    dq_specs = [
        pl.BlockSpec((None, bq, None, dp), lambda b_, h_, i: (b_, i, h_, 0)),  # q
        pl.BlockSpec((None, sp, None, dp), lambda b_, h_, i: (b_, 0, h_ // g, 0)),  # k
        pl.BlockSpec((None, sp, None, dp), lambda b_, h_, i: (b_, 0, h_ // g, 0)),  # v
        pl.BlockSpec((None, bq, None, dp), lambda b_, h_, i: (b_, i, h_, 0)),  # do
        pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i)),  # lse
        pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i)),  # delta
    ]
    specs, args = _extra_specs(
        mask,
        seg,
        pl.BlockSpec((None, sp), lambda b_, h_, i: (b_, 0)),  # mask
        pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),  # q ids
        pl.BlockSpec((None, sp), lambda b_, h_, i: (b_, 0)),  # kv ids
        kv_ranges,
    )
    dq_specs += specs
    dq_args = [q, k, v, do, lse, delta, *args]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, **flags),
        grid=(b, h, tp // bq),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((None, bq, None, dp), lambda b_, h_, i: (b_, i, h_, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq",
        **params,
    )(*dq_args)

    # Group the query heads by kv head (free reshapes): [B, Tp, K, G, Dp] and [B, K, G, Tp].
    grouped = lambda x: x.reshape(b, tp, kv_heads, g, dp)
    per_group = lambda x: x.reshape(b, kv_heads, g, tp)
    dkv_specs = [
        pl.BlockSpec((None, tp, None, g, dp), lambda b_, kh, j: (b_, 0, kh, 0, 0)),  # q
        pl.BlockSpec((None, bk, None, dp), lambda b_, kh, j: (b_, j, kh, 0)),  # k
        pl.BlockSpec((None, bk, None, dp), lambda b_, kh, j: (b_, j, kh, 0)),  # v
        pl.BlockSpec((None, tp, None, g, dp), lambda b_, kh, j: (b_, 0, kh, 0, 0)),  # do
        pl.BlockSpec((None, None, g, tp), lambda b_, kh, j: (b_, kh, 0, 0)),  # lse
        pl.BlockSpec((None, None, g, tp), lambda b_, kh, j: (b_, kh, 0, 0)),  # delta
    ]
    specs, args = _extra_specs(
        mask,
        seg,
        pl.BlockSpec((None, bk), lambda b_, kh, j: (b_, j)),  # mask
        pl.BlockSpec((None, tp), lambda b_, kh, j: (b_, 0)),  # q ids
        pl.BlockSpec((None, bk), lambda b_, kh, j: (b_, j)),  # kv ids
        q_ranges,
    )
    dkv_specs += specs
    dkv_args = [grouped(q), k, v, grouped(do), per_group(lse), per_group(delta), *args]
    kv_spec = pl.BlockSpec((None, bk, None, dp), lambda b_, kh, j: (b_, j, kh, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, **flags),
        grid=(b, kv_heads, sp // bk),
        in_specs=dkv_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="flash_attention_dkv",
        **params,
    )(*dkv_args)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, mask, seg, st: _Static):
    return _forward(q, k, v, mask, seg, st)[0]


def _flash_fwd(q, k, v, mask, seg, st: _Static):
    o, lse = _forward(q, k, v, mask, seg, st)
    return o, (q, k, v, mask, seg, o, lse)


def _flash_bwd(st: _Static, residuals, do):
    q, k, v, mask, seg, o, lse = residuals
    dq, dk, dv = _backward(q, k, v, mask, seg, o, lse, do, st)
    return dq, dk, dv, None, None if seg is None else (None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _fit(block: int, length: int) -> int:
    """Shrink a block for short sequences (but keep it a power of two >= 16)."""
    return min(block, max(16, pl.next_power_of_2(length)))


def flash_attention(
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
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:
    """Flash attention with a VJP. q [B, T, H, D]; k, v [B, S, K, D]; mask [B, S] bool or None;
    segment_ids [B, T] int (T == S) or None: a query sees only keys of its own id.

    Inputs are assumed validated (see `kernels.attention`). Returns [B, T, H, D] in q's dtype.
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    chex.assert_equal_shape_prefix([q, k], 1)
    _, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    bs = block_sizes
    blocks = dataclasses.replace(
        bs,
        block_q=_fit(bs.block_q, t),
        block_k=_fit(bs.block_k, s),
        block_q_bwd=_fit(bs.block_q_bwd, t),
        block_k_bwd=_fit(bs.block_k_bwd, s),
    )
    tp = _round_up(t, max(blocks.block_q, blocks.block_q_bwd))
    sp = _round_up(s, max(blocks.block_k, blocks.block_k_bwd))
    dp = max(16, pl.next_power_of_2(d))
    st = _Static(
        q_len=t,
        kv_len=s,
        kv_padded=sp,
        groups=h // kv_heads,
        causal=causal,
        window=window,
        softcap=None if softcap is None else float(softcap),
        scale=float(scale),
        blocks=blocks,
        interpret=interpret,
    )
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))
    if mask is not None:
        mask = jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, sp - s)))
    seg = None
    if segment_ids is not None:
        # Padded queries / keys repeat the last id (their outputs are cut, the keys masked), so
        # they widen no block's id interval.
        ids = segment_ids.astype(jnp.int32)
        edge = lambda n: jnp.pad(ids, ((0, 0), (0, n - t)), mode="edge")
        seg = (edge(tp), edge(sp))
    out = _flash(pad(q, tp), pad(k, sp), pad(v, sp), mask, seg, st)
    return out[:, :t, :, :d]
