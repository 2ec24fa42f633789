"""Pallas attention kernels (interpret mode on the CPU) against the pure-JAX reference.

Acceptance: forward relative error <= 1e-5 (float32) / 1e-2 (bfloat16), gradients <= 1e-4
(float32). Relative error is ||x - ref|| / ||ref|| over the whole array.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import BlockSizes, flash, splash
from kernels import decode as decode_lib


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def make_qkv(seed, b, t, s, h, k, d, dtype=jnp.float32):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    return (
        jax.random.normal(kq, (b, t, h, d), dtype),
        jax.random.normal(kk, (b, s, k, d), dtype),
        jax.random.normal(kv, (b, s, k, d), dtype),
        jax.random.normal(kc, (b, t, h, d), jnp.float32),  # output cotangent
    )


def key_mask(kind: str | None, b: int, s: int):
    """None; "left_pad": rows padded on the left by 0, s/3, ...; "+empty": last row all padding."""
    if kind is None:
        return None
    pads = np.array([(i * s) // 3 for i in range(b)])
    if kind == "left_pad+empty":
        pads[-1] = s
    return jnp.arange(s)[None, :] >= jnp.asarray(pads)[:, None]


def value_and_grads(fn, q, k, v, cot):
    """jit(fn) output and jit(grad) of <fn(q, k, v), cot> w.r.t. q, k, v."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    t: int  # queries
    s: int  # keys
    h: int  # query heads
    kv: int  # kv heads
    d: int
    blocks: BlockSizes
    causal: bool = True
    softcap: float | None = None
    window: int | None = None
    mask: str | None = None  # see key_mask


CASES = {
    # groups 1, window smaller than the sequence, soft-cap, T not a multiple of any block
    "g1-window24-cap-uneven": Case(
        2, 100, 100, 2, 2, 32, BlockSizes(32, 32, 16, 32), softcap=5.0, window=24
    ),
    # groups 2, global causal, no cap, left padding and a row with no valid key at all
    "g2-global-mask-empty": Case(
        3, 96, 96, 4, 2, 32, BlockSizes(32, 16, 32, 16), mask="left_pad+empty"
    ),
    # groups 4, chunked prefill (T < S), window larger than the sequence, cap, mask
    "g4-chunk-window200-cap-mask": Case(
        2, 40, 72, 8, 2, 64, BlockSizes(16, 32, 16, 16), softcap=3.0, window=200, mask="left_pad"
    ),
    # non-causal with a key mask
    "g2-noncausal-cap-mask": Case(
        2, 48, 80, 4, 2, 32, BlockSizes(16, 32, 32, 16), causal=False, softcap=2.0, mask="left_pad"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flash_matches_reference_fp32(name):
    c = CASES[name]
    q, k, v, cot = make_qkv(list(CASES).index(name), c.b, c.t, c.s, c.h, c.kv, c.d)
    kw = dict(causal=c.causal, softcap=c.softcap, window=c.window, mask=key_mask(c.mask, c.b, c.s))
    pallas = lambda q, k, v: kernels.attention(
        q, k, v, impl="pallas", interpret=True, block_sizes=c.blocks, **kw
    )
    out, grads = value_and_grads(pallas, q, k, v, cot)
    xla = lambda q, k, v: kernels.attention(q, k, v, impl="xla", **kw)
    out_ref, grads_ref = value_and_grads(xla, q, k, v, cot)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, out_ref) <= 1e-5
    for arg, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert np.all(np.isfinite(g)), f"d{arg} not finite"
        assert rel_err(g, g_ref) <= 1e-4, f"d{arg}"
    if c.mask == "left_pad+empty":  # the all-padding row attends to nothing: exact zeros
        assert not np.any(np.asarray(out[-1])) and not np.any(np.asarray(out_ref[-1]))
        assert not np.any(np.asarray(grads[0][-1]))


def test_flash_bf16():
    b, t, s, h, kh, d = 2, 80, 80, 4, 2, 64
    q, k, v, cot = make_qkv(7, b, t, s, h, kh, d, jnp.bfloat16)
    kw = dict(softcap=5.0, window=32, mask=key_mask("left_pad", b, s))
    out, grads = value_and_grads(
        lambda q, k, v: kernels.attention(
            q, k, v, impl="pallas", interpret=True, block_sizes=BlockSizes(32, 32, 32, 32), **kw
        ),
        q,
        k,
        v,
        cot,
    )
    f32 = lambda x: x.astype(jnp.float32)  # reference on the same (bf16-rounded) values
    out_ref, grads_ref = value_and_grads(
        lambda q, k, v: kernels.attention(q, k, v, **kw), f32(q), f32(k), f32(v), cot
    )
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, out_ref) <= 1e-2
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == jnp.bfloat16
        assert rel_err(g, g_ref) <= 1e-2  # measured ~3e-3, as for the XLA path in bf16


