"""Entry points: `attention` (prefill / training, with gradients) and `decode_attention`.

Both validate their inputs (errors name the argument and shape at fault), then dispatch on
`impl` and the backend:

    impl="xla"                        pure-JAX reference (kernels/reference.py), any backend
    impl="pallas", GPU                Triton flash kernels (flash.py / decode.py)
    impl="pallas", TPU                splash attention (splash.py); decode falls back to "xla"
    impl="pallas", interpret=True     the flash / decode kernels in the Pallas interpreter (CPU)
    impl="pallas", CPU, no interpret  ValueError (Pallas cannot compile for the CPU)

Sharding: XLA cannot partition a Pallas call, so under a mesh (`jax.set_mesh`) it would
all-gather q/k/v and compute the whole batch on every device. `attention(impl="pallas")` runs
the kernel in `jax.shard_map` instead (kernels/sharded.py): rows split over `batch_axes`, heads
over `head_axis` where they divide. No mesh or a 1-device mesh: the plain call. `impl="xla"`
and `decode_attention` are left to XLA's partitioner.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels import decode, flash, reference, sharded, splash

_IMPLS = ("xla", "pallas")


def _backend() -> str:
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def _check_common(where, q, k, v, *, softcap, window, scale, mask, impl, interpret):
    if impl not in _IMPLS:
        raise ValueError(f"{where}: impl={impl!r}; expected one of {_IMPLS}")
    if k.ndim != 4:
        raise ValueError(f"{where}: k must be [B, S, K, D], got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"{where}: v shape {v.shape} must equal k shape {k.shape}")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(
            f"{where}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    b, s, kv_heads, d = k.shape
    if q.shape[0] != b or q.shape[-1] != d:
        raise ValueError(
            f"{where}: q shape {q.shape} does not match k shape {k.shape} (batch, head dim)"
        )
    if q.shape[-2] % kv_heads:
        raise ValueError(
            f"{where}: {q.shape[-2]} query heads (q {q.shape}) is not a multiple of "
            f"{kv_heads} kv heads (k {k.shape})"
        )
    if mask is not None:
        if mask.shape != (b, s):
            raise ValueError(f"{where}: mask must be [B, S] = {(b, s)}, got {mask.shape}")
        if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
            raise ValueError(f"{where}: mask must be bool (key validity), got {mask.dtype}")
    is_int = isinstance(window, (int, np.integer)) and not isinstance(window, bool)
    if window is not None and (not is_int or window < 1):
        raise ValueError(f"{where}: window must be a positive int or None, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{where}: softcap must be > 0 or None, got {softcap!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"{where}: scale must be > 0 or None, got {scale!r}")
    if impl == "pallas" and not interpret and _backend() == "cpu":
        raise ValueError(
            f"{where}: impl='pallas' cannot compile for the CPU backend; pass interpret=True "
            "(slow, for tests) or use impl='xla'"
        )


def attention(
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
    impl: str = "xla",
    interpret: bool = False,
    block_sizes: flash.BlockSizes | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
) -> jax.Array:
    """Gemma2 attention: soft-cap before the mask, sliding window, GQA, key mask.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K (query head h reads kv head
    h // (H // K)). With `causal`, query t sits at key position S - T + t (chunked prefill) and
    sees keys j <= that position, and j > position - window when `window` is set (window
    requires causal). mask: optional [B, S] bool key validity (padding is never attended; a row
    with no visible key returns zeros). segment_ids: optional [B, T] int document ids of packed
    rows, self-attention only (T == S): a query sees a key only when their ids are equal, on top
    of causal / window / mask. scale defaults to D ** -0.5; softcap c maps scores s to
    c * tanh(s / c). block_sizes: Pallas tiles (default per backend, see flash.BlockSizes).
    batch_axes / head_axis: mesh axes the Pallas path splits rows / heads over under a mesh
    (axes the mesh lacks are ignored; see kernels/sharded.py). Returns [B, T, H, D] in q's
    dtype. Differentiable (the Pallas path has its own VJP).
    """
    if q.ndim != 4:
        raise ValueError(f"attention: q must be [B, T, H, D], got shape {q.shape}")
    _check_common(
        "attention",
        q,
        k,
        v,
        softcap=softcap,
        window=window,
        scale=scale,
        mask=mask,
        impl=impl,
        interpret=interpret,
    )
    if window is not None and not causal:
        raise ValueError("attention: window is only defined for causal attention (causal=True)")
    if segment_ids is not None:
        b, t, s = q.shape[0], q.shape[1], k.shape[1]
        if t != s:
            raise ValueError(
                f"attention: segment_ids need self-attention (T == S), got q {q.shape} and k "
                f"{k.shape}"
            )
        if segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"attention: segment_ids must be int [B, T] = {(b, t)}, got {segment_ids.dtype} "
                f"{segment_ids.shape}"
            )
    kernel = functools.partial(
        _attention,
        causal=bool(causal),
        softcap=None if softcap is None else float(softcap),
        window=None if window is None else int(window),
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        impl=impl,
        interpret=bool(interpret),
        block_sizes=block_sizes,
    )
    if impl == "xla":  # XLA partitions the reference itself
        return kernel(q, k, v, mask, segment_ids)
    return sharded.shard_attention(
        kernel,
        q,
        k,
        v,
        mask,
        segment_ids,
        batch_axes=tuple(batch_axes),
        head_axis=head_axis,
    )


@functools.partial(
    jax.jit,
    static_argnames=("causal", "softcap", "window", "scale", "impl", "interpret", "block_sizes"),
)
def _attention(
    q, k, v, mask, segment_ids, *, causal, softcap, window, scale, impl, interpret, block_sizes
):
    kw = dict(causal=causal, softcap=softcap, window=window, scale=scale)
    if impl == "xla":
        return reference.attention_reference(q, k, v, mask=mask, segment_ids=segment_ids, **kw)
    backend = "cpu" if interpret else _backend()
    if backend == "tpu":
        return splash.splash_attention(q, k, v, mask, segment_ids=segment_ids, **kw)
    if block_sizes is None:
        block_sizes = flash.default_block_sizes(backend, q.shape[-1])
    return flash.flash_attention(
        q,
        k,
        v,
        mask,
        segment_ids=segment_ids,
        block_sizes=block_sizes,
        interpret=interpret,
        **kw,
    )


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    softcap: float | None = None,
    window: int | None = None,
    scale: float | None = None,
    mask: jax.Array | None = None,
    impl: str = "xla",
    interpret: bool = False,
    block_k: int | None = None,
    num_splits: int | None = None,
) -> jax.Array:
    """One query token per row against a KV cache.

    q: [B, H, D]; k, v: [B, S, K, D] (the cache, H a multiple of K); lengths: [B] (or scalar)
    int, cache slots in use per row: the query is the token in slot lengths - 1 (already
    written) and sees slots j < lengths (and j > lengths - 1 - window). mask: optional [B, S]
    bool slot validity (e.g. left padding). Slot distance is token distance, which holds for
    left-padded caches. block_k / num_splits: Pallas tiling (defaults per backend). Returns
    [B, H, D] in q's dtype. Not differentiable on the Pallas path.
    """
    if q.ndim != 3:
        raise ValueError(f"decode_attention: q must be [B, H, D], got shape {q.shape}")
    _check_common(
        "decode_attention",
        q,
        k,
        v,
        softcap=softcap,
        window=window,
        scale=scale,
        mask=mask,
        impl=impl,
        interpret=interpret,
    )
    lengths = jnp.asarray(lengths)
    if lengths.ndim > 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"decode_attention: lengths must be an int scalar or [B], got {lengths.dtype} "
            f"{lengths.shape}"
        )
    if lengths.ndim == 1 and lengths.shape[0] != q.shape[0]:
        raise ValueError(f"decode_attention: lengths {lengths.shape} must be [B] = [{q.shape[0]}]")
    if block_k is not None and (block_k < 16 or block_k & (block_k - 1)):
        raise ValueError(f"decode_attention: block_k={block_k} must be a power of two >= 16")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"decode_attention: num_splits={num_splits} must be >= 1")
    return _decode_attention(
        q,
        k,
        v,
        jnp.broadcast_to(lengths, (q.shape[0],)),
        mask,
        softcap=None if softcap is None else float(softcap),
        window=None if window is None else int(window),
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        impl=impl,
        interpret=bool(interpret),
        block_k=block_k,
        num_splits=num_splits,
    )


@functools.partial(
    jax.jit,
    static_argnames=("softcap", "window", "scale", "impl", "interpret", "block_k", "num_splits"),
)
def _decode_attention(
    q, k, v, lengths, mask, *, softcap, window, scale, impl, interpret, block_k, num_splits
):
    kw = dict(softcap=softcap, window=window, scale=scale)
    backend = "cpu" if interpret else _backend()
    if impl == "xla" or backend == "tpu":  # no Mosaic decode kernel: XLA's fusion is used on TPU
        return reference.decode_attention_reference(q, k, v, lengths, mask=mask, **kw)
    default_block_k, default_splits = decode.default_decode_blocks(
        backend, q.shape[0] * k.shape[2], k.shape[1]
    )
    return decode.flash_decode(
        q,
        k,
        v,
        lengths,
        mask,
        block_k=block_k or default_block_k,
        num_splits=num_splits or default_splits,
        interpret=interpret,
        **kw,
    )