def test_masked_blocks_are_skipped():
    """NaNs planted where causality + window hide whole blocks never reach the checked rows.

    T = S = 128, blocks of 32, window 16: query block 3 (rows 96..127) sees only key blocks 2-3,
    and key block 3 is seen only by query block 3. With NaN in q, k, v at rows 0..63, any visit
    of a hidden block would leak NaN (0 * NaN) into out/dq rows 96+ or dk/dv rows 96+.
    """
    q, k, v, cot = make_qkv(21, 1, 128, 128, 2, 1, 32)
    poison = lambda x: x.at[:, :64].set(jnp.nan)
    blocks = BlockSizes(32, 32, 32, 32)
    fn = lambda q, k, v: kernels.attention(
        q, k, v, softcap=5.0, window=16, impl="pallas", interpret=True, block_sizes=blocks
    )
    out, grads = value_and_grads(fn, poison(q), poison(k), poison(v), cot)
    ref = lambda q, k, v: kernels.attention(q, k, v, softcap=5.0, window=16)
    out_ref, grads_ref = value_and_grads(ref, q, k, v, cot)  # clean inputs
    assert np.isnan(np.asarray(out[:, :64])).any()  # the poison is really there
    for x, x_ref in zip((out, *grads), (out_ref, *grads_ref), strict=True):
        assert np.all(np.isfinite(x[:, 96:]))
        assert rel_err(x[:, 96:], x_ref[:, 96:]) <= 1e-4


@pytest.mark.parametrize(
    "window, softcap, mask_kind, groups, num_splits",
    [(None, None, None, 1, 1), (20, 3.0, "left_pad+empty", 4, 3)],
)
def test_decode_matches_reference(window, softcap, mask_kind, groups, num_splits):
    b, s, kh, d = 4, 150, 2, 32
    q, k, v, _ = make_qkv(11 + groups, b, 1, s, kh * groups, kh, d)
    q = q[:, 0]  # [B, H, D]
    lengths = jnp.array([s, 70, 33, 0])  # full, partial, short, nothing written yet
    kw = dict(softcap=softcap, window=window, mask=key_mask(mask_kind, b, s))
    out = kernels.decode_attention(
        q, k, v, lengths, impl="pallas", interpret=True, block_k=32, num_splits=num_splits, **kw
    )
    out_ref = kernels.decode_attention(q, k, v, lengths, **kw)
    assert out.shape == q.shape
    assert rel_err(out, out_ref) <= 1e-5
    assert not np.any(np.asarray(out[3]))  # length 0: no key visible -> zeros
    # Row 1 (70 slots in use) is ordinary attention of its last token over those 70 keys.
    mask70 = None if kw["mask"] is None else kw["mask"][:, :70]
    last = kernels.attention_reference(
        q[:, None], k[:, :70], v[:, :70], softcap=softcap, window=window, mask=mask70
    )
    assert rel_err(out[1], last[1, 0]) <= 1e-5


def test_decode_of_a_cache_shorter_than_16_slots_with_lengths_past_it():
    """A cache under 16 slots is padded to 16; lengths beyond the real S must still place the
    query at slot S - 1 (the window then covers the right keys)."""
    q, k, v, _ = make_qkv(5, 1, 1, 10, 2, 1, 16)
    q = q[:, 0]
    for length in (10, 12):
        lengths = jnp.asarray([length], jnp.int32)
        out = kernels.decode_attention(q, k, v, lengths, window=4, impl="pallas", interpret=True)
        assert rel_err(out, kernels.decode_attention(q, k, v, lengths, window=4)) <= 1e-5


def test_splash_tpu_path_in_interpreter():
    """The TPU route (JAX splash attention) reproduces the reference, gradients included."""
    b, t, s, h, kh, d = 2, 100, 130, 4, 2, 32
    q, k, v, cot = make_qkv(3, b, t, s, h, kh, d)
    kw = dict(causal=True, softcap=3.0, window=20, scale=d**-0.5)
    mask = key_mask("left_pad", b, s)
    fn = lambda q, k, v: splash.splash_attention(q, k, v, mask, interpret=True, **kw)
    out, grads = value_and_grads(fn, q, k, v, cot)
    ref = lambda q, k, v: kernels.attention_reference(q, k, v, mask=mask, **kw)
    out_ref, grads_ref = value_and_grads(ref, q, k, v, cot)
    assert rel_err(out, out_ref) <= 1e-5
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) <= 1e-4


# ----------------------------------------------------------------------------- segment ids
def packed_rows(b: int, t: int, seed: int = 0):
    """Segment ids [B, T] of ragged documents back to back and a key mask [B, T]: row 0 packs
    documents of random lengths (ids 1, 2, ...) with right padding (id 0, masked); row 1 is left
    padded and its last document has a masked hole; further rows have non-contiguous ids."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    mask = np.ones((b, t), bool)
    for i in range(b):
        at, doc = (0, 1) if i != 1 else (t // 5, 1)
        mask[i, :at] = i != 1
        while at < t - 4:
            n = int(rng.integers(1, t // 3))
            seg[i, at : at + n] = doc if i < 2 else doc % 3 + 7  # rows >= 2: ids 8, 9, 7, 8, ...
            at, doc = at + n, doc + 1
        mask[i, at:] = i >= 2
    mask[1, t // 2] = False  # a hole: nobody sees this key
    return jnp.asarray(seg), jnp.asarray(mask)


SEG_KW = dict(causal=True, softcap=4.0, window=13)


def test_flash_segments_match_reference():
    """Several ragged documents per row, key mask, soft-cap, window, GQA: out, dq, dk, dv."""
    b, t, h, kh, d = 3, 50, 4, 2, 16
    q, k, v, cot = make_qkv(11, b, t, t, h, kh, d)
    seg, mask = packed_rows(b, t)
    kw = dict(mask=mask, segment_ids=seg, **SEG_KW)
    pallas = lambda q, k, v: kernels.attention(
        q, k, v, impl="pallas", interpret=True, block_sizes=BlockSizes(16, 32, 16, 16), **kw
    )
    out, grads = value_and_grads(pallas, q, k, v, cot)
    ref = lambda q, k, v: kernels.attention_reference(q, k, v, **kw)
    out_ref, grads_ref = value_and_grads(ref, q, k, v, cot)
    without = kernels.attention_reference(q, k, v, mask=mask, **SEG_KW)
    assert rel_err(without, out_ref) > 0.1  # the documents do change the answer
    assert rel_err(out, out_ref) <= 1e-5
    for arg, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert np.all(np.isfinite(g)), f"d{arg} not finite"
        assert rel_err(g, g_ref) <= 1e-4, f"d{arg}"
    assert not np.any(np.asarray(out[1, : t // 5]))  # left padding (id 0, masked) sees nothing


def test_flash_segments_without_a_window_skip_blocks_and_match_reference():
    """Short documents in long rows and no window, so segment ids alone cut most blocks: the
    kernels (which skip the blocks `segment_block_ranges` leaves out) still equal the reference,
    values and gradients, with back-to-back ids (rows 0, 1) and ids that repeat (row 2)."""
    b, t, h, kh, d = 3, 96, 2, 1, 16
    q, k, v, cot = make_qkv(12, b, t, t, h, kh, d)
    seg, mask = packed_rows(b, t, seed=3)
    kw = dict(mask=mask, segment_ids=seg, causal=True, softcap=None, window=None)
    blocks = BlockSizes(16, 16, 16, 16)
    kv_ranges, _ = flash.segment_block_ranges(seg, seg, 16, 16)
    visited = int(jnp.sum(kv_ranges[0, 1] - kv_ranges[0, 0]))
    assert visited < (t // 16) * (t // 16 + 1) // 2  # fewer than the causal triangle's blocks
    pallas = lambda q, k, v: kernels.attention(
        q, k, v, impl="pallas", interpret=True, block_sizes=blocks, **kw
    )
    out, grads = value_and_grads(pallas, q, k, v, cot)
    ref = lambda q, k, v: kernels.attention_reference(q, k, v, **kw)
    out_ref, grads_ref = value_and_grads(ref, q, k, v, cot)
    assert rel_err(out, out_ref) <= 1e-5
    for arg, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) <= 1e-4, f"d{arg}"


@pytest.mark.parametrize("bq,bk", [(16, 16), (16, 32), (32, 16)])
def test_segment_block_ranges_leave_out_only_blocks_without_equal_ids(bq, bk):
    """Against every (query block, key block) pair: each pair holding a query and a key of equal
    ids is inside both ranges; with back-to-back ids 1, 2, 3, ... every block inside holds one."""
    rng = np.random.default_rng(0)
    back_to_back = np.repeat(np.arange(1, 129), rng.integers(1, 30, 128))[None, :128]
    packed, _ = packed_rows(2, 128, seed=1)  # padding of id 0 after the documents
    shuffled = rng.integers(0, 4, (2, 128))  # any layout at all
    ids = np.concatenate([back_to_back, np.asarray(packed), shuffled]).astype(np.int32)
    kv_ranges, q_ranges = map(np.asarray, flash.segment_block_ranges(ids, ids, bq, bk))
    nq, nk = 128 // bq, 128 // bk
    assert kv_ranges.shape == (5, 2, nq) and q_ranges.shape == (5, 2, nk)  # powers of two here
    for row in range(5):
        for i in range(nq):
            for j in range(nk):
                pair = np.intersect1d(
                    ids[row, i * bq : (i + 1) * bq], ids[row, j * bk : (j + 1) * bk]
                )
                inside = kv_ranges[row, 0, i] <= j < kv_ranges[row, 1, i]  # forward, dq
                inside_t = q_ranges[row, 0, j] <= i < q_ranges[row, 1, j]  # dkv
                if pair.size:
                    assert inside and inside_t, (row, i, j)
                elif row == 0:  # ids 1, 2, 3, ... back to back: the ranges are tight
                    assert not inside and not inside_t, (row, i, j)


def test_reference_segments_equal_dense_masked_softmax():
    b, t, h, kh, d = 3, 24, 2, 1, 8
    q, k, v, _ = make_qkv(12, b, t, t, h, kh, d)
    seg, mask = packed_rows(b, t, seed=1)
    out = kernels.attention_reference(q, k, v, mask=mask, segment_ids=seg, **SEG_KW)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    seg_, mask_ = np.asarray(seg), np.asarray(mask)
    expected = np.zeros(q.shape)
    for r in range(b):
        for i in range(t):
            keys = [
                j
                for j in range(t)
                if j <= i and j > i - 13 and mask_[r, j] and seg_[r, j] == seg_[r, i]
            ]
            for head in range(h):
                if not keys:
                    continue
                s = k64[r, keys, head // (h // kh)] @ q64[r, i, head] * d**-0.5
                s = 4.0 * np.tanh(s / 4.0)
                p = np.exp(s - s.max())
                expected[r, i, head] = (p / p.sum()) @ v64[r, keys, head // (h // kh)]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_splash_segments_in_interpreter():
    """The TPU route: documents and the key mask share splash's SegmentIds; padding never
    matches a document, even one whose id is the mask's would-be 0 or -1."""
    b, t, h, kh, d = 3, 40, 2, 1, 16
    q, k, v, cot = make_qkv(13, b, t, t, h, kh, d)
    seg, mask = packed_rows(b, t, seed=2)
    seg = seg.at[0].add(-1)  # row 0: ids -1 (padding), 0, 1, ...
    kw = dict(scale=d**-0.5, **SEG_KW)
    fn = lambda q, k, v: splash.splash_attention(q, k, v, mask, seg, interpret=True, **kw)
    out, grads = value_and_grads(fn, q, k, v, cot)
    ref = lambda q, k, v: kernels.attention_reference(q, k, v, mask=mask, segment_ids=seg, **kw)
    out_ref, grads_ref = value_and_grads(ref, q, k, v, cot)
    assert rel_err(out, out_ref) <= 1e-5
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) <= 1e-4


# ----------------------------------------------------------------------------- structure
def _eqns(jaxpr):
    """All equations, descending into sub-jaxprs but not into Pallas kernel bodies."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jex.Jaxpr):
                    yield from _eqns(sub)


def _square_intermediates(fn, args, n):
    """Shapes of intermediate arrays whose two trailing dims are both >= n."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    shapes = [v.aval.shape for e in _eqns(jaxpr) for v in e.outvars if hasattr(v.aval, "shape")]
    kernels_seen = sum(e.primitive.name == "pallas_call" for e in _eqns(jaxpr))
    return [sh for sh in shapes if len(sh) >= 2 and min(sh[-2:]) >= n], kernels_seen


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_no_full_score_matrix(impl):
    t, d = 256, 64
    q, k, v, cot = make_qkv(0, 1, t, t, 2, 1, d)
    blocks = BlockSizes(64, 64, 64, 64)
    attn = lambda q, k, v: kernels.attention(
        q, k, v, softcap=50.0, window=128, impl=impl, interpret=True, block_sizes=blocks
    )
    loss = lambda q, k, v: jnp.sum(attn(q, k, v) * cot)
    fwd_square, fwd_kernels = _square_intermediates(attn, (q, k, v), t)
    bwd_square, bwd_kernels = _square_intermediates(jax.grad(loss, (0, 1, 2)), (q, k, v), t)
    if impl == "pallas":
        assert (fwd_kernels, bwd_kernels) == (1, 3)  # forward; forward + dq + dkv
        assert fwd_square == [] and bwd_square == []
    else:  # the walker does find the [T, T] scores of the materialising path
        assert fwd_square and bwd_square


# Lowering for a GPU on a machine without one: jax >= 0.11 asks the Triton lowering which GPU it
# targets; an abstract mesh names one (jax 0.10 ignores it).
_GPU_TARGET = jax.sharding.AbstractMesh(
    (1,), ("x",),
    abstract_device=jax.sharding.AbstractDevice("NVIDIA H100 80GB HBM3", None, "cuda"),
)  # fmt: skip


def test_gpu_and_tpu_paths_lower():
    """Cross-platform lowering on the CPU: the kernels pass the Triton (fwd, bwd, decode) and
    Mosaic (splash) lowerings, which reject non-power-of-two tiles and unsupported ops."""
    b, t, h, kh, d = 1, 200, 4, 2, 256
    q, k, v, _ = make_qkv(0, b, t, t, h, kh, d, jnp.bfloat16)
    mask = key_mask("left_pad", b, t)
    kw = dict(causal=True, softcap=50.0, window=64, scale=0.0625)

    def lowered(fn, platform):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        gpu_target = platform == "cuda"
        with jax.sharding.use_abstract_mesh(_GPU_TARGET) if gpu_target else nullcontext():
            return grad.trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()

    blocks = flash.default_block_sizes("gpu", d)
    gpu = lambda q, k, v: flash.flash_attention(
        q, k, v, mask, block_sizes=blocks, interpret=False, **kw
    )
    assert lowered(gpu, "cuda").count("xla.gpu.triton") == 3
    tpu = lambda q, k, v: splash.splash_attention(q, k, v, mask, **kw)
    assert "tpu_custom_call" in lowered(tpu, "tpu")
    seg = (jnp.arange(t, dtype=jnp.int32) // 50)[None]  # packed rows: the ids' loads lower too
    gpu_seg = lambda q, k, v: flash.flash_attention(
        q, k, v, mask, segment_ids=seg, block_sizes=blocks, interpret=False, **kw
    )
    assert lowered(gpu_seg, "cuda").count("xla.gpu.triton") == 3
    tpu_seg = lambda q, k, v: splash.splash_attention(q, k, v, mask, segment_ids=seg, **kw)
    assert "tpu_custom_call" in lowered(tpu_seg, "tpu")
    dec = jax.jit(
        lambda q, k, v, n: decode_lib.flash_decode(
            q, k, v, n, mask, softcap=50.0, window=64, scale=0.0625, block_k=64, num_splits=2,
            interpret=False,
        )
    )  # fmt: skip
    args = (q[:, 0], k, v, jnp.array([t]))  # concrete arrays, made outside the abstract mesh
    with jax.sharding.use_abstract_mesh(_GPU_TARGET):
        text = dec.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


# ----------------------------------------------------------------------------- semantics, errors
def test_reference_matches_jax_dot_product_attention():
    """Window / causal / GQA conventions agree with jax.nn.dot_product_attention (no soft-cap)."""
    q, k, v, _ = make_qkv(5, 2, 64, 64, 4, 2, 32)
    for window in (None, 9):
        ours = kernels.attention_reference(q, k, v, window=window)
        theirs = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=None if window is None else (window - 1, 0)
        )
        assert rel_err(ours, theirs) <= 1e-5


def test_reference_softcap_by_hand():
    q, k, v, _ = make_qkv(6, 1, 1, 5, 1, 1, 16)
    s = np.einsum("d,sd->s", np.asarray(q[0, 0, 0], np.float64), np.asarray(k[0, :, 0], np.float64))
    s = 2.0 * np.tanh(0.5 * s / 2.0)  # scale 0.5, cap 2, then the window hides keys 0..2
    p = np.exp(s[3:] - s[3:].max())
    expected = (p / p.sum()) @ np.asarray(v[0, 3:, 0], np.float64)
    out = kernels.attention_reference(q, k, v, softcap=2.0, window=2, scale=0.5)
    np.testing.assert_allclose(np.asarray(out[0, 0, 0]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(impl="pallas"), "interpret=True"),
        (dict(impl="triton"), "impl='triton'"),
        (dict(causal=False, window=8), "window"),
        (dict(mask=jnp.ones((2, 7), bool)), r"mask must be \[B, S\]"),
        (dict(k=jnp.zeros((2, 16, 3, 32)), v=jnp.zeros((2, 16, 3, 32))), "multiple of 3 kv heads"),
        (dict(v=jnp.zeros((2, 16, 2, 32), jnp.bfloat16)), "dtype"),
        (dict(window=0), "window must be a positive int"),
        (dict(segment_ids=jnp.zeros((2, 15), jnp.int32)), r"segment_ids must be int \[B, T\]"),
        (dict(segment_ids=jnp.zeros((2, 16))), "segment_ids must be int"),
        (
            dict(q=jnp.zeros((2, 8, 4, 32)), segment_ids=jnp.zeros((2, 8), jnp.int32)),
            r"segment_ids need self-attention \(T == S\)",
        ),
    ],
)
def test_attention_rejects_bad_input(kwargs, match):
    args = dict(
        q=jnp.zeros((2, 16, 4, 32)), k=jnp.zeros((2, 16, 2, 32)), v=jnp.zeros((2, 16, 2, 32))
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kernels.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_decode_rejects_bad_lengths():
    q, k = jnp.zeros((2, 4, 32)), jnp.zeros((2, 16, 2, 32))
    with pytest.raises(ValueError, match="lengths"):
        kernels.decode_attention(q, k, k, jnp.zeros((3,), jnp.int32))
